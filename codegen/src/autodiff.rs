//! Reverse-mode differentiation of straight-line tile IR.
//!
//! Given the `Let`s of a region of a kernel being built (no loops inside), the values whose
//! adjoints are wanted (the leaves: loads, a carried state) and the adjoints of some of its
//! values (the seeds), this appends to the builder the ops that carry the adjoints back
//! through every op of the region, and returns the leaves' adjoints.
//!
//! It works on the IR, not on the rule: every op the rule lowering emits has its
//! vector-Jacobian product written once here, so the backward of a new rule needs nothing
//! new. Only values that depend on a leaf are differentiated (the exponent of `pow(x, 2)`,
//! a constant, gets no adjoint); an elementwise op's adjoint is summed back over the
//! dimensions its operand was broadcast along.

use crate::builder::Builder;
use crate::ir::*;
use std::collections::{HashMap, HashSet};

/// An op the differentiator has no rule for (a compiler limitation, reported to the user as
/// "not differentiable yet").
#[derive(Clone, Debug, PartialEq)]
pub struct AdError(pub String);

impl std::fmt::Display for AdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Appends to `b` the adjoint computation of `region` (its `Let`s, in order) and returns the
/// adjoint of every leaf that one reached (a leaf no seed depends on is absent: its adjoint
/// is zero). `seeds` pairs a value of the region (or a leaf) with its incoming adjoint, of
/// the same type; several seeds of one value add up.
pub fn reverse(
    b: &mut Builder,
    region: &[(ValueId, Op)],
    leaves: &[ValueId],
    seeds: &[(ValueId, ValueId)],
) -> Result<HashMap<ValueId, ValueId>, AdError> {
    let active = active_values(region, leaves);
    // With a `where` in the region, the branch it did not take gets a zero adjoint, and that
    // zero must stay zero through ops whose slope is not finite there (log or sqrt of a
    // negative, exp of a large value): each elementwise contribution is kept only where its
    // incoming adjoint is nonzero.
    let guard_zeros = region.iter().any(|(_, op)| matches!(op, Op::Binary { op: BinOp::Keep, .. }));
    let mut adj: HashMap<ValueId, ValueId> = HashMap::new();
    let mut slices = SliceAdjoints::default();
    for &(v, g) in seeds {
        if active.contains(&v) {
            accumulate(b, &mut adj, v, g);
        }
    }
    for (id, op) in region.iter().rev() {
        // Every use of `id` comes after it, so its slices' adjoints are all in by now.
        slices.assemble(b, &mut adj, *id);
        if leaves.contains(id) {
            continue;
        }
        let Some(&g) = adj.get(id) else { continue };
        if let Op::Rows { x, start, len } = op {
            slices.add(b, *x, *start, *len, g);
            continue;
        }
        let elementwise = matches!(op, Op::Unary { .. } | Op::Binary { .. });
        for (operand, mut contribution) in vjp(b, *id, op, g, &active)? {
            if guard_zeros && elementwise {
                contribution = b.binary(BinOp::Keep, g, contribution);
            }
            let reduced = reduce_to(b, contribution, b.ty(operand));
            accumulate(b, &mut adj, operand, reduced);
        }
    }
    for l in leaves {
        slices.assemble(b, &mut adj, *l);
    }
    Ok(leaves.iter().filter_map(|l| adj.get(l).map(|g| (*l, *g))).collect())
}

/// The adjoints of row slices (`Op::Rows`), kept per sliced value and range until the
/// value's adjoint is needed. The chunk plans slice one tile into sub-chunks many times;
/// adding each slice's adjoint at the slice's size, then stacking the ranges into one tile
/// (zeros in the gaps), costs a copy where placing each use into a full-size tile would cost
/// a full-size add per use.
#[derive(Default)]
struct SliceAdjoints(HashMap<ValueId, Vec<(usize, usize, ValueId)>>);

impl SliceAdjoints {
    fn add(&mut self, b: &mut Builder, x: ValueId, start: usize, len: usize, g: ValueId) {
        let ranges = self.0.entry(x).or_default();
        match ranges.iter_mut().find(|(s, l, _)| (*s, *l) == (start, len)) {
            Some((_, _, sum)) => *sum = b.add(*sum, g),
            None => ranges.push((start, len, g)),
        }
    }

