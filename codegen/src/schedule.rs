//! The schedule: every choice of how a rule's program is built and run that leaves what it
//! computes unchanged (up to rounding), in one struct that the command line, the tuner, its
//! cache and the backends share. A plan reads the kernel, chunk, sub-chunk, V-tile, program
//! shape and input type; the CPU executor the time block; the PTX backend its knobs.

use crate::ir::ElemType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes of the smallest 16-bit staging buffer of a tensor-core dot: one 16 x 16 slice of each
/// operand with its padding (the PTX backend's `mma::stage_bytes(16, 16, 16)`, checked there).
pub const MIN_STAGING_BYTES: usize = 1536;

/// How `Dot` ops are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DotPrecision {
    /// One output element per thread, a k-loop of `fma.rn.f32` (IEEE f32 products and sums).
    #[default]
    F32Fma,
    /// `mma.sync.m16n8k8` on tf32 operands (10-bit mantissa, `cvt.rna`), f32 accumulation.
    Tf32,
    /// `mma.sync.m16n8k16` on bf16 operands (8-bit mantissa, rounded to nearest), f32 accumulation.
    Bf16,
    /// `mma.sync.m16n8k16` on f16 operands (11-bit mantissa, range +-65504), f32 accumulation.
    F16,
}

impl DotPrecision {
    /// True for the precisions that use tensor cores.
    pub fn tensor_cores(self) -> bool {
        self != DotPrecision::F32Fma
    }

    /// The relative RMS error budget DESIGN.md sets for kernels whose dots run at this
    /// precision (the f32 budget for fma, tf32 1e-3, 16-bit operands 1e-2).
    pub fn tolerance(self) -> f64 {
        match self {
            DotPrecision::F32Fma => 1e-5,
            DotPrecision::Tf32 => 1e-3,
            DotPrecision::Bf16 | DotPrecision::F16 => 1e-2,
        }
    }

    /// A short name for labels and file names.
    pub fn name(self) -> &'static str {
        match self {
            DotPrecision::F32Fma => "f32",
            DotPrecision::Tf32 => "tf32",
            DotPrecision::Bf16 => "bf16",
            DotPrecision::F16 => "f16",
        }
    }
}

/// Tunable parameters of the PTX lowering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct PtxSchedule {
    /// Warps per CTA (1 to 32); `blockDim.x = 32 * warps`.
    pub warps: u32,
    /// How `Dot` ops are computed.
    pub dot: DotPrecision,
    /// A dot runs on tensor cores only when each of m, n and k is at least this (smaller
    /// dots, such as the recurrent kernels' 1-row products, keep the fma loop: padding them
    /// to 16 rows would waste more than the tensor cores gain).
    pub min_mma_dim: usize,
    /// Bytes of shared memory for the 16-bit operand staging buffers (bf16/f16 only). A dot
    /// whose operands do not fit is staged in k-slices.
    pub staging_bytes: usize,
    /// Load input tiles from global memory with `cp.async` (sm_80+) when the tiles live in
    /// shared memory, instead of a register round trip.
    pub async_copy: bool,
    /// Let the tiles use shared memory up to the target's opt-in maximum
    /// (`ptx::max_smem_per_block`) instead of `ptx::EmitOptions::smem_limit` (an
    /// `smem_limit` of 0 still forces global scratch).
    pub opt_in_smem: bool,
    /// `cp.async` pipeline depth of the loads in a chunk loop: 1 loads each chunk's tiles when
    /// the iteration reaches them; 2 double-buffers them (the copies of chunk i + 1 are in
    /// flight while chunk i computes). Only with `async_copy` and tiles in shared memory.
    pub stages: u32,
}

impl Default for PtxSchedule {
    fn default() -> Self {
        PtxSchedule {
            warps: 8,
            dot: DotPrecision::F32Fma,
            min_mma_dim: 8,
            staging_bytes: 16 * 1024,
            async_copy: false,
            opt_in_smem: false,
            stages: 1,
        }
    }
}

