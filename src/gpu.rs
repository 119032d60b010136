//! Running a kernel's emitted PTX: in the PTX simulator (`--backend ptx-sim`) or on a CUDA
//! device (`--backend cuda`).
//!
//! [`bind`] is the one place on the host that knows the kernels' launch ABI: which tensor
//! goes to which `.param`, in what element type, which buffers are outputs, how big the
//! scratch is and what the grid is for a problem size. Both executors take what it builds
//! (a device-neutral [`Launch`] and [`Arg`]s, `chunkc_runtime::launch`), and [`Bound::outputs`]
//! turns the bytes they return into tensors. When the emitter adds input element types
//! (bf16, f16) or schedule fields to `LaunchMeta`, this file changes and nothing else.

use crate::backend::{h0_or_zeros, Outputs};
use crate::error::Error;
use chunkc_codegen::ir::Kernel;
use chunkc_codegen::ptx::{self, EmitOptions, LaunchMeta, ParamAccess, ParamKind, PtxKernel, Sm};
use chunkc_dsl::ast::Rule;
use chunkc_dsl::reference::Dims;
use chunkc_runtime::io::Tensors;
use chunkc_runtime::launch::{self, Arg, Launch, ReadBack};
use chunkc_runtime::tensor::Tensor;
use chunkc_runtime::{cuda, ptxsim};

/// Where emitted PTX runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The PTX simulator on the CPU (`chunkc_runtime::ptxsim`), which checks every access.
    Sim,
    /// CUDA device 0 through the driver API.
    Cuda,
}

impl Device {
    /// The `--backend` name.
    pub fn name(self) -> &'static str {
        match self {
            Device::Sim => "ptx-sim",
            Device::Cuda => "cuda",
        }
    }
}

/// The largest problem the simulator takes, in token-state elements B * H * T * K * V.
///
/// The simulator interprets every instruction of every thread on one core: measured 0.7 us
/// (K = V = 64) to 3 us (K = 32, V = 40) of CPU time per token-state element, so a run at the
/// limit takes a few seconds (gated_delta_rule, B=H=1, T=1024, K=V=64: 6 s per kernel). The
/// largest golden case (B=2, T=130, H=2, K=V=32) is 0.53 M.
pub const SIM_MAX_ELEMENTS: usize = 4 << 20;

/// Refuses problems too large for the simulator, with the size and the limit.
fn check_sim_size(dims: &Dims) -> Result<(), Error> {
    let n = [dims.batch, dims.heads, dims.seq_len, dims.k, dims.v].iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    match n {
        Some(n) if n <= SIM_MAX_ELEMENTS => Ok(()),
        _ => Err(Error::Unsupported(format!(
            "--backend ptx-sim: B*H*T*K*V = {}*{}*{}*{}*{} is over the simulator's limit of {SIM_MAX_ELEMENTS} \
             (it interprets every GPU thread on the CPU); use a smaller shape, or --backend cuda on a GPU",
            dims.batch, dims.heads, dims.seq_len, dims.k, dims.v
        ))),
    }
}

/// Checks up front that `device` can take a problem of `dims`: the simulator's size limit,
/// or a CUDA driver with a device. The error is the one line a user sees.
pub fn check_ready(device: Device, dims: &Dims) -> Result<(), Error> {
    match device {
        Device::Sim => check_sim_size(dims),
        Device::Cuda => cuda::device_count().map(|_| ()).map_err(cuda_error),
    }
}

fn cuda_error(e: cuda::CudaError) -> Error {
    Error::Device(format!("--backend cuda: {e}"))
}

/// The PTX of `kernel` for `target`, as the executors run it.
pub fn emit(kernel: &Kernel, target: Sm) -> Result<PtxKernel, Error> {
    ptx::emit_with(kernel, target, EmitOptions::default())
        .map_err(|e| Error::Internal(format!("emitting PTX for {}: {e}", kernel.name)))
}

/// Emits `kernel` for `target` and runs it on `device` over the (batch, head) grid. The
/// tensors must have been checked against `dims` (as `backend::run` does).
pub fn execute(
    kernel: &Kernel,
    rule: &Rule,
    tensors: &Tensors,
    dims: Dims,
    device: Device,
    target: Sm,
) -> Result<Outputs, Error> {
    check_ready(device, &dims)?;
    let emitted = emit(kernel, target)?;
    let bound = bind(&emitted, rule, tensors, &dims)?;
    let back = match device {
        Device::Sim => launch::simulate(&bound.launch, &bound.args).map_err(|e| sim_error(&emitted.meta, &e))?,
        Device::Cuda => cuda::run(&bound.launch, &bound.args).map_err(cuda_error)?,
    };
    bound.outputs(back)
}

fn sim_error(meta: &LaunchMeta, e: &ptxsim::SimError) -> Error {
    let one_line = e.to_string().replace('\n', "; ");
    Error::Device(format!("--backend ptx-sim: kernel {} ({}): {one_line}", meta.entry, meta.target))
}

