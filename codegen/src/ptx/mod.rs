//! PTX backend: a SIMT lowering of the tile IR to PTX text for sm_80 and sm_90, written
//! directly as text (pure Rust: no LLVM, no CUDA toolkit), with tensor-core dots and
//! `cp.async` loads when the [`PtxSchedule`] asks for them, plus [`assemble`], which runs
//! NVIDIA's `ptxas` (when installed) and reads back its resource report.
//!
//! Status: every kernel of every rule in `rules/` assembles with ptxas for sm_80 and sm_90
//! under the default schedules (f32 fma, tf32, bf16) with no spills, and every chunked
//! kernel under the double-buffered tf32 and bf16 schedules (`codegen/tests/ptx_assemble.rs`). The PTX simulator (`chunkc_runtime::ptxsim`) runs the
//! default-schedule kernels against the f64 reference (`codegen/tests/ptx_sim.rs`); the
//! tensor-core and `cp.async` kernels run there too once the simulator executes `mma.sync`,
//! `ldmatrix` and `cp.async` (the tests probe for it), and every rule's kernels under the
//! double-buffered, opt-in shared-memory schedules (`codegen/tests/ptx_pipeline.rs`). No real
//! GPU has run any of it.
//!
//! # Design
//! - **Mid-end** (`crate::midend`, with [`crate::midend::Abilities::simt`]): every single-use
//!   elementwise chain is fused into the op that consumes it (computed element by element in
//!   registers there: no tile, no loop, no barrier of its own), redundant rows masks are
//!   dropped, and a loop's state update that may is written straight into its carried region
//!   (no copy at the end of an iteration); the workspace layout is the mid-end's too.
//! - **Schedule** ([`PtxSchedule`], `schedule.rs`): warps per CTA, the dot precision
//!   ([`DotPrecision`]: f32 fma, tf32, bf16, f16), the smallest dot dimension worth a tensor
//!   core, the 16-bit staging budget, whether loads use `cp.async`, whether the tiles may use
//!   the target's opt-in shared memory (`opt_in_smem`) and the `cp.async` pipeline depth of
//!   the chunk loop (`stages`, 1 or 2). Block size and shared memory follow from it;
//!   [`LaunchMeta`] records it. The default is the plain fma lowering (48 KiB, one stage);
//!   [`PtxSchedule::with_dot`] for a tensor-core precision opts in to the large shared memory;
//!   [`PtxSchedule::pipelined`] also double-buffers.
//! - **Grid**: one CTA per grid point (b, h): `gridDim = (batch * heads, 1, 1)`,
//!   `blockIdx.x = b * heads + h` (see [`Grid`]). CTAs past `batch * heads` exit at once.
//!   A kernel split into V-tiles (the Schedule's `bv`) has one CTA per (b, h, V-tile):
//!   `gridDim = (vtiles, batch * heads, 1)`, `Grid::BatchHeadsVTiles` in the metadata. A
//!   chunk-parallel kernel (a program's output pass) has one CTA per (V-tile, chunk, b, h):
//!   `gridDim = (vtiles, ceil(T / C), batch * heads)`, `Grid::VTilesChunksBatchHeads`, and its
//!   loop runs the CTA's chunk alone. [`emit_program`] emits every phase of a program.
//! - **Block**: `32 * warps` threads (one dimension), and `.maxnreg` all the registers one
//!   CTA may have (left to itself, ptxas picked targets as low as 48 registers and spilled).
//!   Every op that is not fused is a loop over its output elements strided by the block size
//!   (elementwise ops, loads through registers and stores with up to 4 copies of the body
//!   per iteration, every copy's reads before any write: [`unroll_factor`]). A `bar.sync 0`
//!   comes before an op only when it reads what an op since the last barrier wrote, or writes
//!   what one read or wrote (`hazards.rs`: byte spans of the workspace, the staging buffer,
//!   whole global tensors), and at every loop boundary. `Rows` and `Transpose` are views: no
//!   code, no barrier.
//! - **Tiles** live where `midend::layout` puts them: one region per non-view value, reused once
//!   dead. The whole workspace goes in dynamic shared memory when it fits, together with the
//!   16-bit staging buffer, in [`EmitOptions::smem_limit`] (48 KiB by default, the size that
//!   needs no opt-in attribute at launch) or, under a schedule with `opt_in_smem`, in the
//!   target's opt-in maximum per block ([`max_smem_per_block`]: 163 KiB on sm_80, 227 KiB on
//!   sm_90; the CUDA launcher raises the kernel's dynamic shared-memory attribute past
//!   48 KiB), otherwise in a per-CTA slice of a global scratch buffer passed as the `scratch`
//!   parameter (`scratch + blockIdx.x * bytes`). An `smem_limit` of 0 forces global scratch
//!   under every schedule. The staging buffer is a static `.shared` array
//!   (`LaunchMeta::static_smem_bytes`).
//! - **Dots** (`mma.rs`): per dot, tensor cores when the schedule asks for them and m, n, k
//!   are all at least `min_mma_dim` (else the fma loop: the recurrent kernels' 1-row
//!   products). Warps own 16 x 16 output tiles (two m16n8 products) and keep the f32
//!   accumulators in registers over all of k; m, n, k are padded with zeros to the
//!   instruction shape. bf16/f16: operands are rounded (`cvt.rn.{bf16,f16}x2.f32`) into a
//!   padded, bank-conflict-free staging layout (A as m x k, B as n x k: transposes are
//!   absorbed there, so `ldmatrix.x4` without `.trans` yields the fragments), staged in
//!   k-slices when the budget is small; tf32: fragments are loaded from the tiles and rounded
//!   with `cvt.rna.tf32.f32`. Fragment index formulas cite the PTX ISA tables and are
//!   unit-tested by emulating ldmatrix + mma from those tables.
//! - **Input dtypes**: a `Load` of a bf16 tensor reads 16 bits and shifts them into the high
//!   half of an f32; an f16 one converts with `cvt.f32.f16`; both are exact, so the f32
//!   budget still holds. [`ParamMeta::elem`] records each tensor's type.
//! - **Loads** (`async_copy.rs`): with `async_copy` and tiles in shared memory, a run of
//!   consecutive loads is one batch of `cp.async` (4 bytes, or 16 when contiguity and
//!   alignment are provable from the index expression), zero-filling the sequence tail via
//!   `src-size`, closed by `commit_group`, `wait_group 0`, `bar.sync` before the next op.
//!   With `stages = 2` the f32 loads of a loop body are double-buffered: the layout planner
//!   (`layout::plan_with`) gives them an even and an odd copy in one region live over the
//!   loop, every access to them adds a per-iteration phase register, and the copies of
//!   iteration i + 1 are issued at the top of iteration i, before its compute (none on the
//!   last iteration; `commit_group`, `wait_group 1`, `bar.sync`: exactly iteration i's group
//!   is complete). When the doubled workspace does not fit the limit, the kernel falls back
//!   to one stage.
//! - **Other ops**: `Cumsum` and `SolveUnitLower` run one thread per column, unrolled down
//!   the rows up to [`UNROLLED_ROWS`] (every access at a constant offset, so the loads are
//!   issued ahead; the solve keeps a window of [`SOLVE_WINDOW`] rows of its column in
//!   registers, in the loop's fma order, so the bits do not change), a loop past it; `RowSum`
//!   one thread per row; `GatedDot` one thread per (i, j) pair; elementwise ops (`Unary`, `Binary` with
//!   broadcasting, `Mask`, `Cast`, `Const`) one thread per element. Loads and stores honour
//!   the `valid_rows` masks with predicates. Index expressions are 64-bit integer arithmetic
//!   on `%ctaid.x` and the scalar parameters `batch`, `heads`, `seq_len`. The `Loop` copies
//!   its carried values like the CPU backend (yields that read a carried region go through a
//!   temporary first); every branch around a loop or a warp's mma is uniform.
//! - **Math precision**: `exp` is `ex2.approx.ftz.f32` of `x * log2(e)` (about 2 ulp of ex2
//!   plus the rounding of the product, which grows with |x|: the plans only exponentiate
//!   values <= 0 of moderate size); `log` is `lg2.approx.ftz.f32` times ln 2; `sigmoid`,
//!   `silu`, `softplus` and `pow` are built from those (softplus as in the DSL: x above 20,
//!   exp(x) below -20, else log(1 + exp(x)), so its log1p loses relative precision for tiny
//!   exp(x)); `sqrt`, `recip`, `div` are IEEE (`.rn`). Adds and multiplies carry `.rn`, which
//!   keeps ptxas from contracting them into fmas, so elementwise ops round like the
//!   interpreter. Denormals are flushed inside ex2/lg2 only. f64 tiles use f64 instructions
//!   (add, sub, mul, div, sqrt, rcp, max, cumsum); their transcendental functions go through
//!   f32. `Dot` accumulates in f32 on every path (tensor cores included); tf32 operands carry
//!   10 mantissa bits, bf16 7, f16 10 (and f16 overflows past 65504: nothing clamps it), so
//!   tensor-core kernels meet the tf32 (1e-3) and 16-bit (1e-2) budgets, not the f32 one.
//!
//! # What is slow, and what is missing
//! - A barrier before most ops all the same: consecutive ops mostly read what the op before
//!   wrote, and the layout's reuse of dead regions adds writes after reads (the planner does
//!   not avoid them); element indices recomputed with integer division per element; a 64-bit
//!   address computation per element access.
//! - Tensor cores: the 16-bit operands are re-staged for every dot (and every pass of a dot
//!   with more than `4 * warps` warp tiles), A fragments are reloaded for each warp tile (no
//!   register blocking across tiles), and tf32 fragments are plain scalar loads.
//! - Shared memory: the plain (fma) schedule keeps the 48 KiB limit, so at K = V = 64 its
//!   tiles are mostly in global scratch. Under the tensor-core schedules (opt-in maximum),
//!   at K = V = 64 every recurrent and c16 kernel fits in shared memory on both targets; c64
//!   fits on sm_90 (up to 224 KiB) but on sm_80 only delta_rule and linear_attn do; at
//!   K = V = 128 (c64) only linear_attn on sm_90 does (the ptxas tests' tables, `tiles:`
//!   column). The rest still use global scratch, where the tf32 fragments and the 16-bit
//!   staging read global memory and `cp.async` is not used. A workspace of 100+ KiB allows one CTA per SM: the workspace is
//!   not trimmed (every non-view value has its own region while live) and no occupancy model
//!   chooses between shared and global placement.
//! - Double buffering (`stages = 2`) prefetches only the f32 loads directly in the loop body
//!   (16-bit tensors still go through registers), waits for all of an iteration's loads at
//!   its top (not for each load just before its first use), and doubles those tiles' bytes,
//!   which pushes some kernels over the limit (they fall back to one stage). Deeper pipelines
//!   (`stages > 2`) are not implemented. Nothing has measured the overlap on a GPU.
//! - 16-bit input tensors (`ir::ElemType`) go through registers: 8 elements per
//!   `ld.global.v4.u32` when rows of 8 are contiguous and aligned ([`vector_width_16bit`]),
//!   else one scalar `ld.global.u16`/`.b16` per element; never `cp.async`, so never
//!   prefetched a chunk ahead.
//! - No `wgmma`/TMA for sm_90 (the sm_90 kernels use the sm_80 instructions).

