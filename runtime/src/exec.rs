//! The CPU executor: runs a compiled kernel over the (batch, head) grid on worker threads.

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

/// Runs `kernel` for every (b, h) in `batch x heads` on up to `threads` threads.
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
    let points = batch * heads;
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
            let (b, h) = (p / heads, p % heads);
            unsafe { kernel.call(ptrs.0.as_ptr(), b as i64, h as i64, seq_len as i64, ws) };
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
