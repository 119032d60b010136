//! Kernel-to-kernel clean-ups every backend gets before fusion and layout.
//!
//! The chunked plan zeroes the rows past the sequence end of every per-token tile with a
//! `Mask RowsBefore(valid)` (so that, say, a NaN from an l2norm of a zero row cannot leak
//! into a matmul). Where the operand is already known to be zero in exactly those rows (a
//! `Load` with the same `valid_rows`, which fills them with 0, or an elementwise op that
//! keeps zeros zero), the mask is the identity: profiles showed each such mask as one extra
//! pass over a 32 KB tile per chunk. [`drop_redundant_masks`] replaces the mask's uses with
//! its operand. The facts are tracked per statement list, so that `Iter` in the index
//! expressions means the same iteration for the mask and its operand.

use std::collections::HashMap;

use crate::ir::*;

/// The kernel with every redundant rows mask removed (see the module doc).
pub(super) fn drop_redundant_masks(kernel: &Kernel) -> Kernel {
    let mut subst: HashMap<ValueId, ValueId> = HashMap::new();
    let mut out = kernel.clone();
    out.body = block(kernel, &kernel.body, &mut subst);
    out
}

fn block(kernel: &Kernel, stmts: &[Stmt], subst: &mut HashMap<ValueId, ValueId>) -> Vec<Stmt> {
    // zero[v] = e: value v (defined in this statement list) is 0 in every row at or past e.
    let mut zero: HashMap<ValueId, Idx> = HashMap::new();
    let mut consts: HashMap<ValueId, f64> = HashMap::new();
    let mut body = vec![];
    for s in stmts {
        match s {
            Stmt::Let { id, op } => {
                let mut op = op.clone();
                map_operands(&mut op, subst);
                let rows = kernel.ty(*id).rows;
                let full = |v: &ValueId| kernel.ty(*v).rows == rows;
                let z = |v: &ValueId| zero.get(v).filter(|_| full(v)).cloned();
                let fact = match &op {
                    Op::Load { valid_rows, .. } => Some(valid_rows.clone()),
                    Op::Mask { x, mask: MaskKind::RowsBefore(e), fill } if *fill == 0.0 => {
                        if z(x).as_ref() == Some(e) {
                            subst.insert(*id, *x);
                            continue;
                        }
                        Some(e.clone())
                    }
                    Op::Unary { op: UnOp::Neg, x } | Op::Cast { x, .. } => z(x),
                    Op::Binary { op: BinOp::Mul, a, b } => {
                        let finite = |v: &ValueId| consts.get(v).is_some_and(|c| c.is_finite());
                        match (z(a), z(b)) {
                            (Some(e), Some(f)) if e == f => Some(e),
                            (Some(e), None) if finite(b) => Some(e),
                            (None, Some(e)) if finite(a) => Some(e),
                            _ => None,
                        }
                    }
                    Op::Binary { op: BinOp::Add | BinOp::Sub, a, b } => match (z(a), z(b)) {
                        (Some(e), Some(f)) if e == f => Some(e),
                        _ => None,
                    },
                    _ => None,
                };
                if let Op::Const { value, .. } = &op {
                    consts.insert(*id, *value);
                }
                if let Some(e) = fact {
                    zero.insert(*id, e);
                }
                body.push(Stmt::Let { id: *id, op });
            }
            Stmt::Store { value, param, base, row_stride, col_stride, valid_rows } => body.push(Stmt::Store {
                value: get(subst, *value),
                param: *param,
                base: base.clone(),
                row_stride: *row_stride,
                col_stride: *col_stride,
                valid_rows: valid_rows.clone(),
            }),
            Stmt::Loop { count, carried, body: inner, yields, results } => {
                let carried = carried.iter().map(|&(c, init)| (c, get(subst, init))).collect();
                let inner = block(kernel, inner, subst);
                let yields = yields.iter().map(|&y| get(subst, y)).collect();
                body.push(Stmt::Loop { count: count.clone(), carried, body: inner, yields, results: results.clone() });
            }
        }
    }
    body
}

fn get(subst: &HashMap<ValueId, ValueId>, v: ValueId) -> ValueId {
    subst.get(&v).copied().unwrap_or(v)
}

/// Renames the operands of `op` by `subst`.
fn map_operands(op: &mut Op, subst: &HashMap<ValueId, ValueId>) {
    for v in op.operands_mut() {
        *v = get(subst, *v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;

    fn count_masks(stmts: &[Stmt]) -> usize {
        stmts
            .iter()
            .map(|s| match s {
                Stmt::Let { op: Op::Mask { .. }, .. } => 1,
                Stmt::Loop { body, .. } => count_masks(body),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn masks_of_zero_rows_go_and_others_stay() {
        let mut b = Builder::new("m");
        let (px, py) = (b.param("x", Access::Read), b.param("y", Access::Write));
        let valid = Idx::var(IdxVar::SeqLen).min(Idx::c(8));
        let x = b.load(px, Idx::c(0), 4, 1, 8, 4, valid.clone());
        let c = b.constant(0.5, TileTy::f32(1, 1));
        let xs = b.mul(x, c);
        let m1 = b.mask(xs, MaskKind::RowsBefore(valid.clone()), 0.0); // redundant
        let m2 = b.mask(x, MaskKind::RowsBefore(Idx::c(3)), 0.0); // other limit: stays
        let e = b.exp(x);
        let m3 = b.mask(e, MaskKind::RowsBefore(valid.clone()), 0.0); // exp(0) = 1: stays
        let s = b.add(m1, m2);
        let s = b.add(s, m3);
        b.store(s, py, Idx::c(0), 4, 1, valid);
        let k = b.finish();
        assert_eq!(count_masks(&k.body), 3);
        let r = drop_redundant_masks(&k);
        assert_eq!(count_masks(&r.body), 2);
        crate::midend::layout::plan(&r).expect("the rewritten kernel is valid");
        let uses_xs =
            r.body.iter().any(|s| matches!(s, Stmt::Let { op: Op::Binary { op: BinOp::Add, a, .. }, .. } if *a == xs));
        assert!(uses_xs, "the sum reads the unmasked product");
    }
}
