//! `chunkc grad`: the gradient of the loss `L = sum(o * do) + sum(hT * dhT)` (plus
//! `sum(<name>T * d<name>T)` for each extra state) with respect to every input of a rule, `h0`
//! and each extra state's `<name>0`, from tensors by name.
//!
//! Backends: the f64 reference differentiated in reverse mode (`chunkc_dsl::gradient`, the
//! truth the compiled backward is held to), and the compiled recurrent backward program
//! (`plan::backward`: checkpointed reverse mode through the token step, any rule), run as
//! native code, in the tile-IR interpreter or as PTX.

use crate::backend::{self, shape_of, Backend, CpuRunner, Engine};
use crate::error::Error;
use crate::gpu;
use crate::problem::{check_known_tensors, infer_dims};
use chunkc_codegen::ir::ElemType;
use chunkc_codegen::plan::backward;
use chunkc_codegen::program::Program;
use chunkc_codegen::schedule::{ProgramShape, PtxSchedule, Schedule, DEFAULT_TIME_BLOCK};
use chunkc_dsl::ast::{Rule, Ty};
use chunkc_dsl::canon::canonicalize;
use chunkc_dsl::gradient;
use chunkc_dsl::reference::Dims;
use chunkc_runtime::error::{expect_shape, RuntimeError};
use chunkc_runtime::exec::Order;
use chunkc_runtime::io::Tensors;
use chunkc_runtime::tensor::Tensor;
use std::collections::BTreeMap;

/// The tensors `chunkc grad` takes besides the rule's inputs (the rule checker keeps inputs
/// from taking these names).
const STATE_AND_COTANGENTS: [&str; 3] = ["h0", "do", "dhT"];

/// How the gradient is computed.
#[derive(Clone, Copy, Debug)]
pub struct GradOptions {
    /// The reference, or the recurrent or chunked backward program.
    pub backend: Backend,
    /// How a compiled program runs (native code, the interpreter, PTX).
    pub engine: Engine,
    /// Worker threads for native code; 0 means all.
    pub threads: usize,
    /// `scale`; None means 1/sqrt(K).
    pub scale: Option<f64>,
    /// Tokens between the stored states: the recurrent backward's checkpoints (None: chosen
    /// from T), or the chunked backward's stored chunk boundaries (a multiple of the chunk;
    /// None: every chunk's, the states in between recomputed otherwise).
    pub checkpoint: Option<usize>,
    /// The chunked backward's chunk size.
    pub chunk: usize,
    /// The chunked backward's columns of V per grid point (None: the whole V); the gradients
    /// shared by the columns are summed over the V-tiles here.
    pub bv: Option<usize>,
    /// The chunked backward's program: fused (the forward and one reverse pass, each
    /// sequential) or split (the split forward, a sequential pass carrying the state's
    /// adjoint only, then a chunk-parallel pass for every gradient: FLA's decomposition).
    pub program: ProgramShape,
    /// The input type and the PTX knobs (dot precision, warps) of the PTX engines; the CPU
    /// runs f32 inputs and f32 dots.
    pub ptx: PtxPrecision,
}

/// What a PTX engine reads and how it multiplies: the per-token inputs' element type (the
/// host rounds the f32 tensors to it) and the PTX schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PtxPrecision {
    pub input: ElemType,
    pub schedule: PtxSchedule,
}

impl PtxPrecision {
    /// True when it asks for no more than f32 inputs and the default schedule.
    pub fn is_default(&self) -> bool {
        *self == PtxPrecision::default()
    }

    /// The input type and PTX knobs of `schedule`.
    pub fn of(schedule: &Schedule) -> PtxPrecision {
        PtxPrecision { input: schedule.input, schedule: schedule.ptx }
    }

    /// The relative RMS budget of a gradient held to `f32_budget` in f32: at least the
    /// precision's own ([`Schedule::tolerance`]).
    pub fn tolerance(&self, f32_budget: f64) -> f64 {
        let schedule = Schedule::default().with_input(self.input).with_ptx(self.schedule);
        f32_budget.max(schedule.tolerance())
    }
}

