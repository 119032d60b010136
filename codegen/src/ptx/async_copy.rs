//! `cp.async` loads: input tiles go from global to shared memory without a register round
//! trip (sm_80+), when the schedule asks for it and the tiles live in shared memory.
//!
//! A run of consecutive `Load`s is issued as one batch: each element (or 16-byte chunk, when
//! the rows are provably contiguous and 16-byte aligned) is one `cp.async`; rows past
//! `valid_rows` copy 0 source bytes, which `cp.async` fills with zeros (its `src-size`
//! operand), so the tail needs no separate store. Before the first statement that is not such
//! a load, the batch is closed with `cp.async.commit_group`, `cp.async.wait_group 0` and
//! `bar.sync`: every thread's copies are complete and visible to the CTA before any op
//! reads them. Two loads of one batch never write overlapping bytes (the batch is closed
//! first when they would).
//!
//! With `stages = 2` (double buffering) the f32 loads of a loop body ([`pipelinable`]) get two
//! copies in the workspace, one per iteration parity (`layout::plan_with`), and are issued one
//! iteration ahead:
//! - before the loop (when it runs at all), iteration 0's copies into the even buffers, one
//!   commit group;
//! - every access to a double-buffered value adds `(Iter & 1) * stride` to its address
//!   (computed from the counter register at the access);
//! - at the top of iteration i: unless i is the last iteration, iteration i + 1's copies are
//!   issued into the other parity's buffers (their index expressions and parity evaluated
//!   with the counter register standing for `Iter = i + 1`); then `commit_group` (an empty
//!   group on the last iteration, so the count stays regular), `wait_group 1` (everything
//!   but the group just committed: exactly iteration i's copies) and `bar.sync`;
//! - at the load's own place in the body nothing is emitted;
//! - after the loop, `wait_group 0` and `bar.sync`, so that nothing is in flight when the
//!   pipeline region's bytes are reused (only a loop that ran no iteration leaves a group).
//!
//! The buffers written at the top of iteration i were last read in iteration i - 1, whose
//! every op ended with `bar.sync`; the compute of iteration i reads only its own parity.
//! Copies read their source when issued, and the inputs are never written by the kernel.

use super::emit::{Em, P, R, RD};
use crate::ir::*;
use crate::midend::layout::Pipeline;

/// Loads that double buffering prefetches: the f32 ones, which `cp.async` copies verbatim
/// (16-bit tensors are widened through registers).
pub fn pipelinable(op: &Op) -> bool {
    matches!(op, Op::Load { elem: ElemType::F32, .. })
}

/// A factor every value of `e` is known to be a multiple of (0 stands for "any": the value
/// is the constant 0).
pub fn known_factor(e: &Idx) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    match e {
        Idx::Const(c) => c.unsigned_abs(),
        Idx::Var(_) | Idx::CeilDiv(..) => 1,
        Idx::Add(a, b) | Idx::Sub(a, b) | Idx::Min(a, b) => gcd(known_factor(a), known_factor(b)),
        Idx::Mul(a, b) => known_factor(a).saturating_mul(known_factor(b)),
    }
}

/// Elements per `cp.async` of a load: 4 (16 bytes) when every chunk of 4 elements is
/// contiguous in global memory and 16-byte aligned there and in the tile (assuming a 16-byte
/// aligned tensor pointer, which [`super::ParamMeta::align`] records), else 1.
pub fn vector_width(base: &Idx, row_stride: i64, col_stride: i64, cols: usize, dst_off: i64) -> usize {
    let f = known_factor(base);
    let aligned_base = f == 0 || f.is_multiple_of(4);
    if col_stride == 1 && cols.is_multiple_of(4) && row_stride % 4 == 0 && aligned_base && dst_off % 16 == 0 {
        4
    } else {
        1
    }
}

/// Elements per global access of a 16-bit load through registers: 8 (one 16-byte
/// `ld.global.v4.u32`) when every run of 8 elements is contiguous in global memory and
/// 16-byte aligned there (assuming a 16-byte aligned tensor pointer, recorded in
/// [`super::ParamMeta::align`]), else 1.
pub fn vector_width_16bit(base: &Idx, row_stride: i64, col_stride: i64, cols: usize) -> usize {
    let f = known_factor(base);
    let aligned_base = f == 0 || f.is_multiple_of(8);
    if col_stride == 1 && cols.is_multiple_of(8) && row_stride % 8 == 0 && aligned_base {
        8
    } else {
        1
    }
}

