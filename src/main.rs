//! The `chunkc` command line: check, run, grad, verify, bench, tune and compile rule files.

use chunkc::backend::{self, Backend, Engine, Options};
use chunkc::codegen::ir::ElemType;
use chunkc::codegen::plan::ProgramShape;
use chunkc::codegen::ptx::{DotPrecision, PtxSchedule};
use chunkc::codegen::schedule::{KernelKind, Schedule, CPU_DEFAULT_CHUNK, GPU_DEFAULT_CHUNK};
use chunkc::dsl::ast::{Rule, Ty};
use chunkc::dsl::diag::Diagnostic;
use chunkc::gpu::Device;
use chunkc::tune;
use chunkc::verify;
use chunkc::{load_rule, Error};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "chunkc", version, about = "A compiler for chunked linear recurrences")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Reference,
    Recurrent,
    Chunked,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Reference => Backend::Reference,
            BackendArg::Recurrent => Backend::Recurrent,
            BackendArg::Chunked => Backend::Chunked,
        }
    }
}

/// `run` and `verify` backends: the CPU ones name the kernel; the PTX ones name where the
/// kernel's PTX runs (the kernel is `--kernel` for `run`; `verify` checks both).
#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum RunBackend {
    /// The rule interpreted in f64.
    Reference,
    /// The fused recurrent kernel, native code.
    Recurrent,
    /// The chunked kernel, native code.
    Chunked,
    /// The kernel's PTX in the PTX simulator (small shapes; every access checked).
    #[value(name = "ptx-sim")]
    PtxSim,
    /// The kernel's PTX on CUDA device 0.
    Cuda,
}

/// The kernel a PTX backend runs.
#[derive(Clone, Copy, ValueEnum)]
enum KernelArg {
    Recurrent,
    Chunked,
}

/// GPU targets of the PTX backends.
#[derive(Clone, Copy, ValueEnum)]
enum GpuTarget {
    /// NVIDIA sm_80 (A100).
    #[value(name = "sm_80")]
    Sm80,
    /// NVIDIA sm_90 (H100).
    #[value(name = "sm_90")]
    Sm90,
}

impl GpuTarget {
    fn sm(self) -> ptx::Sm {
        match self {
            GpuTarget::Sm80 => ptx::Sm::Sm80,
            GpuTarget::Sm90 => ptx::Sm::Sm90,
        }
    }
}

impl RunBackend {
    fn device(self) -> Option<Device> {
        match self {
            RunBackend::PtxSim => Some(Device::Sim),
            RunBackend::Cuda => Some(Device::Cuda),
            _ => None,
        }
    }

    /// The kernels this backend runs, each with its engine: a PTX backend runs `kernels`
    /// on its device for `target` (sm_90 when not given); a CPU backend runs its own kernel
    /// on `cpu`.
    fn runs(self, kernels: &[Backend], target: Option<GpuTarget>, cpu: Engine) -> Vec<(Backend, Engine)> {
        match (self, self.device()) {
            (_, Some(device)) => {
                let target = target.map_or(ptx::Sm::Sm90, GpuTarget::sm);
                kernels.iter().map(|&k| (k, Engine::Ptx { device, target })).collect()
            }
            (RunBackend::Reference, None) => vec![(Backend::Reference, cpu)],
            (RunBackend::Recurrent, None) => vec![(Backend::Recurrent, cpu)],
            (_, None) => vec![(Backend::Chunked, cpu)],
        }
    }
}

/// `--target`, `--kernel` and the precision flags only mean something for the PTX backends.
fn check_ptx_flags(
    backends: &[RunBackend],
    target: bool,
    kernel: bool,
    precision: &PrecisionArgs,
) -> Result<(), Error> {
    if backends.iter().any(|b| b.device().is_some()) {
        return Ok(());
    }
    if let Some(flag) = precision.given().first() {
        return Err(Error::Unsupported(format!(
            "{flag} goes with --backend ptx-sim or cuda (the CPU backends read f32 inputs and compute f32 dots)"
        )));
    }
    let flag = match (target, kernel) {
        (true, _) => "--target",
        (_, true) => "--kernel",
        _ => return Ok(()),
    };
    Err(Error::Input(format!(
        "{flag} goes with --backend ptx-sim or cuda (the CPU backends are named by their kernel)"
    )))
}

/// `--dtype`: the element type the kernel reads its per-token inputs in.
#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

/// `--dot`: the dot precision of the PTX schedule.
#[derive(Clone, Copy, ValueEnum)]
enum DotArg {
    /// f32 fma loops (no tensor cores).
    F32,
    /// tf32 tensor cores.
    Tf32,
    /// bf16 tensor cores.
    Bf16,
    /// f16 tensor cores.
    F16,
}

/// The precision flags of `run` and `verify` (PTX backends only).
#[derive(clap::Args, Clone, Copy)]
struct PrecisionArgs {
    /// Element type the PTX kernel reads its per-token inputs in (ptx-sim, cuda): the f32
    /// tensors are rounded to it (nearest even) on the host; per-head parameters, h0 and
    /// hT stay f32 [default: f32]
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Dot precision of the PTX schedule (ptx-sim, cuda): f32 fma, or tf32, bf16, f16 on
    /// tensor cores [default: f32]
    #[arg(long, value_enum)]
    dot: Option<DotArg>,
    /// Warps per CTA of the PTX schedule (ptx-sim, cuda; 1 to 32) [default: 8]
    #[arg(long)]
    warps: Option<u32>,
    /// Pipeline stages of the PTX schedule's chunk loop (ptx-sim, cuda): 1, or 2 to
    /// double-buffer the per-chunk input tiles with cp.async in (opt-in) shared memory;
    /// a kernel whose doubled workspace does not fit keeps one stage [default: 1]
    #[arg(long)]
    stages: Option<u32>,
}

