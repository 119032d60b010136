//! A PTX interpreter (verification ladder, rung 5): runs the PTX text chunkc emits, parsed
//! from the text (not from the IR), on the CPU, and reports the bugs a GPU would hide.
//!
//! # Model
//! - [`launch`] parses the module, picks the `.entry`, and runs the CTAs of the grid one after
//!   another; [`run`] runs the launches of a [`Run`] in order on one global memory. Inside a
//!   CTA the warps run one after another from one barrier to the next, and
//!   inside a warp the lanes run one at a time until each reaches a barrier, exits, or
//!   reaches a warp-collective instruction (`shfl.sync`, `mma.sync`, `ldmatrix`,
//!   `bar.warp.sync`); a collective then executes once for all its participants (the
//!   membermask; the whole warp for the `.aligned` ones) and they go on. This is a legal
//!   schedule of the PTX memory model for race-free code; the race detector rejects every
//!   program whose result could depend on the schedule through shared memory.
//! - Global memory is a set of buffers ([`GlobalMemory`]) at distinct base addresses; pointer
//!   parameters are plain `u64` values pointing into them. Generic addresses equal global
//!   addresses, except a shared window at [`SHARED_WINDOW`] (`cvta.shared` / `cvta.to.shared`).
//! - Shared memory is per CTA: the static `.shared` declarations followed by the dynamic
//!   (`.extern .shared ... []`) part, at shared addresses starting at 0.
//! - `cp.async` reads its global source when issued and lands in shared memory only when a
//!   `cp.async.wait_group`/`wait_all` of the issuing thread covers its commit group; a
//!   `bar.sync` does not complete it. Its destination counts as written by the issuing thread.
//!
//! # What it reports ([`SimError`], naming the PTX line, thread and address)
//! 1. out-of-bounds global, shared and parameter accesses (and misaligned ones: every
//!    access, vector accesses, `ldmatrix` rows (16 bytes) and `cp.async` both ends must be
//!    aligned to their size);
//! 2. reads of uninitialised shared memory (a written bit per byte, cleared per CTA);
//! 3. a `bar.sync` reached by only part of the CTA (some threads exited, or wait at a
//!    different `bar.sync` instruction or barrier id);
//! 4. shared-memory races: two different threads touching one byte between two barriers,
//!    at least one of them writing, unless both are lanes of one warp separated by a
//!    full-warp `bar.warp.sync` (a partial-mask one orders nothing here: conservative);
//! 5. a `bra.uni` whose decision differs between the threads of one warp (the emitter
//!    promised a uniform branch);
//! 6. divergent collectives: a participant of a collective waits elsewhere, has exited, or
//!    uses another membermask; `mma`/`ldmatrix` in a warp of fewer than 32 threads; a
//!    `shfl` source lane outside the membermask;
//! 7. any access (read or write, by any thread) to the destination of a `cp.async` before
//!    the issuing thread's wait covers it;
//! 8. integer division by zero, unknown registers/labels/instructions, runaway threads
//!    (more than [`LaunchLimits::max_steps_per_thread`] instructions between barriers).
//!
//! # Precision
//! Arithmetic is IEEE in f32/f64 with round-to-nearest-even (`.rn`); `fma` is fused.
//! `ex2.approx` and `lg2.approx` (and `sin`/`cos`/`rsqrt`/`rcp`/`sqrt`/`div` `.approx`) are
//! computed in f64 and rounded to f32 once: the hardware's `ex2.approx.f32` has a maximum
//! error of 2 ulp (PTX ISA), so the simulator is within 2 ulp of a GPU there; callers'
//! tolerances must allow that. `.ftz` flushes f32 subnormal inputs and results to zero.
//! Directed rounding modes (`.rz`, `.rm`, `.rp`) of arithmetic are not supported (an error);
//! `cvt` supports all integer roundings (`.rni`, `.rzi`, `.rmi`, `.rpi`).
//!
//! Narrow formats: `cvt.rn.{f16,bf16}.f32`, `cvt.rn.{f16x2,bf16x2}.f32` (first source to the
//! upper half) and `cvt.rn.tf32.f32` round to nearest even, `cvt.rna.tf32.f32` ties away
//! from zero, all exactly (subnormals kept, overflow to infinity, NaN to a canonical NaN);
//! `cvt.f32.{f16,bf16}` is exact.
//!
//! `mma`: every product of two bf16/f16/tf32 values is exact; the K products and C are
//! summed in f64 (k order, C last) and rounded once to f32, which is the exactly rounded
//! result except under extreme cancellation. Real tensor cores accumulate differently
//! (internal truncation, partial sums), so a GPU may differ from the simulator by a few
//! ulp per mma, more after cancellation: callers' tolerances must allow it. A `.tf32`
//! operand's low 13 bits are ignored (truncated), as the hardware reads only 19 bits.
//!
//! # Supported beyond scalar arithmetic
//! - `ld`/`st` `.v2`/`.v4` (one access of the whole vector), 16-bit types `.b16 .u16 .s16`
//!   (integer arithmetic too) and `.f16 .bf16` (mov/ld/st/cvt only), `mov.b32`/`mov.b64`
//!   packing `{a, b}` and unpacking;
//! - `mma.sync.aligned.m16n8k16.row.col.f32.{bf16.bf16,f16.f16}.f32`,
//!   `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32` (fragments as the PTX ISA's
//!   "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8");
//! - `ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}{.shared{::cta}}.b16`;
//! - `shfl.sync.{up,down,bfly,idx}.b32 d{|p}, a, b, c, membermask` (clamp and segment mask
//!   of `c` as the ISA's pseudocode), `bar.warp.sync membermask`, `%laneid`;
//! - `cp.async.ca.shared{::cta}.global [d], [s], 4|8|16{, src-size}`, `cp.async.cg` (16),
//!   the zero-filling src-size form (src-size 0 reads nothing), `cp.async.commit_group`,
//!   `cp.async.wait_group N`, `cp.async.wait_all`.
//!
//! # Missing
//! Other `mma` shapes and types (f16 accumulators, integer, f64, sparse), `wgmma`, `ldmatrix`
//! of 8-bit/other shapes, `stmatrix`, `cp.async.bulk`/TMA, mbarriers, `.local` memory,
//! `.func` calls, atomics, `vote`/`redux`/`match`, 8-bit types, arithmetic on `.f16`/`.bf16`
//! (`add.f16`, `fma.rn.f16x2`, ...), the `cp.async` ignore-src predicate, and `cvt` `.relu`/`.satfinite`. They are errors naming
//! the line. `%warpid` is supported but (as on hardware) should not be relied on; the
//! simulator gives `tid / 32`.

