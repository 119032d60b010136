//! The state update written in place: which loop yield a backend may compute straight into
//! its carried region, so that the end of every iteration has no copy of the state (a
//! 64 KB copy per chunk at K=V=128, about 3% of a chunked kernel).
//!
//! The yield must be a `Dot` at the top level of the body, and the carried value it replaces
//! must be dead by then: the loop carries exactly that one value, and neither the dot's
//! operands nor any later statement read the carried value or a view of it (through fused
//! elementwise operands too), and nothing after the dot reads the dot's result except the
//! yield itself. The dot then never reads the bytes it writes, and everything after it that
//! would have read the old state reads nothing of it.
//!
//! One read of the old state is allowed: the dot's accumulator may be the carried value
//! itself (not a view), or a row-scaled accumulator of it that the gemm applies (`midend::fuse`).
//! Every product reads an accumulator element just before it writes the same element of
//! the result (`lower.rs`, `gemm.rs`), and the two have the same layout, so `S' = diag(d) S +
//! K^T V` can overwrite `S` as it goes.

use super::fuse::Fusion;
use crate::ir::*;

/// The dot in `body` whose result may be stored in the region of the loop's one carried
/// value, or None.
pub fn state_dot(
    carried: &[(ValueId, ValueId)],
    body: &[Stmt],
    yields: &[ValueId],
    fusion: &Fusion,
) -> Option<ValueId> {
    let ([(state, _)], [y]) = (carried, yields) else {
        return None;
    };
    let at = body.iter().position(|s| matches!(s, Stmt::Let { id, op: Op::Dot { .. } } if id == y))?;
    // The carried value and every view of it share its bytes.
    let mut aliases = vec![*state];
    for s in body {
        if let Stmt::Let { id, op } = s {
            if op.is_view() && op.operands().iter().any(|v| aliases.contains(v)) {
                aliases.push(*id);
            }
        }
    }
    let reads = |v: ValueId, what: &[ValueId]| read_closure(v, fusion).iter().any(|x| what.contains(x));
    let Stmt::Let { op: Op::Dot { a, b, acc, .. }, .. } = &body[at] else {
        return None;
    };
    if [a, b].iter().any(|&&v| reads(v, &aliases)) {
        return None;
    }
    if let Some(c) = acc {
        let ok = if c == state {
            true
        } else if fusion.fused[c.0 as usize] {
            match fusion.scaled.get(c.0 as usize).copied().flatten() {
                Some((x, s)) => x == *state && !reads(s, &aliases),
                None => false,
            }
        } else {
            !reads(*c, &aliases)
        };
        if !ok {
            return None;
        }
    }
    let mut later_reads_old_state_or_result = false;
    for s in &body[at + 1..] {
        let operands = match s {
            Stmt::Let { op, .. } => op.operands(),
            Stmt::Store { value, .. } => vec![*value],
            Stmt::Loop { .. } => return None,
        };
        let fused_here = matches!(s, Stmt::Let { id, .. } if fusion.fused[id.0 as usize]);
        if !fused_here {
            later_reads_old_state_or_result |= operands.iter().any(|&v| reads(v, &aliases) || reads(v, &[*y]));
        }
    }
    (!later_reads_old_state_or_result).then_some(*y)
}