impl PtxSchedule {
    /// The default schedule with dots at `dot` precision (and, when tensor cores are used,
    /// `cp.async` loads and the opt-in shared-memory maximum: tensor-core kernels are the
    /// ones worth the occupancy a large workspace costs, and both need sm_80, which every
    /// target has).
    pub fn with_dot(dot: DotPrecision) -> PtxSchedule {
        let tc = dot.tensor_cores();
        PtxSchedule { dot, async_copy: tc, opt_in_smem: tc, ..PtxSchedule::default() }
    }

    /// [`PtxSchedule::with_dot`] with `cp.async` loads double-buffered across the chunk
    /// loop and the opt-in shared-memory maximum (for any `dot`, fma included).
    pub fn pipelined(dot: DotPrecision) -> PtxSchedule {
        PtxSchedule { async_copy: true, opt_in_smem: true, stages: 2, ..PtxSchedule::with_dot(dot) }
    }

    /// The schedules the tests and the autotuner start from: f32 fma, tf32 and bf16 dots.
    pub fn defaults() -> [PtxSchedule; 3] {
        [DotPrecision::F32Fma, DotPrecision::Tf32, DotPrecision::Bf16].map(PtxSchedule::with_dot)
    }

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        32 * self.warps
    }

    /// The registers a thread may use (the kernel's `.maxnreg`): all that one CTA may have of
    /// an SM's 64 K, at most 255. Without it ptxas picks its own target from `.maxntid` and
    /// was seen spilling at 48 registers where 115 were free.
    pub fn max_registers(&self) -> u32 {
        (65536 / self.threads().max(1)).min(255)
    }

    /// Checks the schedule; the error is one line.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.warps) {
            return Err(format!("ptx schedule: warps must be 1 to 32, not {}", self.warps));
        }
        if !(1..=2).contains(&self.stages) {
            return Err(format!("ptx schedule: stages must be 1 or 2, not {}", self.stages));
        }
        if self.dot == DotPrecision::Bf16 || self.dot == DotPrecision::F16 {
            // The smallest staging is one 16 x 16 slice of each operand (with its padding).
            let min = MIN_STAGING_BYTES;
            if self.staging_bytes < min {
                return Err(format!("ptx schedule: staging_bytes must be at least {min}, not {}", self.staging_bytes));
            }
        }
        Ok(())
    }
}

/// The tolerance of the f32 paths (DESIGN.md).
pub const F32_TOLERANCE: f64 = 1e-5;

/// The tolerance of kernels that read bf16 or f16 inputs (DESIGN.md's 16-bit operands).
pub const SIXTEEN_BIT_TOLERANCE: f64 = 1e-2;

/// The algorithm of a rule's forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    /// The fused token-by-token kernel (any rule).
    Recurrent,
    /// The chunked kernel (rules linear in the state).
    #[default]
    Chunked,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Recurrent => "recurrent",
            KernelKind::Chunked => "chunked",
        }
    }
}

/// How the chunked forward is organised (`plan::program`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgramShape {
    /// One sequential phase.
    #[default]
    Fused,
    /// A chunk-parallel prep for the delta class, a sequential state pass, then a
    /// chunk-parallel output pass.
    Split,
}

impl ProgramShape {
    pub fn name(self) -> &'static str {
        match self {
            ProgramShape::Fused => "fused",
            ProgramShape::Split => "split",
        }
    }
}

/// How a rule's program is built and run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Schedule {
    pub kernel: KernelKind,
    /// Tokens per chunk of the chunked kernel (the state is passed between chunks); 0 for
    /// the recurrent kernel, which has none (so that two recurrent schedules compare equal).
    pub chunk: usize,
    /// Tokens per sub-chunk for per-channel gates (the chunk is used whole otherwise).
    pub sub_chunk: usize,
    /// The chunked program: fused or split.
    pub program: ProgramShape,
    /// Columns of V per grid point (None: the whole V); BV must divide V.
    pub bv: Option<usize>,
    /// Element type of the per-token input tensors (q, k, v, gates...); states stay f32.
    pub input: ElemType,
    /// Tokens per time block of the CPU executor (0: each grid point's whole sequence in turn).
    pub time_block: usize,
    /// The PTX backend's knobs (warps, dot precision, cp.async, stages, shared memory).
    pub ptx: PtxSchedule,
}

