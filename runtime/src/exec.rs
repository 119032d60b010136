//! The CPU executor: runs a compiled kernel over the (batch, head, V-tile) grid on worker
//! threads, which take grid points one at a time from a shared counter (so T threads never
//! run more than T points at once, whatever the split).

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
/// threads.
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
    threads: usize,
) {
    let ptrs = SendPtrs(buffers.iter_mut().map(|b| b.ptr()).collect());
    let vtiles = kernel.vtiles().max(1);
    let points = batch * heads * vtiles;
    let threads = threads.max(1).min(points.max(1));
    let next = AtomicUsize::new(0);
    let bytes = kernel.workspace_bytes().max(64);
    let ptrs = &ptrs;
    let work = |_: usize| {
        // u128-aligned scratch, rounded up; 64-byte alignment from over-allocation.
        let mut scratch = vec![0u8; bytes + 64];
        let off = scratch.as_ptr().align_offset(64);
        let ws = unsafe { scratch.as_mut_ptr().add(off) };
        loop {
            let p = next.fetch_add(1, Ordering::Relaxed);
            if p >= points {
                break;
            }
            // V-tiles of one head are adjacent, so neighbouring points share K-side loads.
            let (bh, vt) = (p / vtiles, p % vtiles);
            let (b, h) = (bh / heads, bh % heads);
            unsafe { kernel.call_tile(ptrs.0.as_ptr(), b as i64, h as i64, vt as i64, seq_len as i64, ws) };
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