/// A launch with its arguments, and how to read the results back.
pub struct Bound<'a> {
    pub launch: Launch<'a>,
    pub args: Vec<Arg>,
    /// For each read-back buffer, in argument order: the parameter's name and its shape.
    read_back: Vec<(String, Vec<usize>)>,
}

/// The launch ABI: turns an emitted kernel's metadata and the tensors into a launch and its
/// `.param` arguments, in declaration order.
///
/// - Tensor parameters are named as the IR names them: the rule's inputs and `h0` (read;
///   `h0` is zeros when absent), `o` and `hT` (written). Elements are f32, little endian.
///   Written tensors start as NaN, so an element the kernel fails to write shows.
/// - The scratch parameter is `scratch_bytes_per_cta` per CTA, NaN-filled too, so that
///   reading scratch before writing it poisons the outputs instead of reading zeros.
/// - Scalars are `batch`, `heads` and `seq_len`, as u64.
pub fn bind<'a>(emitted: &'a PtxKernel, rule: &Rule, tensors: &Tensors, dims: &Dims) -> Result<Bound<'a>, Error> {
    let meta = &emitted.meta;
    // One CTA per (b, h): B*H must fit the grid's u32 (checked here, so that the grid
    // arithmetic below cannot overflow).
    let too_big = || Error::Input(format!("B*H = {}*{} is too large for one GPU launch", dims.batch, dims.heads));
    dims.batch.checked_mul(dims.heads).and_then(|n| u32::try_from(n).ok()).ok_or_else(too_big)?;
    let grid = meta.grid.dims(dims.batch as u32, dims.heads as u32);
    let ctas = grid.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize)).ok_or_else(too_big)?;
    let h0 = h0_or_zeros(tensors, dims);
    let mut args = Vec::with_capacity(meta.params.len());
    let mut read_back = vec![];
    for p in &meta.params {
        let arg = match p.kind {
            ParamKind::Tensor => {
                let shape = match p.name.as_str() {
                    "o" => Some(dims.output_shape()),
                    "hT" => Some(dims.state_shape()),
                    _ => None,
                };
                let bytes = match (p.access, &shape) {
                    (ParamAccess::Write, Some(shape)) => f32_bytes(&vec![f32::NAN; shape.iter().product()]),
                    (ParamAccess::Write, None) => {
                        return Err(Error::Internal(format!("kernel writes `{}`, which is not o or hT", p.name)))
                    }
                    _ if p.name == "h0" => f32_bytes(&h0.data),
                    _ => {
                        let t = tensors.get(&p.name).filter(|_| rule.input(&p.name).is_some()).ok_or_else(|| {
                            Error::Internal(format!(
                                "kernel parameter `{}` is not an input of rule `{}`",
                                p.name, rule.name
                            ))
                        })?;
                        f32_bytes(&t.data)
                    }
                };
                let back = p.access != ParamAccess::Read;
                if back {
                    let shape = shape
                        .ok_or_else(|| Error::Internal(format!("kernel writes `{}`, which is not o or hT", p.name)))?;
                    read_back.push((p.name.clone(), shape));
                }
                Arg::Buffer { bytes, read_back: back }
            }
            ParamKind::Scratch => {
                let bytes = meta.scratch_bytes_per_cta.checked_mul(ctas).ok_or_else(|| {
                    Error::Input(format!("the kernel's scratch for {ctas} CTAs overflows this machine's memory"))
                })?;
                Arg::Buffer {
                    bytes: f32::NAN.to_le_bytes().into_iter().cycle().take(bytes).collect(),
                    read_back: false,
                }
            }
            ParamKind::Scalar => Arg::U64(match p.name.as_str() {
                "batch" => dims.batch as u64,
                "heads" => dims.heads as u64,
                "seq_len" => dims.seq_len as u64,
                other => return Err(Error::Internal(format!("kernel scalar `{other}` is unknown to the launcher"))),
            }),
        };
        args.push(arg);
    }
    let sm = meta
        .target
        .name()
        .trim_start_matches("sm_")
        .parse::<u32>()
        .map_err(|_| Error::Internal(format!("target {} has no compute capability number", meta.target)))?;
    let launch = Launch {
        ptx: &emitted.ptx,
        entry: &meta.entry,
        grid,
        block: meta.block,
        dynamic_smem_bytes: meta.dynamic_smem_bytes,
        sm,
    };
    Ok(Bound { launch, args, read_back })
}

