//! Which barriers the SIMT lowering needs between ops: each op's element loop used to end
//! with `bar.sync`; now that barrier is held back and emitted only before the first later
//! statement that reads what a pending op wrote (read after write) or writes what a pending
//! op read or wrote (write after read or write). "Pending" is everything since the last
//! barrier. Every access is a byte span of the tile workspace, the 16-bit staging buffer of
//! the tensor-core dots, or a whole global tensor (a kernel that stores a tensor and loads it
//! again is ordered too); spans are conservative (a tile's whole extent, both parities of a
//! double-buffered one).
//!
//! Loops keep their barriers: everything pending is settled before a loop starts and at the
//! end of every iteration (the next iteration, and the prefetches at its top, may touch any
//! region), and the carried-state copies keep theirs.

use super::emit::Em;
use crate::ir::*;

/// Bytes or buffers one statement touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Span {
    /// `[lo, hi)` of the tile workspace.
    Tile(i64, i64),
    /// The static staging buffer of the 16-bit tensor-core dots.
    Stage,
    /// A global tensor parameter, whole.
    Param(usize),
}

impl Span {
    fn overlaps(self, o: Span) -> bool {
        match (self, o) {
            (Span::Tile(a, b), Span::Tile(c, d)) => a < d && c < b,
            (Span::Stage, Span::Stage) => true,
            (Span::Param(p), Span::Param(q)) => p == q,
            _ => false,
        }
    }
}

/// What the ops since the last barrier read and wrote.
#[derive(Clone, Debug, Default)]
pub(super) struct Pending {
    reads: Vec<Span>,
    writes: Vec<Span>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.writes.is_empty()
    }

    pub(super) fn clear(&mut self) {
        self.reads.clear();
        self.writes.clear();
    }

    /// Whether a statement reading `reads` and writing `writes` must wait for a barrier.
    pub(super) fn conflicts(&self, reads: &[Span], writes: &[Span]) -> bool {
        let any = |xs: &[Span], ys: &[Span]| xs.iter().any(|&x| ys.iter().any(|&y| x.overlaps(y)));
        any(reads, &self.writes) || any(writes, &self.writes) || any(writes, &self.reads)
    }

    pub(super) fn add(&mut self, reads: Vec<Span>, writes: Vec<Span>) {
        self.reads.extend(reads);
        self.writes.extend(writes);
    }
}

impl Em<'_> {
    /// The workspace bytes value `v` occupies (its storage, with the region's other parity
    /// when double-buffered).
    pub(super) fn span(&self, v: ValueId) -> Span {
        let t = self.k.ty(v);
        let st = self.storage(v);
        let size = t.dtype.size() as i64;
        let extent = |n: usize, stride: i64| (n as i64 - 1).max(0) * stride * size;
        let (r, c) = (extent(t.rows, st.rs), extent(t.cols, st.cs));
        let lo = st.off + r.min(0) + c.min(0);
        let mut hi = st.off + r.max(0) + c.max(0) + size;
        if st.phase {
            hi += self.phase_stride.abs();
        }
        Span::Tile(lo, hi)
    }

    /// The spans reading `v` touches: its own, or, for a value fused into its consumer, those
    /// of the operands it is computed from.
    pub(super) fn read_spans(&self, v: ValueId) -> Vec<Span> {
        if self.is_fused(v) {
            self.def(v)
                .map(|op| op.operands().into_iter().flat_map(|x| self.read_spans(x)).collect())
                .unwrap_or_default()
        } else {
            vec![self.span(v)]
        }
    }

    /// What statement `s` (a `Let` or a `Store`) reads and writes.
    pub(super) fn accesses(&self, s: &Stmt) -> (Vec<Span>, Vec<Span>) {
        match s {
            Stmt::Let { id, op } => {
                if op.is_view() {
                    return (vec![], vec![]);
                }
                let mut reads: Vec<Span> = op.operands().into_iter().flat_map(|x| self.read_spans(x)).collect();
                let mut writes = vec![self.span(*id)];
                match op {
                    Op::Load { param, .. } => reads.push(Span::Param(*param)),
                    Op::Dot { .. } if self.dot_uses_staging(op) => {
                        reads.push(Span::Stage);
                        writes.push(Span::Stage);
                    }
                    _ => {}
                }
                (reads, writes)
            }
            Stmt::Store { value, param, .. } => (self.read_spans(*value), vec![Span::Param(*param)]),
            Stmt::Loop { .. } => (vec![], vec![]),
        }
    }

    /// Emits the barrier held back, if any op is pending.
    pub(super) fn settle(&mut self) {
        if !self.pending.is_empty() {
            self.barrier();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hazards_are_overlaps_of_a_write_with_a_later_access() {
        let mut p = Pending::default();
        p.add(vec![Span::Tile(0, 64)], vec![Span::Tile(64, 128)]);
        assert!(!p.conflicts(&[Span::Tile(0, 64)], &[Span::Tile(128, 256)]), "read after read, fresh write");
        assert!(p.conflicts(&[Span::Tile(100, 104)], &[]), "read after write");
        assert!(p.conflicts(&[], &[Span::Tile(60, 70)]), "write after read");
        assert!(p.conflicts(&[], &[Span::Tile(127, 130)]), "write after write");
        assert!(!p.conflicts(&[Span::Tile(128, 130)], &[Span::Param(0)]), "half-open spans");
        p.add(vec![Span::Param(2)], vec![Span::Stage]);
        assert!(p.conflicts(&[Span::Stage], &[]), "the staging buffer");
        assert!(
            !p.conflicts(&[Span::Param(2)], &[]) && p.conflicts(&[], &[Span::Param(2)]),
            "a tensor stored after it was loaded"
        );
        p.clear();
        assert!(p.is_empty() && !p.conflicts(&[Span::Stage], &[Span::Tile(0, 1)]));
    }
}
