//! Resumable kernels: whether a kernel's sequence loop can run in pieces, one range of
//! iterations per call, with the state handed from one call to the next through memory.
//!
//! The CPU executor uses this to run the heads of a batch time block by time block (a few
//! chunks of every head, then the next few) instead of head by head: the inputs are
//! `[B, T, H, K]`, so the rows of all heads at one token share a 4 KB page, and walking the
//! heads inside a time block touches each page while it is still cached and in the TLB.
//!
//! A kernel qualifies when resuming is exact, i.e. when running iterations `[0, m)` and then
//! `[m, n)` with the second call's state read from where the first stored it gives the same
//! bits as one call over `[0, n)`:
//! - the body is: `Let`s, then one `Loop`, then `Store`s;
//! - every carried value starts as a f32 `Load` of a read parameter (the state in), used for
//!   nothing else, and the loop's result for it is stored, once, to a written parameter with
//!   the same indexing (the state out), and f32 (so the stored state is the carried one);
//! - nothing after the loop stores anything else, nothing reads a state-out parameter and
//!   nothing writes a state-in one;
//! - the loop runs `T` or `ceil(T / C)` times, so an iteration covers a fixed number of
//!   tokens;
//! - in a kernel split into V-tiles, every state is the tile's own (its indexing moves with
//!   the tile).
//!
//! Everything before the loop is a pure function of the inputs and is simply recomputed by
//! every call. A loop that carries nothing (a chunk-parallel phase) qualifies with no state:
//! its iterations are independent, so any range of them runs alone.

use crate::ir::*;
pub use chunkc_runtime::cpu_kernel::Resume;

/// `Some` when `kernel`'s loop can be split exactly (see the module doc).
pub fn analyse(kernel: &Kernel) -> Option<Resume> {
    let loop_at = kernel.body.iter().position(|s| matches!(s, Stmt::Loop { .. }))?;
    let (before, rest) = kernel.body.split_at(loop_at);
    let (Stmt::Loop { count, carried, body, yields: _, results }, after) = rest.split_first()? else {
        return None;
    };
    let tokens_per_iteration = iteration_tokens(count)?;
    if before.iter().any(|s| !matches!(s, Stmt::Let { .. })) {
        return None;
    }
    let defined_before = |v: ValueId| {
        before.iter().find_map(|s| match s {
            Stmt::Let { id, op } if *id == v => Some(op),
            _ => None,
        })
    };
    let mut state = vec![];
    for ((inner, init), result) in carried.iter().zip(results) {
        let Some(Op::Load { elem: ElemType::F32, param, base, row_stride, col_stride, rows, cols, valid_rows }) =
            defined_before(*init)
        else {
            return None;
        };
        if kernel.ty(*inner).dtype != DType::F32 || kernel.ty(*init).dtype != DType::F32 {
            return None;
        }
        if kernel.ty(*result) != (TileTy { rows: *rows, cols: *cols, dtype: DType::F32 }) {
            return None;
        }
        let stores: Vec<&Stmt> =
            after.iter().filter(|s| matches!(s, Stmt::Store { value, .. } if value == result)).collect();
        let [Stmt::Store {
            param: out,
            base: out_base,
            row_stride: out_rs,
            col_stride: out_cs,
            valid_rows: out_valid,
            ..
        }] = stores[..]
        else {
            return None;
        };
        // Before the loop `Iter` has no iteration's value, after it the last one's.
        let same_indexing = out_base == base
            && out_rs == row_stride
            && out_cs == col_stride
            && out_valid == valid_rows
            && !base.uses(IdxVar::Iter)
            && !valid_rows.uses(IdxVar::Iter);
        // A state every V-tile of a head reads and writes at one place (an extra `[K]` state,
        // recomputed alike by each tile) cannot be handed on through memory per tile: a tile's
        // next call would read what another tile's later call stored.
        let shared_by_tiles = kernel.vtiles > 1 && !base.uses(IdxVar::VTile);
        if !same_indexing || out == param || shared_by_tiles {
            return None;
        }
        let access = |p: usize| kernel.params.get(p).map(|p| p.access);
        if access(*param) != Some(Access::Read) || access(*out) != Some(Access::Write) {
            return None;
        }
        state.push((*param, *out));
    }
    // Only the state stores after the loop; each state value carried once.
    let stored_results = after.iter().filter(|s| matches!(s, Stmt::Store { value, .. } if results.contains(value)));
    if after.len() != stored_results.count() || after.len() != state.len() {
        return None;
    }
    // A state-in load feeds its carried value only: anything else reading it would see the
    // resumed state in a later call instead of the original one.
    let inits: Vec<ValueId> = carried.iter().map(|(_, init)| *init).collect();
    let mut uses = vec![];
    collect_uses(kernel.body.as_slice(), &mut uses);
    if uses.iter().any(|v| inits.contains(v)) {
        return None;
    }
    let (ins, outs): (Vec<usize>, Vec<usize>) = state.iter().copied().unzip();
    let mut conflict = false;
    visit_accesses(before, &mut |p, write| conflict |= (!write && outs.contains(&p)) || (write && ins.contains(&p)));
    visit_accesses(body, &mut |p, write| conflict |= (!write && outs.contains(&p)) || (write && ins.contains(&p)));
    // A loop that carries nothing (a chunk-parallel phase) resumes trivially: its iterations
    // are independent, and `state` is empty.
    if conflict {
        return None;
    }
    Some(Resume { state, tokens_per_iteration })
}

