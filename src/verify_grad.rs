//! `verify --grad`: the compiled backward programs against the reference gradient (reverse
//! mode over the f64 interpreter), on random inputs, cotangents `do` and `dhT`, and `h0`;
//! one row per gradient tensor, each held to its budget.

use crate::backend::Backend;
use crate::error::Error;
use crate::grad::{grad, GradOptions, PtxPrecision};
use crate::verify::{precision_of, random_inputs, rel_rms, Plan, Rng};
use chunkc_dsl::ast::{Domain, Rule, Ty};
use chunkc_dsl::reference::Dims;
use chunkc_runtime::tensor::Tensor;

/// One row: one tensor of one run.
#[derive(Clone, Debug)]
pub struct GradRow {
    /// `recurrent`, `chunked`, `ptx-sim` or `cuda`.
    pub label: &'static str,
    /// The backward's kernel.
    pub backend: Backend,
    /// The chunk size (chunked), or tokens between checkpoints (recurrent).
    pub chunk: usize,
    pub seq_len: usize,
    /// `o`, `hT`, `dh0` or `d<input>`.
    pub tensor: String,
    pub err: f64,
    pub tolerance: f64,
    pub pass: bool,
}

/// The f32 budget of a tensor (the training issue's): 1e-5 for the outputs, `dh0` and the
/// gradients of per-token key and value vectors (q, k, v and their kin); 1e-4 for gates,
/// betas, scalars and per-head parameters, whose gradients sum many terms of both signs.
pub fn tolerance(rule: &Rule, tensor: &str) -> f64 {
    let input = tensor.strip_prefix('d').and_then(|n| rule.input(n));
    match input {
        Some(i) if i.per_head || !matches!(i.ty, Ty::VecK | Ty::VecV) => 1e-4,
        Some(i) if !matches!(i.domain, Domain::Any | Domain::UnitNorm) => 1e-4,
        _ => 1e-5,
    }
}

/// Random inputs, `h0`, `do` `[B, T, H, V]` and `dhT` `[B, H, K, V]` (standard normal), and
/// each extra state's `d<name>T`.
pub fn random_grad_inputs(rule: &Rule, dims: &Dims, seed: u64) -> crate::runtime::io::Tensors {
    let mut t = random_inputs(rule, dims, seed);
    let mut rng = Rng::new(seed ^ 0xD0D0);
    let mut normal = |shape: Vec<usize>| {
        let n = shape.iter().product();
        Tensor { shape, data: (0..n).map(|_| rng.normal() as f32).collect() }
    };
    t.insert("do".into(), normal(dims.output_shape()));
    t.insert("dhT".into(), normal(dims.state_shape()));
    for s in &rule.states {
        t.insert(format!("d{}", s.final_name()), normal(vec![dims.batch, dims.heads, s.width(dims.k, dims.v)]));
    }
    t
}

/// Runs every compiled backward of `plan.runs` against the reference gradient at every
/// sequence length: the recurrent one with a checkpoint at every token and at its default
/// interval, the chunked one at every chunk size of `plan.chunks`. The PTX engines run at
/// the input type and PTX schedule of `plan.schedule`, each row held to that precision's
/// budget.
pub fn verify_grad(rule: &Rule, plan: &Plan, mut progress: impl FnMut(&GradRow)) -> Result<Vec<GradRow>, Error> {
    plan.check_ready()?;
    let mut rows = vec![];
    for &(backend, engine) in plan.runs.iter().filter(|(b, _)| *b != Backend::Reference) {
        for t in plan.lens_for(engine) {
            let dims = Dims { batch: plan.batch, seq_len: t, heads: plan.heads, k: plan.k, v: plan.v };
            let inputs = random_grad_inputs(rule, &dims, plan.seed ^ t as u64);
            let reference = grad(rule, &inputs, "random inputs", &GradOptions::default(), false)?;
            let sizes: Vec<usize> = match backend {
                Backend::Chunked => plan.chunks.clone(),
                _ => {
                    let auto = chunkc_codegen::plan::backward::checkpoint_interval(t);
                    if auto == 1 {
                        vec![1]
                    } else {
                        vec![1, auto]
                    }
                }
            };
            let ptx = PtxPrecision::of(&precision_of(engine, &plan.schedule));
            for size in sizes {
                let opts = GradOptions {
                    backend,
                    engine,
                    threads: plan.threads,
                    scale: None,
                    checkpoint: Some(size),
                    chunk: size,
                    bv: plan.schedule.bv.filter(|_| backend == Backend::Chunked),
                    program: if backend == Backend::Chunked { plan.schedule.program } else { Default::default() },
                    ptx,
                };
                let got = grad(rule, &inputs, "random inputs", &opts, false)?;
                for (name, want) in &reference {
                    let err = got.get(name).map_or(f64::INFINITY, |g| rel_rms(&g.data, &want.data));
                    let tolerance = ptx.tolerance(tolerance(rule, name));
                    let row = GradRow {
                        label: engine.label(backend),
                        backend,
                        chunk: size,
                        seq_len: t,
                        tensor: name.clone(),
                        err,
                        tolerance,
                        pass: err <= tolerance,
                    };
                    progress(&row);
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}
