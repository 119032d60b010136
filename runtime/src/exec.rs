//! The CPU executor: runs a compiled kernel over the (batch, head, V-tile) grid on worker
//! threads, never more threads than grid points.
//!
//! Two orders. Head by head: workers take grid points one at a time from a shared counter
//! and run each point's whole sequence. Time blocks (for a [`Resume`]-able kernel and a
//! sequence longer than the block): the workers take (block, point) items from the counter,
//! the first block of tokens of every point, then the next block of every point, and so on,
//! the state going from one call to the next through the state-out buffer (a block waits for
//! its point's previous block, which was taken earlier). The inputs are
//! `[B, T, H, K]`, so one token's rows of all heads share a page: walking the heads inside a
//! block uses each page (and its TLB entry) while it is still cached, where the head-by-head
//! order comes back to it only after the whole sequence of a head.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A kernel compiled for this CPU, callable once per grid point.
///
/// The kernel reads and writes the f32 buffers whose base pointers it receives, at offsets
/// that depend on the grid point; different grid points never write the same element.
pub trait CpuKernel: Send + Sync {
    /// Scratch bytes one call needs (each thread gets its own).
    fn workspace_bytes(&self) -> usize;
    /// Runs grid point (`batch`, `head`) with sequence length `seq_len`.
    ///
    /// # Safety
    /// `params` must hold one pointer per kernel parameter, each to a buffer large enough
    /// for every element the kernel touches for this grid point and `seq_len`, and
    /// `workspace` must point to `workspace_bytes()` writable bytes, aligned to 64.
    unsafe fn call(&self, params: *const *mut f32, batch: i64, head: i64, seq_len: i64, workspace: *mut u8);
    /// V-tiles per head: the grid is (batch, head, V-tile). 1 for a kernel over the whole V.
    fn vtiles(&self) -> usize {
        1
    }
    /// Runs grid point (`batch`, `head`, `vtile`) of a kernel split into V-tiles.
    ///
    /// # Safety
    /// As [`CpuKernel::call`], with `vtile < vtiles()`.
    unsafe fn call_tile(
        &self,
        params: *const *mut f32,
        batch: i64,
        head: i64,
        vtile: i64,
        seq_len: i64,
        workspace: *mut u8,
    ) {
        debug_assert_eq!(vtile, 0, "a kernel without V-tiles has only V-tile 0");
        // SAFETY: the caller upholds `call`'s contract.
        unsafe { self.call(params, batch, head, seq_len, workspace) }
    }
    /// How the kernel's sequence loop may run in pieces, or None when it must run whole.
    fn resume(&self) -> Option<&Resume> {
        None
    }
    /// Runs iterations `range` = `[begin, end)` (clamped to the loop's count) of grid point
    /// `[batch, head, vtile]`.
    ///
    /// # Safety
    /// As [`CpuKernel::call_tile`]; a call with `begin > 0` must get, in place of every
    /// state-in parameter of [`CpuKernel::resume`], the state-out buffer that the call for
    /// the iterations before `begin` wrote. Only meaningful when `resume` is Some.
    unsafe fn call_range(
        &self,
        params: *const *mut f32,
        [batch, head, vtile]: [i64; 3],
        seq_len: i64,
        range: (i64, i64),
        workspace: *mut u8,
    ) {
        debug_assert!(range.0 == 0 && range.1 == i64::MAX, "a kernel without `resume` runs whole");
        // SAFETY: the caller upholds `call_tile`'s contract.
        unsafe { self.call_tile(params, batch, head, vtile, seq_len, workspace) }
    }
}

/// How a kernel's sequence loop can run in pieces (the compiler proves it exact: chunkc-codegen's
/// `resume` module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    /// (state-in parameter, state-out parameter) per carried value: a call that resumes at
    /// iteration `m > 0` gets the state-out buffer in place of the state-in one.
    pub state: Vec<(usize, usize)>,
    /// Tokens one loop iteration covers (the chunk size; 1 for a token-by-token loop).
    pub tokens_per_iteration: usize,
}

/// Tokens per time block of [`launch`]'s blocked order when the caller has no preference:
/// 4 chunks of 64. Measured on gla and simple_gla at B1 T2048 H8 K=V=128 (docs/performance.md):
/// 2 to 8 chunks of 64 are within a few percent of each other; 1 chunk and 16 lose most of
/// the gain.
pub const DEFAULT_TIME_BLOCK: usize = 256;

/// How [`launch`] walks the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    /// Worker threads (at least 1 is used; never more than grid points).
    pub threads: usize,
    /// Tokens per time block; 0 runs each grid point's whole sequence at once (head by head).
    pub time_block: usize,
}