impl Default for GradOptions {
    fn default() -> GradOptions {
        GradOptions {
            backend: Backend::Reference,
            engine: Engine::Jit,
            threads: 0,
            scale: None,
            checkpoint: None,
            chunk: 64,
            bv: None,
            program: ProgramShape::Fused,
            ptx: PtxPrecision::default(),
        }
    }
}

/// Runs the rule forward and backward on `tensors` (the rule's inputs, optional `h0`, the
/// required `do` and optional `dhT`); returns `o`, `hT`, `d<input>` for every input (the
/// input's shape; a per-head parameter's summed over batch and time) and `dh0` when `h0` was
/// given. `source` names where the tensors came from, for messages. A tensor the rule does
/// not take is an error naming the ones it does, unless `allow_extra`.
pub fn grad(
    rule: &Rule,
    tensors: &Tensors,
    source: &str,
    opts: &GradOptions,
    allow_extra: bool,
) -> Result<BTreeMap<String, Tensor>, Error> {
    check_known_tensors(rule, tensors, source, "grad", &STATE_AND_COTANGENTS, allow_extra)?;
    let (tensors, groups) = crate::heads::expand_tensors(rule, tensors)?;
    let tensors = &*tensors;
    let dims = infer_dims(rule, tensors, source)?;
    let d_o = tensors.get("do").ok_or_else(|| {
        Error::Runtime(RuntimeError::MissingTensor {
            name: "do".into(),
            path: source.to_string(),
            available: tensors.keys().cloned().collect(),
        })
    })?;
    expect_shape("do", d_o, &dims.output_shape(), "[B, T, H, V]")?;
    if let Some(d) = tensors.get("dhT") {
        expect_shape("dhT", d, &dims.state_shape(), "[B, H, K, V]")?;
    }
    let mut out = match opts.backend {
        Backend::Reference => reference(rule, tensors, dims, opts.scale, false)?,
        Backend::Recurrent | Backend::Chunked => compiled(rule, tensors, dims, opts)?,
    };
    drop_initial_gradients(rule, &|n| tensors.contains_key(n), &mut out);
    crate::heads::reduce_gradients(&groups, &mut out)?;
    Ok(out)
}

/// Drops the gradient of each initial state the caller did not give (`dh0` without `h0`,
/// `d<name>0` without `<name>0`): the run started from zeros of no one's choosing.
pub(crate) fn drop_initial_gradients(rule: &Rule, given: &dyn Fn(&str) -> bool, out: &mut BTreeMap<String, Tensor>) {
    if !given("h0") {
        out.remove("dh0");
    }
    for s in &rule.states {
        if !given(&s.initial_name()) {
            out.remove(&format!("d{}", s.initial_name()));
        }
    }
}

/// The reference gradient with the forward computed in rounded-to-f32 arithmetic
/// ([`gradient::Arithmetic::F32Forward`]): its distance from the exact one is the part of a
/// compiled backward's error that f32 alone accounts for. The tensors as for [`grad`].
pub fn reference_f32_forward(
    rule: &Rule,
    tensors: &Tensors,
    source: &str,
    scale: Option<f64>,
) -> Result<BTreeMap<String, Tensor>, Error> {
    let dims = infer_dims(rule, tensors, source)?;
    let mut out = reference(rule, tensors, dims, scale, true)?;
    drop_initial_gradients(rule, &|n| tensors.contains_key(n), &mut out);
    Ok(out)
}