    /// Adds the slices' adjoints of `x` to `x`'s: one stacked tile per set of disjoint
    /// ranges (overlapping ranges go to further sets, added together).
    fn assemble(&mut self, b: &mut Builder, adj: &mut HashMap<ValueId, ValueId>, x: ValueId) {
        let Some(mut ranges) = self.0.remove(&x) else { return };
        ranges.sort_by_key(|&(start, len, _)| (start, len));
        let mut layers: Vec<Vec<(usize, usize, ValueId)>> = vec![];
        for r in ranges {
            match layers.iter_mut().find(|l| l.last().is_some_and(|&(s, n, _)| s + n <= r.0)) {
                Some(layer) => layer.push(r),
                None => layers.push(vec![r]),
            }
        }
        let ty = b.ty(x);
        for layer in layers {
            let mut parts = vec![];
            let mut at = 0;
            for (start, len, g) in layer {
                if start > at {
                    parts.push(b.constant(0.0, TileTy { rows: start - at, ..ty }));
                }
                parts.push(g);
                at = start + len;
            }
            if at < ty.rows {
                parts.push(b.constant(0.0, TileTy { rows: ty.rows - at, ..ty }));
            }
            let whole = if parts.len() == 1 { parts[0] } else { b.concat(&parts) };
            accumulate(b, adj, x, whole);
        }
    }
}

/// The values of the region that depend on a leaf (the leaves included) through a
/// differentiable path: a comparison is flat wherever it has a slope, so nothing flows
/// through it.
fn active_values(region: &[(ValueId, Op)], leaves: &[ValueId]) -> HashSet<ValueId> {
    let mut active: HashSet<ValueId> = leaves.iter().copied().collect();
    for (id, op) in region {
        if matches!(op, Op::Binary { op: BinOp::Lt | BinOp::Le | BinOp::Equal, .. }) {
            continue;
        }
        if op.operands().iter().any(|o| active.contains(o)) {
            active.insert(*id);
        }
    }
    active
}

fn accumulate(b: &mut Builder, adj: &mut HashMap<ValueId, ValueId>, v: ValueId, g: ValueId) {
    let sum = match adj.get(&v) {
        Some(&old) => b.add(old, g),
        None => g,
    };
    adj.insert(v, sum);
}

/// Sums `g` over the dimensions along which a value of type `to` was broadcast to reach
/// `g`'s shape.
fn reduce_to(b: &mut Builder, mut g: ValueId, to: TileTy) -> ValueId {
    let from = b.ty(g);
    if from.cols != to.cols {
        g = b.row_sum(g);
    }
    if from.rows != to.rows {
        let t = b.transpose(g);
        let s = b.row_sum(t);
        g = b.transpose(s);
    }
    b.cast(g, to.dtype)
}

