//! Running a rule on tensors with a chosen backend: the f64 reference, the recurrent kernel
//! or the chunked kernel, executed as native code (JIT), through the tile-IR interpreter (for
//! debugging), or as emitted PTX in the PTX simulator or on a CUDA device ([`crate::gpu`]).

use crate::error::Error;
use crate::gpu::{self, Device};
use crate::precision::Precision;
use crate::problem::infer_dims;
use chunkc_codegen::ir::{ElemType, Kernel};
use chunkc_codegen::plan::{self, Schedule, Shape};
use chunkc_codegen::ptx::Sm;
use chunkc_dsl::ast::Rule;
use chunkc_dsl::canon::canonicalize;
use chunkc_dsl::reference::{self, Dims};
use chunkc_runtime::exec::{self, Buffer, CpuKernel, Order};
use chunkc_runtime::io::Tensors;
use chunkc_runtime::tensor::Tensor;

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
        }
    }
}

/// `o` `[B, T, H, V]` and the final state `hT` `[B, H, K, V]`.
#[derive(Clone, Debug)]
pub struct Outputs {
    pub o: Tensor,
    pub ht: Tensor,
}

/// The kernel shape for these dims.
pub fn shape_of(dims: &Dims, scale: Option<f64>) -> Shape {
    Shape { heads: dims.heads, k: dims.k, v: dims.v, scale: scale.unwrap_or(1.0 / (dims.k as f64).sqrt()) }
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

/// [`build_kernel_typed`] with V split into tiles of `bv` columns (None: the whole V), one
/// grid point (b, h, V-tile) each.
pub fn build_kernel_tiled(
    rule: &Rule,
    backend: Backend,
    shape: Shape,
    chunk: usize,
    input: ElemType,
    bv: Option<usize>,
) -> Result<Kernel, Error> {
    let refused = |e: plan::PlanError| Error::Unsupported(format!("rule `{}`: {}", rule.name, e.0));
    match backend {
        Backend::Recurrent => match bv {
            None => plan::recurrent::build_typed(rule, shape, input).map_err(|e| Error::Unsupported(e.0)),
            Some(_) => plan::recurrent::build_tiled(rule, shape, input, bv).map_err(refused),
        },
        Backend::Chunked => {
            let canon = canonicalize(rule).map_err(|n| Error::from(n.to_diagnostic(rule)))?;
            plan::chunked::build(rule, &canon, shape, Schedule::with_chunk(chunk).with_input(input).with_bv(bv))
                .map_err(refused)
        }
        Backend::Reference => Err(Error::Internal("the reference has no kernel".into())),
    }
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
    let kernel = build_kernel_tiled(rule, opts.backend, shape, opts.chunk, input, opts.bv)?;
    match opts.engine {
        Engine::Jit => {
            let compiled = chunkc_codegen::cpu::compile(&kernel).map_err(|e| Error::Internal(e.to_string()))?;
            execute(&compiled, rule, tensors, dims, Order { threads: opts.threads, time_block: opts.time_block })
        }
        Engine::Interp => execute_interp(&kernel, rule, tensors, dims),
        Engine::Ptx { device, target, precision } => {
            gpu::execute(&kernel, rule, tensors, dims, device, target, &precision.schedule)
        }
    }
}

fn run_reference(rule: &Rule, tensors: &Tensors, dims: Dims, scale: f64) -> Result<Outputs, Error> {
    let as_f64 = |t: &Tensor| t.data.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let h0 = tensors.get("h0").map(as_f64);
    let out = reference::run(rule, dims, scale, &|name| tensors.get(name).map(as_f64), h0.as_deref())
        .map_err(Error::Internal)?;
    let f32s = |x: Vec<f64>| x.into_iter().map(|y| y as f32).collect::<Vec<f32>>();
    Ok(Outputs {
        o: Tensor::new(dims.output_shape(), f32s(out.o))?,
        ht: Tensor::new(dims.state_shape(), f32s(out.ht))?,
    })
}

/// Output tensors filled with NaN, so that an element a kernel fails to write shows.
fn poisoned(dims: &Dims) -> (Tensor, Tensor) {
    (Tensor::filled(dims.output_shape(), f32::NAN), Tensor::filled(dims.state_shape(), f32::NAN))
}

/// `h0` from the tensors, or a zero state.
pub(crate) fn h0_or_zeros(tensors: &Tensors, dims: &Dims) -> Tensor {
    tensors.get("h0").cloned().unwrap_or_else(|| Tensor::zeros(dims.state_shape()))
}

/// Runs a compiled kernel over the (batch, head, V-tile) grid into freshly allocated,
/// poisoned outputs. The tensors must have been checked against `dims` (as [`run`] does
/// through `infer_dims`).
pub fn execute(
    kernel: &dyn CpuKernel,
    rule: &Rule,
    tensors: &Tensors,
    dims: Dims,
    order: Order,
) -> Result<Outputs, Error> {
    let h0 = h0_or_zeros(tensors, &dims);
    let (o, ht) = poisoned(&dims);
    let mut out = Outputs { o, ht };
    execute_into(kernel, rule, tensors, &h0, &mut out, dims, order)?;
    Ok(out)
}

/// Runs a compiled kernel over the (batch, head) grid, writing into `out`, which the caller
/// allocated (and poisons, when the run checks correctness). This is only the launch: no
/// allocation of outputs, no fill, no input conversion, so that `chunkc bench` can time it
/// alone. The tensors, `h0` and `out` must have been checked against `dims`.
pub fn execute_into(
    kernel: &dyn CpuKernel,
    rule: &Rule,
    tensors: &Tensors,
    h0: &Tensor,
    out: &mut Outputs,
    dims: Dims,
    order: Order,
) -> Result<(), Error> {
    // The kernel indexes these buffers by `dims` without bounds checks: refuse any buffer
    // smaller than the shapes it was built for rather than trust the caller.
    let state = dims.batch * dims.heads * dims.k * dims.v;
    if h0.data.len() < state
        || out.ht.data.len() < state
        || out.o.data.len() < dims.batch * dims.seq_len * dims.heads * dims.v
    {
        return Err(Error::Internal("execute_into: an output or h0 buffer is smaller than dims".into()));
    }
    let mut buffers: Vec<Buffer> = Vec::with_capacity(rule.inputs.len() + 3);
    for inp in &rule.inputs {
        let t = tensors.get(&inp.name).ok_or_else(|| Error::Internal(format!("input `{}` vanished", inp.name)))?;
        buffers.push(Buffer::In(&t.data));
    }
    buffers.push(Buffer::In(&h0.data));
    buffers.push(Buffer::Out(&mut out.o.data));
    buffers.push(Buffer::Out(&mut out.ht.data));
    let threads = if order.threads == 0 { exec::default_threads() } else { order.threads };
    let order = Order { threads, ..order };
    // SAFETY: every tensor was checked against `dims`, the sizes the kernel was built for
    // (the outputs and h0 just above), and the kernel only touches elements of its own
    // (b, h) inside those shapes.
    unsafe { exec::launch(kernel, &mut buffers, dims.batch, dims.heads, dims.seq_len, order) };
    Ok(())
}

/// Output tensors filled with NaN for `dims` (what [`execute`] writes into), for callers of
/// [`execute_into`].
pub fn poisoned_outputs(dims: &Dims) -> Outputs {
    let (o, ht) = poisoned(dims);
    Outputs { o, ht }
}

fn execute_interp(kernel: &Kernel, rule: &Rule, tensors: &Tensors, dims: Dims) -> Result<Outputs, Error> {
    let mut h0 = h0_or_zeros(tensors, &dims);
    let (mut o, mut ht) = poisoned(&dims);
    let mut inputs: Vec<Vec<f32>> = rule
        .inputs
        .iter()
        .map(|i| tensors.get(&i.name).map(|t| t.data.clone()).ok_or_else(|| Error::Internal(format!("`{}`", i.name))))
        .collect::<Result<_, _>>()?;
    for b in 0..dims.batch {
        for h in 0..dims.heads {
            for vt in 0..kernel.vtiles.max(1) {
                let mut params: Vec<&mut [f32]> = inputs.iter_mut().map(|x| x.as_mut_slice()).collect();
                params.push(&mut h0.data);
                params.push(&mut o.data);
                params.push(&mut ht.data);
                let (b, h, vt, t) = (b as i64, h as i64, vt as i64, dims.seq_len as i64);
                chunkc_codegen::interp::run_tile(kernel, &mut params, b, h, vt, t).map_err(|e| Error::Internal(e.0))?;
            }
        }
    }
    Ok(Outputs { o, ht })
}
