//! PTX backend, first rung: a simple SIMT lowering of the tile IR to PTX text for sm_80 and
//! sm_90, written directly as text (pure Rust: no LLVM, no CUDA toolkit), plus [`assemble`],
//! which runs NVIDIA's `ptxas` (when installed) and reads back its resource report.
//!
//! Status: the emitted PTX assembles with ptxas for every rule in `rules/` (see
//! `codegen/tests/ptx_assemble.rs`); nothing executes it yet. The PTX simulator and the GPU
//! run are later rungs of the verification ladder (DESIGN.md, rungs 5 and 6), so no numerical
//! claim is made here.
//!
//! # Design (simple on purpose)
//! - **Grid**: one CTA per grid point (b, h): `gridDim = (batch * heads, 1, 1)`,
//!   `blockIdx.x = b * heads + h` (see [`Grid`]). CTAs past `batch * heads` exit at once.
//! - **Block**: [`BLOCK_THREADS`] threads (one dimension). Every op is a loop over its output
//!   elements strided by the thread index, followed by `bar.sync 0`, so each op sees its
//!   operands complete. `Rows` and `Transpose` are views: no code, no barrier.
//! - **Tiles** live where `layout.rs` (a copy of the CPU backend's workspace planner) puts
//!   them: one region per non-view value, reused once dead. The whole workspace goes in
//!   dynamic shared memory when it fits in [`EmitOptions::smem_limit`] (48 KiB by default, the
//!   size that needs no opt-in attribute at launch), otherwise in a per-CTA slice of a global
//!   scratch buffer passed as the `scratch` parameter (`scratch + blockIdx.x * bytes`).
//! - **Ops**: `Dot` computes one output element per thread iteration with a k-loop of
//!   `fma.rn.f32`; `Cumsum` and `SolveUnitLower` run one thread per column, `RowSum` one per
//!   row; `GatedDot` one thread per (i, j) pair; elementwise ops (`Unary`, `Binary` with
//!   broadcasting, `Mask`, `Cast`, `Const`) one thread per element. Loads and stores to the
//!   tensors honour the `valid_rows` masks with predicates. Index expressions are 64-bit
//!   integer arithmetic on `%ctaid.x` and the scalar parameters `batch`, `heads`, `seq_len`.
//!   The `Loop` copies its carried values like the CPU backend (yields that read a carried
//!   region go through a temporary first); every branch around a loop is uniform.
//! - **Math precision**: `exp` is `ex2.approx.ftz.f32` of `x * log2(e)` (about 2 ulp of ex2
//!   plus the rounding of the product, which grows with |x|: the plans only exponentiate
//!   values <= 0 of moderate size); `log` is `lg2.approx.ftz.f32` times ln 2; `sigmoid`,
//!   `silu`, `softplus` and `pow` are built from those (softplus as in the DSL: x above 20,
//!   exp(x) below -20, else log(1 + exp(x)), so its log1p loses relative precision for tiny
//!   exp(x)); `sqrt`, `recip`, `div` are IEEE (`.rn`). Adds and multiplies carry `.rn`, which
//!   keeps ptxas from contracting them into fmas, so elementwise ops round like the
//!   interpreter. Denormals are flushed inside ex2/lg2 only. f64 tiles use f64 instructions
//!   (add, sub, mul, div, sqrt, rcp, max, cumsum); their transcendental functions go through
//!   f32 (`cvt.rn.f32.f64`, f32 math, `cvt.f64.f32`): the plans only take exp of f32 today.
//!   `Dot`, `GatedDot`, `RowSum` and `SolveUnitLower` accumulate in f32 (f64 for an f64
//!   `RowSum`), as the IR documents.
//!
//! # What is slow on purpose, and what is missing
//! No tensor cores yet (`mma.sync`, `ldmatrix`, `cp.async` come in a later rung), no register
//! tiling, no shared-memory staging of global tiles, element indices recomputed with integer
//! division per element, a barrier after every op, and a 64-bit address computation per
//! element access. Input dtypes are f32 only (the IR's loads are f32); bf16/f16 come with
//! the tensor-core path. Grid, block and placement are fixed here rather than taken from a
//! Schedule.

mod async_copy;
mod emit;
pub mod mma;
mod ptxas;
mod schedule;

use serde::{Deserialize, Serialize};
use std::fmt;

pub use ptxas::{assemble, find_ptxas, PtxasReport, PTXAS_MISSING};
pub use schedule::{DotPrecision, PtxSchedule};

use crate::ir::Kernel;

/// Threads per CTA of the default schedule ([`PtxSchedule::threads`] in general).
pub const BLOCK_THREADS: u32 = 256;

/// Default limit for placing the tile workspace in dynamic shared memory (bytes).
pub const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// The GPU architecture a kernel is emitted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sm {
    /// Ampere (A100): PTX ISA 7.8.
    #[serde(rename = "sm_80")]
    Sm80,
    /// Hopper (H100): PTX ISA 8.0.
    #[serde(rename = "sm_90")]
    Sm90,
}

