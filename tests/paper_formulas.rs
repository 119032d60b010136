//! Rule files beyond flash-linear-attention's goldens, each against an independent float64
//! implementation of its paper's formula, written here from the formula (not from the rule,
//! its canonical form or chunkc's reference interpreter): the rule's chunked kernel (every
//! chunk size, T not a multiple of the chunk) and its recurrent kernel must match it within
//! the f32 budget (relative RMS 1e-5) on `o` and `hT`, which start NaN-filled.
//!
//! - `gla_value`, `gla_two_sided`: GLA's general gate (Yang et al. 2024, "Gated Linear
//!   Attention Transformers with Hardware-Efficient Training", section 4: `G_t = alpha_t^T
//!   beta_t`, `S_t = G_t ⊙ S_(t-1) + k_t^T v_t`, `o_t = q_t S_t`; the paper's code fixes
//!   beta = 1, these rules keep it): value side only (alpha = 1), and both sides.
//! - `deltaproduct`: Gated DeltaProduct with n_h = 2 (Siems et al. 2025, "DeltaProduct:
//!   Improving State-Tracking in Linear RNNs via Householder Products"): the transition is a
//!   product of generalised Householder matrices, `S_t = prod_j (I - beta_j k_j k_j^T)
//!   (alpha_t S_(t-1)) + ...`, applied here one step at a time as the paper writes it
//!   (`S <- S - beta_j k_j (k_j^T S) + beta_j k_j v_j^T`), never expanded into low-rank terms.
//! - `mlstm`: xLSTM's matrix memory (Beck et al. 2024, "xLSTM: Extended Long Short-Term
//!   Memory", section 2.3): `C_t = f_t C_(t-1) + i_t v_t k_t^T`, `n_t = f_t n_(t-1) + i_t k_t`,
//!   `h_t = C_t q_t / max(|n_t^T q_t|, 1)` with `k_t` scaled by 1/sqrt(d), `i_t = exp(i~_t)`
//!   and `f_t = sigmoid(f~_t)`; the normaliser `n` is the rule's second state (`nT` is checked
//!   too), and the random inputs reach both sides of the max.

mod common;

use chunkc::backend::{run, Backend, Options};
use chunkc::dsl::reference::Dims;
use chunkc::verify::random_inputs;
use chunkc::Schedule;
use common::root;

const TOLERANCE: f64 = 1e-5;

