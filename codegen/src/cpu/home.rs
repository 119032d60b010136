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
//! Where the state lives is chosen per call: in `hT` when the call runs at most
//! [`SHORT_CALL`] iterations or `hT` is aligned to a cache line ([`LINE`]), else in the
//! loop's carried region of the workspace (64-byte aligned), with `h0` copied straight there
//! and the result copied out after the loop. A caller's buffer is often not aligned (a large
//! `Vec<f32>` from malloc sits 16 bytes past a page), and a misaligned state costs every
//! vector access that crosses a line: 7% of the chunked forward at B1 T2048 H8 K=V=128
//! (docs/performance.md, round 14), where three 64 KB copies per time block were noise.
//!
//! Beyond what resuming needs, homing asks that no view (`Rows`, `Transpose`) is taken of a
//! carried value or a loop result (a view's storage is derived from the workspace region
//! its operand would have had), and that the state loads every row (a load that fills rows
//! with zeros would need those rows in `hT` too).

use crate::ir::*;
use crate::midend::layout::Plan;
use crate::midend::Fusion;

/// Calls that run at most this many loop iterations keep the state in `hT` even when it is
/// not aligned: the copies they save cost more than the misaligned accesses they take.
pub const SHORT_CALL: i64 = 2;

/// Bytes in a cache line: a state-out buffer aligned to one is as good as the workspace.
pub const LINE: i64 = 64;

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
/// pre-order), in carried order, or None when its states stay in the workspace. The loop's
/// carried regions in `plan` must have the strides of the states' buffers (either may hold
/// the state in a call).
pub fn analyse(kernel: &Kernel, fusion: &Fusion, plan: &Plan) -> Option<Vec<Home>> {
    let resume = crate::resume::analyse(kernel)?;
    let regions = &plan.loops.first()?.carried;
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
        let region = regions.get(homes.len())?;
        if *valid_rows != Idx::c(*rows as i64) || (region.rs, region.cs) != (*row_stride, *col_stride) {
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
        let homes = analyse(&p.kernel, &p.fusion, &p.plan).expect("homed");
        assert_eq!((homes.len(), homes[0].in_param, homes[0].out_param), (1, 1, 2));
        let k = scan(true);
        let p = prepare(&k, &Abilities::simt()).expect("plans");
        assert!(analyse(&p.kernel, &p.fusion, &p.plan).is_none(), "a transposed view of the state is read");
    }

    /// 16 floats of which `at` is the first of `n`, `at * 4` bytes past a cache line.
    fn buffer_at(n: usize, at: usize) -> (Vec<f32>, usize) {
        let v = vec![f32::NAN; n + 32];
        let line = v.as_ptr().align_offset(64);
        (v, line + at)
    }

    /// The state gives the same bits wherever a call keeps it: in an aligned `hT`, in the
    /// workspace (misaligned `hT`, more than `SHORT_CALL` iterations), in `hT` for a short
    /// call, resumed from `hT` in either, and with `h0` and `hT` one buffer (a pool slot).
    #[test]
    fn the_state_gives_the_same_bits_wherever_a_call_keeps_it() {
        use chunkc_runtime::cpu_kernel::CpuKernel;
        let kernel = super::super::compile_with(&scan(false), super::super::Simd::best()).expect("compiles");
        let t = 37i64; // 10 iterations of 4 tokens
        let k: Vec<f32> = (0..10 * 16).map(|i| ((i * 37 % 23) as f32 - 11.0) / 13.0).collect();
        let h0: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 4.0).collect();
        let mut ws = vec![0u8; kernel.workspace_bytes() + 64];
        let ws_at = ws.as_ptr().align_offset(64);
        // Runs the iteration ranges in turn with `hT` `at` floats past a line; the first
        // reads `h0` (or, `pooled`, `hT` holding h0), the rest resume from `hT`.
        let mut run = |at: usize, ranges: &[(i64, i64)], pooled: bool| -> Vec<f32> {
            let (mut ht, o) = buffer_at(16, at);
            let mut h0 = h0.clone();
            if pooled {
                ht[o..o + 16].copy_from_slice(&h0);
            }
            for (i, &range) in ranges.iter().enumerate() {
                let ht_ptr = ht[o..].as_mut_ptr();
                let state_in = if pooled || i > 0 { ht_ptr } else { h0.as_mut_ptr() };
                let params = [k.as_ptr() as *mut f32, state_in, ht_ptr];
                // SAFETY: k holds every iteration's rows, the states 16 floats each; the
                // workspace is aligned and as large as asked; a resumed call gets hT as h0.
                unsafe { kernel.call_range(params.as_ptr(), [0, 0, 0], t, range, ws.as_mut_ptr().add(ws_at)) };
            }
            ht[o..o + 16].to_vec()
        };
        let whole = (0, i64::MAX);
        let reference = run(0, &[whole], false);
        assert!(reference.iter().all(|x| x.is_finite()));
        /// (hT's offset from a line in floats, the calls' iteration ranges, h0 and hT one buffer)
        type Case<'a> = (usize, &'a [(i64, i64)], bool);
        let cases: [Case; 6] = [
            (4, &[whole], false),
            (4, &[(0, 2), (2, i64::MAX)], false),
            (0, &[(0, 5), (5, 6), (6, i64::MAX)], false),
            (4, &[(0, 5), (5, 6), (6, i64::MAX)], false),
            (0, &[whole], true),
            (4, &[whole], true),
        ];
        for (at, ranges, pooled) in cases {
            let got = run(at, ranges, pooled);
            let same = got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "hT {at} floats past a line, ranges {ranges:?}, pooled {pooled}: {got:?} vs {reference:?}");
        }
    }
}
