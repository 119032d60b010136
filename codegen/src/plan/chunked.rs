//! The chunked forward for every linear class (DESIGN.md forms (a) to (d)), written once.
//!
//! Per chunk of C tokens with state S0 entering it, and B the chunk-local cumulative log
//! gate (inclusive `Bin`, exclusive `Bex`; `Bq` is `Bin` when o reads the state after the
//! update, `Bex` when before):
//!
//! ```text
//! scores(X, gX, Y, gY)[i, j] = sum_c X_ic Y_jc exp(gX_ic - gY_jc)       on j <= i (or j < i)
//! R  = (I - scores(Bv, Bex, A, Bin))^-1 (scores(Bv, Bex, KW, Bin) VW + (Bv ⊙ e^Bex) S0)   [low rank only]
//! O  = (Q ⊙ e^Bq) S0 + scores(Q, Bq, KW, Bin) VW + scores(Q, Bq, A, Bin) R
//! S' = diag(e^{B_C}) S0 + (KW ⊙ e^{B_C - Bin})^T VW + (A ⊙ e^{B_C - Bin})^T R
//! ```
//!
//! When the decay is a factor of the low-rank `b` (`Bv = w ⊙ Bv'`), `(Bv, Bex)` is formed as
//! `(Bv', Bin)`: `Bv ⊙ e^Bex = Bv' ⊙ e^Bin` term by term.
//!
//! Every exponent used is <= 0. The gate decides how scores are formed: no gate, plain
//! matmuls with a causal mask; a scalar gate, one matmul times a C x C decay mask, the chunk
//! as one block; a per-channel gate, blocks of `sub_chunk` rows where an off-diagonal block
//! is one matmul of factors re-centred on the block's first row (both <= 1) and a diagonal
//! block is evaluated pairwise. Gate sums and their differences are carried in f64 so that
//! differences of large sums keep their precision; the exps run in f32. The low-rank solve
//! is blockwise forward substitution.

use super::{PlanError, Schedule, Shape};
use crate::builder::Builder;
use crate::ir::*;
use crate::lower::{state_base_tiled, v_token_base, Lowerer, ParamLayout};
use chunkc_dsl::ast::{Expr, Rule, Ty};
use chunkc_dsl::canon::{same, Canonical, Read};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    None,
    Scalar,
    Vector,
}

