//! Running a rule on tensors with a chosen backend: the f64 reference, or the recurrent or
//! chunked forward program (fused or split), executed as native code (JIT), through the
//! tile-IR interpreter (for debugging), or as emitted PTX in the PTX simulator or on a CUDA
//! device ([`crate::gpu`]). Every engine binds tensors through the program's description.

use crate::error::Error;
use crate::gpu::{self, Device};
use crate::precision::Precision;
use crate::problem::infer_dims;
use chunkc_codegen::cpu::CpuProgram;
use chunkc_codegen::ir::{ElemType, Kernel};
use chunkc_codegen::plan::{self, ProgramShape, Schedule, Shape};
use chunkc_codegen::program::{Program, Role, Sizes, SpecError};
use chunkc_codegen::ptx::Sm;
use chunkc_dsl::ast::Rule;
use chunkc_dsl::canon::canonicalize;
use chunkc_dsl::reference::{self, Dims};
use chunkc_runtime::exec::{self, Order, ProgramMemory};
use chunkc_runtime::io::Tensors;
use chunkc_runtime::tensor::Tensor;
use std::collections::BTreeMap;

/// Which implementation computes the outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The rule interpreted in f64, token by token.
    Reference,
    /// The fused recurrent kernel (any rule).
    Recurrent,
    /// The chunked kernel (rules linear in the state).
    Chunked,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Recurrent => "recurrent",
            Backend::Chunked => "chunked",
        }
    }
}

/// How a kernel is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Native code from the Cranelift backend.
    Jit,
    /// The tile-IR interpreter (slow; for debugging plans).
    Interp,
    /// The kernel's PTX for `target`, run on `device`, reading its inputs and computing its
    /// dots at `precision`.
    Ptx { device: Device, target: Sm, precision: Precision },
}

impl Engine {
    /// How a row of `verify` or a `run` names this backend and engine: the kernel
    /// (`recurrent`, `chunked`) for the CPU engines, the device (`ptx-sim`, `cuda`) for PTX.
    pub fn label(self, backend: Backend) -> &'static str {
        match self {
            Engine::Ptx { device, .. } if backend != Backend::Reference => device.name(),
            _ => backend.name(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub backend: Backend,
    pub engine: Engine,
    pub chunk: usize,
    /// Worker threads; 0 means all available.
    pub threads: usize,
    /// Tokens per time block of the CPU executor (`--time-block`; 0: head by head).
    pub time_block: usize,
    /// `scale`; None means 1/sqrt(K).
    pub scale: Option<f64>,
    /// Columns of V per grid point (`--bv`); None means the whole V.
    pub bv: Option<usize>,
    /// The chunked program: fused (one sequential phase) or split (a state pass, then a
    /// chunk-parallel output pass).
    pub program: ProgramShape,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            backend: Backend::Chunked,
            engine: Engine::Jit,
            chunk: 64,
            threads: 0,
            time_block: exec::DEFAULT_TIME_BLOCK,
            scale: None,
            bv: None,
            program: ProgramShape::Fused,
        }
    }
}

/// A run's outputs by name (`o` `[B, T, H, V]` and the final state `hT` `[B, H, K, V]` for
/// the forward), as the program's description names them.
#[derive(Clone, Debug)]
pub struct Outputs(pub BTreeMap<String, Tensor>);

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor, Error> {
        self.0.get(name).ok_or_else(|| Error::Internal(format!("the run produced no output `{name}`")))
    }
    /// `o`.
    pub fn o(&self) -> &Tensor {
        &self.0["o"]
    }
    /// The final state `hT`.
    pub fn ht(&self) -> &Tensor {
        &self.0["hT"]
    }
    fn checked(map: BTreeMap<String, Tensor>) -> Result<Outputs, Error> {
        for name in ["o", "hT"] {
            if !map.contains_key(name) {
                return Err(Error::Internal(format!("the run produced no output `{name}`")));
            }
        }
        Ok(Outputs(map))
    }
}

/// The kernel shape for these dims.
pub fn shape_of(dims: &Dims, scale: Option<f64>) -> Shape {
    Shape { heads: dims.heads, k: dims.k, v: dims.v, scale: scale.unwrap_or(1.0 / (dims.k as f64).sqrt()) }
}

/// The program sizes of these dims.
pub fn sizes_of(dims: &Dims) -> Sizes {
    Sizes { batch: dims.batch, seq_len: dims.seq_len, heads: dims.heads, k: dims.k, v: dims.v }
}

