//! The numeric precision of a PTX run: the element type the input tensors are given to the
//! kernel in (`--dtype`) and the schedule its dots run under (`--dot`, `--warps`), with the
//! tolerance DESIGN.md sets for that combination.

use crate::error::Error;
use chunkc_codegen::ir::ElemType;
use chunkc_codegen::ptx::{DotPrecision, PtxSchedule};

/// The tolerance of the f32 paths (DESIGN.md).
pub const F32_TOLERANCE: f64 = 1e-5;

/// The tolerance of kernels that read bf16 or f16 inputs (DESIGN.md's 16-bit operands).
pub const SIXTEEN_BIT_TOLERANCE: f64 = 1e-2;

/// Input element type and PTX schedule; the default is f32 inputs and f32 fma dots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Precision {
    pub input: ElemType,
    pub schedule: PtxSchedule,
}

impl Precision {
    /// f32 inputs with `dot` dots under the default schedule for it (tensor cores with
    /// `cp.async` loads, as `PtxSchedule::with_dot`).
    pub fn with_dot(input: ElemType, dot: DotPrecision) -> Precision {
        Precision { input, schedule: PtxSchedule::with_dot(dot) }
    }

    /// True when this is the f32-everywhere default (the only precision the CPU backends run).
    pub fn is_f32(&self) -> bool {
        self.input == ElemType::F32 && self.schedule.dot == DotPrecision::F32Fma
    }

    /// The relative RMS budget: the looser of the input type's (16-bit: 1e-2) and the dots'
    /// (f32 1e-5, tf32 1e-3, bf16/f16 1e-2). The error is measured against the reference on
    /// the original f32 inputs, so the rounding of 16-bit inputs counts against it.
    pub fn tolerance(&self) -> f64 {
        let input = if self.input == ElemType::F32 { F32_TOLERANCE } else { SIXTEEN_BIT_TOLERANCE };
        input.max(self.schedule.dot.tolerance())
    }

    /// `f32 in, tf32 dots` and the like, for tables and messages.
    pub fn describe(&self) -> String {
        format!("{} in, {} dots", self.input.name(), self.schedule.dot.name())
    }

    /// Checks the schedule (one line).
    pub fn validate(&self) -> Result<(), Error> {
        self.schedule.validate().map_err(Error::Input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_the_looser_of_inputs_and_dots() {
        let t = |e, d| Precision::with_dot(e, d).tolerance();
        assert_eq!(t(ElemType::F32, DotPrecision::F32Fma), 1e-5);
        assert_eq!(t(ElemType::F32, DotPrecision::Tf32), 1e-3);
        assert_eq!(t(ElemType::F32, DotPrecision::Bf16), 1e-2);
        assert_eq!(t(ElemType::Bf16, DotPrecision::F32Fma), 1e-2);
        assert_eq!(t(ElemType::F16, DotPrecision::Tf32), 1e-2);
        assert!(Precision::default().is_f32());
        assert!(!Precision::with_dot(ElemType::F32, DotPrecision::Tf32).is_f32());
    }
}
