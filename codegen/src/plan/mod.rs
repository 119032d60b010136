//! Chunk plans: kernels in the tile IR built from a checked rule and a schedule.
//!
//! `recurrent` runs any rule token by token (also the decode step). `chunked` is the chunked
//! forward for every linear class, written once: the gate decides how intra-chunk scores are
//! formed (none; a scalar decay mask on one matmul; per-channel gates in sub-chunks with
//! re-centred exponents) and a low-rank transition adds the UT forward substitution.
//! `program` assembles the kernels into the forward programs (fused or split).

pub mod chunked;
pub mod program;
pub mod recurrent;
pub mod vtile;

pub use crate::lower::Shape;
pub use program::ProgramShape;

/// Tunable parameters of a chunked kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Tokens per chunk (the state is passed between chunks).
    pub chunk: usize,
    /// Tokens per sub-chunk for per-channel gates (the chunk is used whole otherwise).
    pub sub_chunk: usize,
    /// Element type of the per-token input tensors (q, k, v, gates...); states stay f32.
    pub input: crate::ir::ElemType,
    /// Columns of V per grid point (None: the whole V). With `Some(BV)` the grid is
    /// (batch, head, V / BV) and BV must divide V (see [`vtile`]).
    pub bv: Option<usize>,
    /// The chunked program: fused or split ([`program`]).
    pub program: ProgramShape,
}

impl Schedule {
    /// This schedule with per-token inputs of type `input`.
    pub fn with_input(self, input: crate::ir::ElemType) -> Schedule {
        Schedule { input, ..self }
    }

    /// This schedule with the chunked program `program`.
    pub fn with_program(self, program: ProgramShape) -> Schedule {
        Schedule { program, ..self }
    }

    /// This schedule with V split into tiles of `bv` columns (None: the whole V).
    pub fn with_bv(self, bv: Option<usize>) -> Schedule {
        Schedule { bv, ..self }
    }

    /// The chunk with the largest sub-chunk of at most 16 tokens that divides it.
    pub fn with_chunk(chunk: usize) -> Schedule {
        let sub_chunk = (1..=16.min(chunk)).rev().find(|d| chunk.is_multiple_of(*d)).unwrap_or(1);
        Schedule { chunk, sub_chunk, input: crate::ir::ElemType::F32, bv: None, program: ProgramShape::Fused }
    }
}

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
