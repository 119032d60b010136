//! Building tile-IR kernels: one method per op, each inferring and checking the result shape.
//!
//! Shape errors here are bugs in a chunk plan, never a user's mistake (the rule checker has
//! already typed the rule), so they panic with the op and the shapes involved.

use crate::ir::*;

/// Builds a [`Kernel`]. Statements go to the innermost open loop body.
pub struct Builder {
    name: String,
    params: Vec<Param>,
    values: Vec<TileTy>,
    /// Stack of statement lists; the last is the one being appended to.
    blocks: Vec<Vec<Stmt>>,
    /// Open loops: (count, carried pairs).
    loops: Vec<(Idx, Vec<(ValueId, ValueId)>)>,
    /// V-tiles per head of the kernel being built (1: the whole V).
    vtiles: usize,
    /// Whether the loop's iterations are independent ([`Kernel::chunk_parallel`]).
    chunk_parallel: bool,
}

impl Builder {
    pub fn new(name: impl Into<String>) -> Builder {
        Builder {
            name: name.into(),
            params: vec![],
            values: vec![],
            blocks: vec![vec![]],
            loops: vec![],
            vtiles: 1,
            chunk_parallel: false,
        }
    }

    /// Marks the kernel's loop as chunk-parallel: it must carry nothing (checked when the
    /// kernel is laid out).
    pub fn set_chunk_parallel(&mut self) {
        self.chunk_parallel = true;
    }

    /// Marks the kernel as split into `n` V-tiles per head (its grid is (batch, head, V-tile)).
    pub fn set_vtiles(&mut self, n: usize) {
        self.vtiles = n.max(1);
    }

    pub fn param(&mut self, name: impl Into<String>, access: Access) -> usize {
        self.params.push(Param { name: name.into(), access });
        self.params.len() - 1
    }

    pub fn ty(&self, v: ValueId) -> TileTy {
        self.values[v.0 as usize]
    }

    /// The id the next value will get: a mark for [`Builder::lets_since`].
    pub fn next_value(&self) -> ValueId {
        ValueId(self.values.len() as u32)
    }

    /// The `Let`s of the open block defining values at or after `mark`, in order: a region
    /// to differentiate (`autodiff`).
    pub fn lets_since(&self, mark: ValueId) -> Vec<(ValueId, Op)> {
        let block = self.blocks.last().map(Vec::as_slice).unwrap_or_default();
        block
            .iter()
            .filter_map(|s| match s {
                Stmt::Let { id, op } if *id >= mark => Some((*id, op.clone())),
                _ => None,
            })
            .collect()
    }

    fn fresh(&mut self, ty: TileTy) -> ValueId {
        self.values.push(ty);
        ValueId(self.values.len() as u32 - 1)
    }

    fn emit(&mut self, op: Op, ty: TileTy) -> ValueId {
        let id = self.fresh(ty);
        self.push(Stmt::Let { id, op });
        id
    }

