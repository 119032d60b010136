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

pub use crate::cpu_kernel::{CpuKernel, Resume};
use crate::program::{Access, PhaseKind, ProgramSpec, Role, Sizes, SpecError};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How [`launch`] walks the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    /// Worker threads (at least 1 is used; never more than grid points).
    pub threads: usize,
    /// Tokens per time block; 0 runs each grid point's whole sequence at once (head by head).
    pub time_block: usize,
    /// NaN-fill each worker's scratch before its first call, so that a kernel reading scratch
    /// it never wrote poisons its outputs instead of reading zeros. Runs that check results
    /// want it; a benchmark, timing the launch alone, turns it off.
    pub poison_scratch: bool,
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

/// One worker's kernel scratch, 64-byte aligned.
pub(crate) struct Scratch(Vec<u8>);

impl Scratch {
    /// `bytes` of scratch, NaN-filled when `poison` (see [`Order::poison_scratch`]). Zeroed
    /// memory costs nothing until touched (calloc), so only a checking run pays for the fill.
    pub(crate) fn new(bytes: usize, poison: bool) -> Scratch {
        // 64-byte alignment from over-allocation.
        Scratch(if poison {
            f32::NAN.to_le_bytes().into_iter().cycle().take(bytes + 64).collect()
        } else {
            vec![0u8; bytes + 64]
        })
    }

    pub(crate) fn ptr(&mut self) -> *mut u8 {
        let off = self.0.as_ptr().align_offset(64);
        // SAFETY: `off < 64` and the buffer has 64 bytes more than asked for.
        unsafe { self.0.as_mut_ptr().add(off) }
    }
}

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
    let ptrs: Vec<*mut f32> = buffers.iter_mut().map(|b| b.ptr()).collect();
    // SAFETY: the caller's contract.
    unsafe { launch_ptrs(kernel, ptrs, [batch, heads, seq_len], false, order) }
}