impl Order {
    /// `threads` workers in time blocks of [`DEFAULT_TIME_BLOCK`] tokens.
    pub fn threads(threads: usize) -> Order {
        Order { threads, time_block: DEFAULT_TIME_BLOCK }
    }
}

/// A buffer of f32 the executor hands to a kernel.
pub enum Buffer<'a> {
    In(&'a [f32]),
    Out(&'a mut [f32]),
}

impl Buffer<'_> {
    fn ptr(&mut self) -> *mut f32 {
        match self {
            Buffer::In(s) => s.as_ptr() as *mut f32,
            Buffer::Out(s) => s.as_mut_ptr(),
        }
    }
}

struct SendPtrs(Vec<*mut f32>);
// SAFETY: the pointers are only dereferenced by the kernel, which writes disjoint elements
// per grid point (CpuKernel's contract) and only reads the `In` buffers.
unsafe impl Sync for SendPtrs {}
unsafe impl Send for SendPtrs {}

/// Threads to use when the caller says 0: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs `kernel` for every (b, h, vt) in `batch x heads x kernel.vtiles()` on up to `threads`
/// threads, in time blocks where the kernel allows it (see the module doc).
///
/// # Safety
/// The buffers must be large enough for every access the kernel makes for these grid
/// points and `seq_len` (the caller checked the tensor shapes the kernel was built for).
pub unsafe fn launch(
    kernel: &dyn CpuKernel,
    buffers: &mut [Buffer<'_>],
    batch: usize,
    heads: usize,
    seq_len: usize,
    order: Order,
) {
    let Order { threads, time_block } = order;
    let ptrs = SendPtrs(buffers.iter_mut().map(|b| b.ptr()).collect());
    let vtiles = kernel.vtiles().max(1);
    let points = batch * heads * vtiles;
    let threads = threads.max(1).min(points.max(1));
    let next = AtomicUsize::new(0);
    let bytes = kernel.workspace_bytes().max(64);
    let ptrs = &ptrs;
    // V-tiles of one head are adjacent, so neighbouring points share K-side loads.
    let point = |p: usize| {
        let (bh, vt) = (p / vtiles, p % vtiles);
        ((bh / heads) as i64, (bh % heads) as i64, vt as i64)
    };
    let blocked = kernel.resume().filter(|r| time_block > 0 && seq_len > time_block && r.tokens_per_iteration > 0);
    let done: Vec<AtomicUsize> = (0..if blocked.is_some() { points } else { 0 }).map(|_| AtomicUsize::new(0)).collect();
    let done = &done;
    let work = |_: usize| {
        // u128-aligned scratch, rounded up; 64-byte alignment from over-allocation.
        let mut scratch = vec![0u8; bytes + 64];
        let off = scratch.as_ptr().align_offset(64);
        let ws = unsafe { scratch.as_mut_ptr().add(off) };
        if let Some(resume) = blocked {
            let per_block = (time_block / resume.tokens_per_iteration).max(1);
            let blocks = seq_len.div_ceil(resume.tokens_per_iteration).div_ceil(per_block);
            let mut resumed = ptrs.0.clone();
            for &(state_in, state_out) in &resume.state {
                resumed[state_in] = ptrs.0[state_out];
            }
            // Item k is block k / points of point k % points, taken in order from `next`, so a
            // block's predecessor (item k - points) was taken earlier: waiting for it to
            // finish (`done[p]` counts a point's finished blocks) cannot deadlock, and a slow
            // worker just takes fewer items.
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= blocks * points {
                    break;
                }
                let (block, p) = (k / points, k % points);
                while done[p].load(Ordering::Acquire) < block {
                    std::hint::spin_loop();
                }
                let params = if block == 0 { &ptrs.0 } else { &resumed };
                let (b, h, vt) = point(p);
                let first = (block * per_block) as i64;
                let range = (first, first + per_block as i64);
                unsafe { kernel.call_range(params.as_ptr(), [b, h, vt], seq_len as i64, range, ws) };
                // Release: the next block of p, on any worker, reads the state this one stored.
                done[p].store(block + 1, Ordering::Release);
            }
            return;
        }
        loop {
            let p = next.fetch_add(1, Ordering::Relaxed);
            if p >= points {
                break;
            }
            let (b, h, vt) = point(p);
            unsafe { kernel.call_tile(ptrs.0.as_ptr(), b, h, vt, seq_len as i64, ws) };
        }
    };
    if threads == 1 {
        work(0);
    } else {
        std::thread::scope(|s| {
            for t in 0..threads {
                let work = &work;
                s.spawn(move || work(t));
            }
        });
    }
}
