//! The fused recurrent kernel: the rule's statements, one token per loop iteration.

use super::{PlanError, Shape};
use crate::builder::Builder;
use crate::ir::*;
use crate::lower::{extra_state_base, state_base_tiled, v_token_base, LVal, Lowerer, ParamLayout};
use chunkc_dsl::ast::{Rule, Target};

/// Lowers the rule's statements for one token, the state in `lw.state` as it enters; leaves
/// the state after the token there and returns `o`.
pub fn lower_step(b: &mut Builder, lw: &mut Lowerer) -> Result<ValueId, PlanError> {
    let mut out = None;
    for s in &lw.rule.stmts {
        let LVal::Tile(val) = lw.lower(b, &s.value)? else {
            return Err(PlanError("a statement assigns a transposed matrix".into()));
        };
        match &s.target {
            Target::State => lw.state = Some(val),
            Target::Extra(i) => lw.extras[*i] = Some(val),
            Target::Output => out = Some(val),
            Target::Local(i) => lw.locals[*i] = Some(LVal::Tile(val)),
        }
    }
    out.ok_or_else(|| PlanError("the step never assigns o".into()))
}

/// Builds the recurrent kernel of any checked rule, reading per-token inputs of type `input`
/// (the state stays f32), with V split into tiles of `bv` columns, one per grid point (b, h,
/// vt) when `bv` is given: only for rules linear in S whose step never mixes V columns
/// ([`super::vtile`]).
pub fn build(rule: &Rule, shape: Shape, input: ElemType, bv: Option<usize>) -> Result<Kernel, PlanError> {
    let vtiles = super::vtile::vtiles(rule, &shape, bv, true)?;
    let suffix = bv.map(|bv| format!("_bv{bv}")).unwrap_or_default();
    let mut b = Builder::new(format!("{}_recurrent{suffix}", rule.name));
    b.set_vtiles(vtiles);
    let layout = ParamLayout::declare(&mut b, rule);
    let (k, v) = (shape.k, shape.v);
    let cols = bv.unwrap_or(v);
    let sbase = state_base_tiled(&shape, bv);
    let h0 = b.load(layout.h0, sbase.clone(), v as i64, 1, k, cols, Idx::c(k as i64));
    // Extra states ride along as one-row tiles, loop-carried after S.
    let mut carried = vec![h0];
    for (s, &(p0, _)) in rule.states.iter().zip(&layout.extras) {
        let (base, width) = extra_state_base(&shape, s.ty, bv);
        carried.push(b.load(p0, base, 0, 1, 1, width, Idx::c(1)));
    }
    let inner = b.begin_loop(Idx::var(IdxVar::SeqLen), &carried);
    let t = Idx::var(IdxVar::Iter);
    let mut lw = Lowerer::new(rule, shape, &layout, 1, t.clone(), Idx::c(1));
    lw.input_elem = input;
    lw.bv = bv;
    lw.state = Some(inner[0]);
    for (i, &x) in inner[1..].iter().enumerate() {
        lw.extras[i] = Some(x);
    }
    let out = lower_step(&mut b, &mut lw)?;
    let (obase, ostride) = v_token_base(&shape, t, bv);
    b.store(out, layout.o, obase, ostride, 1, Idx::c(1));
    let mut yields = vec![lw.state.unwrap_or(inner[0])];
    yields.extend(lw.extras.iter().zip(&inner[1..]).map(|(x, &entering)| x.unwrap_or(entering)));
    let last = b.end_loop(&yields);
    b.store(last[0], layout.ht, sbase, v as i64, 1, Idx::c(k as i64));
    for ((s, &(_, pt)), &x) in rule.states.iter().zip(&layout.extras).zip(&last[1..]) {
        let (base, _) = extra_state_base(&shape, s.ty, bv);
        b.store(x, pt, base, 0, 1, Idx::c(1));
    }
    Ok(b.finish())
}