mod async_copy;
pub use async_copy::vector_width_16bit;
mod emit;
mod hazards;
pub use emit::{row_sum_lanes, unroll_factor, unrolled_rows, SOLVE_WINDOW, UNROLLED_ROWS, UNROLL_BATCH};
pub mod mma;
mod ptxas;
mod schedule;

use std::fmt;

pub use chunkc_runtime::artifact::{Grid, ParamAccess, ParamKind, ParamMeta, Sm, TileSpace};
pub use ptxas::{assemble, find_ptxas, PtxasReport, PTXAS_MISSING};
pub use schedule::{max_smem_per_block, smem_limit, DotPrecision, PtxSchedule};

use crate::ir::Kernel;
use crate::program::{Program, ProgramSpec};

/// Threads per CTA of the default schedule ([`PtxSchedule::threads`] in general).
pub const BLOCK_THREADS: u32 = 256;

/// Default limit for placing the tile workspace in dynamic shared memory (bytes).
pub const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// Why PTX could not be emitted or assembled. The message is one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxError(pub String);

impl fmt::Display for PtxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PtxError {}

/// Everything a launcher needs besides the PTX text, with the schedule the kernel was
/// emitted with (the format is the runtime's: [`chunkc_runtime::artifact`]).
pub type LaunchMeta = chunkc_runtime::artifact::LaunchMeta<PtxSchedule>;

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

/// A program emitted as PTX: one kernel per phase, in order, and the program's description,
/// which the runtime binds them through (`chunkc_runtime::abi::bind_program`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxProgram {
    pub spec: ProgramSpec,
    pub phases: Vec<PtxKernel>,
}

/// Emits every phase of `program` for `target` under `schedule`.
pub fn emit_program(
    program: &Program,
    target: Sm,
    opts: EmitOptions,
    schedule: &PtxSchedule,
) -> Result<PtxProgram, PtxError> {
    let phases = program.kernels.iter().map(|k| emit_scheduled(k, target, opts, schedule)).collect::<Result<_, _>>()?;
    Ok(PtxProgram { spec: program.spec.clone(), phases })
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