/// [`launch`] on raw parameter pointers. `independent`: the kernel's loop iterations do not
/// depend on each other (a chunk-parallel phase), so blocks of them run on any worker in any
/// order, with no state handed between them.
///
/// # Safety
/// As [`launch`]: every pointer covers every element the kernel touches.
unsafe fn launch_ptrs(
    kernel: &dyn CpuKernel,
    ptrs: Vec<*mut f32>,
    [batch, heads, seq_len]: [usize; 3],
    independent: bool,
    order: Order,
) {
    let Order { threads, time_block, poison_scratch } = order;
    let ptrs = SendPtrs(ptrs);
    let vtiles = kernel.vtiles().max(1);
    let points = batch * heads * vtiles;
    let next = AtomicUsize::new(0);
    let bytes = kernel.workspace_bytes().max(64);
    let ptrs = &ptrs;
    // V-tiles of one head are adjacent, so neighbouring points share K-side loads.
    let point = |p: usize| {
        let (bh, vt) = (p / vtiles, p % vtiles);
        ((bh / heads) as i64, (bh % heads) as i64, vt as i64)
    };
    let resume = kernel.resume().filter(|r| r.tokens_per_iteration > 0);
    // Blocks of iterations: time blocks of a resumable kernel, or for independent iterations
    // also when there are fewer points than workers (the chunks are then what spreads).
    let per_block = resume.and_then(|r| {
        let iterations = seq_len.div_ceil(r.tokens_per_iteration);
        let spread = independent && points < threads.max(1);
        match (time_block > 0 && seq_len > time_block, spread) {
            (true, _) => Some((time_block / r.tokens_per_iteration).max(1)),
            (false, true) => Some(iterations.div_ceil(threads.max(1).div_ceil(points.max(1))).max(1)),
            (false, false) => None,
        }
    });
    let blocks = match (resume, per_block) {
        (Some(r), Some(per)) => seq_len.div_ceil(r.tokens_per_iteration).div_ceil(per),
        _ => 1,
    };
    // A sequential point's blocks run one after another, so more workers than points would
    // only wait.
    let items = if independent { points * blocks } else { points };
    let threads = threads.max(1).min(items.max(1));
    let done: Vec<AtomicUsize> =
        (0..if per_block.is_some() && !independent { points } else { 0 }).map(|_| AtomicUsize::new(0)).collect();
    let done = &done;
    let work = |_: usize| {
        let mut scratch = Scratch::new(bytes, poison_scratch);
        let ws = scratch.ptr();
        if let (Some(resume), Some(per_block)) = (resume, per_block) {
            let mut resumed = ptrs.0.clone();
            for &(state_in, state_out) in &resume.state {
                resumed[state_in] = ptrs.0[state_out];
            }
            // Item k is block k / points of point k % points, taken in order from `next`, so a
            // block's predecessor (item k - points) was taken earlier: waiting for it to
            // finish (`done[p]` counts a point's finished blocks) cannot deadlock, and a slow
            // worker just takes fewer items. Independent iterations wait for nothing.
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= blocks * points {
                    break;
                }
                let (block, p) = (k / points, k % points);
                if !independent {
                    while done[p].load(Ordering::Acquire) < block {
                        std::hint::spin_loop();
                    }
                }
                let params = if block == 0 || independent { &ptrs.0 } else { &resumed };
                let (b, h, vt) = point(p);
                let first = (block * per_block) as i64;
                let range = (first, first + per_block as i64);
                unsafe { kernel.call_range(params.as_ptr(), [b, h, vt], seq_len as i64, range, ws) };
                if !independent {
                    // Release: the next block of p, on any worker, reads the state this one stored.
                    done[p].store(block + 1, Ordering::Release);
                }
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

/// The memory a program run owns: its outputs and intermediates, allocated for one problem's
/// sizes, and zeros for the optional inputs the caller leaves out. Allocated once, it serves
/// any number of runs (a benchmark's).
pub struct ProgramMemory {
    sizes: Sizes,
    owned: BTreeMap<String, Vec<f32>>,
}

impl ProgramMemory {
    /// NaN-filled outputs and intermediates of `spec` for `sizes`.
    pub fn new(spec: &ProgramSpec, sizes: Sizes) -> Result<ProgramMemory, SpecError> {
        spec.check_sizes(&sizes)?;
        let mut owned = BTreeMap::new();
        for t in spec.tensors.iter().filter(|t| t.role != Role::Input) {
            owned.insert(t.name.clone(), vec![f32::NAN; spec.numel(t, &sizes)?]);
        }
        Ok(ProgramMemory { sizes, owned })
    }

    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// NaN-fills the outputs and intermediates again, so that an element a run fails to
    /// write cannot pass for one an earlier run wrote.
    pub fn poison(&mut self, spec: &ProgramSpec) {
        for t in spec.tensors.iter().filter(|t| t.role != Role::Input) {
            if let Some(data) = self.owned.get_mut(&t.name) {
                data.fill(f32::NAN);
            }
        }
    }

    /// A tensor the run wrote (an output or an intermediate).
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.owned.get(name).map(Vec::as_slice)
    }

    /// The outputs of `spec`, by name, with their shapes.
    pub fn into_outputs(mut self, spec: &ProgramSpec) -> Result<BTreeMap<String, Tensor>, SpecError> {
        let mut out = BTreeMap::new();
        for t in spec.with_role(Role::Output) {
            let data = self
                .owned
                .remove(&t.name)
                .ok_or_else(|| SpecError(format!("output `{}` was not allocated", t.name)))?;
            let tensor = Tensor::new(spec.shape(t, &self.sizes)?, data).map_err(|e| SpecError(e.to_string()))?;
            out.insert(t.name.clone(), tensor);
        }
        Ok(out)
    }
}

/// Runs the phases of `spec` in order, `kernels[i]` for phase i, over the grid of `memory`'s
/// sizes: inputs by name from `inputs` (an optional one may be absent: zeros), outputs and
/// intermediates in `memory`. Each phase starts when the one before has finished.
///
/// Everything a kernel indexes is checked first: the kernels are the phases' (by entry
/// name), the sizes are those the program was compiled for, and every tensor has exactly the
/// elements its shape gives, so the compiled code cannot reach past a buffer.
pub fn run_program<'i>(
    spec: &ProgramSpec,
    kernels: &[&dyn CpuKernel],
    inputs: &dyn Fn(&str) -> Option<&'i [f32]>,
    memory: &mut ProgramMemory,
    order: Order,
) -> Result<(), SpecError> {
    let err = |m: String| Err(SpecError(m));
    spec.check_sizes(&memory.sizes)?;
    if kernels.len() != spec.phases.len() {
        return err(format!("program {}: {} kernels for {} phases", spec.name, kernels.len(), spec.phases.len()));
    }
    let sizes = memory.sizes;
    for t in spec.with_role(Role::Input) {
        let want = spec.numel(t, &sizes)?;
        match inputs(&t.name) {
            Some(data) if data.len() == want => {}
            Some(data) => {
                return err(format!(
                    "tensor `{}`: expected {} = {:?} elements, got {}",
                    t.name,
                    t.dims_label(),
                    spec.shape(t, &sizes)?,
                    data.len()
                ))
            }
            None if t.optional => {
                memory.owned.entry(t.name.clone()).or_insert_with(|| vec![0.0; want]);
            }
            None => return err(format!("program {}: no tensor for input `{}`", spec.name, t.name)),
        }
    }
    for (phase, kernel) in spec.phases.iter().zip(kernels) {
        if kernel.entry() != phase.entry || kernel.vtiles().max(1) != phase.vtiles {
            return err(format!("program {}: kernel {} is not phase {}", spec.name, kernel.entry(), phase.entry));
        }
        let mut ptrs = Vec::with_capacity(phase.params.len());
        for param in &phase.params {
            let caller =
                inputs(&param.tensor).filter(|_| spec.tensor(&param.tensor).is_some_and(|t| t.role == Role::Input));
            let ptr = match (caller, param.access) {
                // Read only: the spec forbids writing an input.
                (Some(data), Access::Read) => data.as_ptr() as *mut f32,
                _ => match memory.owned.get_mut(&param.tensor) {
                    Some(data) => data.as_mut_ptr(),
                    None => return err(format!("program {}: no memory for `{}`", spec.name, param.tensor)),
                },
            };
            ptrs.push(ptr);
        }
        let independent = phase.kind == PhaseKind::ChunkParallel;
        // SAFETY: every buffer was checked above against the shapes of the sizes the kernels
        // were compiled for, and each kernel is its phase's, touching only those tensors in
        // those shapes (the program's contract); phases run one after the other.
        unsafe { launch_ptrs(*kernel, ptrs, [sizes.batch, sizes.heads, sizes.seq_len], independent, order) };
    }
    Ok(())
}