/// Builds the forward program of `rule` for `backend` (recurrent, or chunked as `program`
/// asks), reading its per-token inputs as `input` (per-head parameters and the states stay
/// f32), with V split into tiles of `bv` columns (None: the whole V).
pub fn build_program(
    rule: &Rule,
    backend: Backend,
    shape: Shape,
    chunk: usize,
    input: ElemType,
    bv: Option<usize>,
    program: ProgramShape,
) -> Result<Program, Error> {
    let refused = |e: plan::PlanError| Error::Unsupported(format!("rule `{}`: {}", rule.name, e.0));
    match backend {
        Backend::Recurrent if program != ProgramShape::Fused => Err(Error::Input(format!(
            "--program {}: the recurrent kernel is one phase; programs of several phases are chunked",
            program.name()
        ))),
        Backend::Recurrent => match bv {
            None => plan::program::recurrent(rule, shape, input, bv).map_err(|e| Error::Unsupported(e.0)),
            Some(_) => plan::program::recurrent(rule, shape, input, bv).map_err(refused),
        },
        Backend::Chunked => {
            let canon = canonicalize(rule).map_err(|n| Error::from(n.to_diagnostic(rule)))?;
            let sched = Schedule::with_chunk(chunk).with_input(input).with_bv(bv).with_program(program);
            plan::program::chunked(rule, &canon, shape, sched).map_err(refused)
        }
        Backend::Reference => Err(Error::Internal("the reference has no kernel".into())),
    }
}

/// Builds the tile-IR kernel of `rule` for `backend` (recurrent or chunked), reading f32 inputs.
pub fn build_kernel(rule: &Rule, backend: Backend, shape: Shape, chunk: usize) -> Result<Kernel, Error> {
    build_kernel_typed(rule, backend, shape, chunk, ElemType::F32)
}

/// Builds the tile-IR kernel of `rule` for `backend`, reading its per-token inputs as
/// `input` (per-head parameters and the states stay f32).
pub fn build_kernel_typed(
    rule: &Rule,
    backend: Backend,
    shape: Shape,
    chunk: usize,
    input: ElemType,
) -> Result<Kernel, Error> {
    build_kernel_tiled(rule, backend, shape, chunk, input, None)
}

/// The single kernel of the fused program ([`build_program`]), with V split into tiles of
/// `bv` columns (None: the whole V), one grid point (b, h, V-tile) each.
pub fn build_kernel_tiled(
    rule: &Rule,
    backend: Backend,
    shape: Shape,
    chunk: usize,
    input: ElemType,
    bv: Option<usize>,
) -> Result<Kernel, Error> {
    let program = build_program(rule, backend, shape, chunk, input, bv, ProgramShape::Fused)?;
    program.kernels.into_iter().next().ok_or_else(|| Error::Internal("a fused program without a kernel".into()))
}

/// Runs `rule` on `tensors` (inputs by name, `h0` optional). `source` names where the
/// tensors came from, for messages.
pub fn run(rule: &Rule, tensors: &Tensors, source: &str, opts: &Options) -> Result<Outputs, Error> {
    let dims = infer_dims(rule, tensors, source)?;
    let shape = shape_of(&dims, opts.scale);
    if opts.backend == Backend::Reference {
        return run_reference(rule, tensors, dims, shape.scale);
    }
    if opts.backend == Backend::Chunked && opts.chunk == 0 {
        return Err(Error::Input("--chunk must be at least 1".into()));
    }
    let input = match opts.engine {
        Engine::Ptx { precision, .. } => precision.input,
        _ => ElemType::F32,
    };
    let program = build_program(rule, opts.backend, shape, opts.chunk, input, opts.bv, opts.program)?;
    match opts.engine {
        Engine::Jit => {
            let mut runner = CpuRunner::new(&program, &dims)?;
            let order = Order { threads: opts.threads, time_block: opts.time_block, poison_scratch: true };
            runner.run(tensors, order)?;
            runner.into_outputs()
        }
        Engine::Interp => execute_interp(&program, tensors, &dims),
        Engine::Ptx { device, target, precision } => {
            gpu::execute(&program, tensors, dims, device, target, &precision.schedule)
        }
    }
}

fn run_reference(rule: &Rule, tensors: &Tensors, dims: Dims, scale: f64) -> Result<Outputs, Error> {
    let as_f64 = |t: &Tensor| t.data.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let h0 = tensors.get("h0").map(as_f64);
    let out = reference::run(rule, dims, scale, &|name| tensors.get(name).map(as_f64), h0.as_deref())
        .map_err(Error::Internal)?;
    let f32s = |x: Vec<f64>| x.into_iter().map(|y| y as f32).collect::<Vec<f32>>();
    let mut map = BTreeMap::new();
    map.insert("o".to_string(), Tensor::new(dims.output_shape(), f32s(out.o))?);
    map.insert("hT".to_string(), Tensor::new(dims.state_shape(), f32s(out.ht))?);
    Ok(Outputs(map))
}