impl Sm {
    /// The `.target` name, also ptxas's `-arch`.
    pub fn name(self) -> &'static str {
        match self {
            Sm::Sm80 => "sm_80",
            Sm::Sm90 => "sm_90",
        }
    }

    /// The `.version` the emitted PTX declares.
    pub fn isa_version(self) -> &'static str {
        match self {
            Sm::Sm80 => "7.8",
            Sm::Sm90 => "8.0",
        }
    }

    /// Parses `sm_80` / `sm_90` (also `80`, `90`).
    pub fn parse(s: &str) -> Option<Sm> {
        match s.trim().trim_start_matches("sm_") {
            "80" => Some(Sm::Sm80),
            "90" => Some(Sm::Sm90),
            _ => None,
        }
    }
}

impl fmt::Display for Sm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why PTX could not be emitted or assembled. The message is one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxError(pub String);

impl fmt::Display for PtxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PtxError {}

/// How the grid maps to the kernel's (b, h) grid points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grid {
    /// `gridDim = (batch * heads, 1, 1)`; `blockIdx.x = b * heads + h`.
    BatchHeadsX,
}

impl Grid {
    /// The launch's grid dimensions for a problem of `batch` x `heads` grid points.
    pub fn dims(self, batch: u32, heads: u32) -> [u32; 3] {
        match self {
            Grid::BatchHeadsX => [batch * heads, 1, 1],
        }
    }
}

/// Where the tiles of one CTA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TileSpace {
    /// Dynamic shared memory (`dynamic_smem_bytes` per CTA).
    Shared,
    /// A global scratch buffer parameter, `scratch_bytes_per_cta` per CTA.
    Global,
}

/// How a kernel parameter is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamAccess {
    Read,
    Write,
    ReadWrite,
}

/// What a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A pointer to the f32 elements of a tensor (the kernel's IR parameters, in order).
    Tensor,
    /// A pointer to the global scratch buffer (`grid size * scratch_bytes_per_cta` bytes).
    Scratch,
    /// A 64-bit integer: `batch`, `heads` or `seq_len`.
    Scalar,
}

/// One `.param` of the entry, in declaration order. Every parameter is 8 bytes (`.u64`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamMeta {
    pub name: String,
    pub access: ParamAccess,
    /// True for pointers (global addresses), false for scalars.
    pub pointer: bool,
    pub kind: ParamKind,
}

/// Everything a launcher needs besides the PTX text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchMeta {
    /// The `.entry` name.
    pub entry: String,
    pub target: Sm,
    pub grid: Grid,
    /// Threads per CTA (`blockDim`).
    pub block: [u32; 3],
    pub tile_space: TileSpace,
    /// Dynamic shared memory per CTA (0 when the tiles are in global scratch).
    pub dynamic_smem_bytes: usize,
    /// Global scratch per CTA (0 when the tiles are in shared memory).
    pub scratch_bytes_per_cta: usize,
    /// Static shared memory per CTA (the 16-bit staging buffer of tensor-core dots; 0 without).
    /// A launch needs `dynamic_smem_bytes + static_smem_bytes` of shared memory per CTA.
    #[serde(default)]
    pub static_smem_bytes: usize,
    /// The schedule the kernel was emitted with.
    #[serde(default)]
    pub schedule: PtxSchedule,
    /// All `.param`s in order: the tensors, `scratch` (global placement only), then the scalars.
    pub params: Vec<ParamMeta>,
    /// Names of the scalar parameters, in order (`batch`, `heads`, `seq_len`).
    pub scalars: Vec<String>,
}

/// An emitted kernel: PTX text and its launch metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxKernel {
    pub ptx: String,
    pub meta: LaunchMeta,
}

/// Emission knobs (defaults: [`DEFAULT_SMEM_LIMIT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmitOptions {
    /// Tiles go to shared memory when the workspace is at most this many bytes (0: always
    /// global scratch).
    pub smem_limit: usize,
}

impl Default for EmitOptions {
    fn default() -> Self {
        EmitOptions { smem_limit: DEFAULT_SMEM_LIMIT }
    }
}

/// Emits `kernel` as PTX for `target` with the default options.
pub fn emit(kernel: &Kernel, target: Sm) -> Result<PtxKernel, PtxError> {
    emit_with(kernel, target, EmitOptions::default())
}

/// Emits `kernel` as PTX for `target` with the default schedule.
pub fn emit_with(kernel: &Kernel, target: Sm, opts: EmitOptions) -> Result<PtxKernel, PtxError> {
    emit::emit(kernel, target, opts, PtxSchedule::default())
}

/// Emits `kernel` as PTX for `target` under `schedule` (an invalid schedule is an error).
pub fn emit_scheduled(
    kernel: &Kernel,
    target: Sm,
    opts: EmitOptions,
    schedule: &PtxSchedule,
) -> Result<PtxKernel, PtxError> {
    emit::emit(kernel, target, opts, *schedule)
}