fn reference(
    rule: &Rule,
    tensors: &Tensors,
    dims: Dims,
    scale: Option<f64>,
    round_to_f32: bool,
) -> Result<BTreeMap<String, Tensor>, Error> {
    let f64s = |t: &Tensor| t.data.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let h0 = tensors.get("h0").map(f64s);
    let d_o = tensors.get("do").map(f64s).unwrap_or_default();
    let d_ht = tensors.get("dhT").map(f64s);
    let scale = scale.unwrap_or(1.0 / (dims.k as f64).sqrt());
    let arithmetic = if round_to_f32 { gradient::Arithmetic::F32Forward } else { gradient::Arithmetic::F64 };
    let input = |name: &str| tensors.get(name).map(f64s);
    let g = gradient::grad_in(arithmetic, rule, dims, scale, &input, h0.as_deref(), &d_o, d_ht.as_deref())
        .map_err(Error::Internal)?;
    let f32s = |x: Vec<f64>| x.into_iter().map(|y| y as f32).collect::<Vec<f32>>();
    let mut out = BTreeMap::new();
    out.insert("o".to_string(), Tensor::new(dims.output_shape(), f32s(g.outputs.o))?);
    out.insert("hT".to_string(), Tensor::new(dims.state_shape(), f32s(g.outputs.ht))?);
    for (inp, d) in rule.inputs.iter().zip(g.inputs) {
        out.insert(format!("d{}", inp.name), Tensor::new(dims.input_shape(inp), f32s(d))?);
    }
    out.insert("dh0".to_string(), Tensor::new(dims.state_shape(), f32s(g.dh0))?);
    for ((s, x), d) in rule.states.iter().zip(g.outputs.extra).zip(g.d_extra0) {
        let shape = vec![dims.batch, dims.heads, s.width(dims.k, dims.v)];
        out.insert(s.final_name(), Tensor::new(shape.clone(), f32s(x))?);
        out.insert(format!("d{}", s.initial_name()), Tensor::new(shape, f32s(d))?);
    }
    Ok(out)
}

/// Chunks between the states the chunked backward stores, from `--checkpoint` (tokens, a
/// multiple of the chunk; None: every chunk's state is stored).
pub fn chunked_boundary_every(chunk: usize, checkpoint: Option<usize>) -> Result<usize, Error> {
    match checkpoint {
        None => Ok(1),
        Some(n) if n > 0 && n.is_multiple_of(chunk) => Ok(n / chunk),
        Some(n) => Err(Error::Input(format!(
            "--checkpoint {n}: the chunked backward stores the state every N tokens for N a positive multiple of the chunk ({chunk})"
        ))),
    }
}

/// The backward program `opts` asks for (recurrent or chunked), for these sizes.
pub fn build_program(rule: &Rule, dims: &Dims, opts: &GradOptions) -> Result<Program, Error> {
    if opts.backend == Backend::Chunked {
        if opts.chunk == 0 {
            return Err(Error::Input("--chunk must be at least 1".into()));
        }
        let canon = canonicalize(rule).map_err(|n| Error::from(n.to_diagnostic(rule)))?;
        let shape = shape_of(dims, opts.scale);
        let schedule =
            Schedule::chunked(opts.chunk).with_input(opts.ptx.input).with_bv(opts.bv).with_program(opts.program);
        let every = chunked_boundary_every(opts.chunk, opts.checkpoint)?;
        return backward::chunked(rule, &canon, shape, schedule, every).map_err(|e| {
            Error::Unsupported(format!(
                "rule `{}`: the chunked backward: {}",
                rule.name,
                e.0.trim_start_matches(&format!("rule `{}`: ", rule.name))
            ))
        });
    }
    if let Some(bv) = opts.bv {
        return Err(Error::Unsupported(format!(
            "--bv {bv}: only the chunked backward splits V into tiles; the recurrent one runs the whole V"
        )));
    }
    if opts.program == ProgramShape::Split {
        return Err(Error::Unsupported(
            "--program split: only the chunked backward is split; the recurrent one is one reverse pass".into(),
        ));
    }
    let every = opts.checkpoint.unwrap_or_else(|| backward::checkpoint_interval(dims.seq_len));
    if every == 0 {
        return Err(Error::Input("--checkpoint must be at least 1".into()));
    }
    let shape = shape_of(dims, opts.scale);
    backward::recurrent(rule, shape, opts.ptx.input, every)
        .map_err(|e| Error::Unsupported(format!("rule `{}`: {}", rule.name, e.0)))
}

