//! Splitting a head into V-tiles (the Schedule's `bv`): legality and the tile count.
//!
//! For every linear class the columns of the K x V state evolve independently (A_t acts on
//! S from the left, the write is k v^T, the output is S^T q), so column j needs only column j
//! of every V-side value. A kernel built with `bv = Some(BV)` covers columns
//! `vt*BV .. vt*BV + BV` for grid point (b, h, vt). That is only sound when nothing in the
//! step mixes V columns, which this module checks on the typed rule (and on the canonical
//! form when there is one), conservatively: any reduction of a `[V]` value or of the state
//! is refused, and so is the recurrent kernel of a rule that is not linear in S.

use super::{PlanError, Shape};
use chunkc_dsl::ast::{Expr, ExprKind, Rule, Ty};
use chunkc_dsl::canon::{self, Canonical};

/// V-tiles per head for `bv` (1 for None), or why the rule cannot be split so.
/// `recurrent`: the kernel runs the rule's statements as written (not the canonical form).
pub fn vtiles(rule: &Rule, shape: &Shape, bv: Option<usize>, recurrent: bool) -> Result<usize, PlanError> {
    let Some(bv) = bv else { return Ok(1) };
    if bv == 0 || !shape.v.is_multiple_of(bv) {
        return Err(PlanError(format!("BV ({bv}) must be a positive divisor of V ({})", shape.v)));
    }
    for s in &rule.stmts {
        if let Some(why) = mixes_columns(&s.value) {
            return Err(PlanError(format!("cannot split V into tiles of {bv}: {why} mixes the columns of V")));
        }
    }
    match canon::canonicalize(rule) {
        Ok(c) => {
            if let Some(why) = canonical_mixes(&c) {
                return Err(PlanError(format!("cannot split V into tiles of {bv}: {why} mixes the columns of V")));
            }
        }
        Err(e) if recurrent => {
            return Err(PlanError(format!(
                "cannot split V into tiles of {bv}: the rule is not linear in S ({}), so its columns may mix",
                e.reason
            )));
        }
        // The chunked plan refuses such a rule itself, with its own reason.
        Err(_) => {}
    }
    Ok(shape.v / bv)
}

fn canonical_mixes(c: &Canonical) -> Option<&'static str> {
    let out = [
        Some(&c.output.query),
        c.output.coef.as_ref(),
        c.output.extra.as_ref(),
        c.log_gate.as_ref(),
        c.log_vgate.as_ref(),
        c.output.epilogue.as_ref(),
    ];
    let columns = c.columns.iter().flat_map(|col| &col.writes);
    let pairs = c.writes.iter().chain(&c.low_rank).chain(columns).flat_map(|(a, b)| [a, b]);
    out.into_iter().flatten().chain(pairs).find_map(mixes_columns)
}

/// The first construct in `e` that combines different V columns, if any. Elementwise ops,
/// `outer`, `S^T @ x` and `x @ S` keep columns apart; a reduction over a `[V]` value or over
/// the state (`sum`, `dot`, `l2norm`, `S @ y`, `y @ S^T`, `y @ y`) does not.
fn mixes_columns(e: &Expr) -> Option<&'static str> {
    let v_side = |x: &Expr| matches!(x.ty, Ty::VecV | Ty::Mat | Ty::MatT);
    let here = match &e.kind {
        ExprKind::Sum(a) if v_side(a) => Some("a sum of a [V] value or of the state"),
        ExprKind::L2Norm(a) if v_side(a) => Some("l2norm of a [V] value"),
        ExprKind::Dot(a, b) if v_side(a) || v_side(b) => Some("a dot product of [V] values"),
        ExprKind::MatMul(a, b) if a.ty == Ty::VecV || b.ty == Ty::VecV => Some("a product over V (`@` of a [V] value)"),
        _ => None,
    };
    here.or_else(|| e.children().into_iter().find_map(mixes_columns))
}
