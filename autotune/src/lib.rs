//! chunkc's autotuner: which schedule of a rule's kernel runs fastest on this machine, for one
//! problem shape and thread count.
//!
//! The tuner owns the search and nothing that compiles or runs a kernel: the caller supplies
//! an [`Evaluator`] that turns a [`Schedule`] (the compiler's one schedule type, which the
//! cache stores too) into a verified, ready-to-time [`Trial`] (the
//! `chunkc` crate's builds the CPU kernel, runs it once on random inputs and holds it to the
//! f64 reference). So data still flows one way: the tuner drives codegen and the runtime
//! through that interface, and its tests drive it with scripted timings.
//!
//! - [`space`]: the candidates of each stage of the search for a problem.
//! - [`race`]: the timing protocol (round-robin runs, best and median).
//! - [`search`]: the staged search and its report.
//! - [`device`]: the fingerprint a result is kept under.
//! - [`cache`]: the TOML file of winners per (device, rule, shape, threads).
//! - [`model`]: an analytic estimate of a PTX program on a described GPU (`chunkc model`).

pub mod cache;
pub mod device;
pub mod model;
pub mod race;
pub mod search;
pub mod space;

pub use cache::{Cache, CacheError, Entry, Key, Lookup};
pub use chunkc_codegen::schedule::{KernelKind, ProgramShape, Schedule};
pub use search::{tune, Evaluator, Outcome, Rejection, Report, Row, Settings, Trial, TuneError};
pub use space::{Problem, Space, Stage};