/// Builds the chunked kernel of a canonical rule.
pub fn build(rule: &Rule, canon: &Canonical, shape: Shape, sched: Schedule) -> Result<Kernel, PlanError> {
    if canon.low_rank.len() > 1 {
        return Err(PlanError(format!(
            "transitions of rank {} are not chunked yet (rank 1 is); use the recurrent backend",
            canon.low_rank.len()
        )));
    }
    let c = sched.chunk;
    if c == 0 {
        return Err(PlanError("the chunk size must be at least 1".into()));
    }
    let gate = match &canon.log_gate {
        None => Gate::None,
        Some(g) if g.ty == Ty::VecK => Gate::Vector,
        Some(_) => Gate::Scalar,
    };
    let bs = if gate == Gate::Vector { sched.sub_chunk.clamp(1, c) } else { c };
    if !c.is_multiple_of(bs) {
        return Err(PlanError(format!("the sub-chunk ({bs}) must divide the chunk ({c})")));
    }
    let (k, v) = (shape.k, shape.v);
    // V-tiles (the schedule's BV): only the V-side addressing changes ([`super::vtile`]).
    let vtiles = super::vtile::vtiles(rule, &shape, sched.bv, false)?;
    let suffix = sched.bv.map(|bv| format!("_bv{bv}")).unwrap_or_default();
    let mut b = Builder::new(format!("{}_chunked_c{c}{suffix}", rule.name));
    b.set_vtiles(vtiles);
    let layout = ParamLayout::declare(&mut b, rule);
    let sbase = state_base_tiled(&shape, sched.bv);
    let h0 = b.load(layout.h0, sbase.clone(), v as i64, 1, k, sched.bv.unwrap_or(v), Idx::c(k as i64));
    let n_chunks = Idx::var(IdxVar::SeqLen).ceil_div(c as i64);
    let s0 = b.begin_loop(n_chunks, &[h0])[0];

    let t0 = Idx::var(IdxVar::Iter).mul(Idx::c(c as i64));
    let valid = Idx::c(c as i64).min(Idx::var(IdxVar::SeqLen).sub(t0.clone()));
    let mut lw = Lowerer::new(rule, shape, &layout, c, t0.clone(), valid.clone());
    lw.input_elem = sched.input;
    lw.bv = sched.bv;
    let mut pro = Prologue { lw: &mut lw, rows: c, valid: valid.clone() };

    // Prologue: every canonical vector for the chunk's tokens, zero past the sequence end.
    let g = match &canon.log_gate {
        Some(e) => {
            let g = pro.tile(&mut b, e, true)?;
            Some(b.cast(g, DType::F64))
        }
        None => None,
    };
    let q = pro.tile(&mut b, &canon.output.query, true)?;
    // A write whose key is the low-rank vector `a` (DeltaNet, Gated DeltaNet, KDA: both are
    // k) is folded into the solve: with U = R + VW the system becomes
    // (I - A_ba) U = VW + (b ⊙ e^Bex) S0 + ..., and U replaces R in the output and the state.
    // U is the small pseudo-value beta (v - S^T k) (DESIGN form (c)); keeping R and VW apart
    // would sum two chunk-sized terms that cancel, losing f32 precision.
    let merged = canon.low_rank.first().and_then(|(a, _)| canon.writes.iter().position(|(kw, _)| same(kw, a)));
    let mut merged_vw = None;
    let mut writes: Vec<(ValueId, ValueId)> = vec![];
    for (w, (kw, vw)) in canon.writes.iter().enumerate() {
        let vw = pro.tile(&mut b, vw, true)?;
        if Some(w) == merged {
            merged_vw = Some(vw);
        } else {
            writes.push((pro.tile(&mut b, kw, true)?, vw));
        }
    }
    // `b` reads the state after the token's own decay. When the decay is a factor of it
    // (b = w b', every gated delta rule), b' is gated inclusively, `b' e^Bin` for `b e^Bex`:
    // the same terms, without a tile of exponentials for b and with the other operands'
    // gate, whose factors the backends then share.
    let decayed_b = canon.low_rank_decayed.first().and_then(|b| b.as_ref());
    let low_rank: Option<(ValueId, (ValueId, bool))> = match canon.low_rank.first() {
        Some((a, bv)) => {
            let (bv, inclusive) = match decayed_b.filter(|_| canon.log_gate.is_some()) {
                Some(b2) => (b2, true),
                None => (bv, false),
            };
            Some((pro.tile(&mut b, a, true)?, (pro.tile(&mut b, bv, true)?, inclusive)))
        }
        None => None,
    };
    let coef = canon.output.coef.as_ref().map(|e| pro.tile(&mut b, e, false)).transpose()?;
    let extra = canon.output.extra.as_ref().map(|e| pro.tile(&mut b, e, false)).transpose()?;

    // Cumulative gates (f64).
    let read_before = canon.output.read == Read::Before;
    let gates = g.map(|g| {
        let bin = b.cumsum(g, false);
        let bex = b.cumsum(g, true);
        (bin, bex)
    });
    let mut sc = Scores { gate, bs, pivots: gates.map(|(_, bex)| bex), cache: HashMap::new() };
    let (bin, bex) = (gates.map(|g| g.0), gates.map(|g| g.1));
    let bq = if read_before { bex } else { bin };

    let nb = c / bs;
    // Values written by each write term, block by block.
    let vw_blocks: Vec<Vec<ValueId>> =
        writes.iter().map(|&(_, vw)| (0..nb).map(|j| b.rows(vw, j * bs, bs)).collect()).collect();
    let mut r_blocks: Vec<ValueId> = vec![];
    for i in 0..nb {
        let i0 = i * bs;
        let qg = sc.decayed(&mut b, q, bq, i);
        let mut o = b.dot(qg, s0, false, false, None);
        if let Some((a, (bv, inclusive))) = low_rank {
            let bv_gate = if inclusive { bin } else { bex };
            // R_i = (I - A_ba[i,i])^-1 (bg_i S0 + sum_{j<i} A_ba[i,j] R_j + sum_{j<=i} A_bk[i,j] VW_j)
            // (R is U = R + VW_merged when a write was folded in: then VW_merged_i joins the rhs.)
            let bg = sc.decayed(&mut b, bv, bv_gate, i);
            let merged_i = merged_vw.map(|vw| b.rows(vw, i0, bs));
            let mut rhs = b.dot(bg, s0, false, false, merged_i);
            rhs = sc.apply(&mut b, (bv, bv_gate), (a, bin), (&r_blocks, None), i, true, rhs);
            for (&(kw, vw), vws) in writes.iter().zip(&vw_blocks) {
                rhs = sc.apply(&mut b, (bv, bv_gate), (kw, bin), (vws, Some(vw)), i, true, rhs);
            }
            let aba = sc.scores(&mut b, (bv, bv_gate), (a, bin), i, i, true);
            let l = b.neg(aba);
            r_blocks.push(b.solve_unit_lower(l, rhs));
            o = sc.apply(&mut b, (q, bq), (a, bin), (&r_blocks, None), i, read_before, o);
        }
        for (&(kw, vw), vws) in writes.iter().zip(&vw_blocks) {
            o = sc.apply(&mut b, (q, bq), (kw, bin), (vws, Some(vw)), i, read_before, o);
        }
        if let Some(cf) = coef {
            let cf = rows_of(&mut b, cf, i0, bs);
            o = b.mul(o, cf);
        }
        if let Some(x) = extra {
            let x = rows_of(&mut b, x, i0, bs);
            o = b.add(o, x);
        }
        let (obase, ostride) = v_token_base(&shape, t0.clone().add(Idx::c(i0 as i64)), sched.bv);
        b.store(o, layout.o, obase, ostride, 1, valid.clone().sub(Idx::c(i0 as i64)));
    }

    // State passed to the next chunk.
    let mut s_next = s0;
    let total = bin.map(|bin| b.rows(bin, c - 1, 1));
    if let Some(total) = total {
        let d = exp_f32(&mut b, total);
        let d = if gate == Gate::Vector { b.transpose(d) } else { d };
        s_next = b.mul(s0, d);
    }
    for j in 0..nb {
        let decay = total.map(|total| {
            let bj = b.rows(bin.expect("gates"), j * bs, bs);
            let e = b.sub(total, bj);
            exp_f32(&mut b, e)
        });
        let write = |b: &mut Builder, key: ValueId, val: ValueId, s: ValueId| {
            let kj = b.rows(key, j * bs, bs);
            let kj = match decay {
                Some(d) => b.mul(kj, d),
                None => kj,
            };
            b.dot(kj, val, true, false, Some(s))
        };
        for (&(kw, _), vws) in writes.iter().zip(&vw_blocks) {
            s_next = write(&mut b, kw, vws[j], s_next);
        }
        if let (Some((a, _)), Some(&rj)) = (low_rank, r_blocks.get(j)) {
            s_next = write(&mut b, a, rj, s_next);
        }
    }
    let last = b.end_loop(&[s_next]);
    b.store(last[0], layout.ht, sbase, v as i64, 1, Idx::c(k as i64));
    Ok(b.finish())
}

