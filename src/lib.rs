//! chunkc: a compiler for chunked linear recurrences.
//!
//! A rule file describes one token's state update; chunkc checks and classifies it
//! ([`dsl`]), builds kernels for it ([`codegen`]) and runs them ([`runtime`]); [`autotune`]
//! searches the schedules of those kernels ([`tune`] is its CPU evaluator). This crate is the
//! facade that ties the stages together, and the `chunkc` command line; [`library`] is the
//! typed API a program embeds ([`Rule`], [`compile`], [`Program`]).

pub use chunkc_autotune as autotune;
pub use chunkc_codegen as codegen;
pub use chunkc_dsl as dsl;
pub use chunkc_runtime as runtime;

pub mod backend;
pub mod bench;
pub mod error;
pub mod gpu;
pub mod grad;
pub mod heads;
pub mod library;
pub mod problem;
pub mod tune;
pub mod verify;
pub mod verify_grad;

pub use backend::{run, Backend, Engine, Options, Outputs};
pub use chunkc_codegen::ptx::Sm;
pub use chunkc_codegen::schedule::{Schedule, F32_TOLERANCE, SIXTEEN_BIT_TOLERANCE};
pub use chunkc_runtime::view::{Elems, TensorRef};
pub use error::Error;
pub use library::{compile, CuSeqlens, Heads, Inputs, Program, Rule, StatePool, Target};

use chunkc_dsl::ast::Rule as RuleAst;
use chunkc_dsl::canon::{canonicalize, Canonical, NotChunkable};

/// A checked rule and its canonical form (or why it has none).
pub struct Loaded {
    pub rule: RuleAst,
    /// The canonical form when the chunk planner builds the rule's chunked kernels, else
    /// why not: the rule is not linear in its state, or its form is one the planner does not
    /// build yet.
    pub canonical: Result<Canonical, NotChunkable>,
    /// The canonical form whenever the rule has one, also when no chunked kernel is built
    /// for it (`check` describes it).
    pub form: Option<Canonical>,
}

/// Reads and checks a rule file; a rule that says `chunked = true` must have a chunked
/// kernel.
pub fn load_rule(path: &std::path::Path) -> Result<Loaded, Error> {
    checked(chunkc_dsl::load_rule(path)?)
}

/// [`load_rule`] for a rule already parsed.
pub fn checked(rule: RuleAst) -> Result<Loaded, Error> {
    let form = canonicalize(&rule);
    let canonical = match &form {
        Ok(c) => chunked_kernels(&rule, c).map(|()| c.clone()),
        Err(why) => Err(why.clone()),
    };
    if let (true, Err(why)) = (rule.require_chunked, &canonical) {
        return Err(why.to_diagnostic(&rule).into());
    }
    Ok(Loaded { form: form.ok(), rule, canonical })
}

/// Builds the chunked programs (fused and split) of a canonical form on a small shape, so
/// that nothing claims a chunked kernel the planner refuses; the refusal, pointing at the
/// state update, when it does.
fn chunked_kernels(rule: &RuleAst, canon: &Canonical) -> Result<(), NotChunkable> {
    use chunkc_codegen::plan::{program, Shape};
    use chunkc_codegen::schedule::ProgramShape;
    let probe = Shape { heads: 1, k: 4, v: 4, scale: 0.5 };
    for shape in [ProgramShape::Fused, ProgramShape::Split] {
        if let Err(e) = program::chunked(rule, canon, probe, Schedule::chunked(4).with_program(shape)) {
            let span = rule.stmts.iter().rev().find(|s| s.target == chunkc_dsl::ast::Target::State).map(|s| s.span);
            let reason = e.0.trim_start_matches(&format!("rule `{}`: ", rule.name)).to_string();
            return Err(NotChunkable { reason, span: span.unwrap_or_default() });
        }
    }
    Ok(())
}
