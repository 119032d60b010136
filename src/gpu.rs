//! Running a kernel's emitted PTX: in the PTX simulator (`--backend ptx-sim`) or on a CUDA
//! device (`--backend cuda`).
//!
//! The launch ABI itself (which tensor goes to which `.param`, in what element type, the
//! outputs, the scratch and the grid) is `chunkc_runtime::abi`; [`bind`] feeds it a rule's
//! tensors, and both executors take the device-neutral launch it builds.

use crate::backend::{h0_or_zeros, Outputs};
use crate::error::Error;
use chunkc_codegen::ir::Kernel;
use chunkc_codegen::ptx::{self, EmitOptions, LaunchMeta, PtxKernel, PtxSchedule, Sm};
use chunkc_dsl::ast::Rule;
use chunkc_dsl::reference::Dims;
use chunkc_runtime::abi::{self, BindError, Bound, Problem};
use chunkc_runtime::io::Tensors;
use chunkc_runtime::launch;
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

/// The PTX of `kernel` for `target` under `schedule`, as the executors run it.
pub fn emit(kernel: &Kernel, target: Sm, schedule: &PtxSchedule) -> Result<PtxKernel, Error> {
    schedule.validate().map_err(Error::Input)?;
    ptx::emit_scheduled(kernel, target, EmitOptions::default(), schedule)
        .map_err(|e| Error::Internal(format!("emitting PTX for {}: {e}", kernel.name)))
}

/// Emits `kernel` for `target` under `schedule` and runs it on `device` over the (batch,
/// head) grid. The tensors must have been checked against `dims` (as `backend::run` does).
pub fn execute(
    kernel: &Kernel,
    rule: &Rule,
    tensors: &Tensors,
    dims: Dims,
    device: Device,
    target: Sm,
    schedule: &PtxSchedule,
) -> Result<Outputs, Error> {
    check_ready(device, &dims)?;
    let emitted = emit(kernel, target, schedule)?;
    let bound = bind(&emitted, rule, tensors, &dims)?;
    let back = match device {
        Device::Sim => launch::simulate(&bound.launch, &bound.args).map_err(|e| sim_error(&emitted.meta, &e))?,
        Device::Cuda => cuda::run(&bound.launch, &bound.args).map_err(cuda_error)?,
    };
    let (o, ht) = bound.outputs(back).map_err(bind_error)?;
    Ok(Outputs { o, ht })
}

fn sim_error(meta: &LaunchMeta, e: &ptxsim::SimError) -> Error {
    let one_line = e.to_string().replace('\n', "; ");
    Error::Device(format!("--backend ptx-sim: kernel {} ({}): {one_line}", meta.entry, meta.target))
}

fn bind_error(e: BindError) -> Error {
    match e {
        BindError::TooLarge(s) => Error::Input(s),
        BindError::Abi(s) => Error::Internal(s),
    }
}

/// The launch of `emitted` on the rule's tensors (`chunkc_runtime::abi::bind`, where the ABI
/// is documented): the kernel's tensor parameters are the rule's inputs, `h0` (zeros when
/// absent), `o` and `hT`; each input is converted to its parameter's element type there.
pub fn bind<'a>(emitted: &'a PtxKernel, rule: &Rule, tensors: &Tensors, dims: &Dims) -> Result<Bound<'a>, Error> {
    let h0 = h0_or_zeros(tensors, dims);
    let problem = Problem { batch: dims.batch, heads: dims.heads, seq_len: dims.seq_len, k: dims.k, v: dims.v };
    let input = |name: &str| match name {
        "h0" => Some(h0.data.as_slice()),
        _ => tensors.get(name).filter(|_| rule.input(name).is_some()).map(|t| t.data.as_slice()),
    };
    abi::bind(&emitted.ptx, &emitted.meta, &problem, input).map_err(bind_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{build_kernel, build_kernel_typed, shape_of, Backend};
    use crate::verify::random_inputs;
    use chunkc_codegen::ir::ElemType;
    use chunkc_codegen::ptx::{ParamKind, TileSpace};
    use chunkc_runtime::launch::Arg;

    fn simple_gla() -> Rule {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/simple_gla.toml");
        chunkc_dsl::load_rule(std::path::Path::new(path)).expect("rule loads")
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Every parameter gets what the ABI says: inputs as their bytes in the kernel's input
    /// type (f32, bf16; h0 always f32), outputs and scratch NaN-filled and sized for the
    /// problem, scalars from the dims, in `.param` order.
    #[test]
    fn bind_follows_the_launch_metadata() {
        for elem in [ElemType::F32, ElemType::Bf16] {
            bind_follows_the_launch_metadata_for(elem);
        }
    }

    fn bind_follows_the_launch_metadata_for(elem: ElemType) {
        let rule = simple_gla();
        let dims = Dims { batch: 2, seq_len: 7, heads: 3, k: 4, v: 5 };
        let tensors = random_inputs(&rule, &dims, 3);
        let kernel = build_kernel_typed(&rule, Backend::Chunked, shape_of(&dims, None), 4, elem).expect("kernel");
        let emitted = ptx::emit_with(&kernel, Sm::Sm80, EmitOptions { smem_limit: 0 }).expect("emit");
        assert_eq!(emitted.meta.tile_space, TileSpace::Global);
        let bound = bind(&emitted, &rule, &tensors, &dims).expect("bind");
        assert_eq!(bound.launch.grid, [6, 1, 1]);
        assert_eq!(bound.launch.sm, 80);
        assert_eq!(bound.args.len(), emitted.meta.params.len());
        let mut outputs = 0;
        for (p, arg) in emitted.meta.params.iter().zip(&bound.args) {
            match (p.kind, arg) {
                (ParamKind::Tensor, Arg::Buffer { bytes, read_back }) => match p.name.as_str() {
                    "o" | "hT" => {
                        let data = f32s(bytes);
                        let want = if p.name == "o" { dims.output_shape() } else { dims.state_shape() };
                        assert!(*read_back);
                        assert_eq!(data.len(), want.iter().product::<usize>());
                        assert!(data.iter().all(|x| x.is_nan()), "{} is poisoned", p.name);
                        outputs += 1;
                    }
                    name => {
                        assert!(!*read_back);
                        assert_eq!(p.elem, if name == "h0" { ElemType::F32 } else { elem }, "{name}");
                        assert_eq!(*bytes, p.elem.encode(&tensors[name].data), "{name}");
                    }
                },
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
        let emitted = emit(&kernel, Sm::Sm90, &PtxSchedule::default()).expect("emit");
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