/// Tokens per time block of the CPU executor when nothing else is asked for: 4 chunks of
/// 64 (docs/performance.md: 2 to 8 chunks of 64 are within a few percent of each other).
pub const DEFAULT_TIME_BLOCK: usize = 256;

/// The chunk `run` and `bench` use on a CPU when none is given. At the default shape (B1
/// T2048 H8 K=V=128, one thread) chunk 16 ran 1.19x-1.50x faster than 64 and 1.07x-1.17x
/// faster than 32 for every class measured (gla, kda, simple_gla, gated_delta_rule,
/// linear_attn, delta_rule, rwkv6, mamba2: docs/performance.md round 12), in line with the
/// tuner's picks on an earlier machine (16 or 32).
pub const CPU_DEFAULT_CHUNK: usize = 16;

/// The chunk the GPU backends use when none is given: flash-linear-attention's 64 (no GPU
/// measurement of chunkc's kernels yet), and that of the backward, not yet measured at others.
pub const GPU_DEFAULT_CHUNK: usize = 64;

impl Default for Schedule {
    /// The chunked kernel at chunk 64, fused, the whole V, f32 inputs, the default time
    /// block and the plain PTX schedule.
    fn default() -> Schedule {
        Schedule::chunked(64)
    }
}

impl Schedule {
    /// The chunked kernel at `chunk`, with the largest sub-chunk of at most 16 tokens that
    /// divides it, and every other choice at its default.
    pub fn chunked(chunk: usize) -> Schedule {
        let sub_chunk = (1..=16.min(chunk)).rev().find(|d| chunk.is_multiple_of(*d)).unwrap_or(1);
        Schedule {
            kernel: KernelKind::Chunked,
            chunk,
            sub_chunk,
            program: ProgramShape::Fused,
            bv: None,
            input: ElemType::F32,
            time_block: DEFAULT_TIME_BLOCK,
            ptx: PtxSchedule::default(),
        }
    }

    /// [`Schedule::chunked`] (the name the plans' tests use).
    pub fn with_chunk(chunk: usize) -> Schedule {
        Schedule::chunked(chunk)
    }

    /// The recurrent kernel, every other choice at its default.
    pub fn recurrent() -> Schedule {
        Schedule { kernel: KernelKind::Recurrent, chunk: 0, sub_chunk: 1, ..Schedule::chunked(64) }
    }

    /// This schedule for `kernel` (the recurrent kernel has no chunk).
    pub fn with_kernel(self, kernel: KernelKind, chunk: usize) -> Schedule {
        match kernel {
            KernelKind::Recurrent => Schedule { kernel, chunk: 0, sub_chunk: 1, ..self },
            KernelKind::Chunked => Schedule::chunked(chunk).keep(self),
        }
    }

    /// `self`'s choices besides kernel, chunk and sub-chunk, from `other`.
    fn keep(self, other: Schedule) -> Schedule {
        Schedule {
            program: other.program,
            bv: other.bv,
            input: other.input,
            time_block: other.time_block,
            ptx: other.ptx,
            ..self
        }
    }

    pub fn with_input(self, input: ElemType) -> Schedule {
        Schedule { input, ..self }
    }

    pub fn with_bv(self, bv: Option<usize>) -> Schedule {
        Schedule { bv, ..self }
    }

    pub fn with_program(self, program: ProgramShape) -> Schedule {
        Schedule { program, ..self }
    }

    pub fn with_time_block(self, time_block: usize) -> Schedule {
        Schedule { time_block, ..self }
    }

    pub fn with_ptx(self, ptx: PtxSchedule) -> Schedule {
        Schedule { ptx, ..self }
    }

    /// Tokens one step of the kernel's loop covers: the executor's time blocks are whole steps.
    pub fn tokens_per_step(&self) -> usize {
        match self.kernel {
            KernelKind::Recurrent => 1,
            KernelKind::Chunked => self.chunk.max(1),
        }
    }

    /// True when inputs and dots are f32 (the only precision the CPU backends run).
    pub fn is_f32(&self) -> bool {
        self.input == ElemType::F32 && self.ptx.dot == DotPrecision::F32Fma
    }

