//! Where the CPU kernel keeps a scan's state: in the caller's state-out buffer (`hT`), not in
//! the workspace, when the kernel's shape allows it.
//!
//! A resumable kernel ([`crate::resume`]) loads each state from a read parameter (`h0`) into
//! its loop's carried region, runs the loop there, and stores the result once, with the same
//! indexing, to a written parameter (`hT`). Kept in the workspace, that costs three copies of
//! the state per call: `h0` into a load region, the load region into the carried region, the
//! carried region out to `hT`. For a long sequence that is noise; for the decode step of a
//! serving engine (one token per call, a 64 KB state per head at K = V = 128) it was most of
//! the time (`memmove` 38% of a T = 1 profile, docs/performance.md round 14).
//!
//! Homed in `hT`, the state is copied once, `h0` to `hT`, and not at all when the two are the
//! same buffer: a decode step reading and writing its slot of a state pool, or a time block
//! that resumes where the previous one stored. The loop then reads and updates `hT` in place
//! and the store after the loop has nothing left to do.
//!
//! Beyond what resuming needs, homing asks that no view (`Rows`, `Transpose`) is taken of a
//! carried value or a loop result (a view's storage is derived from the workspace region
//! its operand would have had), and that the state loads every row (a load that fills rows
//! with zeros would need those rows in `hT` too).

use crate::ir::*;
use crate::midend::Fusion;

/// One carried state kept in its state-out buffer.
#[derive(Clone, Debug)]
pub struct Home {
    /// The load of the state in (`h0`), which the kernel no longer emits: the loop's start
    /// copies `in_param` to `out_param` instead.
    pub init: ValueId,
    pub in_param: usize,
    /// The state-out parameter, with the indexing both parameters share.
    pub out_param: usize,
    pub base: Idx,
    pub row_stride: i64,
    pub col_stride: i64,
    pub rows: usize,
    pub cols: usize,
    /// The value inside the loop and the loop's result: both live in the state-out buffer.
    pub carried: ValueId,
    pub result: ValueId,
}

/// The homes of the carried values of the kernel's one top-level loop (the first `Loop` in
/// pre-order), in carried order, or None when its states stay in the workspace.
pub fn analyse(kernel: &Kernel, fusion: &Fusion) -> Option<Vec<Home>> {
    let resume = crate::resume::analyse(kernel)?;
    let Stmt::Loop { carried, results, .. } = kernel.body.iter().find(|s| matches!(s, Stmt::Loop { .. }))? else {
        return None;
    };
    if carried.is_empty() || resume.state.len() != carried.len() {
        return None;
    }
    let mut homes = vec![];
    for ((&(inner, init), &result), &(in_param, out_param)) in carried.iter().zip(results).zip(&resume.state) {
        let Some(Op::Load { base, row_stride, col_stride, rows, cols, valid_rows, .. }) =
            fusion.defs.get(init.0 as usize).and_then(|d| d.as_ref())
        else {
            return None;
        };
        if *valid_rows != Idx::c(*rows as i64) {
            return None;
        }
        homes.push(Home {
            init,
            in_param,
            out_param,
            base: base.clone(),
            row_stride: *row_stride,
            col_stride: *col_stride,
            rows: *rows,
            cols: *cols,
            carried: inner,
            result,
        });
    }
    let homed: Vec<ValueId> = homes.iter().flat_map(|h| [h.carried, h.result]).collect();
    let viewed = fusion.defs.iter().flatten().any(|op| op.is_view() && op.operands().iter().any(|v| homed.contains(v)));
    (!viewed).then_some(homes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;
    use crate::midend::{prepare, Abilities};

    /// `S' = S + k^T k` over chunks of 4, the state loaded from `h0` and stored to `hT`;
    /// with `view`, the body reads a transpose of the state.
    fn scan(view: bool) -> Kernel {
        let mut b = Builder::new("scan");
        let (pk, ph0, pht) = (b.param("k", Access::Read), b.param("h0", Access::Read), b.param("hT", Access::Write));
        let s0 = b.load(ph0, Idx::c(0), 4, 1, 4, 4, Idx::c(4));
        let s = b.begin_loop(Idx::var(IdxVar::SeqLen).ceil_div(4), &[s0])[0];
        let k = b.load(pk, Idx::var(IdxVar::Iter).mul(Idx::c(16)), 4, 1, 4, 4, Idx::c(4));
        let read = if view { b.transpose(s) } else { s };
        let upd = b.dot(k, k, true, false, Some(read));
        let out = b.end_loop(&[upd])[0];
        b.store(out, pht, Idx::c(0), 4, 1, Idx::c(4));
        b.finish()
    }

    #[test]
    fn a_resumable_state_lives_in_its_output_unless_a_view_of_it_is_taken() {
        let k = scan(false);
        let p = prepare(&k, &Abilities::simt()).expect("plans");
        let homes = analyse(&p.kernel, &p.fusion).expect("homed");
        assert_eq!((homes.len(), homes[0].in_param, homes[0].out_param), (1, 1, 2));
        let k = scan(true);
        let p = prepare(&k, &Abilities::simt()).expect("plans");
        assert!(analyse(&p.kernel, &p.fusion).is_none(), "a transposed view of the state is read");
    }
}