impl PrecisionArgs {
    /// The flags given, by name (each goes with a PTX backend only).
    fn given(&self) -> Vec<&'static str> {
        [
            (self.dtype.is_some(), "--dtype"),
            (self.dot.is_some(), "--dot"),
            (self.warps.is_some(), "--warps"),
            (self.stages.is_some(), "--stages"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }

    /// `schedule` with the input type and PTX knobs the flags ask for; an invalid schedule
    /// is a one-line error.
    fn apply(&self, schedule: Schedule) -> Result<Schedule, Error> {
        let input = match self.dtype {
            None | Some(DtypeArg::F32) => ElemType::F32,
            Some(DtypeArg::Bf16) => ElemType::Bf16,
            Some(DtypeArg::F16) => ElemType::F16,
        };
        let dot = match self.dot {
            None | Some(DotArg::F32) => DotPrecision::F32Fma,
            Some(DotArg::Tf32) => DotPrecision::Tf32,
            Some(DotArg::Bf16) => DotPrecision::Bf16,
            Some(DotArg::F16) => DotPrecision::F16,
        };
        let mut ptx = match self.stages {
            None | Some(1) => PtxSchedule::with_dot(dot),
            Some(2) => PtxSchedule::pipelined(dot),
            Some(n) => return Err(Error::Input(format!("--stages must be 1 or 2, not {n}"))),
        };
        if let Some(w) = self.warps {
            ptx.warps = w;
        }
        ptx.validate().map_err(|e| Error::Input(format!("--warps: {e}")))?;
        Ok(schedule.with_input(input).with_ptx(ptx))
    }

    /// The input type and PTX schedule the flags ask for, as the backward takes them.
    fn ptx_precision(&self) -> Result<chunkc::grad::PtxPrecision, Error> {
        Ok(chunkc::grad::PtxPrecision::of(&self.apply(Schedule::default())?))
    }
}

/// `--program`: how the chunked forward is organised.
#[derive(Clone, Copy, Default, ValueEnum)]
enum ProgramArg {
    /// One sequential phase: the state carried over the chunks, `o` written as it goes.
    #[default]
    Fused,
    /// A sequential state pass writing every chunk's entering state, then a chunk-parallel
    /// output pass (FLA's decomposition; the delta rules' UT factors first).
    Split,
}

impl From<ProgramArg> for ProgramShape {
    fn from(p: ProgramArg) -> ProgramShape {
        match p {
            ProgramArg::Fused => ProgramShape::Fused,
            ProgramArg::Split => ProgramShape::Split,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    /// Native code (Cranelift JIT).
    Jit,
    /// The tile-IR interpreter (slow; for debugging).
    Interp,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Target {
    /// Print the tile IR (the CPU backend's input).
    Cpu,
    /// PTX for NVIDIA sm_80 (A100).
    #[value(name = "sm_80")]
    Sm80,
    /// PTX for NVIDIA sm_90 (H100).
    #[value(name = "sm_90")]
    Sm90,
}

#[derive(Subcommand)]
enum Command {
    /// Check a rule file; print its class and canonical form.
    Check { rule: PathBuf },
    /// Run a rule on tensors from a safetensors file; write `o` and `hT`.
    Run {
        rule: PathBuf,
        /// Inputs by the rule's input names; `h0` [B, H, K, V] is optional.
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "chunked")]
        backend: RunBackend,
        /// The kernel --backend ptx-sim or cuda runs (default: chunked).
        #[arg(long, value_enum)]
        kernel: Option<KernelArg>,
        /// The GPU target of --backend ptx-sim or cuda (default: sm_90).
        #[arg(long, value_enum)]
        target: Option<GpuTarget>,
        /// The chunk size [default: 16 on the CPU (measured fastest for every class at the
        /// default shape, docs/performance.md round 12), 64 for ptx-sim and cuda]
        #[arg(long)]
        chunk: Option<usize>,
        /// Worker threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// CPU executor: tokens per time block (every head's first block, then every head's
        /// next block, ...: rows of all heads at a token share a page); 0: head by head.
        #[arg(long, default_value_t = chunkc::codegen::schedule::DEFAULT_TIME_BLOCK)]
        time_block: usize,
        /// Output scale (default 1/sqrt(K)).
        #[arg(long)]
        scale: Option<f64>,
        /// Columns of V per grid point (a V-tile dimension of the grid, as FLA's BV); must
        /// divide V. Default: the whole V.
        #[arg(long)]
        bv: Option<usize>,
        /// The chunked program: fused (one sequential phase) or split (a state pass, then a
        /// chunk-parallel output pass).
        #[arg(long, value_enum, default_value = "fused")]
        program: ProgramArg,
        #[command(flatten)]
        precision: PrecisionArgs,
        /// Use the schedule `chunkc tune` found for this rule, these inputs' shape and
        /// --threads on this CPU (kernel, chunk, time block, V-tile).
        #[arg(long, conflicts_with_all = ["backend", "kernel", "chunk", "time_block", "bv"])]
        tuned: bool,
        /// The tuning cache --tuned reads (default: $CHUNKC_TUNE_CACHE, else
        /// ~/.cache/chunkc/tune.toml).
        #[arg(long, requires = "tuned")]
        cache: Option<PathBuf>,
        /// Ignore tensors in IN that the rule does not take (by default each is an error).
        #[arg(long)]
        allow_extra: bool,
        #[arg(long, value_enum, default_value = "jit", hide = true)]
        engine: EngineArg,
    },
    /// Gradients of L = sum(o * do) + sum(hT * dhT) with respect to every input and h0.
    ///
    /// IN holds the rule's inputs, optional h0, the cotangent do [B, T, H, V] (required) and
    /// optional dhT [B, H, K, V]; OUT gets o, hT, d<name> for every input (in its shape; a
    /// per-head parameter's gradient summed over batch and time) and dh0 when h0 was given.
    ///
    /// --backend reference differentiates the f64 interpreter in reverse mode (the truth);
    /// chunked runs the chunked backward program (rules linear in S: each chunk recomputed
    /// from its stored entering state and differentiated) and recurrent the recurrent one (any
    /// rule: reverse mode through the token step, the state checkpointed every --checkpoint
    /// tokens), as native code; ptx-sim and cuda run either as PTX (--kernel, f32).
    Grad {
        rule: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// [default: chunked for a rule linear in S, else recurrent]
        #[arg(long, value_enum)]
        backend: Option<RunBackend>,
        /// GPU target of the PTX backends (default sm_90).
        #[arg(long, value_enum)]
        target: Option<GpuTarget>,
        /// The kernel a PTX backend runs (default: recurrent).
        #[arg(long, value_enum)]
        kernel: Option<KernelArg>,
        /// The chunked backward's chunk size.
        #[arg(long, default_value_t = 64)]
        chunk: usize,
        /// Tokens between stored states: the recurrent backward's checkpoints (default: about
        /// sqrt(T), at most 16), or the chunked backward's stored chunk boundaries, a multiple
        /// of --chunk (default: every chunk's; more keeps fewer states and recomputes the rest).
        #[arg(long)]
        checkpoint: Option<usize>,
        /// The chunked backward's columns of V per grid point (a V-tile dimension of the grid,
        /// as FLA's BV); must divide V. The gradients the columns share are summed over the
        /// tiles. Default: the whole V.
        #[arg(long)]
        bv: Option<usize>,
        /// The chunked backward's program: fused (the forward, then one reverse pass over the
        /// chunks) or split (the split forward, a reverse pass carrying only the state's
        /// adjoint, then every chunk's gradients in parallel: FLA's decomposition, for GPUs).
        #[arg(long, value_enum, default_value = "fused")]
        program: ProgramArg,
        /// Worker threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Output scale (default 1/sqrt(K)).
        #[arg(long)]
        scale: Option<f64>,
        /// Ignore tensors in IN that the rule does not take (by default each is an error).
        #[arg(long)]
        allow_extra: bool,
        #[command(flatten)]
        precision: PrecisionArgs,
        #[arg(long, value_enum, default_value = "jit", hide = true)]
        engine: EngineArg,
    },
    /// Run backends and chunk sizes on random inputs against the f64 reference.
    ///
    /// --backend ptx-sim and cuda check the recurrent kernel (chunk `-` in the table) and the
    /// chunked kernel at every chunk size, as PTX for --target, at the precision --dtype and
    /// --dot ask for. Each row is held to its precision's relative RMS tolerance (DESIGN.md):
    /// f32 1e-5, tf32 dots 1e-3, bf16/f16 inputs or dots 1e-2. The reference always runs in
    /// f64 on the original f32 inputs, also when the kernel reads them rounded to bf16 or f16
    /// (as FLA compares its bf16 kernels with an f32 reference), so the error includes the
    /// rounding of the inputs.
    Verify {
        rule: PathBuf,
        /// Sequence lengths (default: 1, C-1, C+1 and 1000 for each chunk size C; 200
        /// instead of 1000 for ptx-sim).
        #[arg(long = "T", value_delimiter = ',')]
        seq_lens: Option<Vec<usize>>,
        /// Chunk sizes of the chunked kernel [default: 16,32,64,128].
        #[arg(long, value_delimiter = ',')]
        chunk: Option<Vec<usize>>,
        /// Verify the backward instead: every gradient of the compiled backward programs (the
        /// recurrent one with a checkpoint at every token and at its default interval, the
        /// chunked one at every chunk size) against the reference gradient (f64 reverse
        /// mode), one row per tensor.
        #[arg(long)]
        grad: bool,
        /// Backends to verify [default: recurrent,chunked]. Naming `chunked` for a rule that
        /// cannot be chunked is an error; by default such a rule verifies its recurrent kernel.
        #[arg(long, value_enum, value_delimiter = ',')]
        backend: Option<Vec<RunBackend>>,
        /// The GPU target of --backend ptx-sim or cuda (default: sm_90).
        #[arg(long, value_enum)]
        target: Option<GpuTarget>,
        #[arg(long = "B", default_value_t = 2)]
        batch: usize,
        #[arg(long = "H", default_value_t = 2)]
        heads: usize,
        #[arg(long = "K", default_value_t = 32)]
        k: usize,
        #[arg(long = "V", default_value_t = 40)]
        v: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Columns of V per grid point (a V-tile dimension of the grid, as FLA's BV); must
        /// divide V. Default: the whole V.
        #[arg(long)]
        bv: Option<usize>,
        /// The chunked program: fused (one sequential phase) or split (a state pass, then a
        /// chunk-parallel output pass).
        #[arg(long, value_enum, default_value = "fused")]
        program: ProgramArg,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// CPU executor: tokens per time block (every head's first block, then every head's
        /// next block, ...: rows of all heads at a token share a page); 0: head by head.
        #[arg(long, default_value_t = chunkc::codegen::schedule::DEFAULT_TIME_BLOCK)]
        time_block: usize,
        #[command(flatten)]
        precision: PrecisionArgs,
        #[arg(long, value_enum, default_value = "jit", hide = true)]
        engine: EngineArg,
    },
    /// Time a kernel on random inputs: median of repeated runs after a warm-up.
    ///
    /// Prints the median time, token-heads per second and GFLOP/s. FLOPs are the chunk-form
    /// count of FLA's torch benchmark, per token and head: 2 C K + 2 C V (intra-chunk scores
    /// and their product with the values) + 4 K V (state update and inter-chunk read); the
    /// recurrent kernel is counted at 4 K V. Delta rules do more work than this count.
    ///
    /// Timed: one kernel launch over the (batch, head, V-tile) grid in the --time-block order
    /// (the workers' scratch allocation, thread start-up and the kernel calls). Not timed:
    /// generating the random inputs, the compile, and allocating the outputs, which are
    /// NaN-poisoned once before an untimed warm-up run that must write every element; later
    /// runs overwrite the same buffers. The best run is printed beside the median: on a
    /// shared machine it is the least disturbed one.
    Bench {
        rule: PathBuf,
        /// B,T,H,K,V
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2048, 8, 128, 128])]
        shape: Vec<usize>,
        /// The kernel on this CPU (recurrent, chunked), or `cuda`: --kernel's PTX on CUDA
        /// device 0, timed with CUDA events (module loaded and buffers copied once)
        /// [default: chunked].
        #[arg(long, value_enum)]
        backend: Option<RunBackend>,
        /// The kernel --backend cuda times (default: chunked).
        #[arg(long, value_enum)]
        kernel: Option<KernelArg>,
        /// The GPU target of --backend cuda (default: sm_90).
        #[arg(long, value_enum)]
        target: Option<GpuTarget>,
        #[command(flatten)]
        precision: PrecisionArgs,
        /// The chunk size [default: 16 for the forward on the CPU (measured fastest for every
        /// class at the default shape, docs/performance.md round 12), 64 with --grad or cuda]
        #[arg(long)]
        chunk: Option<usize>,
        /// Time forward + backward: the backward program of --backend (its forward phases,
        /// then the reverse pass; --program and --bv shape the chunked one), on random inputs
        /// and cotangents.
        #[arg(long, conflicts_with = "tuned")]
        grad: bool,
        /// With --grad: tokens between stored states (recurrent: default about sqrt(T), at
        /// most 16; chunked: a multiple of the chunk, default every chunk's).
        #[arg(long, requires = "grad")]
        checkpoint: Option<usize>,
        /// Worker threads (0: all cores).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// CPU executor: tokens per time block (every head's first block, then every head's
        /// next block, ...: rows of all heads at a token share a page); 0: head by head.
        #[arg(long, default_value_t = chunkc::codegen::schedule::DEFAULT_TIME_BLOCK)]
        time_block: usize,
        /// At least this many timed runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
        /// Columns of V per grid point (a V-tile dimension of the grid, as FLA's BV); must
        /// divide V. Default: the whole V.
        #[arg(long)]
        bv: Option<usize>,
        /// The chunked program: fused (one sequential phase) or split (a state pass, then a
        /// chunk-parallel output pass).
        #[arg(long, value_enum, default_value = "fused")]
        program: ProgramArg,
        /// Use the schedule `chunkc tune` found for this rule, --shape and --threads on this
        /// CPU (kernel, chunk, time block, V-tile).
        #[arg(long, conflicts_with_all = ["backend", "chunk", "time_block", "bv"])]
        tuned: bool,
        /// The tuning cache --tuned reads (default: $CHUNKC_TUNE_CACHE, else
        /// ~/.cache/chunkc/tune.toml).
        #[arg(long, requires = "tuned")]
        cache: Option<PathBuf>,
    },
    /// Find the fastest verified CPU schedule of a rule for one shape and thread count, and
    /// keep it in the tuning cache for --tuned.
    ///
    /// A staged search: first the kernel and chunk size (recurrent; chunked at 16, 32, 64,
    /// 128), then the chunked program (fused or split), then the executor's time block, then
    /// the V-tile, each stage from the last one's winner. Every candidate is compiled and run once on random inputs and held to the f64
    /// reference of those inputs (1e-5 relative RMS) before it is timed; a stage's
    /// candidates are timed in interleaved rounds and scored by their best run, and replace
    /// the stage's incumbent only when more than 2% faster. The winner then races the default
    /// schedule (chunked C=64, time block 256, the whole V) once more and is kept only if it
    /// beats it by 2% there too. A candidate with wrong outputs is a bug: it is
    /// printed, nothing is saved and the command fails.
    Tune {
        rule: PathBuf,
        /// B,T,H,K,V; repeat `--shape` to tune several shapes in one go, one after the other
        #[arg(long, value_delimiter = ',', action = clap::ArgAction::Append, default_values_t = [1, 2048, 8, 128, 128])]
        shape: Vec<usize>,
        /// Worker threads (0: all cores).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Rounds of each stage's race (the confirming race runs about twice as many).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The tuning cache to update (default: $CHUNKC_TUNE_CACHE, else
        /// ~/.cache/chunkc/tune.toml).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Seed of the random tuning inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print one JSON line (the winner) after the table.
        #[arg(long)]
        json: bool,
    },
    /// Write random inputs for a rule (each drawn from its input's domain, as `verify` draws
    /// them) and `h0`, to a safetensors file that `run` and `grad` read.
    Inputs {
        rule: PathBuf,
        /// B,T,H,K,V
        #[arg(long, value_delimiter = ',', default_values_t = [1, 256, 4, 64, 64])]
        shape: Vec<usize>,
        #[arg(long)]
        out: PathBuf,
        /// Also write the cotangents `do` and `dhT` (the loss of `grad`).
        #[arg(long)]
        grad: bool,
        /// Leave out `h0` (the run starts from a zero state).
        #[arg(long)]
        no_h0: bool,
        /// A varlen batch of sequences of these lengths (e.g. 37,5,64), packed along T of a
        /// batch of one with their `cu_seqlens`; `--shape` then gives H, K and V only (its B
        /// and T are ignored) and `h0` is [N, H, K, V].
        #[arg(long, value_delimiter = ',')]
        varlen: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Estimate a rule's PTX program on a GPU: an analytic model per phase (grid, waves,
    /// one CTA's chain of ops with its barriers and memory latencies, FLOPs at the tensor-core
    /// rate, bytes at HBM bandwidth), the total and the shape's roofline floor. An estimate,
    /// not a measurement: the GPUs' figures and the latencies it assumes are printed with it.
    Model {
        rule: PathBuf,
        /// The GPU (the model's table: h100, h200, a100).
        #[arg(long, default_value = "h100")]
        gpu: String,
        /// B,T,H,K,V
        #[arg(long, value_delimiter = ',', default_value = "2,8192,16,128,128")]
        shape: Vec<usize>,
        #[arg(long, value_enum, default_value = "chunked")]
        backend: BackendArg,
        #[arg(long, default_value_t = 64)]
        chunk: usize,
        /// Columns of V per grid point (must divide V). Default: the whole V.
        #[arg(long)]
        bv: Option<usize>,
        #[arg(long, value_enum, default_value = "split")]
        program: ProgramArg,
        /// sm_80 or sm_90 [default: sm_90, sm_80 for the a100]
        #[arg(long, value_enum)]
        target: Option<Target>,
        /// Input element type and dot precision default to bf16 here (a GPU's usual);
        /// `--dtype f32` alone gives f32 fma dots.
        #[command(flatten)]
        precision: PrecisionArgs,
        /// One JSON line: est_ms, floor_ms, and the phases.
        #[arg(long)]
        json: bool,
        /// Estimate the chunked schedules around this one (chunk, program, V-tile, warps,
        /// stages) and print the best N: candidates for a GPU to time.
        #[arg(long, value_name = "N")]
        rank: Option<usize>,
        /// Also print each phase's chain op by op: the cycles the model gives every statement
        /// of one CTA (where the time goes).
        #[arg(long, conflicts_with_all = ["json", "rank"])]
        ops: bool,
        /// Estimate the chunked backward program instead (its forward phases, then the reverse
        /// ones: fused or split as --program says; with --rank, both).
        #[arg(long)]
        grad: bool,
    },
    /// Print the tile IR of a rule's kernel, or write its PTX (sm_80, sm_90) and launch metadata.
    Compile {
        rule: PathBuf,
        #[arg(long, value_enum, default_value = "cpu")]
        target: Target,
        /// Folder for .ptx and .json files (GPU targets; default: print the PTX).
        #[arg(short = 'o', long = "out-dir")]
        out_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "chunked")]
        backend: BackendArg,
        #[arg(long, default_value_t = 64)]
        chunk: usize,
        #[arg(long = "H", default_value_t = 1)]
        heads: usize,
        #[arg(long = "K", default_value_t = 64)]
        k: usize,
        #[arg(long = "V", default_value_t = 64)]
        v: usize,
        /// Columns of V per grid point (a V-tile dimension of the grid, as FLA's BV); must
        /// divide V. Default: the whole V.
        #[arg(long)]
        bv: Option<usize>,
        /// The chunked program: fused (one sequential phase) or split (a state pass, then a
        /// chunk-parallel output pass).
        #[arg(long, value_enum, default_value = "fused")]
        program: ProgramArg,
        #[command(flatten)]
        precision: PrecisionArgs,
        /// The backward program instead of the forward: chunked (--backend chunked) or
        /// recurrent with a checkpoint every --checkpoint tokens.
        #[arg(long)]
        grad: bool,
        /// With --grad: tokens between the recurrent backward's checkpoints (default 16), or
        /// between the states the chunked backward stores (a multiple of --chunk; default:
        /// every chunk's).
        #[arg(long)]
        checkpoint: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        // A rule diagnostic already starts with `file:line:col: error:`.
        Err(Error::Rule(d)) => {
            eprint!("{d}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn engine(e: EngineArg) -> Engine {
    match e {
        EngineArg::Jit => Engine::Jit,
        EngineArg::Interp => Engine::Interp,
    }
}

/// `bench --grad`: forward + backward through the backward program of `backend` (chunked
/// unless named), printed as `bench` prints.
/// `bench --backend cuda`: the forward program's PTX on device 0, on random inputs, timed
/// with CUDA events over `runs` runs after two warm-ups.
fn bench_cuda(
    rule: &Rule,
    dims: chunkc::dsl::reference::Dims,
    schedule: &Schedule,
    sm: ptx::Sm,
    runs: usize,
    json: bool,
) -> Result<ExitCode, Error> {
    let chunkc::dsl::reference::Dims { batch, seq_len, heads, k, v } = dims;
    if [batch, seq_len, heads, k, v].contains(&0) {
        return Err(Error::Input("--shape: every size must be at least 1".into()));
    }
    let shape = chunkc::codegen::plan::Shape { heads, k, v, scale: 1.0 / (k as f64).sqrt() };
    let program = backend::build_program(rule, shape, schedule)?;
    let tensors = chunkc::verify::random_inputs(rule, &dims, 1);
    let times = chunkc::gpu::time(&program, &tensors, dims, sm, &schedule.ptx, 2, runs.max(1))?;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let (best, median) = (sorted[0], sorted[sorted.len() / 2]);
    let kernel = if schedule.kernel == KernelKind::Chunked {
        format!("chunked chunk {}", schedule.chunk)
    } else {
        "recurrent".into()
    };
    let precision = format!(
        "{} inputs, {:?} dots, {} warps, {} stage(s)",
        schedule.input.name(),
        schedule.ptx.dot,
        schedule.ptx.warps,
        schedule.ptx.stages
    );
    if json {
        let line = serde_json::json!({
            "rule": rule.name, "backend": "cuda", "target": sm.name(), "kernel": kernel,
            "program": schedule.program.name(), "precision": precision,
            "shape": [batch, seq_len, heads, k, v], "runs": times.len(), "median_ms": median, "best_ms": best,
        });
        println!("{line}");
    } else {
        println!(
            "{} cuda ({}) {kernel}, {} program, {precision}, B={batch} T={seq_len} H={heads} K={k} V={v}: median {median:.4} ms (best {best:.4}) of {} runs (CUDA events)",
            rule.name,
            sm.name(),
            schedule.program.name(),
            times.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench_grad(
    rule: &Rule,
    dims: chunkc::dsl::reference::Dims,
    backend: Option<BackendArg>,
    (chunk, checkpoint, bv, program): (usize, Option<usize>, Option<usize>, ProgramShape),
    threads: usize,
    runs: usize,
    json: bool,
) -> Result<ExitCode, Error> {
    let backend = match backend {
        None | Some(BackendArg::Chunked) => Backend::Chunked,
        Some(BackendArg::Recurrent) => Backend::Recurrent,
        Some(BackendArg::Reference) => {
            return Err(Error::Input("bench times compiled kernels: choose --backend recurrent or chunked".into()))
        }
    };
    let chunkc::dsl::reference::Dims { batch, seq_len, heads, k, v } = dims;
    let every = checkpoint.unwrap_or_else(|| chunkc::codegen::plan::backward::checkpoint_interval(seq_len));
    let threads = if threads == 0 { chunkc::runtime::exec::default_threads() } else { threads };
    // The chunked backward stores every chunk's state unless --checkpoint says otherwise.
    let checkpoint = if backend == Backend::Chunked { checkpoint } else { Some(every) };
    let opts = chunkc::grad::GradOptions { backend, checkpoint, chunk, bv, program, ..Default::default() };
    let m = chunkc::bench::bench_grad(rule, dims, &opts, threads, runs, std::time::Duration::from_secs(1))?;
    let (median, best) = (m.median.as_secs_f64() * 1e3, m.best.as_secs_f64() * 1e3);
    let tiles = bv.map(|b| format!(", bv {b}")).unwrap_or_default()
        + if program == ProgramShape::Split { ", split program" } else { "" };
    let (label, every_shown) = match (backend, checkpoint) {
        (Backend::Chunked, Some(n)) => (format!("chunked chunk {chunk}{tiles}, states stored every {n} tokens"), chunk),
        (Backend::Chunked, None) => (format!("chunked chunk {chunk}{tiles}"), chunk),
        _ => (format!("recurrent, checkpoint every {every} tokens"), every),
    };
    if json {
        println!(
            "{{\"rule\":\"{}\",\"backend\":\"{}\",\"pass\":\"forward+backward\",\"chunk\":{every_shown},\"program\":\"{}\",\"bv\":{},\"shape\":[{batch},{seq_len},{heads},{k},{v}],\"threads\":{threads},\"runs\":{},\"median_ms\":{median:.4},\"best_ms\":{best:.4},\"token_heads_per_s\":{:.1},\"gflops\":{:.3}}}",
            rule.name,
            backend.name(),
            program.name(),
            bv.map_or("null".to_string(), |b| b.to_string()),
            m.runs,
            m.token_heads_per_s(),
            m.gflops()
        );
    } else {
        println!(
            "{} forward + backward, {label}, B={batch} T={seq_len} H={heads} K={k} V={v}, {threads} thread(s): \
             median {median:.2} ms (best {best:.2}) of {} runs, {:.3} M token-heads/s, {:.1} GFLOP/s \
             (FLOP count: `chunkc bench --help`)",
            rule.name,
            m.runs,
            m.token_heads_per_s() / 1e6,
            m.gflops()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `verify --grad`: the backward of `backends` against the reference gradient (a rule's
/// chunked backward only where it can be built; a named one that cannot is an error).
fn verify_grad(
    rule: &std::path::Path,
    backends: Option<Vec<RunBackend>>,
    target: Option<GpuTarget>,
    cpu: Engine,
    mut plan: verify::Plan,
) -> Result<ExitCode, Error> {
    let named = backends.is_some();
    let backends = backends.unwrap_or_else(|| vec![RunBackend::Recurrent, RunBackend::Chunked]);
    if [plan.batch, plan.heads, plan.k, plan.v].contains(&0) || plan.seq_lens.as_ref().is_some_and(|t| t.contains(&0)) {
        return Err(Error::Input(
            "--B, --H, --K, --V and --T must be at least 1: an empty problem verifies nothing".into(),
        ));
    }
    if plan.chunks.contains(&0) {
        return Err(Error::Input("--chunk sizes must be at least 1".into()));
    }
    let loaded = load_rule(rule)?;
    let chunked = chunked_backward(&loaded.rule);
    for b in backends.iter().filter(|b| **b != RunBackend::Reference) {
        for run in b.runs(&[Backend::Recurrent, Backend::Chunked], target, cpu) {
            if plan.runs.contains(&run) {
                continue;
            }
            if let (Backend::Chunked, Err(why)) = (run.0, &chunked) {
                if named && *b == RunBackend::Chunked {
                    return Err(Error::Unsupported(format!("verify --grad --backend chunked: {why}")));
                }
                println!("note: no chunked backward ({why}); verifying the recurrent one");
                continue;
            }
            plan.runs.push(run);
        }
    }
    println!(
        "verify the backward of {} against the f64 reference gradient: B={} H={} K={} V={}, \
         L = sum(o * do) + sum(hT * dhT), relative RMS within each row's tolerance",
        loaded.rule.name, plan.batch, plan.heads, plan.k, plan.v
    );
    println!("(chunk: the chunked backward's chunk size, or the recurrent one's checkpoint interval)");
    let tiles = plan.schedule.bv.map(|bv| format!(", V-tiles of {bv} columns")).unwrap_or_default();
    println!("(the chunked backward: the {} program{tiles})", plan.schedule.program.name());
    println!("{:<10} {:>5} {:>6} {:<12} {:>12} {:>6}  result", "backend", "chunk", "T", "tensor", "error", "tol");
    let rows = chunkc::verify_grad::verify_grad(&loaded.rule, &plan, |r| {
        println!(
            "{:<10} {:>5} {:>6} {:<12} {:>12.3e} {:>6.0e}  {}",
            r.label,
            r.chunk,
            r.seq_len,
            r.tensor,
            r.err,
            r.tolerance,
            if r.pass { "ok" } else { "FAIL" }
        );
    })?;
    verdict("verify --grad", rows.iter().map(|r| r.pass))
}

/// The last line of a verification table (`N passed, M failed`) and the exit code; no rows at
/// all is an error (nothing was checked).
fn verdict(command: &str, passes: impl Iterator<Item = bool>) -> Result<ExitCode, Error> {
    let (mut passed, mut failed) = (0, 0);
    for pass in passes {
        if pass {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if passed + failed == 0 {
        return Err(Error::Internal(format!("{command} ran no rows: nothing was checked")));
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Whether `rule` has a chunked backward, or why not (the program is built on a small
/// shape).
fn chunked_backward(rule: &Rule) -> Result<(), String> {
    let canon = chunkc::dsl::canon::canonicalize(rule).map_err(|n| format!("not chunkable: {}", n.reason))?;
    let probe = chunkc::codegen::plan::Shape { heads: 1, k: 4, v: 4, scale: 0.5 };
    chunkc::codegen::plan::backward::chunked(rule, &canon, probe, Schedule::chunked(4), 1)
        .map(|_| ())
        .map_err(|e| e.0.trim_start_matches(&format!("rule `{}`: ", rule.name)).to_string())
}

/// `run` on a varlen batch: the inputs packed along T of a batch of one, sequence n being
/// tokens `cu_seqlens[n]..cu_seqlens[n+1]` (FLA's layout), through the library's packed
/// executor.
fn run_varlen(
    rule_path: &std::path::Path,
    tensors: &chunkc::runtime::io::Tensors,
    cu: &chunkc::runtime::tensor::Tensor,
    opts: &Options,
) -> Result<BTreeMap<String, chunkc::runtime::tensor::Tensor>, Error> {
    use chunkc::{Heads, Inputs, Target, TensorRef};
    if cu.shape.len() != 1 {
        return Err(Error::Input(format!(
            "tensor `cu_seqlens`: expected one dimension [N + 1], got shape {:?}",
            cu.shape
        )));
    }
    let offsets: Vec<i64> = cu.data.iter().map(|&x| x as i64).collect();
    if cu.data.iter().zip(&offsets).any(|(&x, &i)| x != i as f32) {
        return Err(Error::Input("tensor `cu_seqlens` holds values that are not whole numbers".into()));
    }
    let target = match opts.engine {
        Engine::Jit => Target::Cpu,
        Engine::Ptx { device: chunkc::gpu::Device::Sim, target } => Target::PtxSim(target),
        Engine::Ptx { device: chunkc::gpu::Device::Cuda, target } => Target::Cuda(target),
        Engine::Interp => return Err(Error::Unsupported("the interpreter does not run varlen batches".into())),
    };
    let schedule = opts
        .kernel_schedule()
        .ok_or_else(|| Error::Unsupported("varlen batches run on compiled kernels, not --backend reference".into()))?;
    let rule = chunkc::Rule::load(rule_path)?;
    let states: Vec<String> =
        std::iter::once("h0".to_string()).chain(rule.ast().states.iter().map(|s| s.initial_name())).collect();
    let per_token: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .filter(|(n, _)| *n != "cu_seqlens" && !states.contains(n))
        .map(|(n, t)| (n.clone(), t.shape.clone()))
        .collect();
    let dims = chunkc::problem::infer_dims_of_shapes(rule.ast(), &per_token, "the inputs")?;
    let heads = Heads { heads: dims.heads, k: dims.k, v: dims.v, scale: opts.scale };
    let program = chunkc::compile(&rule, target, schedule, heads)?.with_threads(opts.threads);
    let mut inputs = Inputs::new();
    for (name, t) in tensors.iter().filter(|(n, _)| *n != "cu_seqlens") {
        inputs.insert(name, TensorRef::f32(&t.data, &t.shape)?);
    }
    Ok(program.forward_varlen(&inputs, offsets.as_slice())?.0)
}

fn dispatch(cmd: Command) -> Result<ExitCode, Error> {
    match cmd {
        Command::Check { rule } => check(&rule),
        Command::Run {
            rule,
            inputs,
            out,
            backend,
            kernel,
            target,
            chunk,
            threads,
            time_block,
            scale,
            bv,
            program,
            precision,
            tuned,
            cache,
            allow_extra,
            engine: e,
        } => {
            check_bv(bv)?;
            check_ptx_flags(&[backend], target.is_some(), kernel.is_some(), &precision)?;
            let on_gpu = matches!(backend, RunBackend::PtxSim | RunBackend::Cuda);
            let chunk = chunk.unwrap_or(if on_gpu { GPU_DEFAULT_CHUNK } else { CPU_DEFAULT_CHUNK });
            let schedule = Schedule::chunked(chunk)
                .with_time_block(time_block)
                .with_bv(bv)
                .with_program(ProgramShape::from(program));
            let mut schedule = precision.apply(schedule)?;
            let loaded = load_rule(&rule)?;
            let shown = inputs.display().to_string();
            let (tensors, _) = chunkc::runtime::io::read_safetensors(&inputs)?;
            chunkc::problem::check_known_tensors(
                &loaded.rule,
                &tensors,
                &shown,
                "run",
                &["h0", "cu_seqlens"],
                allow_extra,
            )?;
            for (name, t) in &tensors {
                let bad = t.count_non_finite();
                let a_state = name == "h0" || loaded.rule.states.iter().any(|s| s.initial_name() == *name);
                if bad > 0 && (a_state || loaded.rule.input(name).is_some()) {
                    eprintln!("warning: tensor `{name}` in {shown} holds {bad} NaN or infinite values");
                }
            }
            let kernel = match kernel {
                Some(KernelArg::Recurrent) => Backend::Recurrent,
                _ => Backend::Chunked,
            };
            let [(mut be, eng)] = backend.runs(&[kernel], target, engine(e))[..] else {
                return Err(Error::Internal("one backend must give one run".into()));
            };
            if tuned {
                let dims = chunkc::problem::infer_dims(&loaded.rule, &tensors, &shown)?;
                schedule = tuned_schedule(&loaded.rule, &dims, threads, cache.as_deref())?;
                be = backend_of(&schedule);
            }
            let opts = Options { backend: be, engine: eng, schedule, threads, scale };
            let written = match tensors.get("cu_seqlens") {
                Some(cu) => {
                    if tuned {
                        return Err(Error::Unsupported("--tuned does not take varlen inputs (cu_seqlens) yet".into()));
                    }
                    run_varlen(&rule, &tensors, cu, &opts)?
                }
                None => backend::run(&loaded.rule, &tensors, &shown, &opts)?.0,
            };
            let mut meta = BTreeMap::new();
            meta.insert("rule".to_string(), loaded.rule.name.clone());
            meta.insert("backend".to_string(), eng.label(be).to_string());
            if let Engine::Ptx { target, .. } = eng {
                meta.insert("kernel".to_string(), be.name().to_string());
                meta.insert("target".to_string(), target.name().to_string());
                meta.insert("dtype".to_string(), schedule.input.name().to_string());
                meta.insert("dot".to_string(), schedule.ptx.dot.name().to_string());
            }
            if be == Backend::Chunked {
                meta.insert("chunk".to_string(), schedule.chunk.to_string());
                meta.insert("program".to_string(), schedule.program.name().to_string());
            }
            let mut names: Vec<&str> = written.keys().map(String::as_str).collect();
            names.sort_by_key(|n| (*n != "o", *n));
            chunkc::runtime::io::write_safetensors(&out, &written, Some(meta))?;
            let listed = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
                _ => names.join(""),
            };
            println!("wrote {listed} to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Grad {
            rule,
            inputs,
            out,
            backend,
            target,
            kernel,
            chunk,
            checkpoint,
            bv,
            program,
            threads,
            scale,
            allow_extra,
            precision,
            engine: e,
        } => {
            check_bv(bv)?;
            let loaded = load_rule(&rule)?;
            let linear = loaded.canonical.is_ok();
            let backend = backend.unwrap_or(if linear { RunBackend::Chunked } else { RunBackend::Recurrent });
            check_ptx_flags(&[backend], false, false, &precision)?;
            if (target.is_some() || kernel.is_some()) && backend.device().is_none() {
                return Err(Error::Unsupported(
                    "--target and --kernel only apply to --backend ptx-sim and cuda".into(),
                ));
            }
            let shown = inputs.display().to_string();
            let (tensors, _) = chunkc::runtime::io::read_safetensors(&inputs)?;
            let kernel = match kernel {
                Some(KernelArg::Chunked) => Backend::Chunked,
                _ => Backend::Recurrent,
            };
            let [(be, eng)] = backend.runs(&[kernel], target, engine(e))[..] else {
                return Err(Error::Internal("one backend must give one run".into()));
            };
            let ptx = precision.ptx_precision()?;
            let opts = chunkc::grad::GradOptions {
                backend: be,
                engine: eng,
                threads,
                scale,
                checkpoint,
                chunk,
                bv,
                program: ProgramShape::from(program),
                ptx,
            };
            let written = chunkc::grad::grad(&loaded.rule, &tensors, &shown, &opts, allow_extra)?;
            let mut meta = BTreeMap::new();
            meta.insert("rule".to_string(), loaded.rule.name.clone());
            meta.insert("backend".to_string(), eng.label(be).to_string());
            meta.insert("loss".to_string(), "sum(o*do) + sum(hT*dhT)".to_string());
            chunkc::runtime::io::write_safetensors(&out, &written, Some(meta))?;
            let names: Vec<&str> = written.keys().map(String::as_str).collect();
            println!("wrote {} to {}", names.join(", "), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            rule,
            seq_lens,
            chunk,
            backend,
            target,
            batch,
            heads,
            k,
            v,
            seed,
            threads,
            time_block,
            bv,
            program,
            precision,
            grad,
            engine: e,
        } => {
            check_bv(bv)?;
            if grad {
                check_ptx_flags(backend.as_deref().unwrap_or(&[]), target.is_some(), false, &precision)?;
                let plan = verify::Plan {
                    runs: vec![],
                    chunks: chunk.unwrap_or_else(|| vec![16, 32, 64, 128]),
                    seq_lens,
                    batch,
                    heads,
                    k,
                    v,
                    threads,
                    seed,
                    schedule: precision
                        .apply(Schedule::recurrent().with_bv(bv).with_program(ProgramShape::from(program)))?,
                };
                return verify_grad(&rule, backend, target, engine(e), plan);
            }
            let chunk = chunk.unwrap_or_else(|| vec![16, 32, 64, 128]);
            let named = backend.is_some();
            let backend = backend.unwrap_or_else(|| vec![RunBackend::Recurrent, RunBackend::Chunked]);
            check_ptx_flags(&backend, target.is_some(), false, &precision)?;
            let schedule =
                Schedule::chunked(64).with_time_block(time_block).with_bv(bv).with_program(ProgramShape::from(program));
            let schedule = precision.apply(schedule)?;
            if [batch, heads, k, v].contains(&0) || seq_lens.as_ref().is_some_and(|t| t.contains(&0)) {
                return Err(Error::Input(
                    "--B, --H, --K, --V and --T must be at least 1: an empty problem verifies nothing".into(),
                ));
            }
            let loaded = load_rule(&rule)?;
            if let (Err(why), true) = (&loaded.canonical, named && backend.contains(&RunBackend::Chunked)) {
                return Err(Error::Unsupported(format!(
                    "--backend chunked: rule `{}` cannot be chunked ({}); verify its recurrent kernel with --backend recurrent",
                    loaded.rule.name, why.reason
                )));
            }
            let mut runs: Vec<(Backend, Engine)> = vec![];
            for b in &backend {
                for run in b.runs(&[Backend::Recurrent, Backend::Chunked], target, engine(e)) {
                    if !runs.contains(&run) {
                        runs.push(run);
                    }
                }
            }
            if let Err(why) = &loaded.canonical {
                if runs.iter().any(|(b, _)| *b == Backend::Chunked) {
                    println!("note: not chunkable ({}); verifying the recurrent kernel only", why.reason);
                    runs.retain(|(b, _)| *b != Backend::Chunked);
                }
            }
            if chunk.contains(&0) {
                return Err(Error::Input("--chunk sizes must be at least 1".into()));
            }
            let ptx_target = runs.iter().find_map(|(_, e)| match e {
                Engine::Ptx { target, .. } => Some(*target),
                _ => None,
            });
            let plan = verify::Plan { runs, chunks: chunk, seq_lens, batch, heads, k, v, threads, seed, schedule };
            plan.check_ready()?;
            let on_target = ptx_target.map(|t| format!(", PTX for {t}")).unwrap_or_default();
            println!(
                "verify {} against the f64 reference on the f32 inputs: B={batch} H={heads} K={k} V={v}{on_target}, \
                 {} chunked program, relative RMS within each row's tolerance",
                loaded.rule.name,
                schedule.program.name()
            );
            println!(
                "{:<10} {:>5} {:>6} {:<20} {:>12} {:>12} {:>6}  result",
                "backend",
                "chunk",
                "T",
                "precision",
                "err o",
                // With extra states the column holds the worst of hT and every <name>T.
                if loaded.rule.states.is_empty() { "err hT" } else { "err states" },
                "tol"
            );
            let rows = verify::verify(&loaded.rule, &plan, |r| {
                println!(
                    "{:<10} {:>5} {:>6} {:<20} {:>12.3e} {:>12.3e} {:>6.0e}  {}",
                    r.label(),
                    r.chunk.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    r.seq_len,
                    r.precision,
                    r.err_o,
                    r.err_ht,
                    r.tolerance,
                    if r.pass { "ok" } else { "FAIL" }
                );
            })?;
            verdict("verify", rows.iter().map(|r| r.pass))
        }
        Command::Bench {
            rule,
            shape,
            backend,
            chunk,
            grad,
            checkpoint,
            threads,
            time_block,
            runs,
            json,
            bv,
            program,
            tuned,
            cache,
            kernel,
            target,
            precision,
        } => {
            check_bv(bv)?;
            let backends = backend.map(|b| vec![b]).unwrap_or_default();
            check_ptx_flags(&backends, target.is_some(), kernel.is_some(), &precision)?;
            let loaded = load_rule(&rule)?;
            let dims = dims_of(&shape)?;
            let backend = match backend {
                Some(RunBackend::Cuda) => {
                    if grad || tuned {
                        return Err(Error::Unsupported(
                            "--backend cuda times the forward program: no --grad or --tuned".into(),
                        ));
                    }
                    let kernel = kernel.map_or(KernelKind::Chunked, |k| match k {
                        KernelArg::Recurrent => KernelKind::Recurrent,
                        KernelArg::Chunked => KernelKind::Chunked,
                    });
                    let chunk = chunk.unwrap_or(GPU_DEFAULT_CHUNK);
                    let schedule = Schedule::chunked(chunk)
                        .with_kernel(kernel, chunk)
                        .with_bv(bv)
                        .with_program(ProgramShape::from(program));
                    let schedule = precision.apply(schedule)?;
                    let sm = target.map_or(ptx::Sm::Sm90, GpuTarget::sm);
                    return bench_cuda(&loaded.rule, dims, &schedule, sm, runs, json);
                }
                Some(RunBackend::PtxSim) => {
                    return Err(Error::Unsupported(
                        "bench times the CPU kernels or --backend cuda; the simulator is for correctness".into(),
                    ))
                }
                Some(RunBackend::Reference) => Some(BackendArg::Reference),
                Some(RunBackend::Recurrent) => Some(BackendArg::Recurrent),
                Some(RunBackend::Chunked) => Some(BackendArg::Chunked),
                None => None,
            };
            if grad {
                let chunk = chunk.unwrap_or(GPU_DEFAULT_CHUNK);
                let shape = (chunk, checkpoint, bv, ProgramShape::from(program));
                return bench_grad(&loaded.rule, dims, backend, shape, threads, runs, json);
            }
            let chunk = chunk.unwrap_or(CPU_DEFAULT_CHUNK);
            let backend = backend.unwrap_or(BackendArg::Chunked);
            if chunk == 0 {
                return Err(Error::Input("--chunk must be at least 1".into()));
            }
            let chunkc::dsl::reference::Dims { batch, seq_len, heads, k, v } = dims;
            let kernel = Backend::from(backend).kernel().ok_or_else(|| {
                Error::Input("bench times compiled kernels: choose --backend recurrent or chunked".into())
            })?;
            let mut schedule = Schedule::chunked(chunk)
                .with_kernel(kernel, chunk)
                .with_time_block(time_block)
                .with_bv(bv)
                .with_program(ProgramShape::from(program));
            if tuned {
                schedule = tuned_schedule(&loaded.rule, &dims, threads, cache.as_deref())?;
            }
            let be = backend_of(&schedule);
            let (chunk, time_block, bv) = (schedule.chunk, schedule.time_block, schedule.bv);
            let threads = if threads == 0 { chunkc::runtime::exec::default_threads() } else { threads };
            let m =
                chunkc::bench::bench(&loaded.rule, dims, &schedule, threads, runs, std::time::Duration::from_secs(1))?;
            let chunk_shown = if be == Backend::Chunked { chunk.to_string() } else { "-".into() };
            if json {
                println!(
                    "{{\"rule\":\"{}\",\"backend\":\"{}\",\"chunk\":\"{chunk_shown}\",\"shape\":[{batch},{seq_len},{heads},{k},{v}],\"threads\":{threads},\"time_block\":{time_block},\"bv\":{},\"runs\":{},\"median_ms\":{:.4},\"best_ms\":{:.4},\"token_heads_per_s\":{:.1},\"gflops\":{:.3}}}",
                    loaded.rule.name, be.name(), bv.map_or("null".to_string(), |b| b.to_string()), m.runs, m.median.as_secs_f64() * 1e3, m.best.as_secs_f64() * 1e3, m.token_heads_per_s(), m.gflops()
                );
            } else {
                println!(
                    "{} {} chunk {chunk_shown}, time block {time_block}{}, B={batch} T={seq_len} H={heads} K={k} V={v}, {threads} thread(s): median {:.2} ms (best {:.2}) of {} runs, {:.3} M token-heads/s, {:.1} GFLOP/s (FLOP count: `chunkc bench --help`)",
                    loaded.rule.name, be.name(), bv.map_or(String::new(), |b| format!(", bv {b}")), m.median.as_secs_f64() * 1e3, m.best.as_secs_f64() * 1e3, m.runs, m.token_heads_per_s() / 1e6, m.gflops()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inputs { rule, shape, out, grad, no_h0, varlen, seed } => {
            let loaded = load_rule(&rule)?;
            let mut dims = dims_of(&shape)?;
            if !varlen.is_empty() {
                if grad {
                    return Err(Error::Unsupported("--grad does not take --varlen yet".into()));
                }
                if varlen.contains(&0) {
                    return Err(Error::Input("--varlen: every sequence needs at least one token".into()));
                }
                dims = chunkc::dsl::reference::Dims { batch: 1, seq_len: varlen.iter().sum(), ..dims };
            }
            let mut tensors = if grad {
                chunkc::verify_grad::random_grad_inputs(&loaded.rule, &dims, seed)
            } else {
                chunkc::verify::random_inputs(&loaded.rule, &dims, seed)
            };
            if !varlen.is_empty() {
                // One initial state per sequence, and the offsets.
                let per_sequence = chunkc::dsl::reference::Dims { batch: varlen.len(), seq_len: 1, ..dims };
                let states = chunkc::verify::random_inputs(&loaded.rule, &per_sequence, seed + 1);
                for (name, t) in states {
                    if loaded.rule.input(&name).is_none() {
                        tensors.insert(name, t);
                    }
                }
                let cu: Vec<f32> = std::iter::once(0.0)
                    .chain(varlen.iter().scan(0usize, |end, &l| {
                        *end += l;
                        Some(*end as f32)
                    }))
                    .collect();
                tensors.insert("cu_seqlens".into(), chunkc::runtime::tensor::Tensor::new(vec![cu.len()], cu)?);
            }
            if no_h0 {
                tensors.remove("h0");
                for s in &loaded.rule.states {
                    tensors.remove(&s.initial_name());
                }
            }
            chunkc::runtime::io::write_safetensors(&out, &tensors, None)?;
            let names: Vec<String> = tensors.iter().map(|(n, t)| format!("{n} {:?}", t.shape)).collect();
            println!("wrote {}: {}", out.display(), names.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Tune { rule, shape, threads, rounds, cache, seed, json } => {
            if shape.is_empty() || !shape.len().is_multiple_of(5) {
                return Err(Error::Input(
                    "--shape takes five sizes per shape, B,T,H,K,V (repeat --shape for more shapes)".into(),
                ));
            }
            let shapes = shape.chunks(5).map(dims_of).collect::<Result<Vec<_>, _>>()?;
            let loaded = load_rule(&rule)?;
            for (i, &dims) in shapes.iter().enumerate() {
                if shapes.len() > 1 {
                    println!("shape {} of {}", i + 1, shapes.len());
                }
                tune_rule(&loaded, dims, threads, rounds, cache.as_deref(), seed, json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { rule, gpu, shape, backend, chunk, bv, program, target, precision, json, rank, ops, grad } => {
            model(&rule, &gpu, &shape, (backend, chunk, bv, program, grad), target, precision, (json, rank, ops))
        }
        Command::Compile {
            rule,
            target,
            out_dir,
            backend,
            chunk,
            heads,
            k,
            v,
            bv,
            program,
            precision,
            grad,
            checkpoint,
        } => {
            check_bv(bv)?;
            if matches!(target, Target::Cpu) {
                if let Some(flag) = precision.given().first() {
                    return Err(Error::Unsupported(format!(
                        "{flag} goes with --target sm_80 or sm_90 (the CPU backend reads f32 inputs and computes f32 dots)"
                    )));
                }
            }
            let loaded = load_rule(&rule)?;
            let Some(kernel) = Backend::from(backend).kernel() else {
                return Err(Error::Input("the reference has no kernel; choose --backend recurrent or chunked".into()));
            };
            if heads == 0 || k == 0 || v == 0 || chunk == 0 {
                return Err(Error::Input("--H, --K, --V and --chunk must be at least 1".into()));
            }
            match &loaded.canonical {
                Ok(c) => println!("class: {}", c.class.describe()),
                Err(why) => println!("class: not chunkable ({})", why.reason),
            }
            let shape = chunkc::codegen::plan::Shape { heads, k, v, scale: 1.0 / (k as f64).sqrt() };
            let schedule = Schedule::chunked(chunk)
                .with_kernel(kernel, chunk)
                .with_bv(bv)
                .with_program(ProgramShape::from(program));
            let schedule = precision.apply(schedule)?;
            let program = if grad {
                let backend = Backend::from(backend);
                let checkpoint = match backend {
                    Backend::Chunked => checkpoint,
                    _ => Some(checkpoint.unwrap_or(16)),
                };
                let seq_len = chunk.max(checkpoint.unwrap_or(1));
                let dims = chunkc::dsl::reference::Dims { batch: 1, seq_len, heads, k, v };
                let ptx = chunkc::grad::PtxPrecision::of(&schedule);
                let program = ProgramShape::from(program);
                let opts =
                    chunkc::grad::GradOptions { backend, chunk, checkpoint, bv, program, ptx, ..Default::default() };
                chunkc::grad::build_program(&loaded.rule, &dims, &opts)?
            } else {
                backend::build_program(&loaded.rule, shape, &schedule)?
            };
            let sm = match target {
                Target::Cpu => {
                    print_all(&program.to_string())?;
                    return Ok(ExitCode::SUCCESS);
                }
                Target::Sm80 => ptx::Sm::Sm80,
                Target::Sm90 => ptx::Sm::Sm90,
            };
            compile_ptx(&program, sm, &schedule.ptx, out_dir.as_deref())
        }
    }
}

use chunkc::codegen::ptx;

/// `--bv 0` is refused here, in one line; whether BV divides V and the rule allows V-tiles is
/// the planner's to say (it knows V and the rule).
/// `chunkc model`: builds the program as `compile --target` does and prints the estimate.
fn model(
    rule: &std::path::Path,
    gpu: &str,
    shape: &[usize],
    (backend, chunk, bv, program, grad): (BackendArg, usize, Option<usize>, ProgramArg, bool),
    target: Option<Target>,
    mut precision: PrecisionArgs,
    (json, rank, ops): (bool, Option<usize>, bool),
) -> Result<ExitCode, Error> {
    use chunkc::autotune::model;
    let gpu_key = gpu;
    let gpu = model::gpu(gpu).map_err(Error::Input)?;
    let dims = dims_of(shape)?;
    check_bv(bv)?;
    if chunk == 0 {
        return Err(Error::Input("--chunk must be at least 1".into()));
    }
    let dtype = *precision.dtype.get_or_insert(DtypeArg::Bf16);
    precision.dot.get_or_insert(match dtype {
        DtypeArg::F32 => DotArg::F32,
        DtypeArg::Bf16 => DotArg::Bf16,
        DtypeArg::F16 => DotArg::F16,
    });
    let sm = match target.unwrap_or(if gpu_key.eq_ignore_ascii_case("a100") { Target::Sm80 } else { Target::Sm90 }) {
        Target::Cpu => return Err(Error::Input("the model estimates GPU programs: --target sm_80 or sm_90".into())),
        Target::Sm80 => ptx::Sm::Sm80,
        Target::Sm90 => ptx::Sm::Sm90,
    };
    let loaded = load_rule(rule)?;
    let Some(kernel) = Backend::from(backend).kernel() else {
        return Err(Error::Input("the reference has no kernel; choose --backend recurrent or chunked".into()));
    };
    let schedule =
        Schedule::chunked(chunk).with_kernel(kernel, chunk).with_bv(bv).with_program(ProgramShape::from(program));
    let schedule = precision.apply(schedule)?;
    if let Some(top) = rank {
        return model_rank(&loaded.rule, dims, &schedule, sm, &gpu, (top, grad), json);
    }
    if grad && schedule.kernel != KernelKind::Chunked {
        return Err(Error::Unsupported("model --grad estimates the chunked backward: no --backend recurrent".into()));
    }
    let (emitted, est) = model_estimate(&loaded.rule, dims, &schedule, sm, &gpu, grad)?;
    if json {
        let phases: Vec<serde_json::Value> = est
            .phases
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "grid": p.grid, "block": p.block, "smem_bytes": p.smem_bytes,
                    "scratch_bytes": p.scratch_bytes, "est_ms": p.est_ms,
                })
            })
            .collect();
        let line = serde_json::json!({ "est_ms": est.est_ms, "floor_ms": est.floor_ms, "phases": phases });
        println!("{line}");
        return Ok(ExitCode::SUCCESS);
    }
    let [b, t, h, k, v] = [dims.batch, dims.seq_len, dims.heads, dims.k, dims.v];
    println!(
        "ESTIMATE (an analytic model, not a measurement): {} {} on {}, {} B={b} T={t} H={h} K={k} V={v}, {} inputs, {:?} dots, {} warps",
        loaded.rule.name,
        emitted.spec.name,
        gpu.name,
        sm.name(),
        schedule.input.name(),
        schedule.ptx.dot,
        schedule.ptx.warps
    );
    println!(
        "{:<44} {:>16} {:>6} {:>9} {:>9} {:>7} {:>5} {:>6} {:>5} {:>9} {:>9} {:>9} {:>10}",
        "phase",
        "grid",
        "block",
        "smem B",
        "scratch B",
        "CTAs",
        "/SM",
        "waves",
        "iters",
        "barr/iter",
        "GFLOP",
        "MB",
        "est ms"
    );
    for p in &est.phases {
        let grid = format!("{}x{}x{}", p.grid[0], p.grid[1], p.grid[2]);
        println!(
            "{:<44} {:>16} {:>6} {:>9} {:>9} {:>7} {:>5} {:>6} {:>5} {:>9} {:>9.2} {:>9.1} {:>10.4} ({})",
            p.name,
            grid,
            p.block,
            p.smem_bytes,
            p.scratch_bytes,
            p.ctas,
            p.ctas_per_sm,
            p.waves,
            p.iterations,
            p.barriers_per_iteration,
            p.gflop,
            p.mbytes,
            p.est_ms,
            p.bound
        );
    }
    if ops {
        for p in &est.phases {
            println!(
                "{}: one CTA's chain, cycles (each op with one barrier; {} kept per iteration)",
                p.name, p.barriers_per_iteration
            );
            for o in &p.ops {
                let place = if o.in_loop { "per chunk" } else { "once" };
                println!("  {:<12} {:<18} {:>5}x{:<5} {:<9} {:>9.0}", o.what, o.kind, o.rows, o.cols, place, o.cycles);
            }
        }
    }
    println!(
        "estimate {:.4} ms; roofline floor of the shape {:.4} ms ({:.1}x the floor)",
        est.est_ms,
        est.floor_ms,
        est.est_ms / est.floor_ms
    );
    for a in model::assumptions(&gpu) {
        println!("assumes: {a}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The model's estimate of `schedule`'s forward program for `dims` on `gpu` (and the PTX it
/// estimated).
fn model_estimate(
    rule: &Rule,
    dims: chunkc::dsl::reference::Dims,
    schedule: &Schedule,
    sm: ptx::Sm,
    gpu: &chunkc::autotune::model::Gpu,
    grad: bool,
) -> Result<(ptx::PtxProgram, chunkc::autotune::model::Estimate), Error> {
    let shape =
        chunkc::codegen::plan::Shape { heads: dims.heads, k: dims.k, v: dims.v, scale: 1.0 / (dims.k as f64).sqrt() };
    let built = if grad {
        let opts = chunkc::grad::GradOptions {
            backend: Backend::Chunked,
            chunk: schedule.chunk,
            bv: schedule.bv,
            program: schedule.program,
            ptx: chunkc::grad::PtxPrecision::of(schedule),
            ..Default::default()
        };
        chunkc::grad::build_program(rule, &dims, &opts)?
    } else {
        backend::build_program(rule, shape, schedule)?
    };
    let emitted = chunkc::gpu::emit(&built, sm, &schedule.ptx)?;
    let per_token: usize = rule.inputs.iter().filter(|i| !i.per_head).map(|i| i.width(dims.k, dims.v)).sum();
    let problem = chunkc::autotune::model::Problem {
        batch: dims.batch,
        seq_len: dims.seq_len,
        heads: dims.heads,
        k: dims.k,
        v: dims.v,
        chunk: if schedule.kernel == KernelKind::Chunked { schedule.chunk } else { 1 },
        bytes_per_token_head: per_token as f64 * schedule.input.size() as f64 + dims.v as f64 * 4.0,
    };
    let est =
        chunkc::autotune::model::estimate(&built, &emitted, &schedule.ptx, gpu, &problem).map_err(Error::Internal)?;
    Ok((emitted, est))
}

/// `model --rank N`: the chunked schedules around `base` (chunk 32 / 64, fused / split, every
/// V-tile width dividing V from the whole V down to 16, 4 / 8 warps, 1 / 2 stages; the
/// input type and dot precision kept), each estimated, the best `top` printed. An estimate's
/// ranking, for a GPU run to confirm: candidates to time, not a choice.
fn model_rank(
    rule: &Rule,
    dims: chunkc::dsl::reference::Dims,
    base: &Schedule,
    sm: ptx::Sm,
    gpu: &chunkc::autotune::model::Gpu,
    (top, grad): (usize, bool),
    json: bool,
) -> Result<ExitCode, Error> {
    let mut widths: Vec<Option<usize>> = vec![None];
    widths.extend([64, 32, 16].into_iter().filter(|&w| w < dims.v && dims.v.is_multiple_of(w)).map(Some));
    let mut ranked = vec![];
    for chunk in [32, 64] {
        for program in [ProgramShape::Fused, ProgramShape::Split] {
            for &bv in &widths {
                for warps in [4, 8] {
                    for stages in [1, 2] {
                        let mut ptx = if stages == 2 {
                            PtxSchedule::pipelined(base.ptx.dot)
                        } else {
                            PtxSchedule::with_dot(base.ptx.dot)
                        };
                        ptx.warps = warps;
                        let schedule = Schedule::chunked(chunk)
                            .with_program(program)
                            .with_bv(bv)
                            .with_input(base.input)
                            .with_ptx(ptx);
                        // A V-tile the rule does not allow, or a schedule the target refuses:
                        // not a candidate.
                        if let Ok((_, est)) = model_estimate(rule, dims, &schedule, sm, gpu, grad) {
                            ranked.push((schedule, est));
                        }
                    }
                }
            }
        }
    }
    ranked.sort_by(|a, b| a.1.est_ms.total_cmp(&b.1.est_ms));
    ranked.truncate(top.max(1));
    let describe = |s: &Schedule| {
        format!(
            "--chunk {} --program {} {}--warps {} --stages {}",
            s.chunk,
            s.program.name(),
            s.bv.map(|b| format!("--bv {b} ")).unwrap_or_default(),
            s.ptx.warps,
            s.ptx.stages
        )
    };
    if json {
        let rows: Vec<serde_json::Value> = ranked
            .iter()
            .map(|(s, e)| serde_json::json!({ "flags": describe(s), "est_ms": e.est_ms, "floor_ms": e.floor_ms }))
            .collect();
        println!("{}", serde_json::json!({ "candidates": rows }));
        return Ok(ExitCode::SUCCESS);
    }
    let [b, t, h, k, v] = [dims.batch, dims.seq_len, dims.heads, dims.k, dims.v];
    println!(
        "ESTIMATES (an analytic model, not a measurement), best first: {}{} on {}, {} B={b} T={t} H={h} K={k} V={v}, {} inputs, {:?} dots",
        rule.name,
        if grad { " forward + backward" } else { "" },
        gpu.name,
        sm.name(),
        base.input.name(),
        base.ptx.dot
    );
    for (i, (s, e)) in ranked.iter().enumerate() {
        let phases: Vec<String> = e.phases.iter().map(|p| format!("{:.3}", p.est_ms)).collect();
        println!("{:>3}. {:>9.4} ms  {:<58} phases {}", i + 1, e.est_ms, describe(s), phases.join(" + "));
    }
    if let Some((_, e)) = ranked.first() {
        println!(
            "roofline floor of the shape {:.4} ms; time the candidates on a GPU (bench --backend cuda) before choosing",
            e.floor_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--shape B,T,H,K,V`.
fn dims_of(shape: &[usize]) -> Result<chunkc::dsl::reference::Dims, Error> {
    let [batch, seq_len, heads, k, v] = shape[..] else {
        return Err(Error::Input("--shape takes five sizes: B,T,H,K,V".into()));
    };
    if [batch, seq_len, heads, k, v].contains(&0) {
        return Err(Error::Input("--shape sizes must be at least 1".into()));
    }
    Ok(chunkc::dsl::reference::Dims { batch, seq_len, heads, k, v })
}

/// `--tuned`: the cached schedule for the rule, shape and threads (0: all cores), announced
/// on stderr so that a run's output says which schedule made it.
fn tuned_schedule(
    rule: &Rule,
    dims: &chunkc::dsl::reference::Dims,
    threads: usize,
    cache: Option<&std::path::Path>,
) -> Result<Schedule, Error> {
    let threads = if threads == 0 { chunkc::runtime::exec::default_threads() } else { threads };
    let path = tune::cache_path(cache)?;
    let tuned = tune::tuned_schedule(rule, dims, threads, &path)?;
    let own = [dims.batch, dims.seq_len, dims.heads, dims.k, dims.v];
    let at = if tuned.tuned_at == own {
        String::new()
    } else {
        let [b, t, h, k, v] = tuned.tuned_at;
        format!("; tuned at B={b} T={t} H={h} K={k} V={v}, the nearest tuned shape within 2x of this one")
    };
    eprintln!("tuned schedule: {} (from {}{at})", tuned.schedule, path.display());
    Ok(tuned.schedule)
}

/// The backend that runs a schedule's kernel.
fn backend_of(schedule: &Schedule) -> Backend {
    match schedule.kernel {
        KernelKind::Chunked => Backend::Chunked,
        KernelKind::Recurrent => Backend::Recurrent,
    }
}

/// `chunkc tune`: the search, its table as it goes, and the cache update.
fn tune_rule(
    loaded: &chunkc::Loaded,
    dims: chunkc::dsl::reference::Dims,
    threads: usize,
    rounds: usize,
    cache: Option<&std::path::Path>,
    seed: u64,
    json: bool,
) -> Result<ExitCode, Error> {
    use chunkc::autotune::{self as at, Outcome};
    let threads = if threads == 0 { chunkc::runtime::exec::default_threads() } else { threads };
    let path = tune::cache_path(cache)?;
    let mut store = at::Cache::open(&path).map_err(|e| Error::Input(e.to_string()))?;
    let rule = &loaded.rule;
    let chunkable = loaded.canonical.is_ok();
    let chunkc::dsl::reference::Dims { batch, seq_len, heads, k, v } = dims;
    println!(
        "tuning {} at B={batch} T={seq_len} H={heads} K={k} V={v}, {threads} thread(s), on {}",
        rule.name,
        tune::device()
    );
    let eval = tune::CpuEvaluator::new(rule, dims, threads, seed)?;
    let space = at::Space::new(at::Problem { seq_len, v, chunkable });
    let default = tune::default_schedule(chunkable);
    let settings = at::Settings { rounds, confirm_rounds: 2 * rounds.max(1) - 1, ..Default::default() };
    println!("{:<11} {:<34} {:>9} {:>10}", "stage", "schedule", "best ms", "median ms");
    // A bar on stderr while the races run (drawn only on a terminal): one step per stage of
    // the search and one for the confirming race; the table's rows go to stdout around it.
    let stages: Vec<&str> = at::Stage::ALL.iter().map(|s| s.name()).chain(["confirm"]).collect();
    let bar = indicatif::ProgressBar::new(stages.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed} [{bar:24}] {pos}/{len} stages {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("racing the {} stage", stages[0]));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut rows = 0usize;
    let report = at::tune(&eval, &space, default, settings, &mut |row| {
        rows += 1;
        // A stage's rows arrive when its race is over: it is done, the next one runs.
        if let Some(i) = stages.iter().position(|s| *s == row.stage) {
            bar.set_position(i as u64 + 1);
            let next = stages.get(i + 1).map_or("nothing: done".to_string(), |s| format!("the {s} stage"));
            bar.set_message(format!("{rows} candidate(s) timed; racing {next}"));
        }
        bar.suspend(|| match &row.outcome {
            Outcome::Timed(t) => println!(
                "{:<11} {:<34} {:>9.3} {:>10.3}",
                row.stage,
                row.config.to_string(),
                t.best.as_secs_f64() * 1e3,
                t.median.as_secs_f64() * 1e3
            ),
            Outcome::Rejected(why) => println!("{:<11} {:<34} {why}", row.stage, row.config.to_string()),
        })
    });
    bar.finish_and_clear();
    let report = report.map_err(|e| Error::Internal(e.to_string()))?;
    let wrong = report.wrong();
    if !wrong.is_empty() {
        return Err(Error::Internal(format!(
            "{} candidate schedule(s) gave wrong outputs or failed (listed above); nothing was saved",
            wrong.len()
        )));
    }
    let speedup = report.speedup();
    let versus = match speedup {
        Some(x) if report.winner != report.default => format!("{x:.3}x the default ({})", report.default),
        _ => "the default".to_string(),
    };
    println!("winner: {} (best {:.3} ms, {versus})", report.winner, report.winner_timing.best.as_secs_f64() * 1e3);
    store.insert(tune::entry(tune::key(rule, &dims, threads), &report));
    store.save().map_err(|e| Error::Input(e.to_string()))?;
    println!("saved to {}", path.display());
    if json {
        let w = report.winner;
        println!(
            "{{\"rule\":\"{}\",\"shape\":[{batch},{seq_len},{heads},{k},{v}],\"threads\":{threads},\"kernel\":\"{}\",\"chunk\":{},\"program\":\"{}\",\"time_block\":{},\"bv\":{},\"best_ms\":{:.4},\"speedup_vs_default\":{}}}",
            rule.name,
            w.kernel.name(),
            w.chunk,
            w.program.name(),
            w.time_block,
            w.bv.map_or("null".to_string(), |b| b.to_string()),
            report.winner_timing.best.as_secs_f64() * 1e3,
            speedup.map_or("null".to_string(), |x| format!("{x:.4}"))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn check_bv(bv: Option<usize>) -> Result<(), Error> {
    match bv {
        Some(0) => Err(Error::Input("--bv must be at least 1".into())),
        _ => Ok(()),
    }
}

/// Writes (or prints) every phase's PTX and launch metadata, and the program's description;
/// assembles each phase when ptxas is there.
fn compile_ptx(
    program: &chunkc::codegen::program::Program,
    sm: ptx::Sm,
    schedule: &PtxSchedule,
    out_dir: Option<&std::path::Path>,
) -> Result<ExitCode, Error> {
    let emitted = chunkc::gpu::emit(program, sm, schedule)?;
    let json = |r: serde_json::Result<String>| r.map_err(|e| Error::Internal(e.to_string()));
    match out_dir {
        Some(dir) => {
            let io = |e: std::io::Error| Error::Input(format!("cannot write to {}: {e}", dir.display()));
            std::fs::create_dir_all(dir).map_err(io)?;
            for phase in &emitted.phases {
                let base = dir.join(format!("{}_{}", phase.meta.entry, sm.name()));
                std::fs::write(base.with_extension("ptx"), &phase.ptx).map_err(io)?;
                std::fs::write(base.with_extension("json"), json(serde_json::to_string_pretty(&phase.meta))?)
                    .map_err(io)?;
                println!("wrote {}.ptx and .json", base.display());
            }
            let path = dir.join(format!("{}_{}.program.json", emitted.spec.name, sm.name()));
            std::fs::write(&path, json(serde_json::to_string_pretty(&emitted.spec))?).map_err(io)?;
            println!("wrote {} ({} phase(s))", path.display(), emitted.phases.len());
        }
        None => {
            let text: String =
                std::iter::once(emitted.spec.describe()).chain(emitted.phases.iter().map(|p| p.ptx.clone())).collect();
            print_all(&text)?;
        }
    }
    for phase in &emitted.phases {
        match ptx::assemble(&phase.ptx, sm) {
            Ok(report) => eprintln!("ptxas: {report}"),
            Err(e) if ptx::find_ptxas().is_none() => {
                eprintln!("note: {e}");
                break;
            }
            Err(e) => {
                return Err(Error::Internal(format!("ptxas rejected the PTX of {}: {e}", phase.meta.entry)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to stdout; a reader that stops early (`| head`) ends the output quietly.
fn print_all(text: &str) -> Result<(), Error> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Input(format!("writing to stdout: {e}"))),
        _ => Ok(()),
    }
}

fn check(path: &std::path::Path) -> Result<ExitCode, Error> {
    let loaded = load_rule(path)?;
    let rule = &loaded.rule;
    println!("rule {}: {}", rule.name, rule.summary);
    println!("inputs:");
    for i in &rule.inputs {
        let shape = match i.ty {
            Ty::Scalar => "scalar",
            Ty::VecK => "[K]",
            _ => "[V]",
        };
        let kind = if i.per_head { "per head" } else { "per token" };
        println!("  {:<8} {:<7} {:<10} domain {}", i.name, shape, kind, i.domain.name());
    }
    println!("states:");
    println!("  {:<8} {:<7} tensors h0 (optional), hT", "S", "[K, V]");
    for s in &rule.states {
        let shape = if s.ty == Ty::VecK { "[K]" } else { "[V]" };
        println!("  {:<8} {:<7} tensors {} (optional), {}", s.name, shape, s.initial_name(), s.final_name());
    }
    match &loaded.canonical {
        Ok(c) => {
            for (span, w) in &c.warnings {
                eprint!("{}", warning(rule, *span, w));
            }
            print!("{}", c.describe(rule));
            println!("kernels: recurrent, chunked");
            let phases: Vec<&str> = chunkc::codegen::plan::chunked::split_phases(c).iter().map(|p| p.name()).collect();
            println!(
                "chunked programs: fused (1 sequential phase), split ({} phases: {})",
                phases.len(),
                phases.join(", ")
            );
        }
        Err(why) => match &loaded.form {
            // Linear in the state, in a form the chunk planner does not build yet.
            Some(form) => {
                print!("{}", form.describe(rule));
                println!("kernels: recurrent only (no chunked kernel: {})", why.reason);
            }
            None => {
                println!("class: not chunkable: {}", why.reason);
                println!("kernels: recurrent only");
            }
        },
    }
    println!("{}", backward_line(rule));
    Ok(ExitCode::SUCCESS)
}

/// How the backward is formed, and its memory (`check`); each program is built on a small
/// shape first, so that the line never promises a backward the planner refuses.
fn backward_line(rule: &Rule) -> String {
    use chunkc::codegen::plan::backward;
    let probe = chunkc::codegen::plan::Shape { heads: 1, k: 4, v: 4, scale: 0.5 };
    if let Err(e) = backward::recurrent(rule, probe, chunkc::codegen::ir::ElemType::F32, 2) {
        return format!("backward: none ({e})");
    }
    let (t, kv) = (2048usize, 128usize);
    let every = backward::checkpoint_interval(t);
    let mib = |n: usize| format!("{:.1}", (n * kv * kv * 4) as f64 / f64::from(1 << 20));
    let recurrent = format!(
        "recurrent (reverse mode through the step, the state stored every N tokens, N about sqrt(T) and at \
         most 16, and recomputed in between: ceil(T/N) K x V f32 states per batch and head, {} MiB per head \
         at T={t} K=V={kv})",
        mib(t.div_ceil(every))
    );
    match chunked_backward(rule) {
        Ok(()) => format!(
            "backward: chunked (reverse mode through each chunk, recomputed from the state entering it: \
             ceil(T/C) states per batch and head, {} MiB per head at T={t} K=V={kv} C=64; with --checkpoint N, \
             a multiple of C, ceil(T/N) states and the ones between recomputed, {} MiB at N=256), and {recurrent}",
            mib(t.div_ceil(64)),
            mib(t.div_ceil(256))
        ),
        Err(why) => format!("backward: {recurrent}; no chunked backward: {why}"),
    }
}

fn warning(rule: &Rule, span: chunkc::dsl::ast::Span, msg: &str) -> String {
    Diagnostic::warning(&rule.path, &rule.source, span, msg).to_string()
}