mod cpasync;
mod decode_tc;
mod exec;
mod half;
mod parse;
mod shared;
mod warp;

use crate::launch::{Arg, ReadBack, Run};
use std::fmt;

pub use parse::{parse_module, Module};

/// Generic addresses in `[SHARED_WINDOW, SHARED_WINDOW + shared size)` map to shared memory.
pub const SHARED_WINDOW: u64 = 0xFFFF_0000_0000;

/// An error of parsing or running PTX. One line when displayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimError {
    /// 1-based line of the PTX text (0 when not tied to a line).
    pub line: usize,
    /// What went wrong, including the thread/CTA where that applies.
    pub message: String,
}

impl SimError {
    pub(crate) fn new(line: usize, message: impl Into<String>) -> SimError {
        SimError { line, message: message.into() }
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "ptx line {}: {}", self.line, self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

impl std::error::Error for SimError {}

/// A kernel parameter value, in `.param` order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SimParam {
    /// A 64-bit value (`.u64`/`.s64`/`.b64`): scalars and pointers ([`GlobalMemory::alloc`]).
    U64(u64),
    /// A 32-bit value (`.u32`/`.s32`/`.b32`).
    U32(u32),
    F32(f32),
    F64(f64),
}

/// Global memory: buffers at distinct, 256-byte aligned base addresses with gaps between
/// them, so that running off the end of one buffer is out of bounds.
#[derive(Clone, Debug, Default)]
pub struct GlobalMemory {
    buffers: Vec<(u64, Vec<u8>)>,
    next: u64,
}

impl GlobalMemory {
    pub fn new() -> GlobalMemory {
        GlobalMemory { buffers: vec![], next: 0x1000_0000 }
    }

    /// Allocates `bytes` zeroed bytes; returns the base address.
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        if self.next == 0 {
            self.next = 0x1000_0000;
        }
        let base = self.next;
        self.buffers.push((base, vec![0; bytes]));
        self.next = (base + bytes as u64 + 4096 + 255) & !255;
        base
    }

    /// Allocates a buffer holding `data`; returns the base address.
    pub fn alloc_f32(&mut self, data: &[f32]) -> u64 {
        let base = self.alloc(data.len() * 4);
        self.write_f32(base, data).expect("fresh buffer");
        base
    }

    fn find(&self, addr: u64, len: usize) -> Option<(usize, usize)> {
        self.buffers.iter().enumerate().find_map(|(i, (b, d))| {
            (addr >= *b && addr - b <= d.len() as u64 && addr - b + len as u64 <= d.len() as u64)
                .then_some((i, (addr - b) as usize))
        })
    }