fn spec_error(e: SpecError) -> Error {
    Error::Internal(e.to_string())
}

/// A program compiled for this CPU with the memory of one problem size, ready to run any
/// number of times (as `run` does once, and `bench` and `tune` many times): the outputs and
/// intermediates are allocated (NaN-filled) once.
pub struct CpuRunner {
    compiled: CpuProgram,
    memory: ProgramMemory,
}

impl CpuRunner {
    /// Compiles every phase of `program` for problems of `dims`.
    pub fn new(program: &Program, dims: &Dims) -> Result<CpuRunner, Error> {
        let compiled = chunkc_codegen::cpu::compile_program(program).map_err(|e| Error::Internal(e.to_string()))?;
        let memory = ProgramMemory::new(&compiled.spec, sizes_of(dims)).map_err(spec_error)?;
        Ok(CpuRunner { compiled, memory })
    }

    /// Runs the program on `tensors` (its inputs by name; an optional one, `h0`, may be
    /// absent). `threads` 0 means all cores. The outputs are not poisoned first: call
    /// [`CpuRunner::poison`] before a run whose results are checked.
    pub fn run(&mut self, tensors: &Tensors, order: Order) -> Result<(), Error> {
        let threads = if order.threads == 0 { exec::default_threads() } else { order.threads };
        let inputs = |name: &str| tensors.get(name).map(|t| t.data.as_slice());
        let kernels = self.compiled.kernels();
        exec::run_program(&self.compiled.spec, &kernels, &inputs, &mut self.memory, Order { threads, ..order })
            .map_err(spec_error)
    }

    /// NaN-fills the outputs and intermediates.
    pub fn poison(&mut self) {
        self.memory.poison(&self.compiled.spec);
    }

    /// An output or intermediate as the last run left it.
    pub fn tensor(&self, name: &str) -> Result<&[f32], Error> {
        self.memory.get(name).ok_or_else(|| Error::Internal(format!("the program has no tensor `{name}`")))
    }

    /// The outputs, by name.
    pub fn into_outputs(self) -> Result<Outputs, Error> {
        Outputs::checked(self.memory.into_outputs(&self.compiled.spec).map_err(spec_error)?)
    }
}

/// Runs every phase through the tile-IR interpreter (a debugging engine): each phase over its
/// grid points in turn, its loop whole (a chunk-parallel loop in order, which is one of the
/// orders it allows), with NaN-filled outputs and intermediates.
fn execute_interp(program: &Program, tensors: &Tensors, dims: &Dims) -> Result<Outputs, Error> {
    let spec = &program.spec;
    let sizes = sizes_of(dims);
    spec.check_sizes(&sizes).map_err(spec_error)?;
    let mut memory: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for t in &spec.tensors {
        let n = spec.numel(t, &sizes).map_err(spec_error)?;
        let data = match (t.role, tensors.get(&t.name)) {
            (Role::Input, Some(given)) => given.data.clone(),
            (Role::Input, None) if t.optional => vec![0.0; n],
            (Role::Input, None) => return Err(Error::Internal(format!("no tensor for input `{}`", t.name))),
            _ => vec![f32::NAN; n],
        };
        memory.insert(t.name.clone(), data);
    }
    for kernel in &program.kernels {
        for b in 0..dims.batch {
            for h in 0..dims.heads {
                for vt in 0..kernel.vtiles.max(1) {
                    let mut params: Vec<&mut [f32]> = vec![];
                    // Each kernel parameter is a distinct tensor (the spec checks it), so
                    // taking them out of the map one by one borrows disjoint memory.
                    let mut rest: Vec<(&String, &mut Vec<f32>)> = memory.iter_mut().collect();
                    for p in &kernel.params {
                        let at = rest.iter().position(|(n, _)| **n == p.name).ok_or_else(|| {
                            Error::Internal(format!("kernel {} takes `{}`, which has no memory", kernel.name, p.name))
                        })?;
                        params.push(rest.swap_remove(at).1.as_mut_slice());
                    }
                    let (b, h, vt, t) = (b as i64, h as i64, vt as i64, dims.seq_len as i64);
                    chunkc_codegen::interp::run_tile(kernel, &mut params, b, h, vt, t)
                        .map_err(|e| Error::Internal(e.0))?;
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for t in spec.with_role(Role::Output) {
        let data = memory.remove(&t.name).unwrap_or_default();
        out.insert(t.name.clone(), Tensor::new(spec.shape(t, &sizes).map_err(spec_error)?, data)?);
    }
    Outputs::checked(out)
}