/// The contributions of result `y = op(...)`'s adjoint `g` to its active operands, each at
/// the result's shape (or at the operand's).
fn vjp(
    b: &mut Builder,
    y: ValueId,
    op: &Op,
    g: ValueId,
    active: &HashSet<ValueId>,
) -> Result<Vec<(ValueId, ValueId)>, AdError> {
    let is_active = |v: &ValueId| active.contains(v);
    let mut out = vec![];
    match op {
        Op::Load { .. } | Op::Const { .. } | Op::IdxValue(_) => {}
        Op::Unary { op, x } => {
            let d = unary_vjp(b, *op, *x, y, g);
            out.push((*x, d));
        }
        Op::Binary { op, a, b: c } => {
            let (da, dc) = binary_vjp(b, *op, *a, *c, y, g, (is_active(a), is_active(c)))?;
            out.extend(da.map(|d| (*a, d)));
            out.extend(dc.map(|d| (*c, d)));
        }
        Op::Cast { x, .. } => out.push((*x, g)),
        Op::Dot { a, b: c, ta, tb, acc } => {
            // C = A' B' (+ acc), A' = op(a), B' = op(b): dA' = dC B'^T, dB' = A'^T dC, each
            // written with the operands' own transpose flags.
            if is_active(a) {
                let da = if *ta { b.dot(*c, g, *tb, true, None) } else { b.dot(g, *c, false, !*tb, None) };
                out.push((*a, da));
            }
            if is_active(c) {
                let dc = if *tb { b.dot(g, *a, true, *ta, None) } else { b.dot(*a, g, !*ta, false, None) };
                out.push((*c, dc));
            }
            if let Some(acc) = acc.filter(is_active) {
                out.push((acc, g));
            }
        }
        Op::RowSum { x } => {
            let ones = b.constant(1.0, b.ty(*x));
            out.push((*x, b.mul(ones, g)));
        }
        Op::Transpose { x } => out.push((*x, b.transpose(g))),
        Op::Concat { parts } => {
            let mut at = 0;
            for p in parts {
                let rows = b.ty(*p).rows;
                if is_active(p) {
                    out.push((*p, b.rows(g, at, rows)));
                }
                at += rows;
            }
        }
        Op::Mask { x, mask, .. } => out.push((*x, b.mask(g, mask.clone(), 0.0))),
        Op::Cumsum { x, exclusive } => {
            // y_i = sum_{s<=i} x_s (exclusive: s<i): dx_s = sum_{i>=s} g_i (i>s), the column
            // total less the other kind of prefix sum.
            let t = b.transpose(g);
            let sums = b.row_sum(t);
            let total = b.transpose(sums);
            let prefix = b.cumsum(g, !*exclusive);
            out.push((*x, b.sub(total, prefix)));
        }
        Op::Rows { .. } => unreachable!("row slices' adjoints are assembled by `SliceAdjoints`"),
        Op::SolveUnitLower { l, b: rhs } => {
            // X = A^-1 B with A = I + strict_lower(l): dB = A^-T G, dl = strict_lower(-dB X^T).
            // A^-T is an upper solve, written as the lower one conjugated by the reversal J:
            // A^T = J (I + J l^T J) J, and J l^T J's strict lower part is l's, reflected.
            let n = b.ty(*l).rows;
            let j = reversal(b, n);
            let lt_j = b.dot(*l, j, true, false, None);
            let reflected = b.dot(j, lt_j, false, false, None);
            let jg = b.dot(j, g, false, false, None);
            let solved = b.solve_unit_lower(reflected, jg);
            let d_rhs = b.dot(j, solved, false, false, None);
            if is_active(l) {
                let outer = b.dot(d_rhs, y, false, true, None);
                let lower = b.mask(outer, MaskKind::Tril { strict: true }, 0.0);
                out.push((*l, b.neg(lower)));
            }
            out.push((*rhs, d_rhs));
        }
        Op::GatedDot { a, ga, b: bv, gb, strict } => {
            // out[i, j] = sum_c a[i, c] b[j, c] e^(ga[i, c] - gb[j, c]) over the triangle:
            // da[i, c] = sum_j G[i, j] b[j, c] e^(..), db[j, c] = sum_i G[i, j] a[i, c] e^(..),
            // and each gate's slope is its own vector times that sum (with a minus for gb).
            let da = b.gated_matmul(g, *bv, *gb, *ga, false, *strict);
            let db = b.gated_matmul(g, *a, *ga, *gb, true, *strict);
            if is_active(ga) {
                let s = b.mul(*a, da);
                out.push((*ga, s));
            }
            if is_active(gb) {
                let s = b.mul(*bv, db);
                out.push((*gb, b.neg(s)));
            }
            out.push((*a, da));
            out.push((*bv, db));
        }
        Op::GatedMatMul { m, x, gx, gy, transposed, strict } => {
            // out[i, c] = sum_{j<=i} m[i, j] x[j, c] e^(gy[i, c] - gx[j, c]) (transposed: out[j, c]
            // = sum_{i>=j} m[i, j] x[i, c] e^(gx[i, c] - gy[j, c])). Each adjoint is the other
            // gated product: dm pairs g with x over c (a GatedDot), dx runs the triangle the
            // other way (the other GatedMatMul); a gate's slope is its operand times that sum,
            // minus for the gate subtracted.
            let (dm, dx) = if *transposed {
                (b.gated_dot(*x, *gx, g, *gy, *strict), b.gated_matmul(*m, g, *gy, *gx, false, *strict))
            } else {
                (b.gated_dot(g, *gy, *x, *gx, *strict), b.gated_matmul(*m, g, *gy, *gx, true, *strict))
            };
            if is_active(m) {
                out.push((*m, dm));
            }
            // gy's slope is g ⊙ out and gx's -x ⊙ dx; the transposed product subtracts gy
            // and adds gx, so the signs swap.
            if is_active(gy) {
                let s = b.mul(g, y);
                let s = if *transposed { b.neg(s) } else { s };
                out.push((*gy, s));
            }
            if is_active(gx) {
                let s = b.mul(*x, dx);
                let s = if *transposed { s } else { b.neg(s) };
                out.push((*gx, s));
            }
            if is_active(x) {
                out.push((*x, dx));
            }
        }
    }
    out.retain(|(v, _)| is_active(v));
    Ok(out)
}