impl Em<'_> {
    /// True when `Load`s are issued as `cp.async`.
    pub(super) fn async_loads(&self) -> bool {
        self.sched.async_copy && self.space == "shared"
    }

    /// Issues the `cp.async`s of one `Load` (no wait, no barrier: see [`Em::flush_async`]).
    /// Returns the element width used (1 or 4).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn async_load(
        &mut self,
        id: ValueId,
        param: usize,
        base: &Idx,
        row_stride: i64,
        col_stride: i64,
        cols: usize,
        valid_rows: &Idx,
    ) -> usize {
        let t = self.k.ty(id);
        let dst = self.storage(id);
        let bytes = (t.len() * 4) as i64;
        if self.pending_async.iter().any(|&(lo, hi)| dst.off < hi && lo < dst.off + bytes) {
            self.flush_async();
        }
        let w = self.issue_copies(id, param, base, (row_stride, col_stride), cols, valid_rows);
        self.pending_async.push((dst.off, dst.off + bytes));
        w
    }

    /// The `cp.async`s of one load into its storage (its parity's copy when double-buffered):
    /// no commit, no wait, no barrier. Returns the element width used (1 or 4).
    fn issue_copies(
        &mut self,
        id: ValueId,
        param: usize,
        base: &Idx,
        (row_stride, col_stride): (i64, i64),
        cols: usize,
        valid_rows: &Idx,
    ) -> usize {
        let t = self.k.ty(id);
        let dst = self.storage(id);
        let w = vector_width(base, row_stride, col_stride, cols, dst.off);
        self.param_align[param] = self.param_align[param].max(4 * w);
        self.comment(format!("{id} = load (cp.async, {} bytes each)", 4 * w));
        let b = self.idx(base);
        let valid = self.idx(valid_rows);
        let l = self.eloop(t.len() / w);
        let e = l.e.clone();
        let (i, jc) = self.split(&e, cols / w);
        let j = if w > 1 {
            let j = self.reg(R);
            self.ins(format!("mul.lo.u32 {j}, {jc}, {w}"));
            j
        } else {
            jc
        };
        let p = self.row_valid(&i, &valid);
        let a = self.gaddr(param, &b, row_stride, col_stride, &i, &j);
        // A row past the end copies 0 bytes (zero fill) from the tensor's first element, an
        // address that is valid whenever the tensor is not empty.
        let (src, size) = (self.reg(RD), self.reg(R));
        let ptr = self.param_ptr(param);
        self.ins(format!("selp.b64 {src}, {a}, {ptr}, {p}"));
        self.ins(format!("selp.u32 {size}, {}, 0, {p}", 4 * w));
        let d = self.taddr(dst, DType::F32, Some(&i), Some(&j));
        let cache = if w == 4 { "cg" } else { "ca" };
        self.ins(format!("cp.async.{cache}.shared.global [{d}], [{src}], {}, {size}", 4 * w));
        self.eloop_end_no_barrier(l);
        w
    }

    /// Issues the copies of every double-buffered load of `body` for the iteration whose
    /// counter is in `iter` (into that iteration's parity).
    fn issue_pipeline(&mut self, body: &[Stmt], pipe: &Pipeline, iter: String) {
        self.phase_stride = pipe.stride;
        let saved = std::mem::replace(&mut self.iter, iter);
        for s in body {
            if let Stmt::Let { id, op: Op::Load { param, base, row_stride, col_stride, cols, valid_rows, .. } } = s {
                if pipe.loads.contains(id) {
                    self.issue_copies(*id, *param, base, (*row_stride, *col_stride), *cols, valid_rows);
                }
            }
        }
        self.iter = saved;
    }

    /// Before a double-buffered loop of `count` iterations: iteration 0's copies (when the
    /// loop runs), as one commit group.
    pub(super) fn prefetch_first(&mut self, body: &[Stmt], pipe: &Pipeline, count: &str) {
        self.comment("double buffering: iteration 0's loads into the even buffers");
        let (p, skip) = (self.reg(P), self.label());
        self.ins(format!("setp.le.s64 {p}, {count}, 0"));
        self.ins(format!("@{p} bra.uni {skip}"));
        let zero = self.reg(RD);
        self.ins(format!("mov.s64 {zero}, 0"));
        self.issue_pipeline(body, pipe, zero);
        self.place(&skip);
        self.ins("cp.async.commit_group");
    }

    /// At the top of iteration `counter` (of `count`): issues iteration counter + 1's copies
    /// unless this is the last one, and waits for this iteration's copies.
    pub(super) fn prefetch_next(&mut self, body: &[Stmt], pipe: &Pipeline, counter: &str, count: &str) {
        self.comment("double buffering: prefetch the next iteration, wait for this one");
        self.phase_stride = pipe.stride;
        let (next, p, skip) = (self.reg(RD), self.reg(P), self.label());
        self.ins(format!("add.s64 {next}, {counter}, 1"));
        self.ins(format!("setp.ge.s64 {p}, {next}, {count}"));
        self.ins(format!("@{p} bra.uni {skip}"));
        self.issue_pipeline(body, pipe, next);
        self.place(&skip);
        self.ins("cp.async.commit_group");
        self.ins("cp.async.wait_group 1");
        self.barrier();
    }

    /// After a double-buffered loop: nothing stays in flight.
    pub(super) fn pipeline_drain(&mut self) {
        self.ins("cp.async.wait_group 0");
        self.barrier();
    }

    /// Completes the pending `cp.async`s and synchronises the CTA.
    pub(super) fn flush_async(&mut self) {
        if self.pending_async.is_empty() {
            return;
        }
        self.ins("cp.async.commit_group");
        self.ins("cp.async.wait_group 0");
        self.barrier();
        self.pending_async.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_and_widths() {
        let b = Idx::var(IdxVar::Batch).mul(Idx::c(8)).add(Idx::var(IdxVar::Head).mul(Idx::c(64)));
        assert_eq!(known_factor(&b), 8);
        assert_eq!(known_factor(&Idx::c(0)), 0);
        assert_eq!(known_factor(&b.clone().add(Idx::c(2))), 2);
        assert_eq!(vector_width(&b, 128, 1, 64, 0), 4);
        assert_eq!(vector_width(&b, 128, 1, 64, 8), 1, "tile offset not 16-byte aligned");
        assert_eq!(vector_width(&b, 128, 1, 6, 0), 1, "row of 6");
        assert_eq!(vector_width(&b, 130, 1, 64, 0), 1, "row stride 130");
        assert_eq!(vector_width(&b, 128, 2, 64, 0), 1, "strided columns");
        assert_eq!(vector_width(&Idx::var(IdxVar::Iter), 128, 1, 64, 0), 1, "unknown base");
    }
}
