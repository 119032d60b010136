//! Runs the kernels that `build.rs` generated, through the typed module, on random inputs,
//! and compares them with the f64 reference interpreter of the same rule files. Exits
//! non-zero when an output differs by more than f32 tolerance.
//!
//!     cargo run --release -p build_time
//!
//! `build_time --bench` times the linked gated_delta_rule forward instead, at B1 T2048 H8
//! K=V=128 on one thread (`scripts/aot_bench.sh` runs it next to the JIT's `chunkc bench`).

include!(concat!(env!("OUT_DIR"), "/chunkc_kernels.rs"));

use chunkc_dsl::reference::{self, Dims};
use chunkc_runtime::error::RuntimeError;
use chunkc_runtime::tensor::Tensor;
use chunkc_runtime::view::TensorRef;

/// Relative RMS error the f32 kernels may have against the f64 reference.
const TOLERANCE: f64 = 1e-5;

/// A small deterministic generator (xorshift64*), so that the example needs no crate.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }

    fn tensor(&mut self, shape: &[usize], draw: impl Fn(f64) -> f64) -> Tensor {
        let n = shape.iter().product();
        Tensor { shape: shape.to_vec(), data: (0..n).map(|_| draw(self.normal()) as f32).collect() }
    }
}

fn rel_rms(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Unit-norm rows of width `w`.
fn normalise(t: &mut Tensor, w: usize) {
    for row in t.data.chunks_mut(w) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The reference's outputs for `rule_file` on `tensors` (by name), `o` then each final state.
fn reference(rule_file: &str, tensors: &[(&str, &Tensor)], dims: Dims, scale: f64) -> Result<Vec<Vec<f64>>, String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules").join(rule_file);
    let rule = chunkc_dsl::load_rule(&path).map_err(|d| d.to_string())?;
    let get =
        |name: &str| tensors.iter().find(|(n, _)| *n == name).map(|(_, t)| t.data.iter().map(|&x| x as f64).collect());
    let h0: Option<Vec<f64>> = get("h0");
    let out = reference::run(&rule, dims, scale, &get, h0.as_deref())?;
    Ok([vec![out.o, out.ht], out.extra].concat())
}

fn check(name: &str, got: &[&Tensor], want: &[Vec<f64>]) -> Result<f64, String> {
    let mut worst: f64 = 0.0;
    for (g, w) in got.iter().zip(want) {
        if g.count_non_finite() > 0 {
            return Err(format!("{name}: the kernels left {} elements unwritten or non-finite", g.count_non_finite()));
        }
        worst = worst.max(rel_rms(&g.data, w));
    }
    println!(
        "{name:<18} B2 T50 H{} K{} V{}: worst rel. RMS error {worst:.1e} against the f64 reference",
        gated_delta_rule::HEADS,
        gated_delta_rule::K,
        gated_delta_rule::V
    );
    if worst > TOLERANCE {
        return Err(format!("{name}: error {worst:.2e} is over {TOLERANCE:.0e}"));
    }
    Ok(worst)
}

fn view(x: &Tensor) -> Result<TensorRef<'_>, RuntimeError> {
    TensorRef::f32(&x.data, &x.shape)
}

/// Gated DeltaNet's per-token inputs, drawn as `chunkc verify` draws them: unit-norm keys,
/// log gates, betas in (0, 1).
struct GdnInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
}

impl GdnInputs {
    fn draw(rng: &mut Rng, [b, t, h, k, v]: [usize; 5]) -> GdnInputs {
        let q = rng.tensor(&[b, t, h, k], |x| x);
        let mut kk = rng.tensor(&[b, t, h, k], |x| x);
        normalise(&mut kk, k);
        let vv = rng.tensor(&[b, t, h, v], |x| x);
        let g = rng.tensor(&[b, t, h], |x| -(1.0 + (-(x + 2.0)).exp()).ln());
        let beta = rng.tensor(&[b, t, h], |x| 1.0 / (1.0 + (-x).exp()));
        GdnInputs { q, k: kk, v: vv, g, beta }
    }

    /// Views of q, k, v, g and beta, in the rule's order.
    fn views(&self) -> Result<[TensorRef<'_>; 5], String> {
        let e = |e: RuntimeError| e.to_string();
        Ok([
            view(&self.q).map_err(e)?,
            view(&self.k).map_err(e)?,
            view(&self.v).map_err(e)?,
            view(&self.g).map_err(e)?,
            view(&self.beta).map_err(e)?,
        ])
    }
}