/// Relative RMS error of `got` against `want`; infinite when `got` has a non-finite value.
fn rel_rms(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// The input `name` in f64.
fn input(t: &chunkc::runtime::io::Tensors, name: &str) -> Vec<f64> {
    t.get(name).unwrap_or_else(|| panic!("input {name}")).data.iter().map(|&x| x as f64).collect()
}

/// `o` `[B, T, H, V]` and `hT` `[B, H, K, V]` of a recurrence from `h0`, token by token in
/// f64: `update(row, S)` takes the K x V state (row-major) through one token (`row` indexes
/// the token's `[B, T, H]` position), then `o = scale * S^T q` with scale 1/sqrt(K).
fn recurrence(
    dims: Dims,
    t: &chunkc::runtime::io::Tensors,
    mut update: impl FnMut(usize, &mut [f64]),
) -> (Vec<f64>, Vec<f64>) {
    let Dims { batch, seq_len, heads, k: dk, v: dv } = dims;
    let (q, h0) = (input(t, "q"), input(t, "h0"));
    let scale = 1.0 / (dk as f64).sqrt();
    let mut o = vec![0.0; batch * seq_len * heads * dv];
    let mut ht = vec![0.0; batch * heads * dk * dv];
    for b in 0..batch {
        for h in 0..heads {
            let mut s: Vec<f64> = h0[(b * heads + h) * dk * dv..][..dk * dv].to_vec();
            for step in 0..seq_len {
                let row = (b * seq_len + step) * heads + h;
                update(row, &mut s);
                let qt = &q[row * dk..][..dk];
                for c in 0..dv {
                    o[row * dv + c] = scale * (0..dk).map(|i| qt[i] * s[i * dv + c]).sum::<f64>();
                }
            }
            ht[(b * heads + h) * dk * dv..][..dk * dv].copy_from_slice(&s);
        }
    }
    (o, ht)
}

/// GLA's recurrence with the outer-product gate `alpha_t^T beta_t` (alpha = 1 where
/// `log_alpha` is None): `S = (alpha beta^T) ⊙ S + k v^T`.
fn gla_outer_gate(
    dims: Dims,
    t: &chunkc::runtime::io::Tensors,
    log_alpha: Option<&str>,
    log_beta: &str,
) -> (Vec<f64>, Vec<f64>) {
    let (dk, dv) = (dims.k, dims.v);
    let (k, v, lb) = (input(t, "k"), input(t, "v"), input(t, log_beta));
    let la = log_alpha.map(|n| input(t, n));
    recurrence(dims, t, |row, s| {
        let (kt, vt, beta) = (&k[row * dk..][..dk], &v[row * dv..][..dv], &lb[row * dv..][..dv]);
        for i in 0..dk {
            let alpha = la.as_ref().map_or(1.0, |la| la[row * dk + i].exp());
            for j in 0..dv {
                s[i * dv + j] = alpha * beta[j].exp() * s[i * dv + j] + kt[i] * vt[j];
            }
        }
    })
}

/// Gated DeltaProduct with `steps` Householder steps per token (inputs `k1, v1, b1, k2, ...`,
/// the scalar log gate `g`): `S = alpha S`, then for each step `S = S - beta k (k^T S) +
/// beta k v^T`.
fn deltaproduct(dims: Dims, t: &chunkc::runtime::io::Tensors, steps: usize) -> (Vec<f64>, Vec<f64>) {
    let (dk, dv) = (dims.k, dims.v);
    let g = input(t, "g");
    let ks: Vec<Vec<f64>> = (1..=steps).map(|j| input(t, &format!("k{j}"))).collect();
    let vs: Vec<Vec<f64>> = (1..=steps).map(|j| input(t, &format!("v{j}"))).collect();
    let bs: Vec<Vec<f64>> = (1..=steps).map(|j| input(t, &format!("b{j}"))).collect();
    recurrence(dims, t, |row, s| {
        let alpha = g[row].exp();
        s.iter_mut().for_each(|x| *x *= alpha);
        for j in 0..steps {
            let (kt, vt, beta) = (&ks[j][row * dk..][..dk], &vs[j][row * dv..][..dv], bs[j][row]);
            let kts: Vec<f64> = (0..dv).map(|c| (0..dk).map(|i| kt[i] * s[i * dv + c]).sum()).collect();
            for i in 0..dk {
                for c in 0..dv {
                    s[i * dv + c] += beta * kt[i] * (vt[c] - kts[c]);
                }
            }
        }
    })
}

/// xLSTM's mLSTM in the paper's orientation (C is V x K, `C v k^T`); returns `o`, `hT` (C
/// transposed into chunkc's K x V layout) and `nT`, and counts the tokens whose
/// normaliser `|n . q|` is below 1 and above it (`sides`).
fn mlstm(dims: Dims, t: &chunkc::runtime::io::Tensors, sides: &std::cell::Cell<(usize, usize)>) -> Formula {
    let Dims { batch, seq_len, heads, k: dk, v: dv } = dims;
    let (q, k, v, fg, ig) = (input(t, "q"), input(t, "k"), input(t, "v"), input(t, "fg"), input(t, "ig"));
    let (h0, n0) = (input(t, "h0"), input(t, "n0"));
    let scale = 1.0 / (dk as f64).sqrt();
    let mut o = vec![0.0; batch * seq_len * heads * dv];
    let mut ht = vec![0.0; batch * heads * dk * dv];
    let mut nt = vec![0.0; batch * heads * dk];
    for b in 0..batch {
        for h in 0..heads {
            let at = b * heads + h;
            // c[j][i]: value row j, key column i.
            let mut c: Vec<Vec<f64>> = (0..dv).map(|j| (0..dk).map(|i| h0[(at * dk + i) * dv + j]).collect()).collect();
            let mut n: Vec<f64> = n0[at * dk..][..dk].to_vec();
            for step in 0..seq_len {
                let row = (b * seq_len + step) * heads + h;
                let f = 1.0 / (1.0 + (-fg[row]).exp());
                let i_gate = ig[row].exp();
                let kt: Vec<f64> = k[row * dk..][..dk].iter().map(|x| x * scale).collect();
                let (vt, qt) = (&v[row * dv..][..dv], &q[row * dk..][..dk]);
                for j in 0..dv {
                    for i in 0..dk {
                        c[j][i] = f * c[j][i] + i_gate * vt[j] * kt[i];
                    }
                }
                for i in 0..dk {
                    n[i] = f * n[i] + i_gate * kt[i];
                }
                let nq: f64 = (0..dk).map(|i| n[i] * qt[i]).sum();
                let (below, above) = sides.get();
                sides.set(if nq.abs() < 1.0 { (below + 1, above) } else { (below, above + 1) });
                let denominator = nq.abs().max(1.0);
                for j in 0..dv {
                    o[row * dv + j] = (0..dk).map(|i| c[j][i] * qt[i]).sum::<f64>() / denominator;
                }
            }
            for i in 0..dk {
                for j in 0..dv {
                    ht[(at * dk + i) * dv + j] = c[j][i];
                }
            }
            nt[at * dk..][..dk].copy_from_slice(&n);
        }
    }
    Formula { o, ht, states: vec![("nT", nt)] }
}

/// What a formula gives: `o`, `hT` and the extra states' final values by tensor name.
struct Formula {
    o: Vec<f64>,
    ht: Vec<f64>,
    states: Vec<(&'static str, Vec<f64>)>,
}

impl From<(Vec<f64>, Vec<f64>)> for Formula {
    fn from((o, ht): (Vec<f64>, Vec<f64>)) -> Formula {
        Formula { o, ht, states: vec![] }
    }
}

fn check<F: Into<Formula>>(name: &str, formula: impl Fn(Dims, &chunkc::runtime::io::Tensors) -> F) {
    let loaded = chunkc::load_rule(&root().join("rules").join(format!("{name}.toml"))).expect("rule loads");
    assert!(loaded.canonical.is_ok(), "{name} has a chunked kernel");
    let mut failures = vec![];
    for (seq_len, seed) in [(1, 1), (37, 2), (130, 3)] {
        let dims = Dims { batch: 2, seq_len, heads: 2, k: 24, v: 40 };
        let inputs = random_inputs(&loaded.rule, &dims, seed);
        let want: Formula = formula(dims, &inputs).into();
        let runs = [(Backend::Recurrent, Schedule::recurrent())]
            .into_iter()
            .chain([16, 32, 64, 128].map(|c| (Backend::Chunked, Schedule::chunked(c))));
        for (backend, schedule) in runs {
            let opts = Options { backend, schedule, ..Options::default() };
            let out = run(&loaded.rule, &inputs, "random inputs", &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            let o: Vec<f64> = out.o().data.iter().map(|&x| x as f64).collect();
            let ht: Vec<f64> = out.get("hT").expect("hT").data.iter().map(|&x| x as f64).collect();
            let (eo, mut eh) = (rel_rms(&o, &want.o), rel_rms(&ht, &want.ht));
            for (state, value) in &want.states {
                let got: Vec<f64> = out.get(state).expect("final state").data.iter().map(|&x| x as f64).collect();
                eh = eh.max(rel_rms(&got, value));
            }
            println!("{name} {} chunk {} T={seq_len}: o {eo:.2e}, states {eh:.2e}", backend.name(), schedule.chunk);
            if !(eo <= TOLERANCE && eh <= TOLERANCE) {
                failures.push(format!(
                    "{} chunk {} T={seq_len}: o {eo:.2e}, states {eh:.2e}",
                    backend.name(),
                    schedule.chunk
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{name} against its paper's formula:\n{}", failures.join("\n"));
}

#[test]
fn gla_value_matches_the_outer_product_gate_formula() {
    check("gla_value", |dims, t| gla_outer_gate(dims, t, None, "gv"));
}

#[test]
fn gla_two_sided_matches_the_outer_product_gate_formula() {
    check("gla_two_sided", |dims, t| gla_outer_gate(dims, t, Some("gk"), "gv"));
}

#[test]
fn deltaproduct_matches_the_householder_product_formula() {
    check("deltaproduct", |dims, t| deltaproduct(dims, t, 2));
}

#[test]
fn mlstm_matches_the_xlstm_formula() {
    let sides = std::cell::Cell::new((0, 0));
    check("mlstm", |dims, t| mlstm(dims, t, &sides));
    let (below, above) = sides.get();
    println!("mlstm tokens with |n . q| below 1: {below}, above: {above}");
    assert!(below > 0 && above > 0, "the inputs reach one side of max(|n . q|, 1) only ({below} below, {above} above)");
}
