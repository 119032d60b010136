//! chunkc's code generator: the tile IR, the chunk plans per recurrence class, and backends.
//!
//! Data flows one way: a checked rule (and its canonical form) from `chunkc-dsl` becomes a
//! tile-IR [`program::Program`] (one [`ir::Kernel`] per phase) through a plan in [`plan`];
//! the [`midend`] prepares each kernel for a backend (fusion, masks, workspace layout, in-place
//! updates, given the backend's abilities as data), and a backend ([`cpu`], [`ptx`]) turns it
//! into code the runtime executes.

pub mod autodiff;
pub mod builder;
pub mod cpu;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod midend;
pub mod plan;
pub mod print;
pub mod program;
pub mod ptx;
pub mod resume;
pub mod schedule;
