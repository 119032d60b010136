//! The PTX schedule: the knobs of the PTX lowering that an autotuner may vary per device and
//! per kernel. Block size and the shared-memory staging area follow from it; the emitted
//! kernel records the schedule it was built with in its [`super::LaunchMeta`].
//!
//! The default is the simple SIMT lowering (f32 fma dots, plain loads, 8 warps, tiles in
//! shared memory only up to [`super::EmitOptions::smem_limit`]), so code that does not ask for
//! tensor cores gets exactly the kernels it got before schedules existed.
//!
//! Shared memory: a launch may use more than 48 KiB of dynamic shared memory per block only
//! after raising the kernel's `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` (the CUDA
//! launcher does), up to the device's opt-in maximum ([`max_smem_per_block`]). With
//! [`PtxSchedule::opt_in_smem`] the tile workspace goes to shared memory whenever it fits
//! that maximum.

use super::Sm;
use serde::{Deserialize, Serialize};

/// The most shared memory (static + dynamic, bytes) one block of `target` can opt in to:
/// the SM's shared-memory capacity less the 1 KiB CUDA reserves per block (CUDA programming
/// guide, compute capabilities: 8.0 has up to 164 KiB per SM, so 163 KiB per block; 9.0 has
/// 228 KiB per SM, so 227 KiB per block). Lesser parts of an architecture (sm_86, sm_89) have
/// less; the kernels are emitted for sm_80 / sm_90 proper.
pub fn max_smem_per_block(target: Sm) -> usize {
    match target {
        Sm::Sm80 => 163 * 1024,
        Sm::Sm90 => 227 * 1024,
    }
}

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
    /// ([`max_smem_per_block`]) instead of [`super::EmitOptions::smem_limit`] (an
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

    /// The shared-memory limit for the tile workspace (plus staging) on `target`, given
    /// [`super::EmitOptions::smem_limit`].
    pub fn smem_limit(&self, target: Sm, opts_limit: usize) -> usize {
        if self.opt_in_smem && opts_limit != 0 {
            max_smem_per_block(target)
        } else {
            opts_limit
        }
    }

    /// The schedules the tests and the autotuner start from: f32 fma, tf32 and bf16 dots.
    pub fn defaults() -> [PtxSchedule; 3] {
        [DotPrecision::F32Fma, DotPrecision::Tf32, DotPrecision::Bf16].map(PtxSchedule::with_dot)
    }

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        32 * self.warps
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
            let min = super::mma::stage_bytes(16, 16, 16);
            if self.staging_bytes < min {
                return Err(format!("ptx schedule: staging_bytes must be at least {min}, not {}", self.staging_bytes));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_simt_lowering_and_round_trips() {
        let d = PtxSchedule::default();
        assert_eq!(d.dot, DotPrecision::F32Fma);
        assert_eq!(d.threads(), 256);
        assert!(!d.async_copy);
        let s = PtxSchedule::with_dot(DotPrecision::Bf16);
        let json = serde_json::to_string(&s).expect("serialise");
        assert!(json.contains("\"dot\":\"bf16\""), "{json}");
        let back: PtxSchedule = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, s);
        // Missing fields take their defaults.
        let partial: PtxSchedule = serde_json::from_str("{\"dot\":\"tf32\"}").expect("parse");
        assert_eq!(partial, PtxSchedule { dot: DotPrecision::Tf32, ..PtxSchedule::default() });
    }

    #[test]
    fn invalid_schedules_are_one_line_errors() {
        for bad in [
            PtxSchedule { warps: 0, ..PtxSchedule::default() },
            PtxSchedule { warps: 33, ..PtxSchedule::default() },
            PtxSchedule { stages: 0, ..PtxSchedule::default() },
            PtxSchedule { stages: 3, ..PtxSchedule::pipelined(DotPrecision::Tf32) },
            PtxSchedule { staging_bytes: 64, ..PtxSchedule::with_dot(DotPrecision::Bf16) },
        ] {
            let e = bad.validate().expect_err("invalid");
            assert!(e.starts_with("ptx schedule:") && !e.contains('\n'), "{e}");
        }
        for s in PtxSchedule::defaults() {
            s.validate().expect("defaults are valid");
            PtxSchedule::pipelined(s.dot).validate().expect("pipelined schedules are valid");
        }
    }

    #[test]
    fn shared_memory_limits() {
        let plain = PtxSchedule::default();
        assert_eq!(plain.smem_limit(Sm::Sm80, 48 * 1024), 48 * 1024, "the plain schedule keeps the option");
        let tc = PtxSchedule::with_dot(DotPrecision::Tf32);
        assert!(tc.opt_in_smem && tc.stages == 1);
        assert_eq!(tc.smem_limit(Sm::Sm80, 48 * 1024), 166_912);
        assert_eq!(tc.smem_limit(Sm::Sm90, 48 * 1024), 232_448);
        assert_eq!(tc.smem_limit(Sm::Sm90, 0), 0, "0 still forces global scratch");
        let p = PtxSchedule::pipelined(DotPrecision::F32Fma);
        assert!(p.async_copy && p.opt_in_smem && p.stages == 2);
    }
}