/// `v` and, where `v` is computed inside its consumer (fused) or is a view, everything it is
/// computed from: the values whose bytes reading `v` reads.
fn read_closure(v: ValueId, fusion: &Fusion) -> Vec<ValueId> {
    let mut out = vec![v];
    let mut i = 0;
    while i < out.len() {
        let x = out[i];
        let def = fusion.defs.get(x.0 as usize).and_then(|d| d.as_ref());
        if let Some(op) = def.filter(|op| fusion.fused[x.0 as usize] || op.is_view()) {
            for o in op.operands() {
                if !out.contains(&o) {
                    out.push(o);
                }
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;
    use crate::midend::Abilities;

    /// A backend whose gemm takes products of at least 16 x 16 x 16 with a scaled epilogue.
    const GEMM_ONLY: Abilities = Abilities {
        vectorises: |_, _, _| true,
        scaled_gemm: Some(|m, n, k| m >= 16 && n >= 16 && k >= 16),
        scaled_accumulator: Some(|m, n, k| m >= 16 && n >= 16 && k >= 16),
        decay_routine: false,
        sums_routine: false,
    };

    /// `O = K S` then `S' = K^T V + 0.9 S`; with `late`, `S` (or the dot's result) is read
    /// once more after the dot.
    fn body(late: Option<bool>) -> Kernel {
        let mut b = Builder::new("scan");
        let (pk, ps0, po) = (b.param("k", Access::Read), b.param("s0", Access::Read), b.param("o", Access::Write));
        let s0 = b.load(ps0, Idx::c(0), 4, 1, 4, 4, Idx::c(4));
        let s = b.begin_loop(Idx::var(IdxVar::SeqLen), &[s0])[0];
        let k = b.load(pk, Idx::c(0), 4, 1, 4, 4, Idx::c(4));
        let o = b.dot(k, s, false, false, None);
        b.store(o, po, Idx::c(0), 4, 1, Idx::c(4));
        let d = b.scalar(0.9);
        let decayed = b.mul(s, d);
        let next = b.dot(k, k, true, false, Some(decayed));
        match late {
            Some(true) => {
                let t = b.transpose(s);
                let e = b.exp(t);
                b.store(e, po, Idx::c(16), 4, 1, Idx::c(4));
            }
            Some(false) => b.store(next, po, Idx::c(16), 4, 1, Idx::c(4)),
            None => {}
        }
        let out = b.end_loop(&[next])[0];
        b.store(out, po, Idx::c(32), 4, 1, Idx::c(4));
        b.finish()
    }

    fn analyse(k: &Kernel) -> Option<ValueId> {
        let fusion = super::super::fuse::analyse(k, &GEMM_ONLY);
        let Some(Stmt::Loop { carried, body, yields, .. }) = k.body.iter().find(|s| matches!(s, Stmt::Loop { .. }))
        else {
            panic!("no loop");
        };
        state_dot(carried, body, yields, &fusion)
    }

    #[test]
    fn the_update_goes_in_place_only_when_the_old_state_is_dead() {
        let k = body(None);
        let Some(Stmt::Loop { yields, .. }) = k.body.iter().find(|s| matches!(s, Stmt::Loop { .. })) else {
            panic!("no loop");
        };
        assert_eq!(analyse(&k), Some(yields[0]));
        assert_eq!(analyse(&body(Some(true))), None, "a view of the old state is read (through a fused exp) later");
        assert_eq!(analyse(&body(Some(false))), None, "the new state is read before the yield");
    }

    /// `S' = k^T k + diag(d) X` on a 16 x 16 state (a product the gemm takes), with X the
    /// state itself or its transpose.
    fn scaled_update(transposed: bool) -> (Kernel, ValueId, ValueId) {
        let mut b = Builder::new("scaled");
        let (pk, pd, ps0, po) = (
            b.param("k", Access::Read),
            b.param("d", Access::Read),
            b.param("s0", Access::Read),
            b.param("o", Access::Write),
        );
        let s0 = b.load(ps0, Idx::c(0), 16, 1, 16, 16, Idx::c(16));
        let s = b.begin_loop(Idx::var(IdxVar::SeqLen), &[s0])[0];
        let k = b.load(pk, Idx::c(0), 16, 1, 16, 16, Idx::c(16));
        let d = b.load(pd, Idx::c(0), 16, 1, 1, 16, Idx::c(1));
        let scale = b.transpose(d);
        let x = if transposed { b.transpose(s) } else { s };
        let decayed = b.mul(x, scale);
        let next = b.dot(k, k, true, false, Some(decayed));
        let out = b.end_loop(&[next])[0];
        b.store(out, po, Idx::c(0), 16, 1, Idx::c(16));
        (b.finish(), decayed, next)
    }

    #[test]
    fn a_row_scaled_update_of_the_state_itself_goes_in_place() {
        let (k, decayed, next) = scaled_update(false);
        let fusion = super::super::fuse::analyse(&k, &GEMM_ONLY);
        assert!(fusion.fused[decayed.0 as usize], "the scaling fuses into the gemm");
        assert_eq!(analyse(&k), Some(next));
        // Of the transposed state the accumulator reads other elements than the product
        // writes: the update must not overwrite the state it reads.
        let (k, decayed, _) = scaled_update(true);
        assert!(super::super::fuse::analyse(&k, &GEMM_ONLY).fused[decayed.0 as usize]);
        assert_eq!(analyse(&k), None);
        // Without a gemm nothing fuses into the product.
        let (k, decayed, _) = scaled_update(false);
        assert!(
            !super::super::fuse::analyse(&k, &Abilities { scaled_gemm: None, scaled_accumulator: None, ..GEMM_ONLY })
                .fused[decayed.0 as usize]
        );
    }
}