fn run() -> Result<(), String> {
    let (b, t, h, k, v) = (2, 50, gated_delta_rule::HEADS, gated_delta_rule::K, gated_delta_rule::V);
    let dims = Dims { batch: b, seq_len: t, heads: h, k, v };
    let mut rng = Rng(0x5eed);
    let err = |e: RuntimeError| e.to_string();

    // Gated DeltaNet, from a random initial state.
    let gdn = GdnInputs::draw(&mut rng, [b, t, h, k, v]);
    let h0 = rng.tensor(&[b, h, k, v], |x| 0.1 * x);
    let h0_view = view(&h0).map_err(err)?;
    let [q, kk, vv, g, beta] = gdn.views()?;
    let out = gated_delta_rule::forward(&q, &kk, &vv, &g, &beta, Some(&h0_view)).map_err(err)?;
    let GdnInputs { q: q_t, k: k_t, v: v_t, g: g_t, beta: beta_t } = &gdn;
    let inputs = [("q", q_t), ("k", k_t), ("v", v_t), ("g", g_t), ("beta", beta_t), ("h0", &h0)];
    let want = reference("gated_delta_rule.toml", &inputs, dims, gated_delta_rule::SCALE)?;
    check("gated_delta_rule", &[&out.o, &out.ht], &want)?;

    // The same rule's embedded sm_90 PTX, run in the PTX simulator (on a GPU machine,
    // `Device::Cuda` runs it on the device).
    let started = std::time::Instant::now();
    let device = gated_delta_rule::Device::Simulator;
    let on_sim = gated_delta_rule::forward_sm_90(device, &q, &kk, &vv, &g, &beta, Some(&h0_view)).map_err(err)?;
    println!(
        "gated_delta_rule's sm_90 PTX ({} phase(s)) in the PTX simulator, {:.1} s:",
        gated_delta_rule::PTX_SM_90.len(),
        started.elapsed().as_secs_f64()
    );
    check("  sm_90 simulated", &[&on_sim.o, &on_sim.ht], &want)?;

    // A wrong shape is an error that names the tensor, not a crash.
    let short = Tensor::zeros(vec![b, t, h, k - 1]);
    let short_view = view(&short).map_err(err)?;
    match gated_delta_rule::forward(&q, &short_view, &vv, &g, &beta, None) {
        Err(e) => println!("a k of shape {:?} is refused: {e}", short.shape),
        Ok(_) => return Err("a k of the wrong shape was accepted".into()),
    }

    // mLSTM: a matrix memory and its normaliser state `n`, from zeros.
    let ig = rng.tensor(&[b, t, h], |x| 0.5 * x);
    let fg = rng.tensor(&[b, t, h], |x| x + 2.0);
    let (ig_view, fg_view) = (view(&ig).map_err(err)?, view(&fg).map_err(err)?);
    let out = mlstm::forward(&q, &kk, &vv, &fg_view, &ig_view, None, None).map_err(err)?;
    let inputs = [("q", q_t), ("k", k_t), ("v", v_t), ("ig", &ig), ("fg", &fg)];
    let want = reference("mlstm.toml", &inputs, dims, mlstm::SCALE)?;
    check("mlstm", &[&out.o, &out.ht, &out.n_t], &want)?;
    Ok(())
}

/// The median and best of 10 timed runs (after one warm-up) of the linked forward.
fn bench() -> Result<(), String> {
    use gated_delta_rule_k128 as rule;
    let (b, t, h, k, v) = (1, 2048, rule::HEADS, rule::K, rule::V);
    let mut rng = Rng(7);
    let err = |e: RuntimeError| e.to_string();
    let gdn = GdnInputs::draw(&mut rng, [b, t, h, k, v]);
    let [q, kk, vv, g, beta] = gdn.views()?;
    let mut times = vec![];
    for run in 0..11 {
        let start = std::time::Instant::now();
        let out = rule::forward_on(1, &q, &kk, &vv, &g, &beta, None).map_err(err)?;
        if run > 0 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        if out.o.count_non_finite() > 0 {
            return Err("the benchmark's output has non-finite elements".into());
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "linked gated_delta_rule B1 T2048 H8 K=V=128 chunk 16, 1 thread: median {:.2} ms, best {:.2} ms ({} runs)",
        times[times.len() / 2],
        times[0],
        times.len()
    );
    Ok(())
}

fn main() {
    let result = if std::env::args().any(|a| a == "--bench") { bench() } else { run() };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