fn compiled(rule: &Rule, tensors: &Tensors, dims: Dims, opts: &GradOptions) -> Result<BTreeMap<String, Tensor>, Error> {
    if !matches!(opts.engine, Engine::Ptx { .. }) && !opts.ptx.is_default() {
        return Err(Error::Unsupported(
            "an input type or dot precision goes with a PTX engine (the CPU backward reads f32 inputs and computes f32 dots)"
                .into(),
        ));
    }
    let program = build_program(rule, &dims, opts)?;
    let mut out = match opts.engine {
        Engine::Jit => {
            let mut runner = CpuRunner::new(&program, &dims)?;
            runner.poison();
            let order = Order { threads: opts.threads, time_block: DEFAULT_TIME_BLOCK, poison_scratch: true };
            runner.run(tensors, order)?;
            runner.into_outputs()?.0
        }
        Engine::Interp => backend::execute_interp(&program, tensors, &dims)?.0,
        Engine::Ptx { device, target } => gpu::execute(&program, tensors, dims, device, target, &opts.ptx.schedule)?.0,
    };
    sum_partial_gradients(rule, &dims, program.spec.vtiles(), &mut out)?;
    Ok(out)
}

/// Adds up the gradients a backward program writes in parts: a per-head parameter's, per
/// batch row (and per chunk, and per V-tile), into `d<name>` of the parameter's shape; with
/// `vtiles` > 1, every gradient shared by the columns (`d<name>.by_vtile`, and
/// `d<state>0.by_vtile` of an extra `[K]` state), over its tiles.
pub(crate) fn sum_partial_gradients(
    rule: &Rule,
    dims: &Dims,
    vtiles: usize,
    out: &mut BTreeMap<String, Tensor>,
) -> Result<(), Error> {
    let partial = backward::PARTIAL_SUFFIX;
    let width = |ty: Ty| match ty {
        Ty::VecK => dims.k,
        Ty::VecV => dims.v,
        _ => 1,
    };
    // A `[V]` gradient is each tile's own: never in parts.
    let parts = |ty: Ty| if ty == Ty::VecV { 1 } else { vtiles.max(1) };
    for inp in &rule.inputs {
        let shape = dims.input_shape(inp);
        let by_batch = format!("d{}.by_batch", inp.name);
        let by_vtile = format!("d{}{partial}", inp.name);
        let parts_of = match (out.remove(&by_batch), out.remove(&by_vtile)) {
            (Some(t), None) if inp.per_head => t,
            (None, Some(t)) if !inp.per_head => t,
            _ => continue,
        };
        let sum = sum_parts(&inp.name, &parts_of.data, shape.iter().product(), width(inp.ty), parts(inp.ty))?;
        out.insert(format!("d{}", inp.name), Tensor::new(shape, sum)?);
    }
    for s in &rule.states {
        let name = format!("d{}", s.initial_name());
        if let Some(t) = out.remove(&format!("{name}{partial}")) {
            let shape = vec![dims.batch, dims.heads, s.width(dims.k, dims.v)];
            let sum = sum_parts(&name, &t.data, shape.iter().product(), shape[2], parts(s.ty))?;
            out.insert(name, Tensor::new(shape, sum)?);
        }
    }
    Ok(())
}

/// `data` as copies of a tensor of `numel` elements, each run of `inner` elements split into
/// `parts` (`[copies, numel / inner, parts, inner]`), summed over the copies and the parts.
fn sum_parts(name: &str, data: &[f32], numel: usize, inner: usize, parts: usize) -> Result<Vec<f32>, Error> {
    let whole = numel * parts;
    if whole == 0 || inner == 0 || !data.len().is_multiple_of(whole) || !numel.is_multiple_of(inner) {
        return Err(Error::Internal(format!(
            "the backward wrote {} elements for the gradient of `{name}`, not a multiple of {whole}",
            data.len()
        )));
    }
    let mut sum = vec![0f32; numel];
    for copy in data.chunks(whole) {
        for (run, out) in copy.chunks(inner * parts).zip(sum.chunks_mut(inner)) {
            for part in run.chunks(inner) {
                out.iter_mut().zip(part).for_each(|(s, x)| *s += x);
            }
        }
    }
    Ok(sum)
}
