//! The reference gradient (`chunkc_dsl::gradient`, reverse mode over the reference
//! interpreter) against central finite differences of the reference itself, in f64, on tiny
//! shapes: every rule in rules/, and rules that exercise what the built-in ones do not
//! (non-linear state use, division, pow, sqrt, exp2, softplus, silu, l2norm of a value,
//! `sum`, `dot`, `S @ y`, locals, per-head parameters, `head`, output before the update, and
//! the piecewise functions: relu, abs, tanh, min, max, clip, comparisons and `where`).
//!
//! Loss `L = sum(o * do) + sum(hT * dhT)` for random `do`, `dhT`; every input element and
//! every element of `h0` is perturbed by +-1e-5 and the relative error of each tensor's
//! gradient must stay within 1e-6.

use chunkc_dsl::ast::{Domain, Rule};
use chunkc_dsl::gradient::grad;
use chunkc_dsl::reference::{run, Dims};
use std::path::PathBuf;

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// A value of `domain` away from its edges (finite differences must not cross them).
fn draw(rng: &mut Rng, domain: Domain) -> f64 {
    let n = rng.normal();
    match domain {
        Domain::LogGate => -0.05 - 0.5 * (0.5 * n).exp(),
        Domain::Unit => 0.1 + 0.8 * rng.uniform(),
        Domain::Positive => 0.2 + (0.5 * n).exp(),
        Domain::Negative => -0.2 - (0.5 * n).exp(),
        Domain::Any | Domain::UnitNorm => n,
    }
}

const DIMS: Dims = Dims { batch: 2, seq_len: 4, heads: 2, k: 3, v: 2 };
const EPS: f64 = 1e-5;
const TOLERANCE: f64 = 1e-6;

/// The loss for the given inputs (by index) and h0.
fn loss(rule: &Rule, inputs: &[Vec<f64>], h0: &[f64], d_o: &[f64], d_ht: &[f64]) -> f64 {
    let get = |name: &str| rule.inputs.iter().position(|i| i.name == name).map(|i| inputs[i].clone());
    let out = run(rule, DIMS, 0.7, &get, Some(h0)).expect("the reference runs");
    out.o.iter().zip(d_o).map(|(a, b)| a * b).sum::<f64>() + out.ht.iter().zip(d_ht).map(|(a, b)| a * b).sum::<f64>()
}

