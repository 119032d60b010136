//! chunkc's front end: rule files, diagnostics, checking, canonical form and the f64 reference.
//!
//! `parse` reads a rule file (TOML plus the step's expression language) with spans, `check`
//! types it into an [`ast::Rule`], `canon` classifies it into the canonical form that code
//! generation consumes, `reference` interprets the checked rule token by token in f64, and
//! `gradient` differentiates that interpreter (reverse mode over its tape).

pub mod ast;
pub mod canon;
pub mod check;
pub mod diag;
pub mod gradient;
pub mod parse;
pub mod reference;

pub use check::{load_rule, parse_rule};