    fn push(&mut self, s: Stmt) {
        self.blocks.last_mut().expect("builder has an open block").push(s);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn load(
        &mut self,
        param: usize,
        base: Idx,
        row_stride: i64,
        col_stride: i64,
        rows: usize,
        cols: usize,
        valid_rows: Idx,
    ) -> ValueId {
        self.load_typed(ElemType::F32, param, base, row_stride, col_stride, rows, cols, valid_rows)
    }

    /// A load of a tensor whose elements are `elem` (widened to an f32 tile).
    #[allow(clippy::too_many_arguments)]
    pub fn load_typed(
        &mut self,
        elem: ElemType,
        param: usize,
        base: Idx,
        row_stride: i64,
        col_stride: i64,
        rows: usize,
        cols: usize,
        valid_rows: Idx,
    ) -> ValueId {
        let op = Op::Load { elem, param, base, row_stride, col_stride, rows, cols, valid_rows };
        self.emit(op, TileTy::f32(rows, cols))
    }

    pub fn store(
        &mut self,
        value: ValueId,
        param: usize,
        base: Idx,
        row_stride: i64,
        col_stride: i64,
        valid_rows: Idx,
    ) {
        self.push(Stmt::Store { value, param, base, row_stride, col_stride, valid_rows });
    }

    pub fn constant(&mut self, value: f64, ty: TileTy) -> ValueId {
        self.emit(Op::Const { value, ty }, ty)
    }

    pub fn scalar(&mut self, value: f64) -> ValueId {
        self.constant(value, TileTy::f32(1, 1))
    }

    pub fn idx_value(&mut self, idx: Idx) -> ValueId {
        self.emit(Op::IdxValue(idx), TileTy::f32(1, 1))
    }

    pub fn unary(&mut self, op: UnOp, x: ValueId) -> ValueId {
        let t = self.ty(x);
        self.emit(Op::Unary { op, x }, t)
    }

    pub fn binary(&mut self, op: BinOp, a: ValueId, b: ValueId) -> ValueId {
        let (ta, tb) = (self.ty(a), self.ty(b));
        assert_eq!(ta.dtype, tb.dtype, "{op:?}: dtypes differ ({ta:?}, {tb:?})");
        let dim = |x: usize, y: usize| {
            assert!(x == y || x == 1 || y == 1, "{op:?}: shapes {ta:?} and {tb:?} do not broadcast");
            x.max(y)
        };
        let ty = TileTy { rows: dim(ta.rows, tb.rows), cols: dim(ta.cols, tb.cols), dtype: ta.dtype };
        self.emit(Op::Binary { op, a, b }, ty)
    }

    pub fn add(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(BinOp::Add, a, b)
    }
    pub fn sub(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(BinOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: ValueId, b: ValueId) -> ValueId {
        self.binary(BinOp::Mul, a, b)
    }
    pub fn exp(&mut self, x: ValueId) -> ValueId {
        self.unary(UnOp::Exp, x)
    }
    pub fn neg(&mut self, x: ValueId) -> ValueId {
        self.unary(UnOp::Neg, x)
    }

    pub fn cast(&mut self, x: ValueId, dtype: DType) -> ValueId {
        let t = self.ty(x);
        if t.dtype == dtype {
            return x;
        }
        self.emit(Op::Cast { x, dtype }, TileTy { dtype, ..t })
    }

    /// `op(a) @ op(b) (+ acc)`.
    pub fn dot(&mut self, a: ValueId, b: ValueId, ta: bool, tb: bool, acc: Option<ValueId>) -> ValueId {
        let (xa, xb) = (self.ty(a), self.ty(b));
        assert!(xa.dtype == DType::F32 && xb.dtype == DType::F32, "dot: f32 operands only");
        let (m, k1) = if ta { (xa.cols, xa.rows) } else { (xa.rows, xa.cols) };
        let (k2, n) = if tb { (xb.cols, xb.rows) } else { (xb.rows, xb.cols) };
        assert_eq!(
            k1,
            k2,
            "dot: inner dimensions differ ({xa:?}{}, {xb:?}{})",
            if ta { "^T" } else { "" },
            if tb { "^T" } else { "" }
        );
        if let Some(c) = acc {
            let xc = self.ty(c);
            assert!(xc.rows == m && xc.cols == n && xc.dtype == DType::F32, "dot: accumulator {xc:?} is not {m}x{n}");
        }
        self.emit(Op::Dot { a, b, ta, tb, acc }, TileTy::f32(m, n))
    }

    pub fn cumsum(&mut self, x: ValueId, exclusive: bool) -> ValueId {
        let t = self.ty(x);
        self.emit(Op::Cumsum { x, exclusive }, t)
    }

    pub fn row_sum(&mut self, x: ValueId) -> ValueId {
        let t = self.ty(x);
        self.emit(Op::RowSum { x }, TileTy { cols: 1, ..t })
    }

    pub fn rows(&mut self, x: ValueId, start: usize, len: usize) -> ValueId {
        let t = self.ty(x);
        assert!(start + len <= t.rows, "rows {start}..{} of a {}-row tile", start + len, t.rows);
        if start == 0 && len == t.rows {
            return x;
        }
        self.emit(Op::Rows { x, start, len }, TileTy { rows: len, ..t })
    }

    /// `parts` stacked by rows (one column count and dtype).
    pub fn concat(&mut self, parts: &[ValueId]) -> ValueId {
        let first = self.ty(*parts.first().expect("concat takes at least one part"));
        let mut rows = 0;
        for p in parts {
            let t = self.ty(*p);
            assert!(t.cols == first.cols && t.dtype == first.dtype, "concat of {first:?} and {t:?}");
            rows += t.rows;
        }
        self.emit(Op::Concat { parts: parts.to_vec() }, TileTy { rows, ..first })
    }

    pub fn transpose(&mut self, x: ValueId) -> ValueId {
        let t = self.ty(x);
        self.emit(Op::Transpose { x }, TileTy { rows: t.cols, cols: t.rows, dtype: t.dtype })
    }

    pub fn mask(&mut self, x: ValueId, mask: MaskKind, fill: f64) -> ValueId {
        let t = self.ty(x);
        self.emit(Op::Mask { x, mask, fill }, t)
    }

    pub fn gated_dot(&mut self, a: ValueId, ga: ValueId, b: ValueId, gb: ValueId, strict: bool) -> ValueId {
        let (ta, tga, tb, tgb) = (self.ty(a), self.ty(ga), self.ty(b), self.ty(gb));
        assert!(ta.dtype == DType::F32 && tb.dtype == DType::F32, "gated_dot: f32 operands");
        assert!(
            ta.rows == tga.rows && ta.cols == tga.cols && tb.rows == tgb.rows && tb.cols == tgb.cols,
            "gated_dot: gate shapes"
        );
        assert!(tga.dtype == tgb.dtype, "gated_dot: gate dtypes differ");
        assert!(ta.cols == tb.cols && ta.rows == tb.rows, "gated_dot: square diagonal blocks only ({ta:?}, {tb:?})");
        self.emit(Op::GatedDot { a, ga, b, gb, strict }, TileTy::f32(ta.rows, tb.rows))
    }

    /// [`Op::GatedMatMul`].
    pub fn gated_matmul(
        &mut self,
        m: ValueId,
        x: ValueId,
        gx: ValueId,
        gy: ValueId,
        transposed: bool,
        strict: bool,
    ) -> ValueId {
        let (tm, tx, tgx, tgy) = (self.ty(m), self.ty(x), self.ty(gx), self.ty(gy));
        assert!(tm.dtype == DType::F32 && tx.dtype == DType::F32, "gated_matmul: f32 operands");
        assert!(tm.rows == tm.cols && tm.rows == tx.rows, "gated_matmul: {tm:?} with {tx:?}");
        let same = |a: TileTy, b: TileTy| a.rows == b.rows && a.cols == b.cols;
        assert!(same(tx, tgx) && same(tx, tgy) && tgx.dtype == tgy.dtype, "gated_matmul: gate shapes");
        self.emit(Op::GatedMatMul { m, x, gx, gy, transposed, strict }, tx)
    }

    pub fn solve_unit_lower(&mut self, l: ValueId, b: ValueId) -> ValueId {
        let (tl, tb) = (self.ty(l), self.ty(b));
        assert!(tl.rows == tl.cols && tl.rows == tb.rows, "solve: {tl:?} with {tb:?}");
        assert!(tl.dtype == DType::F32 && tb.dtype == DType::F32, "solve: f32 only");
        self.emit(Op::SolveUnitLower { l, b }, tb)
    }

    /// Opens a loop of `count` iterations carrying `inits`; returns the in-loop values.
    pub fn begin_loop(&mut self, count: Idx, inits: &[ValueId]) -> Vec<ValueId> {
        assert!(self.loops.is_empty(), "loops do not nest");
        let carried: Vec<(ValueId, ValueId)> = inits.iter().map(|&i| (self.fresh(self.ty(i)), i)).collect();
        let inner = carried.iter().map(|c| c.0).collect();
        self.loops.push((count, carried));
        self.blocks.push(vec![]);
        inner
    }

    /// Closes the open loop; `yields` become the next iteration's carried values. Returns the
    /// values after the loop.
    pub fn end_loop(&mut self, yields: &[ValueId]) -> Vec<ValueId> {
        let (count, carried) = self.loops.pop().expect("end_loop without begin_loop");
        let body = self.blocks.pop().expect("loop body");
        assert_eq!(yields.len(), carried.len(), "loop yields");
        for (y, c) in yields.iter().zip(&carried) {
            assert_eq!(self.ty(*y), self.ty(c.0), "loop-carried value changes type");
        }
        let results: Vec<ValueId> = carried.iter().map(|c| self.fresh(self.ty(c.0))).collect();
        self.push(Stmt::Loop { count, carried, body, yields: yields.to_vec(), results: results.clone() });
        results
    }

    /// The kernel, without the values nothing reads and the parameters nothing loads or
    /// stores: a plan may form terms that a rule's shape leaves unused (the exclusive gate of
    /// a chunk that is one block), and a phase of a program computes only part of what the
    /// chunk's algebra forms (a state pass no output); every op is free of side effects, so
    /// a backend should not run them, and a launch should not pass tensors nothing touches.
    pub fn finish(mut self) -> Kernel {
        assert!(self.loops.is_empty(), "unclosed loop");
        let mut body = self.blocks.pop().unwrap_or_default();
        drop_dead(&mut body);
        let params = drop_untouched_params(&mut body, self.params);
        Kernel {
            name: self.name,
            params,
            values: self.values,
            body,
            vtiles: self.vtiles,
            chunk_parallel: self.chunk_parallel,
        }
    }
}

/// Drops the parameters no `Load` or `Store` names, renumbering the rest in order.
fn drop_untouched_params(body: &mut [Stmt], params: Vec<Param>) -> Vec<Param> {
    fn visit(stmts: &mut [Stmt], f: &mut dyn FnMut(&mut usize)) {
        for s in stmts {
            match s {
                Stmt::Let { op: Op::Load { param, .. }, .. } | Stmt::Store { param, .. } => f(param),
                Stmt::Loop { body, .. } => visit(body, f),
                Stmt::Let { .. } => {}
            }
        }
    }
    let mut touched = vec![false; params.len()];
    visit(body, &mut |p| touched[*p] = true);
    let mut renumber = vec![0; params.len()];
    let mut kept = vec![];
    for (i, p) in params.into_iter().enumerate() {
        if touched[i] {
            renumber[i] = kept.len();
            kept.push(p);
        }
    }
    visit(body, &mut |p| *p = renumber[*p]);
    kept
}

/// Removes `Let`s whose value no statement reads, until none is left.
fn drop_dead(body: &mut Vec<Stmt>) {
    fn reads(stmts: &[Stmt], used: &mut std::collections::HashSet<ValueId>) {
        for s in stmts {
            match s {
                Stmt::Let { op, .. } => used.extend(op.operands()),
                Stmt::Store { value, .. } => {
                    used.insert(*value);
                }
                Stmt::Loop { carried, body, yields, .. } => {
                    used.extend(carried.iter().map(|&(_, init)| init));
                    used.extend(yields.iter().copied());
                    reads(body, used);
                }
            }
        }
    }
    fn retain(stmts: &mut Vec<Stmt>, used: &std::collections::HashSet<ValueId>) -> bool {
        let before = stmts.len();
        stmts.retain(|s| !matches!(s, Stmt::Let { id, .. } if !used.contains(id)));
        let mut removed = stmts.len() != before;
        for s in stmts.iter_mut() {
            if let Stmt::Loop { body, .. } = s {
                removed |= retain(body, used);
            }
        }
        removed
    }
    loop {
        let mut used = std::collections::HashSet::new();
        reads(body, &mut used);
        if !retain(body, &used) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_nothing_reads_are_dropped_in_loops_and_outside() {
        let mut b = Builder::new("t");
        let x = b.param("x", Access::Read);
        let o = b.param("o", Access::Write);
        let ty = TileTy::f32(2, 2);
        let init = b.constant(0.0, ty);
        let unused_outside = b.constant(1.0, ty);
        let s = b.begin_loop(Idx::c(3), &[init])[0];
        let l = b.load(x, Idx::c(0), 2, 1, 2, 2, Idx::c(2));
        let dead = b.exp(l);
        let _dead_too = b.add(dead, dead);
        let kept = b.add(s, l);
        b.store(kept, o, Idx::c(0), 2, 1, Idx::c(2));
        let out = b.end_loop(&[kept]);
        b.store(out[0], o, Idx::c(0), 2, 1, Idx::c(2));
        let k = b.finish();
        let mut ids = vec![];
        fn lets(stmts: &[Stmt], ids: &mut Vec<ValueId>) {
            for s in stmts {
                match s {
                    Stmt::Let { id, .. } => ids.push(*id),
                    Stmt::Loop { body, .. } => lets(body, ids),
                    Stmt::Store { .. } => {}
                }
            }
        }
        lets(&k.body, &mut ids);
        // The exp only feeds an add nothing reads: both go, and so does the unused constant.
        assert_eq!(ids, [init, l, kept], "{:?}", k.body);
        let _ = unused_outside;
    }
}
