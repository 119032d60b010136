//! Running a program's emitted PTX: in the PTX simulator (`--backend ptx-sim`) or on a CUDA
//! device (`--backend cuda`).
//!
//! The launch ABI itself (which tensor goes to which `.param`, in what element type, the
//! outputs, intermediates, scratch and grids) is `chunkc_runtime::abi`; [`bind`] feeds it the
//! tensors, and both executors take the device-neutral run it builds.

use crate::backend::{sizes_of, Outputs};
use crate::error::Error;
use chunkc_codegen::program::Program;
use chunkc_codegen::ptx::{self, EmitOptions, PtxProgram, PtxSchedule, Sm};
use chunkc_dsl::reference::Dims;
use chunkc_runtime::abi::{self, BindError, BoundProgram};
use chunkc_runtime::io::Tensors;
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

/// The PTX of every phase of `program` for `target` under `schedule`, as the executors run it.
pub fn emit(program: &Program, target: Sm, schedule: &PtxSchedule) -> Result<PtxProgram, Error> {
    schedule.validate().map_err(Error::Input)?;
    ptx::emit_program(program, target, EmitOptions::default(), schedule)
        .map_err(|e| Error::Internal(format!("emitting PTX for {}: {e}", program.spec.name)))
}

/// Emits `program` for `target` under `schedule` and runs its phases on `device`. The
/// tensors must have been checked against `dims` (as `backend::run` does).
pub fn execute(
    program: &Program,
    tensors: &Tensors,
    dims: Dims,
    device: Device,
    target: Sm,
    schedule: &PtxSchedule,
) -> Result<Outputs, Error> {
    check_ready(device, &dims)?;
    let emitted = emit(program, target, schedule)?;
    let bound = bind(&emitted, tensors, &dims)?;
    let back = match device {
        Device::Sim => ptxsim::run(&bound.run).map_err(|e| sim_error(&emitted, &e))?,
        Device::Cuda => cuda::run(&bound.run).map_err(cuda_error)?,
    };
    Ok(Outputs(bound.outputs(back).map_err(bind_error)?))
}

/// Times `program`'s PTX for `target` on CUDA device 0 with CUDA events: `warmups` runs,
/// then `runs` timed ones (milliseconds each). The tensors must match `dims`.
pub fn time(
    program: &Program,
    tensors: &Tensors,
    dims: Dims,
    target: Sm,
    schedule: &PtxSchedule,
    warmups: usize,
    runs: usize,
) -> Result<Vec<f64>, Error> {
    check_ready(Device::Cuda, &dims)?;
    let emitted = emit(program, target, schedule)?;
    let bound = bind(&emitted, tensors, &dims)?;
    cuda::time(&bound.run, warmups, runs).map_err(cuda_error)
}

fn sim_error(emitted: &PtxProgram, e: &ptxsim::RunError) -> Error {
    let one_line = e.error.to_string().replace('\n', "; ");
    let entry = emitted.phases.get(e.launch).map_or("?", |p| p.meta.entry.as_str());
    let target = emitted.phases.first().map_or("?", |p| p.meta.target.name());
    Error::Device(format!("--backend ptx-sim: kernel {entry} ({target}): {one_line}"))
}

fn bind_error(e: BindError) -> Error {
    match e {
        BindError::TooLarge(s) => Error::Input(s),
        BindError::Abi(s) => Error::Internal(s),
    }
}

