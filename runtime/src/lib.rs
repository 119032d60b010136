//! chunkc's runtime: tensors, safetensors I/O and the executors (CPU threads, the PTX
//! simulator, CUDA). A program that embeds kernels generated ahead of time needs this
//! crate, not the compiler.

pub mod abi;
pub mod artifact;
pub mod cpu_kernel;
pub mod cpu_support;
pub mod cuda;
pub mod error;
pub mod exec;
pub mod io;
pub mod launch;
pub mod linked;
pub mod packed;
pub mod program;
pub mod ptxsim;
pub mod tensor;
pub mod view;
