//! chunkc's code generator: the tile IR, the chunk plans per recurrence class, and backends.
//!
//! Data flows one way: a checked rule (and its canonical form) from `chunkc-dsl` becomes a
//! tile-IR [`ir::Kernel`] through a plan in [`plan`], and a backend ([`cpu`]) turns the kernel
//! into code the runtime executes.

pub mod builder;
pub mod cpu;
pub mod interp;
pub mod ir;
pub mod layout;
pub mod lower;
pub mod plan;
pub mod print;
pub mod program;
pub mod ptx;
pub mod resume;
