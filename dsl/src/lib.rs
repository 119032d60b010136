//! chunkc's front end: rule files, diagnostics, checking, canonical form and the f64 reference.

pub mod ast;
pub mod diag;