/// Rows `i0 .. i0 + n` of a per-token tile; a one-row (per-head) tile broadcasts as is.
fn rows_of(b: &mut Builder, x: ValueId, i0: usize, n: usize) -> ValueId {
    if b.ty(x).rows == 1 {
        x
    } else {
        b.rows(x, i0, n)
    }
}

/// exp of an f64 exponent, as f32. The exponent is a difference of cumulative gates formed in
/// f64 (where cancellation would cost precision); it is rounded to f32 before the exp, which
/// perturbs the weight e^x relatively by about 6e-8 |x|: with every exponent <= 0, that is an
/// absolute error below 2.2e-8 (max of |x| e^x is 1/e), and the exp runs in f32.
fn exp_f32(b: &mut Builder, x: ValueId) -> ValueId {
    let x = b.cast(x, DType::F32);
    b.exp(x)
}

/// Lowers canonical expressions to full-chunk tiles.
struct Prologue<'l, 'a> {
    lw: &'l mut Lowerer<'a>,
    rows: usize,
    valid: Idx,
}

impl Prologue<'_, '_> {
    /// `rows x width` tile of an expression; with `mask`, rows past the sequence end are 0
    /// (so that a NaN from, say, l2norm of a zero row cannot leak into a matmul).
    fn tile(&mut self, b: &mut Builder, e: &Expr, mask: bool) -> Result<ValueId, PlanError> {
        let mut x = self.lw.tile(b, e)?;
        let t = b.ty(x);
        if t.rows == 1 && self.rows > 1 {
            let zeros = b.constant(0.0, TileTy { rows: self.rows, cols: t.cols, dtype: t.dtype });
            x = b.add(zeros, x);
        }
        if mask {
            x = b.mask(x, MaskKind::RowsBefore(self.valid.clone()), 0.0);
        }
        Ok(x)
    }
}

/// Forms gated scores and decayed operands block by block, sharing repeated factors.
struct Scores {
    gate: Gate,
    bs: usize,
    /// Exclusive cumulative gate: row i0 of it is the pivot of the block starting at i0.
    pivots: Option<ValueId>,
    cache: HashMap<(ValueId, Option<ValueId>, usize, usize, bool), ValueId>,
}

impl Scores {
    /// Rows of block `i` of `x`, scaled by exp of the same rows of the gate `g`.
    fn decayed(&mut self, b: &mut Builder, x: ValueId, g: Option<ValueId>, i: usize) -> ValueId {
        let xi = b.rows(x, i * self.bs, self.bs);
        match g {
            None => xi,
            Some(g) => {
                let gi = b.rows(g, i * self.bs, self.bs);
                let e = exp_f32(b, gi);
                b.mul(xi, e)
            }
        }
    }