impl Bound<'_> {
    /// `o` and `hT` from the bytes an executor read back.
    pub fn outputs(&self, back: ReadBack) -> Result<Outputs, Error> {
        if back.len() != self.read_back.len() {
            return Err(Error::Internal(format!(
                "the executor returned {} buffers for {} outputs",
                back.len(),
                self.read_back.len()
            )));
        }
        let (mut o, mut ht) = (None, None);
        for ((name, shape), bytes) in self.read_back.iter().zip(back) {
            let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let t = Tensor::new(shape.clone(), data)?;
            match name.as_str() {
                "o" => o = Some(t),
                _ => ht = Some(t),
            }
        }
        match (o, ht) {
            (Some(o), Some(ht)) => Ok(Outputs { o, ht }),
            _ => Err(Error::Internal(format!("kernel {} does not write both o and hT", self.launch.entry))),
        }
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{build_kernel, shape_of, Backend};
    use crate::verify::random_inputs;
    use chunkc_codegen::ptx::TileSpace;

    fn simple_gla() -> Rule {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/simple_gla.toml");
        chunkc_dsl::load_rule(std::path::Path::new(path)).expect("rule loads")
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Every parameter gets what the ABI says: inputs as their f32 bytes, outputs and
    /// scratch NaN-filled and sized for the problem, scalars from the dims, in `.param` order.
    #[test]
    fn bind_follows_the_launch_metadata() {
        let rule = simple_gla();
        let dims = Dims { batch: 2, seq_len: 7, heads: 3, k: 4, v: 5 };
        let tensors = random_inputs(&rule, &dims, 3);
        let kernel = build_kernel(&rule, Backend::Chunked, shape_of(&dims, None), 4).expect("kernel");
        let emitted = ptx::emit_with(&kernel, Sm::Sm80, EmitOptions { smem_limit: 0 }).expect("emit");
        assert_eq!(emitted.meta.tile_space, TileSpace::Global);
        let bound = bind(&emitted, &rule, &tensors, &dims).expect("bind");
        assert_eq!(bound.launch.grid, [6, 1, 1]);
        assert_eq!(bound.launch.sm, 80);
        assert_eq!(bound.args.len(), emitted.meta.params.len());
        let mut outputs = 0;
        for (p, arg) in emitted.meta.params.iter().zip(&bound.args) {
            match (p.kind, arg) {
                (ParamKind::Tensor, Arg::Buffer { bytes, read_back }) => {
                    let data = f32s(bytes);
                    match p.name.as_str() {
                        "o" | "hT" => {
                            let want = if p.name == "o" { dims.output_shape() } else { dims.state_shape() };
                            assert!(*read_back);
                            assert_eq!(data.len(), want.iter().product::<usize>());
                            assert!(data.iter().all(|x| x.is_nan()), "{} is poisoned", p.name);
                            outputs += 1;
                        }
                        name => {
                            assert!(!*read_back);
                            assert_eq!(data, tensors[name].data, "{name}");
                        }
                    }
                }
                (ParamKind::Scratch, Arg::Buffer { bytes, read_back }) => {
                    assert!(!*read_back);
                    assert_eq!(bytes.len(), emitted.meta.scratch_bytes_per_cta * 6);
                    assert!(f32s(bytes).iter().all(|x| x.is_nan()));
                }
                (ParamKind::Scalar, Arg::U64(x)) => {
                    let want = match p.name.as_str() {
                        "batch" => 2,
                        "heads" => 3,
                        "seq_len" => 7,
                        other => panic!("unexpected scalar {other}"),
                    };
                    assert_eq!(*x, want, "{}", p.name);
                }
                (kind, arg) => panic!("{}: {kind:?} bound as {arg:?}", p.name),
            }
        }
        assert_eq!(outputs, 2);
    }

    /// A launch the simulator rejects (here: the dynamic shared memory withheld, so the first
    /// shared access is out of bounds) is one line naming the kernel and the PTX line.
    #[test]
    fn a_simulator_error_is_one_line_naming_kernel_and_ptx_line() {
        let rule = simple_gla();
        let dims = Dims { batch: 1, seq_len: 3, heads: 1, k: 4, v: 4 };
        let tensors = random_inputs(&rule, &dims, 5);
        let kernel = build_kernel(&rule, Backend::Recurrent, shape_of(&dims, None), 64).expect("kernel");
        let emitted = emit(&kernel, Sm::Sm90).expect("emit");
        assert_eq!(emitted.meta.tile_space, TileSpace::Shared);
        let mut bound = bind(&emitted, &rule, &tensors, &dims).expect("bind");
        bound.launch.dynamic_smem_bytes = 0;
        let err = launch::simulate(&bound.launch, &bound.args).expect_err("no shared memory");
        let msg = sim_error(&emitted.meta, &err).to_string();
        let prefix = format!("--backend ptx-sim: kernel {} (sm_90): ptx line ", emitted.meta.entry);
        assert!(msg.starts_with(&prefix), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }

    #[test]
    fn the_simulator_limit_is_checked_without_overflow() {
        let ok = Dims { batch: 1, seq_len: 1024, heads: 1, k: 64, v: 64 };
        assert!(check_ready(Device::Sim, &ok).is_ok());
        let big = Dims { seq_len: 1025, ..ok };
        assert!(check_ready(Device::Sim, &big).unwrap_err().to_string().contains("over the simulator's limit"));
        let huge = Dims { batch: usize::MAX, ..ok };
        assert!(check_ready(Device::Sim, &huge).is_err());
    }
}
