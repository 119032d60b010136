//! The PTX schedule's target facts: the shared memory a block may opt in to, and the limit a
//! schedule's tiles are placed under. The knobs themselves ([`PtxSchedule`]: warps, dot
//! precision, cp.async, stages, opt-in shared memory) are data in `crate::schedule`, part of
//! the one schedule; the emitted kernel records them in its [`super::LaunchMeta`].
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
pub use crate::schedule::{DotPrecision, PtxSchedule};

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

/// The shared-memory limit for the tile workspace (plus staging) of a kernel under `sched` on
/// `target`, given [`super::EmitOptions::smem_limit`]: the target's opt-in maximum when the
/// schedule opts in (an `opts_limit` of 0 still forces global scratch), else `opts_limit`.
pub fn smem_limit(sched: &PtxSchedule, target: Sm, opts_limit: usize) -> usize {
    if sched.opt_in_smem && opts_limit != 0 {
        max_smem_per_block(target)
    } else {
        opts_limit
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
    fn the_smallest_staging_is_one_slice_of_each_operand() {
        assert_eq!(super::super::mma::stage_bytes(16, 16, 16), crate::schedule::MIN_STAGING_BYTES);
    }

    #[test]
    fn shared_memory_limits() {
        let plain = PtxSchedule::default();
        assert_eq!(smem_limit(&plain, Sm::Sm80, 48 * 1024), 48 * 1024, "the plain schedule keeps the option");
        let tc = PtxSchedule::with_dot(DotPrecision::Tf32);
        assert!(tc.opt_in_smem && tc.stages == 1);
        assert_eq!(smem_limit(&tc, Sm::Sm80, 48 * 1024), 166_912);
        assert_eq!(smem_limit(&tc, Sm::Sm90, 48 * 1024), 232_448);
        assert_eq!(smem_limit(&tc, Sm::Sm90, 0), 0, "0 still forces global scratch");
        let p = PtxSchedule::pipelined(DotPrecision::F32Fma);
        assert!(p.async_copy && p.opt_in_smem && p.stages == 2);
    }
}
