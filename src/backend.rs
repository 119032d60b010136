//! Running a rule on tensors with a chosen backend: the f64 reference, or the recurrent or
//! chunked forward program (fused or split), executed as native code (JIT), through the
//! tile-IR interpreter (for debugging), or as emitted PTX in the PTX simulator or on a CUDA
//! device ([`crate::gpu`]). Every engine binds tensors through the program's description.

use crate::error::Error;
use crate::gpu::{self, Device};
use crate::problem::infer_dims;
use chunkc_codegen::cpu::CpuProgram;
use chunkc_codegen::ir::Kernel;
use chunkc_codegen::plan::{self, Shape};
use chunkc_codegen::program::{Program, Role, Sizes, SpecError};
use chunkc_codegen::ptx::Sm;
use chunkc_codegen::schedule::{KernelKind, Schedule};
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

    /// The kernel a compiled backend runs (None for the reference).
    pub fn kernel(self) -> Option<KernelKind> {
        match self {
            Backend::Reference => None,
            Backend::Recurrent => Some(KernelKind::Recurrent),
            Backend::Chunked => Some(KernelKind::Chunked),
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
    /// The program's PTX for `target`, run on `device` (its input type and PTX knobs are the
    /// schedule's).
    Ptx { device: Device, target: Sm },
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
    /// How the program is built and run: chunk, program shape, V-tile, input type, time
    /// block, PTX knobs (its kernel follows `backend`).
    pub schedule: Schedule,
    /// Worker threads; 0 means all available.
    pub threads: usize,
    /// `scale`; None means 1/sqrt(K).
    pub scale: Option<f64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            backend: Backend::Chunked,
            engine: Engine::Jit,
            schedule: Schedule::default(),
            threads: 0,
            scale: None,
        }
    }
}

impl Options {
    /// The schedule with the backend's kernel (the chunk kept for the chunked one).
    pub fn kernel_schedule(&self) -> Option<Schedule> {
        self.backend.kernel().map(|k| self.schedule.with_kernel(k, self.schedule.chunk))
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
    /// The largest relative RMS error of the final states (`hT`, then each extra state's
    /// `<name>T`) against `reference`'s.
    pub fn state_error(&self, rule: &Rule, reference: &Outputs) -> Result<f64, Error> {
        let mut err = crate::verify::rel_rms(&self.ht().data, &reference.ht().data);
        for s in &rule.states {
            let name = s.final_name();
            err = err.max(crate::verify::rel_rms(&self.get(&name)?.data, &reference.get(&name)?.data));
        }
        Ok(err)
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

/// Builds the forward program `schedule` asks for: the recurrent kernel, or the chunked one
/// (fused or split), reading its per-token inputs as the schedule's input type (per-head
/// parameters and the states stay f32), with the schedule's V-tiles.
pub fn build_program(rule: &Rule, shape: Shape, schedule: &Schedule) -> Result<Program, Error> {
    schedule.validate().map_err(|e| Error::Input(format!("schedule: {e}")))?;
    let refused = |e: plan::PlanError| match (schedule.kernel, schedule.bv) {
        (KernelKind::Recurrent, None) => Error::Unsupported(e.0),
        _ => Error::Unsupported(format!("rule `{}`: {}", rule.name, e.0)),
    };
    let canon = match schedule.kernel {
        KernelKind::Chunked => Ok(canonicalize(rule).map_err(|n| Error::from(n.to_diagnostic(rule)))?),
        KernelKind::Recurrent => canonicalize(rule).map_err(|n| plan::PlanError(n.reason)),
    };
    plan::program::forward(rule, canon.as_ref().map_err(Clone::clone), shape, schedule).map_err(refused)
}

/// The single kernel of the fused program `schedule` asks for (its program shape is ignored).
pub fn build_kernel(rule: &Rule, shape: Shape, schedule: &Schedule) -> Result<Kernel, Error> {
    let fused = schedule.with_program(plan::ProgramShape::Fused);
    let program = build_program(rule, shape, &fused)?;
    program.kernels.into_iter().next().ok_or_else(|| Error::Internal("a fused program without a kernel".into()))
}

/// Runs `rule` on `tensors` (inputs by name, `h0` optional; inputs with fewer heads than the
/// value heads are shared by groups of them, `crate::heads`). `source` names where the
/// tensors came from, for messages.
pub fn run(rule: &Rule, tensors: &Tensors, source: &str, opts: &Options) -> Result<Outputs, Error> {
    let (tensors, _) = crate::heads::expand_tensors(rule, tensors)?;
    let tensors = &*tensors;
    let dims = infer_dims(rule, tensors, source)?;
    let shape = shape_of(&dims, opts.scale);
    if opts.backend == Backend::Reference {
        return run_reference(rule, tensors, dims, shape.scale);
    }
    if opts.backend == Backend::Chunked && opts.schedule.chunk == 0 {
        return Err(Error::Input("--chunk must be at least 1".into()));
    }
    let schedule = opts.kernel_schedule().ok_or_else(|| Error::Internal("the reference has no schedule".into()))?;
    let program = build_program(rule, shape, &schedule)?;
    match opts.engine {
        Engine::Jit => {
            let mut runner = CpuRunner::new(&program, &dims)?;
            let order = Order { threads: opts.threads, time_block: schedule.time_block, poison_scratch: true };
            runner.run(tensors, order)?;
            runner.into_outputs()
        }
        Engine::Interp => execute_interp(&program, tensors, &dims),
        Engine::Ptx { device, target } => gpu::execute(&program, tensors, dims, device, target, &schedule.ptx),
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
    for (s, x) in rule.states.iter().zip(out.extra) {
        map.insert(s.final_name(), Tensor::new(vec![dims.batch, dims.heads, s.width(dims.k, dims.v)], f32s(x))?);
    }
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
pub fn execute_interp(program: &Program, tensors: &Tensors, dims: &Dims) -> Result<Outputs, Error> {
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
