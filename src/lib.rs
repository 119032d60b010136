//! chunkc: a compiler for chunked linear recurrences.
//!
//! A rule file describes one token's state update; chunkc checks and classifies it
//! ([`dsl`]), builds kernels for it ([`codegen`]) and runs them ([`runtime`]); [`autotune`]
//! searches the schedules of those kernels ([`tune`] is its CPU evaluator). This crate is the
//! facade that ties the stages together, and the `chunkc` command line.

pub use chunkc_autotune as autotune;
pub use chunkc_codegen as codegen;
pub use chunkc_dsl as dsl;
pub use chunkc_runtime as runtime;

pub mod backend;
pub mod bench;
pub mod error;
pub mod gpu;
pub mod grad;
pub mod problem;
pub mod tune;
pub mod verify;
pub mod verify_grad;

pub use backend::{run, Backend, Engine, Options, Outputs};
pub use chunkc_codegen::schedule::{Schedule, F32_TOLERANCE, SIXTEEN_BIT_TOLERANCE};
pub use error::Error;

use chunkc_dsl::ast::Rule;
use chunkc_dsl::canon::{canonicalize, Canonical, NotChunkable};

/// A checked rule and its canonical form (or why it has none).
pub struct Loaded {
    pub rule: Rule,
    pub canonical: Result<Canonical, NotChunkable>,
}

/// Reads and checks a rule file; a rule that says `chunked = true` must be chunkable.
pub fn load_rule(path: &std::path::Path) -> Result<Loaded, Error> {
    let rule = chunkc_dsl::load_rule(path)?;
    let canonical = canonicalize(&rule);
    if let (true, Err(why)) = (rule.require_chunked, &canonical) {
        return Err(why.to_diagnostic(&rule).into());
    }
    Ok(Loaded { rule, canonical })
}
