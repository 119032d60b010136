//! The CPU kernel ABI: what a kernel compiled for this CPU offers its executor (its entry,
//! scratch size, V-tiles, and the calls over one grid point, whole or a range of its loop's
//! iterations), and the proof that its loop may run in pieces ([`Resume`]). The compiler
//! implements it (`chunkc_codegen::cpu`), the executor (`crate::exec`) calls it; neither
//! knows the other.

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