/// The n x n reversal J (J[i, j] = 1 where i + j = n - 1, else 0), from index ramps:
/// max(0, 1 - |i + j - (n - 1)|), exact in f32.
fn reversal(b: &mut Builder, n: usize) -> ValueId {
    let ones = b.constant(1.0, TileTy::f32(n, n));
    let rows = b.cumsum(ones, true);
    let cols = b.transpose(rows);
    let sum = b.add(rows, cols);
    let last = b.constant((n - 1) as f64, TileTy::f32(1, 1));
    let d = b.sub(sum, last);
    let minus_d = b.neg(d);
    let dist = b.binary(BinOp::Max, d, minus_d);
    let one = b.constant(1.0, TileTy::f32(1, 1));
    let near = b.sub(one, dist);
    let zero = b.constant(0.0, TileTy::f32(1, 1));
    b.binary(BinOp::Max, near, zero)
}

/// `g * f'(x)`, given `y = f(x)`.
fn unary_vjp(b: &mut Builder, f: UnOp, x: ValueId, y: ValueId, g: ValueId) -> ValueId {
    let scalar = |b: &mut Builder, c: f64| b.constant(c, TileTy { rows: 1, cols: 1, dtype: b.ty(x).dtype });
    match f {
        UnOp::Neg => b.neg(g),
        UnOp::Exp => b.mul(g, y),
        UnOp::Exp2 => {
            let ln2 = scalar(b, std::f64::consts::LN_2);
            let s = b.mul(y, ln2);
            b.mul(g, s)
        }
        UnOp::Log => b.binary(BinOp::Div, g, x),
        UnOp::Sigmoid => {
            let one = scalar(b, 1.0);
            let rest = b.sub(one, y);
            let s = b.mul(y, rest);
            b.mul(g, s)
        }
        UnOp::Softplus => {
            let s = b.unary(UnOp::Sigmoid, x);
            b.mul(g, s)
        }
        UnOp::Silu => {
            // silu' = s (1 + x (1 - s)), s = sigmoid(x)
            let s = b.unary(UnOp::Sigmoid, x);
            let one = scalar(b, 1.0);
            let rest = b.sub(one, s);
            let xr = b.mul(x, rest);
            let inner = b.add(one, xr);
            let slope = b.mul(s, inner);
            b.mul(g, slope)
        }
        UnOp::Sqrt => {
            let half = scalar(b, 0.5);
            let r = b.unary(UnOp::Recip, y);
            let s = b.mul(half, r);
            b.mul(g, s)
        }
        UnOp::Recip => {
            let yy = b.mul(y, y);
            let s = b.mul(g, yy);
            b.neg(s)
        }
        UnOp::Abs => {
            // sign(x) = (0 < x) - (x < 0): 0 at 0, the subgradient the reference takes.
            let zero = scalar(b, 0.0);
            let pos = b.binary(BinOp::Lt, zero, x);
            let neg = b.binary(BinOp::Lt, x, zero);
            let sign = b.sub(pos, neg);
            b.mul(g, sign)
        }
        UnOp::Tanh => {
            let one = scalar(b, 1.0);
            let yy = b.mul(y, y);
            let s = b.sub(one, yy);
            b.mul(g, s)
        }
    }
}

