//! chunkc's runtime: tensors, safetensors I/O and the CPU executor. A program that embeds
//! kernels generated ahead of time needs this crate, not the compiler.

pub mod error;
pub mod exec;
pub mod io;
pub mod ptxsim;
pub mod tensor;
