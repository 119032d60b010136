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

fn run() -> Result<(), String> {
    let (b, t, h, k, v) = (2, 50, gated_delta_rule::HEADS, gated_delta_rule::K, gated_delta_rule::V);
    let dims = Dims { batch: b, seq_len: t, heads: h, k, v };
    let mut rng = Rng(0x5eed);
    let err = |e: RuntimeError| e.to_string();

    // Gated DeltaNet, from a random initial state.
    let q = rng.tensor(&[b, t, h, k], |x| x);
    let mut kk = rng.tensor(&[b, t, h, k], |x| x);
    normalise(&mut kk, k);
    let vv = rng.tensor(&[b, t, h, v], |x| x);
    let g = rng.tensor(&[b, t, h], |x| -(1.0 + (-(x + 2.0)).exp()).ln());
    let beta = rng.tensor(&[b, t, h], |x| 1.0 / (1.0 + (-x).exp()));
    let h0 = rng.tensor(&[b, h, k, v], |x| 0.1 * x);
    let out = gated_delta_rule::forward(
        &view(&q).map_err(err)?,
        &view(&kk).map_err(err)?,
        &view(&vv).map_err(err)?,
        &view(&g).map_err(err)?,
        &view(&beta).map_err(err)?,
        Some(&view(&h0).map_err(err)?),
    )
    .map_err(err)?;
    let inputs = [("q", &q), ("k", &kk), ("v", &vv), ("g", &g), ("beta", &beta), ("h0", &h0)];
    let want = reference("gated_delta_rule.toml", &inputs, dims, gated_delta_rule::SCALE)?;
    check("gated_delta_rule", &[&out.o, &out.ht], &want)?;

    // mLSTM: a matrix memory and its normaliser state `n`, from zeros.
    let ig = rng.tensor(&[b, t, h], |x| 0.5 * x);
    let fg = rng.tensor(&[b, t, h], |x| x + 2.0);
    let out = mlstm::forward(
        &view(&q).map_err(err)?,
        &view(&kk).map_err(err)?,
        &view(&vv).map_err(err)?,
        &view(&fg).map_err(err)?,
        &view(&ig).map_err(err)?,
        None,
        None,
    )
    .map_err(err)?;
    let inputs = [("q", &q), ("k", &kk), ("v", &vv), ("ig", &ig), ("fg", &fg)];
    let want = reference("mlstm.toml", &inputs, dims, mlstm::SCALE)?;
    check("mlstm", &[&out.o, &out.ht, &out.n_t], &want)?;

    // A wrong shape is an error that names the tensor, not a crash.
    let short = Tensor::zeros(vec![b, t, h, k - 1]);
    let refused = gated_delta_rule::forward(
        &view(&q).map_err(err)?,
        &view(&short).map_err(err)?,
        &view(&vv).map_err(err)?,
        &view(&g).map_err(err)?,
        &view(&beta).map_err(err)?,
        None,
    );
    match refused {
        Err(e) => println!("a k of shape {:?} is refused: {e}", short.shape),
        Ok(_) => return Err("a k of the wrong shape was accepted".into()),
    }
    // The same rule's embedded sm_90 PTX, run in the PTX simulator (on a GPU machine,
    // `Device::Cuda` runs it on the device).
    let start = std::time::Instant::now();
    let on_sim = gated_delta_rule::forward_sm_90(
        gated_delta_rule::Device::Simulator,
        &view(&q).map_err(err)?,
        &view(&kk).map_err(err)?,
        &view(&vv).map_err(err)?,
        &view(&g).map_err(err)?,
        &view(&beta).map_err(err)?,
        Some(&view(&h0).map_err(err)?),
    )
    .map_err(err)?;
    let inputs = [("q", &q), ("k", &kk), ("v", &vv), ("g", &g), ("beta", &beta), ("h0", &h0)];
    let want = reference("gated_delta_rule.toml", &inputs, dims, gated_delta_rule::SCALE)?;
    println!(
        "gated_delta_rule's sm_90 PTX ({} phase(s)) in the PTX simulator, {:.1} s:",
        gated_delta_rule::PTX_SM_90.len(),
        start.elapsed().as_secs_f64()
    );
    check("  sm_90 simulated", &[&on_sim.o, &on_sim.ht], &want)?;
    Ok(())
}

/// The median and best of 10 timed runs (after one warm-up) of the linked forward.
fn bench() -> Result<(), String> {
    use gated_delta_rule_k128 as rule;
    let (b, t, h, k, v) = (1, 2048, rule::HEADS, rule::K, rule::V);
    let mut rng = Rng(7);
    let err = |e: RuntimeError| e.to_string();
    let q = rng.tensor(&[b, t, h, k], |x| x);
    let mut kk = rng.tensor(&[b, t, h, k], |x| x);
    normalise(&mut kk, k);
    let vv = rng.tensor(&[b, t, h, v], |x| x);
    let g = rng.tensor(&[b, t, h], |x| -(1.0 + (-(x + 2.0)).exp()).ln());
    let beta = rng.tensor(&[b, t, h], |x| 1.0 / (1.0 + (-x).exp()));
    let (q, kk, vv, g, beta) = (view(&q), view(&kk), view(&vv), view(&g), view(&beta));
    let (q, kk, vv, g, beta) =
        (q.map_err(err)?, kk.map_err(err)?, vv.map_err(err)?, g.map_err(err)?, beta.map_err(err)?);
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
