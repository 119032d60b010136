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

fn check(name: &str, formula: impl Fn(Dims, &chunkc::runtime::io::Tensors) -> (Vec<f64>, Vec<f64>)) {
    let loaded = chunkc::load_rule(&root().join("rules").join(format!("{name}.toml"))).expect("rule loads");
    assert!(loaded.canonical.is_ok(), "{name} has a chunked kernel");
    let mut failures = vec![];
    for (seq_len, seed) in [(1, 1), (37, 2), (130, 3)] {
        let dims = Dims { batch: 2, seq_len, heads: 2, k: 24, v: 40 };
        let inputs = random_inputs(&loaded.rule, &dims, seed);
        let (want_o, want_ht) = formula(dims, &inputs);
        let runs = [(Backend::Recurrent, Schedule::recurrent())]
            .into_iter()
            .chain([16, 32, 64, 128].map(|c| (Backend::Chunked, Schedule::chunked(c))));
        for (backend, schedule) in runs {
            let opts = Options { backend, schedule, ..Options::default() };
            let out = run(&loaded.rule, &inputs, "random inputs", &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            let o: Vec<f64> = out.o().data.iter().map(|&x| x as f64).collect();
            let ht: Vec<f64> = out.get("hT").expect("hT").data.iter().map(|&x| x as f64).collect();
            let (eo, eh) = (rel_rms(&o, &want_o), rel_rms(&ht, &want_ht));
            println!("{name} {} chunk {} T={seq_len}: o {eo:.2e}, hT {eh:.2e}", backend.name(), schedule.chunk);
            if !(eo <= TOLERANCE && eh <= TOLERANCE) {
                failures.push(format!(
                    "{} chunk {} T={seq_len}: o {eo:.2e}, hT {eh:.2e}",
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