/// Tokens per iteration of a loop that runs `count` times: `T` gives 1, `ceil(T / C)` gives C.
fn iteration_tokens(count: &Idx) -> Option<usize> {
    match count {
        Idx::Var(IdxVar::SeqLen) => Some(1),
        Idx::CeilDiv(t, c) if **t == Idx::Var(IdxVar::SeqLen) && *c > 0 => usize::try_from(*c).ok(),
        _ => None,
    }
}

/// Every operand read by an op, and every value a loop carries in or yields, in `stmts`
/// (the carried inits themselves are not counted: they are what the analysis asks about).
fn collect_uses(stmts: &[Stmt], uses: &mut Vec<ValueId>) {
    for s in stmts {
        match s {
            Stmt::Let { op, .. } => uses.extend(op.operands()),
            Stmt::Store { value, .. } => uses.push(*value),
            Stmt::Loop { body, yields, .. } => {
                collect_uses(body, uses);
                uses.extend(yields);
            }
        }
    }
}

/// Calls `f(param, is_write)` for every load and store in `stmts`, loops included.
fn visit_accesses(stmts: &[Stmt], f: &mut dyn FnMut(usize, bool)) {
    for s in stmts {
        match s {
            Stmt::Let { op: Op::Load { param, .. }, .. } => f(*param, false),
            Stmt::Let { .. } => {}
            Stmt::Store { param, .. } => f(*param, true),
            Stmt::Loop { body, .. } => visit_accesses(body, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;

    /// What each test varies in a small state-passing scan (k, v per chunk of 8; S += K^T V).
    #[derive(Clone, Copy, Default)]
    struct Twist {
        init_read_in_loop: bool,
        init_from_constant: bool,
        fixed_count: bool,
        store_elsewhere: bool,
        store_twice: bool,
        read_state_out_in_loop: bool,
        state_in_f64: bool,
        extra_store_after: bool,
    }

    fn scan(t: Twist) -> Kernel {
        let (chunk, n) = (8i64, 4usize);
        let mut b = Builder::new("scan");
        let pk = b.param("k", Access::Read);
        let ph0 = b.param("h0", Access::Read);
        let po = b.param("o", Access::Write);
        let pht = b.param("hT", Access::Write);
        let state = |b: &mut Builder, p| b.load(p, Idx::c(0), n as i64, 1, n, n, Idx::c(n as i64));
        let s0 = if t.init_from_constant { b.constant(0.0, TileTy::f32(n, n)) } else { state(&mut b, ph0) };
        let s0 = if t.state_in_f64 { b.cast(s0, DType::F64) } else { s0 };
        let count = if t.fixed_count { Idx::c(3) } else { Idx::var(IdxVar::SeqLen).ceil_div(chunk) };
        let inner = b.begin_loop(count, &[s0]);
        let start = || Idx::var(IdxVar::Iter).mul(Idx::c(chunk));
        let valid = Idx::var(IdxVar::SeqLen).sub(start()).min(Idx::c(chunk));
        let kc = b.load(pk, start().mul(Idx::c(n as i64)), n as i64, 1, chunk as usize, n, valid.clone());
        let upd = b.dot(kc, kc, true, false, None);
        let upd = if t.state_in_f64 { b.cast(upd, DType::F64) } else { upd };
        let mut s = b.add(inner[0], upd);
        if t.init_read_in_loop {
            s = b.add(s, s0);
        }
        if t.read_state_out_in_loop {
            let back = state(&mut b, pht);
            let back = if t.state_in_f64 { b.cast(back, DType::F64) } else { back };
            s = b.add(s, back);
        }
        let s32 = b.cast(s, DType::F32);
        let o = b.dot(kc, s32, false, false, None);
        b.store(o, po, start().mul(Idx::c(n as i64)), n as i64, 1, valid);
        let out = b.end_loop(&[s])[0];
        let base = if t.store_elsewhere { Idx::c(1) } else { Idx::c(0) };
        b.store(out, pht, base, n as i64, 1, Idx::c(n as i64));
        if t.store_twice {
            b.store(out, po, Idx::c(0), n as i64, 1, Idx::c(n as i64));
        }
        if t.extra_store_after {
            let z = b.constant(1.0, TileTy::f32(1, 1));
            b.store(z, po, Idx::c(0), 1, 1, Idx::c(1));
        }
        b.finish()
    }

    #[test]
    fn a_state_passing_scan_resumes_by_chunk() {
        let r = analyse(&scan(Twist::default())).expect("resumable");
        assert_eq!(r, Resume { state: vec![(1, 3)], tokens_per_iteration: 8 });
    }

    #[test]
    fn anything_that_would_make_resuming_inexact_is_refused() {
        let cases: [(&str, Twist); 8] = [
            ("the loop reads the initial state", Twist { init_read_in_loop: true, ..Default::default() }),
            ("the state starts as a constant", Twist { init_from_constant: true, ..Default::default() }),
            ("the loop count is not T-based", Twist { fixed_count: true, ..Default::default() }),
            ("the state is stored elsewhere", Twist { store_elsewhere: true, ..Default::default() }),
            ("the state is stored twice", Twist { store_twice: true, ..Default::default() }),
            ("the loop reads the state-out buffer", Twist { read_state_out_in_loop: true, ..Default::default() }),
            ("the carried state is f64 (a cast of the load)", Twist { state_in_f64: true, ..Default::default() }),
            ("something else is stored after the loop", Twist { extra_store_after: true, ..Default::default() }),
        ];
        for (what, twist) in cases {
            assert_eq!(analyse(&scan(twist)), None, "{what}");
        }
    }
}