/// The launches of `emitted` on the tensors (`chunkc_runtime::abi::bind_program`, where the
/// ABI is documented): each phase's parameters are the program's tensors by name, each input
/// converted to its tensor's element type there, `h0` zeros when absent.
pub fn bind<'a>(emitted: &'a PtxProgram, tensors: &'a Tensors, dims: &Dims) -> Result<BoundProgram<'a>, Error> {
    let phases: Vec<_> = emitted.phases.iter().map(|p| (p.ptx.as_str(), &p.meta)).collect();
    let input = |name: &str| tensors.get(name).map(|t| t.data.as_slice());
    abi::bind_program(&emitted.spec, &phases, &sizes_of(dims), input).map_err(bind_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{build_program, shape_of};
    use crate::verify::random_inputs;
    use chunkc_codegen::ir::ElemType;
    use chunkc_codegen::ptx::{Grid, ParamKind, TileSpace};
    use chunkc_codegen::schedule::{ProgramShape, Schedule};
    use chunkc_dsl::ast::Rule;
    use chunkc_runtime::launch::Arg;

    fn simple_gla() -> Rule {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/simple_gla.toml");
        chunkc_dsl::load_rule(std::path::Path::new(path)).expect("rule loads")
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Every parameter of every phase gets what the ABI says: inputs as their bytes in the
    /// program's input type (f32, bf16; h0 always f32), outputs, the boundary states and the
    /// scratch NaN-filled and sized for the problem, scalars from the dims, in `.param` order;
    /// the output pass's grid has a CTA per chunk.
    #[test]
    fn bind_follows_the_program_and_the_launch_metadata() {
        for elem in [ElemType::F32, ElemType::Bf16] {
            bind_follows_the_program_for(elem);
        }
    }

    fn bind_follows_the_program_for(elem: ElemType) {
        let rule = simple_gla();
        let dims = Dims { batch: 2, seq_len: 7, heads: 3, k: 4, v: 5 };
        let tensors = random_inputs(&rule, &dims, 3);
        let shape = shape_of(&dims, None);
        let program =
            build_program(&rule, shape, &Schedule::chunked(4).with_input(elem).with_program(ProgramShape::Split))
                .expect("program");
        let emitted = ptx::emit_program(&program, Sm::Sm80, EmitOptions { smem_limit: 0 }, &PtxSchedule::default())
            .expect("emit");
        let bound = bind(&emitted, &tensors, &dims).expect("bind");
        let [states, outputs] = &bound.run.launches[..] else { panic!("two phases") };
        assert_eq!(states.launch.grid, [6, 1, 1]);
        assert_eq!(outputs.launch.grid, [1, 2, 6], "(V-tiles, ceil(7 / 4) chunks, B*H)");
        assert!(matches!(emitted.phases[1].meta.grid, Grid::VTilesChunksBatchHeads { vtiles: 1, chunk: 4 }));
        let mut seen = vec![];
        for (phase, launch) in emitted.phases.iter().zip(&bound.run.launches) {
            assert_eq!(phase.meta.tile_space, TileSpace::Global);
            assert_eq!(launch.args.len(), phase.meta.params.len());
            let ctas: usize = launch.launch.grid.iter().map(|&d| d as usize).product();
            for (p, arg) in phase.meta.params.iter().zip(&launch.args) {
                let buffer = |a: &Arg| match a {
                    Arg::Buffer(i) => &bound.run.buffers[*i],
                    Arg::U64(_) => panic!("{} bound as a scalar", p.name),
                };
                match p.kind {
                    ParamKind::Tensor => {
                        let b = buffer(arg);
                        seen.push(p.name.clone());
                        match p.name.as_str() {
                            "o" | "hT" | "chunk.h" => {
                                let want = match p.name.as_str() {
                                    "o" => dims.output_shape(),
                                    "hT" => dims.state_shape(),
                                    _ => vec![2, 2, 3, 4, 5],
                                };
                                assert_eq!(b.read_back, p.name != "chunk.h", "outputs come back, intermediates stay");
                                let data = f32s(&b.bytes);
                                assert_eq!(data.len(), want.iter().product::<usize>(), "{}", p.name);
                                assert!(data.iter().all(|x| x.is_nan()), "{} is poisoned", p.name);
                            }
                            name => {
                                assert!(!b.read_back);
                                assert_eq!(p.elem, if name == "h0" { ElemType::F32 } else { elem }, "{name}");
                                assert_eq!(b.bytes, p.elem.encode(&tensors[name].data), "{name}");
                            }
                        }
                    }
                    ParamKind::Scratch => {
                        let b = buffer(arg);
                        assert!(!b.read_back);
                        assert_eq!(b.bytes.len(), phase.meta.scratch_bytes_per_cta * ctas);
                        assert!(f32s(&b.bytes).iter().all(|x| x.is_nan()));
                    }
                    ParamKind::Scalar => {
                        let want = match p.name.as_str() {
                            "batch" => 2,
                            "heads" => 3,
                            "seq_len" => 7,
                            other => panic!("unexpected scalar {other}"),
                        };
                        assert_eq!(*arg, Arg::U64(want), "{}", p.name);
                    }
                }
            }
        }
        for name in ["q", "k", "v", "g", "h0", "chunk.h", "o", "hT"] {
            assert!(seen.iter().any(|s| s == name), "no phase takes {name}: {seen:?}");
        }
    }

    /// A launch the simulator rejects (here: the dynamic shared memory withheld, so the first
    /// shared access is out of bounds) is one line naming the kernel and the PTX line.
    #[test]
    fn a_simulator_error_is_one_line_naming_kernel_and_ptx_line() {
        let rule = simple_gla();
        let dims = Dims { batch: 1, seq_len: 3, heads: 1, k: 4, v: 4 };
        let tensors = random_inputs(&rule, &dims, 5);
        let shape = shape_of(&dims, None);
        let program = build_program(&rule, shape, &Schedule::recurrent()).expect("program");
        let emitted = emit(&program, Sm::Sm90, &PtxSchedule::default()).expect("emit");
        assert_eq!(emitted.phases[0].meta.tile_space, TileSpace::Shared);
        let mut bound = bind(&emitted, &tensors, &dims).expect("bind");
        bound.run.launches[0].launch.dynamic_smem_bytes = 0;
        let err = ptxsim::run(&bound.run).expect_err("no shared memory");
        let msg = sim_error(&emitted, &err).to_string();
        let prefix = format!("--backend ptx-sim: kernel {} (sm_90): ptx line ", emitted.phases[0].meta.entry);
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
