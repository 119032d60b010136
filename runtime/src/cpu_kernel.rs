//! The CPU kernel ABI: what a kernel compiled for this CPU offers its executor (its entry,
//! scratch size, V-tiles, and the calls over one grid point, whole or a range of its loop's
//! iterations), and the proof that its loop may run in pieces ([`Resume`]). The compiler
//! implements it (`chunkc_codegen::cpu`), the executor (`crate::exec`) calls it; neither
//! knows the other. [`NativeKernel`] is a kernel that is a function pointer, JIT-compiled or
//! linked at build time.

use std::borrow::Cow;

/// A kernel compiled for this CPU, callable once per grid point.
///
/// The kernel reads and writes the f32 buffers whose base pointers it receives, at offsets
/// that depend on the grid point; different grid points never write the same element.
pub trait CpuKernel: Send + Sync {
    /// The kernel's name (its program phase's entry).
    fn entry(&self) -> &str;
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

/// The signature of every compiled kernel: `(params, batch, head, seq_len, workspace, vtile,
/// first_iter, end_iter)`; the loop runs iterations `[first_iter, min(end_iter, count))`.
pub type KernelFn = unsafe extern "C" fn(*const *mut f32, i64, i64, i64, *mut u8, i64, i64, i64);

/// A kernel that is native code: its function and what the executor needs to know of it.
/// The JIT (`chunkc_codegen::cpu`) makes one from the code it compiled; a program built with
/// `chunkc-build` makes one per linked function.
pub struct NativeKernel {
    /// The phase it runs.
    entry: Cow<'static, str>,
    func: KernelFn,
    /// Scratch bytes per call.
    workspace: usize,
    vtiles: usize,
    resume: Option<Resume>,
}

impl NativeKernel {
    /// The kernel whose code is `func`.
    ///
    /// # Safety
    /// `func` must be chunkc's compiled code of phase `entry`, compiled together with the
    /// other values given here (its scratch bytes, V-tiles and resume proof), and stay
    /// callable while this value lives: the executor trusts them for every call.
    pub unsafe fn new(
        entry: impl Into<Cow<'static, str>>,
        func: KernelFn,
        workspace: usize,
        vtiles: usize,
        resume: Option<Resume>,
    ) -> NativeKernel {
        NativeKernel { entry: entry.into(), func, workspace, vtiles, resume }
    }
}

impl CpuKernel for NativeKernel {
    fn entry(&self) -> &str {
        &self.entry
    }

    fn workspace_bytes(&self) -> usize {
        self.workspace
    }

    unsafe fn call(&self, params: *const *mut f32, batch: i64, head: i64, seq_len: i64, workspace: *mut u8) {
        // SAFETY: the caller upholds `call`'s contract, which is `call_tile`'s for V-tile 0.
        unsafe { self.call_tile(params, batch, head, 0, seq_len, workspace) }
    }

    fn vtiles(&self) -> usize {
        self.vtiles
    }

    unsafe fn call_tile(
        &self,
        params: *const *mut f32,
        batch: i64,
        head: i64,
        vtile: i64,
        seq_len: i64,
        workspace: *mut u8,
    ) {
        // SAFETY: the caller upholds the contract, and `func` is this phase's code
        // (`NativeKernel::new`'s contract).
        unsafe { (self.func)(params, batch, head, seq_len, workspace, vtile, 0, i64::MAX) }
    }

    fn resume(&self) -> Option<&Resume> {
        self.resume.as_ref()
    }

    unsafe fn call_range(
        &self,
        params: *const *mut f32,
        [batch, head, vtile]: [i64; 3],
        seq_len: i64,
        range: (i64, i64),
        workspace: *mut u8,
    ) {
        // SAFETY: `call_range`'s contract: `call_tile`'s, plus the resumed state in place of
        // the state-in buffers, which is what makes a partial range exact (the compiler's
        // resume proof).
        unsafe { (self.func)(params, batch, head, seq_len, workspace, vtile, range.0, range.1) }
    }
}