/// The share of a `max` (or `min`) slope that goes to `a`: 1 where `a` is selected, 1/2 at
/// a tie (as torch's maximum and minimum), 0 elsewhere.
fn selected_share(b: &mut Builder, f: BinOp, a: ValueId, c: ValueId) -> ValueId {
    let wins = if f == BinOp::Max { b.binary(BinOp::Lt, c, a) } else { b.binary(BinOp::Lt, a, c) };
    let tie = b.binary(BinOp::Equal, a, c);
    let half = b.constant(0.5, TileTy { rows: 1, cols: 1, dtype: b.ty(a).dtype });
    let split = b.mul(tie, half);
    b.add(wins, split)
}

/// `(g * df/da, g * df/dc)` for the operands that are active, given `y = f(a, c)`.
fn binary_vjp(
    b: &mut Builder,
    f: BinOp,
    a: ValueId,
    c: ValueId,
    y: ValueId,
    g: ValueId,
    (want_a, want_c): (bool, bool),
) -> Result<(Option<ValueId>, Option<ValueId>), AdError> {
    let da = |b: &mut Builder| -> Result<ValueId, AdError> {
        Ok(match f {
            BinOp::Add | BinOp::Sub => g,
            BinOp::Mul => b.mul(g, c),
            BinOp::Div => b.binary(BinOp::Div, g, c),
            BinOp::Pow => {
                // c a^(c - 1)
                let one = b.constant(1.0, TileTy { rows: 1, cols: 1, dtype: b.ty(c).dtype });
                let cm1 = b.sub(c, one);
                let p = b.binary(BinOp::Pow, a, cm1);
                let s = b.mul(c, p);
                b.mul(g, s)
            }
            BinOp::Max | BinOp::Min => {
                let share = selected_share(b, f, a, c);
                b.mul(g, share)
            }
            BinOp::Lt | BinOp::Le | BinOp::Equal | BinOp::Keep => unreachable!("flat in `a`: not asked for"),
        })
    };
    let dc = |b: &mut Builder| -> Result<ValueId, AdError> {
        Ok(match f {
            BinOp::Add => g,
            BinOp::Sub => b.neg(g),
            BinOp::Mul => b.mul(g, a),
            BinOp::Div => {
                // -g y / c
                let q = b.binary(BinOp::Div, y, c);
                let s = b.mul(g, q);
                b.neg(s)
            }
            BinOp::Pow => {
                // y ln a: the exponent's slope (a > 0 where it is active)
                let l = b.unary(UnOp::Log, a);
                let s = b.mul(y, l);
                b.mul(g, s)
            }
            BinOp::Max | BinOp::Min => {
                let share = selected_share(b, f, c, a);
                b.mul(g, share)
            }
            BinOp::Keep => b.binary(BinOp::Keep, a, g),
            BinOp::Lt | BinOp::Le | BinOp::Equal => unreachable!("comparisons are inactive"),
        })
    };
    // A `where` condition gets no adjoint: the result is flat in it wherever it has a slope.
    let want_a = want_a && f != BinOp::Keep;
    Ok((if want_a { Some(da(b)?) } else { None }, if want_c { Some(dc(b)?) } else { None }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::run_tile;

    /// Builds `f` on one-row leaves read from parameter 0, seeds the result with ones, and
    /// returns the leaves' adjoints as the interpreter computes them, next to central
    /// differences of the sum of the result.
    fn check(name: &str, widths: &[(usize, usize)], inputs: &[f32], f: impl Fn(&mut Builder, &[ValueId]) -> ValueId) {
        let run = |x: &[f32], with_grad: bool| -> (f64, Vec<f32>) {
            let mut b = Builder::new(name);
            let p = b.param("x", Access::Read);
            let out = b.param("out", Access::Write);
            let grad = b.param("grad", Access::Write);
            let mark = b.next_value();
            let mut leaves = vec![];
            let mut at = 0;
            for &(r, c) in widths {
                leaves.push(b.load(p, Idx::c(at as i64), c as i64, 1, r, c, Idx::c(r as i64)));
                at += r * c;
            }
            let y = f(&mut b, &leaves);
            let sum = {
                let s = b.row_sum(y);
                let t = b.transpose(s);
                b.row_sum(t)
            };
            b.store(sum, out, Idx::c(0), 1, 1, Idx::c(1));
            if with_grad {
                let region = b.lets_since(mark);
                let ones = b.constant(1.0, b.ty(y));
                let adj = reverse(&mut b, &region, &leaves, &[(y, ones)]).expect("reverse");
                let mut at = 0;
                for (l, &(r, c)) in leaves.iter().zip(widths) {
                    let g = adj.get(l).copied().unwrap_or_else(|| b.constant(0.0, b.ty(*l)));
                    b.store(g, grad, Idx::c(at as i64), c as i64, 1, Idx::c(r as i64));
                    at += r * c;
                }
            }
            let kernel = b.finish();
            let mut xs = x.to_vec();
            let mut o = vec![0f32; 1];
            let mut gr = vec![f32::NAN; x.len()];
            let mut params: Vec<&mut [f32]> = vec![&mut xs, &mut o];
            if with_grad {
                params.push(&mut gr);
            }
            run_tile(&kernel, &mut params, 0, 0, 0, 1).expect("run");
            (o[0] as f64, gr)
        };
        let (_, grad) = run(inputs, true);
        for i in 0..inputs.len() {
            let h = 1e-2f32 * inputs[i].abs().max(1.0);
            let (mut up, mut down) = (inputs.to_vec(), inputs.to_vec());
            up[i] += h;
            down[i] -= h;
            let fd = (run(&up, false).0 - run(&down, false).0) / (2.0 * h as f64);
            let err = (grad[i] as f64 - fd).abs() / fd.abs().max(1.0);
            assert!(err < 2e-2, "{name}: d/dx[{i}] = {} but finite differences give {fd}", grad[i]);
        }
    }

    #[test]
    fn elementwise_ops_match_finite_differences() {
        let xs = [0.3f32, -0.7, 1.1, 0.4, 0.9, -0.2];
        for op in [
            UnOp::Neg,
            UnOp::Exp,
            UnOp::Exp2,
            UnOp::Sigmoid,
            UnOp::Softplus,
            UnOp::Silu,
            UnOp::Recip,
            UnOp::Abs,
            UnOp::Tanh,
        ] {
            check(&format!("{op:?}"), &[(1, 6)], &xs, |b, l| b.unary(op, l[0]));
        }
        let pos = [0.3f32, 0.7, 1.1, 0.4, 0.9, 0.2];
        for op in [UnOp::Log, UnOp::Sqrt] {
            check(&format!("{op:?}"), &[(1, 6)], &pos, |b, l| b.unary(op, l[0]));
        }
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div, BinOp::Pow, BinOp::Max, BinOp::Min] {
            // a [1, 3] row against a [1, 1] scalar and a [3, 1] column: both broadcasts
            let seven = [0.3f32, 0.7, 1.1, 0.4, 0.9, 0.2, 1.3];
            check(&format!("{op:?} broadcast"), &[(1, 3), (1, 1), (3, 1)], &seven, |b, l| {
                let ab = b.binary(op, l[0], l[1]);
                b.binary(op, l[2], ab)
            });
        }
    }

    #[test]
    fn where_passes_the_taken_branch_and_stops_at_the_condition() {
        // where(x > 0, sqrt(x), 2 x) * x: sqrt of the negative entries is NaN, and the
        // branch not taken must neither reach the value nor turn its zero adjoint into NaN.
        let xs = [0.3f32, -0.7, 1.1, -0.4, 0.9, -0.2];
        check("where", &[(1, 6)], &xs, |b, l| {
            let zero = b.constant(0.0, TileTy::f32(1, 1));
            let pos = b.binary(BinOp::Lt, zero, l[0]);
            let not_pos = b.binary(BinOp::Equal, pos, zero);
            let root = b.unary(UnOp::Sqrt, l[0]);
            let two = b.constant(2.0, TileTy::f32(1, 1));
            let twice = b.mul(l[0], two);
            let taken = b.binary(BinOp::Keep, pos, root);
            let other = b.binary(BinOp::Keep, not_pos, twice);
            let w = b.add(taken, other);
            b.mul(w, l[0])
        });
    }

    #[test]
    fn products_reductions_and_masks_match_finite_differences() {
        let xs: Vec<f32> = (0..28).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        // outer, S^T x, S y, x S with the four transpose patterns, and an accumulator
        check("dot", &[(1, 3), (1, 4), (3, 4), (1, 3)], &xs[..22], |b, l| {
            let outer = b.dot(l[0], l[1], true, false, Some(l[2]));
            let st = b.dot(l[3], outer, false, false, None);
            let s = b.dot(st, outer, false, true, None);
            let t = b.transpose(s);
            let column_row = b.dot(t, l[3], false, false, None);
            let both_transposed = b.dot(l[3], t, true, true, None);
            b.add(column_row, both_transposed)
        });
        check("cumulative sums and row slices", &[(5, 2)], &xs[..10], |b, l| {
            let inc = b.cumsum(l[0], false);
            let exc = b.cumsum(l[0], true);
            let e = b.exp(exc);
            let both = b.mul(inc, e);
            let one = b.rows(both, 4, 1);
            let some = b.rows(both, 1, 3);
            let top = b.rows(some, 0, 1);
            let s = b.mul(some, one);
            b.add(s, top)
        });
        check("overlapping row slices and a concatenation", &[(6, 2)], &xs[..12], |b, l| {
            let e = b.exp(l[0]);
            let (top, middle, top_again) = (b.rows(e, 0, 4), b.rows(e, 2, 4), b.rows(e, 0, 4));
            let s = b.mul(top, middle);
            let s = b.mul(s, top_again);
            let last = b.rows(l[0], 5, 1);
            let stacked = b.concat(&[s, last, top]);
            let inner = b.rows(stacked, 3, 4);
            b.mul(inner, inner)
        });
        check("triangular solve", &[(4, 4), (4, 3)], &xs, |b, l| {
            let small = b.constant(0.3, TileTy::f32(1, 1));
            let l_scaled = b.mul(l[0], small);
            b.solve_unit_lower(l_scaled, l[1])
        });
        for strict in [false, true] {
            // gates decreasing down the rows, as cumulative log gates are
            let gates: Vec<f32> = (0..24).map(|i| -0.1 * (i / 3) as f32 - 0.05 * (i % 3) as f32).collect();
            let inputs: Vec<f32> = xs[..24].iter().chain(&gates).copied().collect();
            check("gated scores", &[(4, 3), (4, 3), (4, 3), (4, 3)], &inputs, |b, l| {
                let s = b.gated_dot(l[0], l[2], l[1], l[3], strict);
                b.mul(s, s)
            });
        }
        for (transposed, strict) in [(false, false), (false, true), (true, false), (true, true)] {
            // a 4 x 4 matrix, values 4 x 3 and two decreasing gates 4 x 3
            let gates: Vec<f32> = (0..24).map(|i| -0.1 * (i / 3) as f32 - 0.05 * (i % 3) as f32).collect();
            let inputs: Vec<f32> = xs[..28].iter().chain(&gates).copied().collect();
            check("gated matmul", &[(4, 4), (4, 3), (4, 3), (4, 3)], &inputs[..52], |b, l| {
                let s = b.gated_matmul(l[0], l[1], l[2], l[3], transposed, strict);
                b.mul(s, s)
            });
        }
        check("row sums and masks", &[(3, 4)], &xs[..12], |b, l| {
            let e = b.exp(l[0]);
            let m = b.mask(e, MaskKind::RowsBefore(Idx::c(2)), 0.0);
            let r = b.row_sum(m);
            b.mul(r, l[0])
        });
    }
}
