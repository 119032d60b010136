//! The PTX schedule: the knobs of the PTX lowering that an autotuner may vary per device and
//! per kernel. Block size and the shared-memory staging area follow from it; the emitted
//! kernel records the schedule it was built with in its [`super::LaunchMeta`].
//!
//! The default is the simple SIMT lowering (f32 fma dots, plain loads, 8 warps), so code that
//! does not ask for tensor cores gets exactly the kernels it got before schedules existed.

use serde::{Deserialize, Serialize};

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
}

impl Default for PtxSchedule {
    fn default() -> Self {
        PtxSchedule { warps: 8, dot: DotPrecision::F32Fma, min_mma_dim: 8, staging_bytes: 16 * 1024, async_copy: false }
    }
}

impl PtxSchedule {
    /// The default schedule with dots at `dot` precision (and `cp.async` loads when tensor
    /// cores are used: both need sm_80, which every target has).
    pub fn with_dot(dot: DotPrecision) -> PtxSchedule {
        PtxSchedule { dot, async_copy: dot.tensor_cores(), ..PtxSchedule::default() }
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
            PtxSchedule { staging_bytes: 64, ..PtxSchedule::with_dot(DotPrecision::Bf16) },
        ] {
            let e = bad.validate().expect_err("invalid");
            assert!(e.starts_with("ptx schedule:") && !e.contains('\n'), "{e}");
        }
        for s in PtxSchedule::defaults() {
            s.validate().expect("defaults are valid");
        }
    }
}