    /// The bytes at `[addr, addr + len)` when they lie in one buffer.
    pub fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.find(addr, len).map(|(i, o)| &self.buffers[i].1[o..o + len])
    }

    /// Mutable bytes at `[addr, addr + len)` when they lie in one buffer.
    pub fn bytes_mut(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        self.find(addr, len).map(move |(i, o)| &mut self.buffers[i].1[o..o + len])
    }

    /// Writes f32 values (little endian) at `addr`.
    pub fn write_f32(&mut self, addr: u64, data: &[f32]) -> Result<(), SimError> {
        let dst = self.bytes_mut(addr, data.len() * 4).ok_or_else(|| {
            SimError::new(0, format!("write_f32: {addr:#x}+{} is outside every buffer", data.len() * 4))
        })?;
        for (c, x) in dst.chunks_exact_mut(4).zip(data) {
            c.copy_from_slice(&x.to_le_bytes());
        }
        Ok(())
    }

    /// Reads `n` f32 values at `addr`.
    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, SimError> {
        let src = self
            .bytes(addr, n * 4)
            .ok_or_else(|| SimError::new(0, format!("read_f32: {addr:#x}+{} is outside every buffer", n * 4)))?;
        Ok(src.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// Safety limits of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchLimits {
    /// Instructions one thread may execute between two barriers before it is reported as
    /// running away.
    pub max_steps_per_thread: u64,
}

impl Default for LaunchLimits {
    fn default() -> Self {
        LaunchLimits { max_steps_per_thread: 50_000_000 }
    }
}

/// What a successful launch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Instructions executed, summed over all threads (predicated-off ones included).
    pub instructions: u64,
    /// Barriers completed, summed over CTAs.
    pub barriers: u64,
    pub ctas: u64,
    /// Shared memory per CTA (static + dynamic bytes).
    pub shared_bytes: usize,
}

/// Runs `entry` of the PTX module `ptx` over `grid` x `block` threads with `dynamic_smem`
/// bytes of dynamic shared memory per CTA. `params` are the `.param` values in order.
pub fn launch(
    ptx: &str,
    entry: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: usize,
    params: &[SimParam],
    memory: &mut GlobalMemory,
) -> Result<SimReport, SimError> {
    launch_with(ptx, entry, grid, block, dynamic_smem, params, memory, LaunchLimits::default())
}

/// A launch of a [`Run`] that the simulator stopped, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct RunError {
    /// Which launch of the run (its index).
    pub launch: usize,
    pub error: SimError,
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "launch {}: {}", self.launch, self.error)
    }
}

/// Runs a [`Run`]'s launches in order on one global memory holding its buffers, checking
/// every access as it goes; returns the read-back buffers' bytes.
pub fn run(run: &Run) -> Result<ReadBack, RunError> {
    let at = |launch: usize| move |error: SimError| RunError { launch, error };
    run.check().map_err(|m| RunError { launch: 0, error: SimError::new(0, m) })?;
    let mut memory = GlobalMemory::new();
    let mut bases = Vec::with_capacity(run.buffers.len());
    for b in &run.buffers {
        let base = memory.alloc(b.bytes.len());
        if let Some(dst) = memory.bytes_mut(base, b.bytes.len()) {
            dst.copy_from_slice(&b.bytes);
        }
        bases.push(base);
    }
    for (i, l) in run.launches.iter().enumerate() {
        let params: Vec<SimParam> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::Buffer(b) => SimParam::U64(bases[*b]),
                Arg::U64(x) => SimParam::U64(*x),
            })
            .collect();
        let k = &l.launch;
        launch(k.ptx, k.entry, k.grid, k.block, k.dynamic_smem_bytes, &params, &mut memory).map_err(at(i))?;
    }
    let last = run.launches.len().saturating_sub(1);
    run.buffers
        .iter()
        .zip(&bases)
        .filter(|(b, _)| b.read_back)
        .map(|(b, &base)| {
            memory
                .bytes(base, b.bytes.len())
                .map(<[u8]>::to_vec)
                .ok_or_else(|| at(last)(SimError::new(0, format!("buffer at {base:#x} vanished"))))
        })
        .collect()
}

/// [`launch`] with explicit [`LaunchLimits`].
#[allow(clippy::too_many_arguments)]
pub fn launch_with(
    ptx: &str,
    entry: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_smem: usize,
    params: &[SimParam],
    memory: &mut GlobalMemory,
    limits: LaunchLimits,
) -> Result<SimReport, SimError> {
    let module = parse_module(ptx)?;
    let kernel = module
        .entries
        .iter()
        .find(|k| k.name == entry)
        .ok_or_else(|| SimError::new(0, format!("no .entry `{entry}` in the module")))?;
    exec::run(&module, kernel, grid, block, dynamic_smem, params, memory, limits)
}