    /// `acc + sum_{j <= i} scores(x, y)[i, j] @ z[j]` over the blocks `z` holds so far.
    /// `whole`: the tile whose row blocks `z` are. With per-channel gates the blocks before
    /// `i` then go as one product each way (the re-centred factors of rows `0 .. i bs` against
    /// block `i`, times those rows of `whole`) instead of two small matmuls per block: the
    /// same terms, in fewer and larger matmuls.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        b: &mut Builder,
        x: (ValueId, Option<ValueId>),
        y: (ValueId, Option<ValueId>),
        (z, whole): (&[ValueId], Option<ValueId>),
        i: usize,
        strict: bool,
        mut acc: ValueId,
    ) -> ValueId {
        if let (Gate::Vector, Some(whole), (xv, Some(gx)), (yv, Some(gy))) = (self.gate, whole, x, y) {
            if i >= 2 && z.len() > i {
                let xt = self.factor(b, xv, gx, i, i, true);
                let yt = self.factor_span(b, yv, gy, i * self.bs, i);
                let s = b.dot(xt, yt, false, true, None);
                let zs = b.rows(whole, 0, i * self.bs);
                acc = b.dot(s, zs, false, false, Some(acc));
                let s = self.scores(b, x, y, i, i, strict);
                return b.dot(s, z[i], false, false, Some(acc));
            }
        }
        for (j, &zj) in z.iter().enumerate().take(i + 1) {
            let s = self.scores(b, x, y, i, j, strict);
            acc = b.dot(s, zj, false, false, Some(acc));
        }
        acc
    }

    /// Block (i, j) of `scores(X, gX, Y, gY)`, j <= i; `strict` masks the diagonal of i == j.
    fn scores(
        &mut self,
        b: &mut Builder,
        (x, gx): (ValueId, Option<ValueId>),
        (y, gy): (ValueId, Option<ValueId>),
        i: usize,
        j: usize,
        strict: bool,
    ) -> ValueId {
        let bs = self.bs;
        let xi = b.rows(x, i * bs, bs);
        let yj = b.rows(y, j * bs, bs);
        let diag = i == j;
        match (self.gate, gx, gy) {
            (Gate::Vector, Some(gx), Some(gy)) => {
                if diag {
                    let gxi = b.rows(gx, i * bs, bs);
                    let gyi = b.rows(gy, i * bs, bs);
                    return b.gated_dot(xi, gxi, yj, gyi, strict);
                }
                // Re-centre on the pivot P = B before block i's first token:
                // x_i e^{gx_i - P} (<= 1) times y_j e^{P - gy_j} (<= 1, j in an earlier block).
                let xt = self.factor(b, x, gx, i, i, true);
                let yt = self.factor(b, y, gy, j, i, false);
                b.dot(xt, yt, false, true, None)
            }
            (Gate::Scalar, Some(gx), Some(gy)) => {
                let s = b.dot(xi, yj, false, true, None);
                let gxi = b.rows(gx, i * bs, bs);
                let gyj = b.rows(gy, j * bs, bs);
                let gyt = b.transpose(gyj);
                let mut e = b.sub(gxi, gyt);
                if diag {
                    e = b.mask(e, MaskKind::Tril { strict }, f64::NEG_INFINITY);
                }
                let w = exp_f32(b, e);
                b.mul(s, w)
            }
            _ => {
                let s = b.dot(xi, yj, false, true, None);
                if diag {
                    b.mask(s, MaskKind::Tril { strict }, 0.0)
                } else {
                    s
                }
            }
        }
    }

    /// Rows `0 .. n` of `x` times exp(P - g), P the pivot of block `at` (rows before it).
    fn factor_span(&mut self, b: &mut Builder, x: ValueId, g: ValueId, n: usize, at: usize) -> ValueId {
        let pivot = b.rows(self.pivots.expect("vector gates have pivots"), at * self.bs, 1);
        let xb = b.rows(x, 0, n);
        let gb = b.rows(g, 0, n);
        let e = b.sub(pivot, gb);
        let e = exp_f32(b, e);
        b.mul(xb, e)
    }

    /// Block `blk` of `x` times exp(g - P) (`ahead`) or exp(P - g), where P is the pivot of
    /// block `at` (the cumulative gate before its first token).
    fn factor(&mut self, b: &mut Builder, x: ValueId, g: ValueId, blk: usize, at: usize, ahead: bool) -> ValueId {
        let key = (x, Some(g), blk, at, ahead);
        if let Some(v) = self.cache.get(&key) {
            return *v;
        }
        let pivot = b.rows(self.pivots.expect("vector gates have pivots"), at * self.bs, 1);
        let xb = b.rows(x, blk * self.bs, self.bs);
        let gb = b.rows(g, blk * self.bs, self.bs);
        let e = if ahead { b.sub(gb, pivot) } else { b.sub(pivot, gb) };
        let e = exp_f32(b, e);
        let v = b.mul(xb, e);
        self.cache.insert(key, v);
        v
    }
}
