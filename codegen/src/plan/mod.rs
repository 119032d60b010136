//! Chunk plans: kernels in the tile IR built from a checked rule and a schedule.
//!
//! `recurrent` runs any rule token by token (also the decode step). `chunked` is the chunked
//! forward for every linear class, written once: the gate decides how intra-chunk scores are
//! formed (none; a scalar decay mask on one matmul; per-channel gates in sub-chunks with
//! re-centred exponents) and a low-rank transition adds the UT forward substitution.
//! `program` assembles the kernels into the forward programs (fused or split).

pub mod backward;
pub mod chunked;
pub mod program;
pub mod recurrent;
pub mod vtile;

pub use crate::lower::Shape;
pub use crate::schedule::{ProgramShape, Schedule};

/// Why a kernel could not be planned.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanError(pub String);

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

impl From<crate::lower::LowerError> for PlanError {
    fn from(e: crate::lower::LowerError) -> PlanError {
        PlanError(e.0)
    }
}