fn rel(fd: &[f64], an: &[f64]) -> f64 {
    let num: f64 = fd.iter().zip(an).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = an.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Every gradient of `rule` against finite differences; the failures, one line each.
fn check(rule: &Rule, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut inputs: Vec<Vec<f64>> = rule
        .inputs
        .iter()
        .map(|i| {
            let n: usize = DIMS.input_shape(i).iter().product();
            (0..n).map(|_| draw(&mut rng, i.domain)).collect()
        })
        .collect();
    let kv = DIMS.batch * DIMS.heads * DIMS.k * DIMS.v;
    let mut h0: Vec<f64> = (0..kv).map(|_| 0.3 * rng.normal()).collect();
    let d_o: Vec<f64> = (0..DIMS.batch * DIMS.seq_len * DIMS.heads * DIMS.v).map(|_| rng.normal()).collect();
    let d_ht: Vec<f64> = (0..kv).map(|_| rng.normal()).collect();
    let get = |name: &str| rule.inputs.iter().position(|i| i.name == name).map(|i| inputs[i].clone());
    let g = grad(rule, DIMS, 0.7, &get, Some(&h0), &d_o, Some(&d_ht)).expect("the gradient runs");
    let mut failures = vec![];
    for i in 0..inputs.len() {
        let mut fd = vec![0.0; inputs[i].len()];
        for e in 0..inputs[i].len() {
            let x = inputs[i][e];
            inputs[i][e] = x + EPS;
            let up = loss(rule, &inputs, &h0, &d_o, &d_ht);
            inputs[i][e] = x - EPS;
            let down = loss(rule, &inputs, &h0, &d_o, &d_ht);
            inputs[i][e] = x;
            fd[e] = (up - down) / (2.0 * EPS);
        }
        let err = rel(&fd, &g.inputs[i]);
        println!("{} d{}: {err:.2e}", rule.name, rule.inputs[i].name);
        if err.is_nan() || err > TOLERANCE {
            failures.push(format!("{} d{}: {err:.2e}", rule.name, rule.inputs[i].name));
        }
    }
    let mut fd = vec![0.0; kv];
    for e in 0..kv {
        let x = h0[e];
        h0[e] = x + EPS;
        let up = loss(rule, &inputs, &h0, &d_o, &d_ht);
        h0[e] = x - EPS;
        let down = loss(rule, &inputs, &h0, &d_o, &d_ht);
        h0[e] = x;
        fd[e] = (up - down) / (2.0 * EPS);
    }
    let err = rel(&fd, &g.dh0);
    println!("{} dh0: {err:.2e}", rule.name);
    if err.is_nan() || err > TOLERANCE {
        failures.push(format!("{} dh0: {err:.2e}", rule.name));
    }
    failures
}

#[test]
fn every_rule_in_the_library_matches_finite_differences() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 11);
    let mut failures = vec![];
    for (n, path) in paths.iter().enumerate() {
        let rule = chunkc_dsl::load_rule(path).unwrap_or_else(|e| panic!("{e}"));
        failures.extend(check(&rule, 11 + n as u64));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rules that use every construct the library's do not, each one line of the step away from
/// a plain linear recurrence.
const EXTRA: &[(&str, &str, &str)] = &[
    (
        "normalised",
        "S = S + outer(k, v)\no = (S^T @ q) / (1 + dot(k, S @ v) * dot(k, S @ v))",
        "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"",
    ),
    (
        "sigmoid_state",
        "S = sigmoid(S) * exp(g) + outer(k, silu(v))\no = scale * S^T @ q",
        "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\ng = { shape = \"scalar\", domain = \"log_gate\" }",
    ),
    (
        "special_functions",
        "w = exp2(-softplus(a)) * sqrt(p)\nS = w * S + outer(l2norm(k), pow(p, 0.5) * v / (1 + sum(v * v)))\no = S^T @ q + head * u",
        "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\na = \"[K]\"\np = { shape = \"scalar\", domain = \"positive\" }\nu = { shape = \"[V]\", per_head = true }",
    ),
    (
        "read_before_delta",
        "o = S^T @ q + dot(q, k) * v\nS = S - outer(k, beta * (k @ S)) + outer(k, beta * v)",
        "q = \"[K]\"\nk = { shape = \"[K]\", domain = \"unit_norm\" }\nv = \"[V]\"\nbeta = { shape = \"scalar\", domain = \"unit\" }",
    ),
    (
        "piecewise",
        "g = -relu(a) - 0.1 * abs(tanh(c)) - 0.01\nkk = where(k >= 0, k, 0.1 * k)\nS = exp(g) * S + outer(clip(kk, -1.5, 1.5), min(v, 2 * max(v, 0.2)))\ny = S^T @ q\no = y / max(abs(dot(q, k)), 1) + where(y > 0, tanh(y), 0)",
        "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\na = \"[K]\"\nc = \"[K]\"",
    ),
    (
        "matrix_vector_both_ways",
        "y = S @ v\nS = S + outer(y * c, v) - outer(k, y @ S)\no = S^T @ q",
        "q = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\nc = { shape = \"[K]\", per_head = true, domain = \"unit\" }",
    ),
];

#[test]
fn constructs_beyond_the_library_match_finite_differences() {
    let mut failures = vec![];
    for (n, (name, step, inputs)) in EXTRA.iter().enumerate() {
        let text = format!("name = \"{name}\"\nstep = \"\"\"\n{step}\n\"\"\"\n\n[inputs]\n{inputs}\n");
        let rule = chunkc_dsl::parse_rule(&format!("{name}.toml"), &text).unwrap_or_else(|d| panic!("{d}\n{text}"));
        failures.extend(check(&rule, 101 + n as u64));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Without `dhT` the final state's cotangent is zero; without `h0` the run starts from zeros
/// and `dh0` is the gradient at that zero state. A one-token sequence works too.
#[test]
fn missing_cotangents_and_states_are_zero() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules/gated_delta_rule.toml");
    let rule = chunkc_dsl::load_rule(&path).expect("rule");
    let dims = Dims { seq_len: 1, ..DIMS };
    let mut rng = Rng(5);
    let data: Vec<Vec<f64>> = rule
        .inputs
        .iter()
        .map(|i| (0..dims.input_shape(i).iter().product()).map(|_| draw(&mut rng, i.domain)).collect())
        .collect();
    let get = |name: &str| rule.inputs.iter().position(|i| i.name == name).map(|i| data[i].clone());
    let d_o: Vec<f64> = (0..dims.batch * dims.heads * dims.v).map(|_| rng.normal()).collect();
    let a = grad(&rule, dims, 0.5, &get, None, &d_o, None).expect("runs");
    let zeros = vec![0.0; dims.batch * dims.heads * dims.k * dims.v];
    let b = grad(&rule, dims, 0.5, &get, Some(&zeros), &d_o, Some(&zeros)).expect("runs");
    assert_eq!(a.dh0, b.dh0);
    assert_eq!(a.inputs, b.inputs);
    assert!(a.dh0.iter().any(|x| *x != 0.0), "the output reads the state, so h0 matters");
    let short = grad(&rule, dims, 0.5, &get, None, &d_o[1..], None).expect_err("do too short");
    assert!(short.contains("do has"), "{short}");
}
