//! What the simulator tests of the PTX backend share: the rule library, deterministic random
//! inputs in each input's domain, the relative RMS error, and a simulated launch through the
//! runtime's launch ABI (so the tests bind parameters exactly as `chunkc run` does).

#![allow(dead_code)]

use chunkc_codegen::ptx::PtxProgram;
use chunkc_dsl::ast::{Domain, Rule};
use chunkc_dsl::reference::Dims;
use chunkc_runtime::abi::bind_program;
use chunkc_runtime::program::Sizes;
use std::path::PathBuf;

/// The rule files in `rules/`, sorted.
pub fn rule_paths() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no rules");
    paths
}

/// xorshift64* with Box-Muller normals: deterministic inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// One value in `domain`.
pub fn draw(rng: &mut Rng, domain: Domain) -> f64 {
    let n = rng.normal();
    match domain {
        Domain::LogGate => -chunkc_dsl::ast::softplus(-(n + 2.0)),
        Domain::Unit => chunkc_dsl::ast::sigmoid(n),
        Domain::Positive => (0.5 * n).exp(),
        Domain::Negative => -(0.5 * n).exp(),
        _ => n,
    }
}

/// Random inputs in FLA's layouts (unit-norm rows where the rule asks) and a random h0.
pub fn inputs(rule: &Rule, dims: &Dims, seed: u64) -> Vec<(String, Vec<f32>)> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = vec![];
    for inp in &rule.inputs {
        let n: usize = dims.input_shape(inp).iter().product();
        let mut data: Vec<f32> = (0..n).map(|_| draw(&mut rng, inp.domain) as f32).collect();
        if inp.domain == Domain::UnitNorm {
            for row in data.chunks_mut(inp.width(dims.k, dims.v)) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        out.push((inp.name.clone(), data));
    }
    let n = dims.batch * dims.heads * dims.k * dims.v;
    out.push(("h0".into(), (0..n).map(|_| (0.1 * rng.normal()) as f32).collect()));
    out
}

/// Relative RMS error against the reference rounded to f32 (the tensor a user would compare
/// with); infinite for any NaN/Inf or a length mismatch.
pub fn rel_rms(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let r = r as f32 as f64;
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Runs an emitted program in the simulator through the runtime's launch ABI
/// (`chunkc_runtime::abi::bind_program`: outputs and intermediates NaN-poisoned, each input
/// converted to its tensor's element type); returns (o, hT) or the failure as one line.
pub fn try_simulate(
    p: &PtxProgram,
    dims: &Dims,
    tensors: &[(String, Vec<f32>)],
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let sizes = Sizes { batch: dims.batch, heads: dims.heads, seq_len: dims.seq_len, k: dims.k, v: dims.v };
    let input = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, d)| d.as_slice());
    let name = &p.spec.name;
    let phases: Vec<_> = p.phases.iter().map(|k| (k.ptx.as_str(), &k.meta)).collect();
    let bound = bind_program(&p.spec, &phases, &sizes, input).map_err(|e| format!("{name}: {e}"))?;
    let back = chunkc_runtime::ptxsim::run(&bound.run).map_err(|e| format!("{name}: simulator: {e}"))?;
    let mut out = bound.outputs(back).map_err(|e| format!("{name}: {e}"))?;
    let mut take = |n: &str| out.remove(n).map(|t| t.data).ok_or_else(|| format!("{name}: no output `{n}`"));
    Ok((take("o")?, take("hT")?))
}

/// [`try_simulate`], panicking on a failure.
pub fn simulate(p: &PtxProgram, dims: &Dims, tensors: &[(String, Vec<f32>)]) -> (Vec<f32>, Vec<f32>) {
    try_simulate(p, dims, tensors).unwrap_or_else(|e| panic!("{e}"))
}