    /// The relative RMS budget of this precision: the looser of the input type's (16-bit:
    /// 1e-2) and the dots' (f32 1e-5, tf32 1e-3, bf16/f16 1e-2). The error is measured
    /// against the reference on the original f32 inputs, so the rounding of 16-bit inputs
    /// counts against it.
    pub fn tolerance(&self) -> f64 {
        let input = if self.input == ElemType::F32 { F32_TOLERANCE } else { SIXTEEN_BIT_TOLERANCE };
        input.max(self.ptx.dot.tolerance())
    }

    /// `f32 in, tf32 dots` and the like, for tables and messages.
    pub fn precision(&self) -> String {
        format!("{} in, {} dots", self.input.name(), self.ptx.dot.name())
    }

    /// Checks what no plan or backend could use; the error is one line.
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel == KernelKind::Chunked && self.chunk == 0 {
            return Err("the chunk size must be at least 1".into());
        }
        if self.bv == Some(0) {
            return Err("the V-tile (BV) must be at least 1".into());
        }
        if self.kernel == KernelKind::Recurrent && self.program != ProgramShape::Fused {
            return Err(format!(
                "program {}: the recurrent kernel is one phase; programs of several phases are chunked",
                self.program.name()
            ));
        }
        self.ptx.validate()
    }
}

impl fmt::Display for Schedule {
    /// `chunked C=64 time-block=256 bv=V` (with ` split` for the split program).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kernel {
            KernelKind::Recurrent => write!(f, "recurrent")?,
            KernelKind::Chunked => write!(f, "chunked C={}", self.chunk)?,
        }
        if self.program == ProgramShape::Split {
            write!(f, " split")?;
        }
        write!(f, " time-block={}", self.time_block)?;
        match self.bv {
            Some(bv) => write!(f, " bv={bv}"),
            None => write!(f, " bv=V"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_and_the_text_form() {
        let c = Schedule::chunked(48);
        assert_eq!((c.chunk, c.sub_chunk, c.time_block), (48, 16, DEFAULT_TIME_BLOCK));
        assert_eq!(Schedule::chunked(20).sub_chunk, 10);
        assert_eq!(c.to_string(), "chunked C=48 time-block=256 bv=V");
        let r = Schedule::recurrent().with_time_block(0).with_bv(Some(32));
        assert_eq!(r.to_string(), "recurrent time-block=0 bv=32");
        assert_eq!(r.tokens_per_step(), 1);
        let s = Schedule::chunked(16).with_program(ProgramShape::Split).with_bv(Some(8));
        assert_eq!(s.to_string(), "chunked C=16 split time-block=256 bv=8");
        // Changing the kernel keeps the other choices.
        let back = s.with_kernel(KernelKind::Chunked, 64);
        assert_eq!((back.chunk, back.bv, back.program), (64, Some(8), ProgramShape::Split));
        assert_eq!(s.with_kernel(KernelKind::Recurrent, 64).chunk, 0);
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<Schedule>(&json).expect("parse"), s);
    }

    #[test]
    fn tolerance_is_the_looser_of_inputs_and_dots_and_bad_schedules_are_refused() {
        let t = |e, d| Schedule::chunked(16).with_input(e).with_ptx(PtxSchedule::with_dot(d)).tolerance();
        assert_eq!(t(ElemType::F32, DotPrecision::F32Fma), 1e-5);
        assert_eq!(t(ElemType::F32, DotPrecision::Tf32), 1e-3);
        assert_eq!(t(ElemType::F32, DotPrecision::Bf16), 1e-2);
        assert_eq!(t(ElemType::Bf16, DotPrecision::F32Fma), 1e-2);
        assert!(Schedule::default().is_f32());
        for bad in [
            Schedule::chunked(0),
            Schedule::chunked(16).with_bv(Some(0)),
            Schedule::recurrent().with_program(ProgramShape::Split),
            Schedule::chunked(16).with_ptx(PtxSchedule { warps: 0, ..PtxSchedule::default() }),
        ] {
            let e = bad.validate().expect_err("invalid");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
