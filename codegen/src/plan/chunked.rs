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
//!
//! A transition of rank R has one R (and A, Bv) per term; the terms' values couple through
//! the blocks `scores(Bv_r, Bex, A_r', Bin)`, all strictly lower triangular (a token's values
//! read the state before it), and each diagonal block's R x R system is eliminated term by
//! term ([`Elimination`]). A value-side gate `D_t` (`S_t = A_t S_(t-1) D_t + ...`) decays
//! every value column from token j to token i by its own cumulative log `V`: the products
//! with VW become `sum_j A[i, j] VW[j, c] e^(V_i,c - V_j,c)`, re-centred per block like the
//! key side ([`value_gated`]), and S0's columns and each write's value decay to the chunk's
//! end.

use super::{PlanError, Schedule, Shape};
use crate::builder::Builder;
use crate::ir::*;
use crate::lower::{extra_state_base, state_base_tiled, token_base, v_offset, v_token_base, Lowerer, ParamLayout};
use chunkc_dsl::ast::{Expr, ExprKind, Rule, Ty};
use chunkc_dsl::canon::{mul, same, scalar_factor, Canonical, Read};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    None,
    Scalar,
    Vector,
}

/// Builds the chunked kernel of a canonical rule: the fused program's single phase.
pub fn build(rule: &Rule, canon: &Canonical, shape: Shape, sched: Schedule) -> Result<Kernel, PlanError> {
    build_phase(rule, canon, shape, sched, Phase::Fused)
}

/// Which part of the chunked forward a kernel computes. Every phase runs the same chunk
/// algebra ([`ChunkTerms`]); where its entering state and its low-rank values come from, and
/// what it stores, decide what survives `Builder::finish`'s removal of unread values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One sequential pass: the state carried over the chunks, `o` stored, `hT` at the end.
    Fused,
    /// The split program's chunk-parallel prep for a low-rank transition (the delta class):
    /// the UT factors of every chunk, which do not depend on the state entering it. With
    /// `R = Ũ + W S0` (the solve is linear in S0), it stores W's rows into `chunk.w`
    /// `[B, T, H, K]` and Ũ's into `chunk.u` `[B, T, H, V]` (FLA's `w` and `u`).
    Factors,
    /// The split program's sequential state pass: stores the state entering every chunk
    /// into `chunk.h` `[B, NT, H, K, V]` and `hT` at the end; forms no output. A low-rank
    /// rule's R comes from the factors.
    States,
    /// The split program's chunk-parallel output pass: each chunk reads its entering state
    /// from `chunk.h` (and a low-rank rule's factors) and stores its rows of `o`; no state
    /// leaves the chunk.
    Outputs,
    /// The fused phase that also stores the state entering every chunk into `chunk.h`: the
    /// forward of a backward program, which reads those states back.
    FusedWithStates,
}

impl Phase {
    /// The phase's name, with its kind: `factors (chunk-parallel)`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fused => "fused (sequential)",
            Phase::Factors => "factors (chunk-parallel)",
            Phase::States => "states (sequential)",
            Phase::Outputs => "outputs (chunk-parallel)",
            Phase::FusedWithStates => "fused, storing the chunks' states (sequential)",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Phase::Fused => "",
            Phase::Factors => "_factors",
            Phase::States => "_states",
            Phase::Outputs => "_outputs",
            Phase::FusedWithStates => "_with_states",
        }
    }
}

/// The split program's phases for `canon`: the UT factors first when the transition has a
/// low-rank part.
pub fn split_phases(canon: &Canonical) -> Vec<Phase> {
    let factors = (!canon.low_rank.is_empty()).then_some(Phase::Factors);
    factors.into_iter().chain([Phase::States, Phase::Outputs]).collect()
}

/// Name of the chunk-boundary states tensor of the split program (`h` in FLA). Not an
/// identifier, so no rule input can take it.
pub const BOUNDARY_STATES: &str = "chunk.h";
/// The UT factors of the split program's low-rank rules, per token: W `[B, T, H, K]` and Ũ
/// `[B, T, H, V]` (FLA's `w` and `u`), one pair per low-rank term.
pub const FACTOR_W: &str = "chunk.w";
pub const FACTOR_U: &str = "chunk.u";

/// The names of the UT factors of low-rank term `r` (counted from 0): `chunk.w` and `chunk.u`
/// for the first, `chunk.w2` and `chunk.u2` for the second, ...
pub fn factor_names(r: usize) -> (String, String) {
    match r {
        0 => (FACTOR_W.to_string(), FACTOR_U.to_string()),
        _ => (format!("{FACTOR_W}{}", r + 1), format!("{FACTOR_U}{}", r + 1)),
    }
}

/// Builds one phase of the chunked forward.
pub fn build_phase(
    rule: &Rule,
    canon: &Canonical,
    shape: Shape,
    sched: Schedule,
    phase: Phase,
) -> Result<Kernel, PlanError> {
    build_phase_storing(rule, canon, shape, sched, phase, 1)
}

/// [`build_phase`], where [`Phase::FusedWithStates`] stores the state entering every
/// `boundary_every`-th chunk only (chunk `m * boundary_every` to slot `m` of `chunk.h`, which
/// then has `ceil(T / (C * boundary_every))` slots): the chunked backward that recomputes the
/// states in between.
pub fn build_phase_storing(
    rule: &Rule,
    canon: &Canonical,
    shape: Shape,
    sched: Schedule,
    phase: Phase,
    boundary_every: usize,
) -> Result<Kernel, PlanError> {
    let c = sched.chunk;
    if c == 0 || boundary_every == 0 {
        return Err(PlanError("the chunk size and the chunks between stored states must be at least 1".into()));
    }
    if phase == Phase::Factors && canon.low_rank.is_empty() {
        return Err(PlanError("internal error: UT factors of a rule without a low-rank transition".into()));
    }
    // V-tiles (the schedule's BV): only the V-side addressing changes ([`super::vtile`]). The
    // factors do not depend on the state, so their phase covers the whole V: W is K-wide and
    // would otherwise be computed (and written) once per V-tile.
    let sched = if phase == Phase::Factors { sched.with_bv(None) } else { sched };
    let vtiles = super::vtile::vtiles(rule, &shape, sched.bv, false)?;
    let suffix = sched.bv.map(|bv| format!("_bv{bv}")).unwrap_or_default();
    let every = if boundary_every > 1 { format!("_every{boundary_every}") } else { String::new() };
    let mut b = Builder::new(format!("{}_chunked_c{c}{suffix}{}{every}", rule.name, phase.suffix()));
    b.set_vtiles(vtiles);
    let layout = ParamLayout::declare(&mut b, rule);
    let n_chunks = Idx::var(IdxVar::SeqLen).ceil_div(c as i64);
    let split = !matches!(phase, Phase::Fused | Phase::FusedWithStates);
    let carried = Carried {
        shape,
        chunk: c,
        bv: sched.bv,
        columns: canon.columns.iter().map(|x| x.state).collect(),
        boundary_every,
    };
    match phase {
        Phase::Fused | Phase::States | Phase::FusedWithStates => {
            let h0 = carried.load_entering(&mut b, &layout);
            let s0 = b.begin_loop(n_chunks, &[h0])[0];
            if phase != Phase::Fused {
                carried.store_boundary(&mut b, rule, s0);
            }
            let mut terms = ChunkTerms::new(&mut b, &layout, rule, canon, shape, sched, Idx::var(IdxVar::Iter))?;
            let o = (phase != Phase::States).then_some(layout.o);
            let r = terms.blocks(&mut b, s0, split, o)?;
            let s_next = terms.next_state(&mut b, s0, &r);
            let last = b.end_loop(&[s_next]);
            carried.store_final(&mut b, &layout, last[0]);
        }
        Phase::Outputs => {
            b.set_chunk_parallel();
            b.begin_loop(n_chunks, &[]);
            let s0 = carried.load_boundary(&mut b, rule, Idx::var(IdxVar::Iter));
            let mut terms = ChunkTerms::new(&mut b, &layout, rule, canon, shape, sched, Idx::var(IdxVar::Iter))?;
            // The state leaving the chunk is the next chunk's business (read from `chunk.h`).
            terms.blocks(&mut b, s0, true, Some(layout.o))?;
            b.end_loop(&[]);
        }
        Phase::Factors => {
            b.set_chunk_parallel();
            b.begin_loop(n_chunks, &[]);
            let mut terms = ChunkTerms::new(&mut b, &layout, rule, canon, shape, sched, Idx::var(IdxVar::Iter))?;
            terms.store_factors(&mut b);
            b.end_loop(&[]);
        }
    }
    Ok(b.finish())
}

/// The state a chunked kernel carries from chunk to chunk: this grid point's columns of S,
/// then one column per extra `[K]` state ([`chunkc_dsl::canon::Column`]); where it enters
/// and leaves the sequence (`h0`/`hT`, `<name>0`/`<name>T`) and the chunk boundaries
/// (`chunk.h`, `chunk.<name>`).
pub(super) struct Carried {
    pub(super) shape: Shape,
    pub(super) chunk: usize,
    pub(super) bv: Option<usize>,
    /// The extra states that are columns, as indices into `Rule::states`, in column order.
    pub(super) columns: Vec<usize>,
    /// Chunks per slot of `chunk.h`: [`Carried::store_boundary`] stores the state entering
    /// every this-many-th chunk (1: every chunk), and the slots are addressed in units of
    /// `chunk * boundary_every` tokens.
    pub(super) boundary_every: usize,
}

impl Carried {
    fn cols(&self) -> usize {
        self.bv.unwrap_or(self.shape.v)
    }

    /// Its columns of S from `param` at `base` (row stride V), the columns after them from
    /// `column(b, j)` (a `[1, K]` tile each).
    fn gather(
        &self,
        b: &mut Builder,
        param: usize,
        base: Idx,
        mut column: impl FnMut(&mut Builder, usize) -> ValueId,
    ) -> ValueId {
        let (k, v) = (self.shape.k, self.shape.v);
        let s = b.load(param, base, v as i64, 1, k, self.cols(), Idx::c(k as i64));
        if self.columns.is_empty() {
            return s;
        }
        let mut parts = vec![s];
        for j in 0..self.columns.len() {
            let n = column(b, j);
            parts.push(b.transpose(n));
        }
        side_by_side(b, &parts)
    }

    /// Stores `x` to `param` at `base` (its S part) and each column through `column(b, j, n)`
    /// (`n` a `[1, K]` tile).
    fn scatter(
        &self,
        b: &mut Builder,
        x: ValueId,
        param: usize,
        base: Idx,
        column: impl FnMut(&mut Builder, usize, ValueId),
    ) {
        self.scatter_rows(b, x, param, base, Idx::c(self.shape.k as i64), column)
    }

    /// [`Carried::scatter`] storing `rows` rows of S (the columns' stores are `column`'s).
    fn scatter_rows(
        &self,
        b: &mut Builder,
        x: ValueId,
        param: usize,
        base: Idx,
        rows: Idx,
        mut column: impl FnMut(&mut Builder, usize, ValueId),
    ) {
        let v = self.shape.v;
        if self.columns.is_empty() {
            b.store(x, param, base, v as i64, 1, rows);
            return;
        }
        // One transpose of the whole: S's part back, the columns as the [1, K] rows they are.
        let t = b.transpose(x);
        let s = b.rows(t, 0, self.cols());
        let s = b.transpose(s);
        b.store(s, param, base, v as i64, 1, rows);
        for j in 0..self.columns.len() {
            let n = b.rows(t, self.cols() + j, 1);
            column(b, j, n);
        }
    }

    /// The carried state from per-head tensors: S's part from `s_name` (`[B, H, K, V]`), each
    /// column from `name(state)` (`[B, H, K]`), read only when `column_rows` is 1 (zeros when
    /// it is 0).
    pub(super) fn load_named(
        &self,
        b: &mut Builder,
        rule: &Rule,
        s_name: &str,
        name: impl Fn(&chunkc_dsl::ast::StateDecl) -> String,
        column_rows: Idx,
    ) -> ValueId {
        let s = b.param(s_name, Access::Read);
        let params: Vec<usize> = self.columns.iter().map(|&i| b.param(name(&rule.states[i]), Access::Read)).collect();
        let (base, k) = (extra_state_base(&self.shape, Ty::VecK, self.bv).0, self.shape.k);
        self.gather(b, s, state_base_tiled(&self.shape, self.bv), |b, j| {
            b.load(params[j], base.clone(), 0, 1, 1, k, column_rows.clone())
        })
    }

    /// Stores the carried state `x` to per-head tensors named as for [`Carried::load_named`],
    /// each column at `column_base` of its tensor.
    pub(super) fn store_named(
        &self,
        b: &mut Builder,
        rule: &Rule,
        x: ValueId,
        s_name: &str,
        name: impl Fn(&chunkc_dsl::ast::StateDecl) -> String,
        column_base: Idx,
    ) {
        let s = b.param(s_name, Access::Write);
        let params: Vec<usize> = self.columns.iter().map(|&i| b.param(name(&rule.states[i]), Access::Write)).collect();
        self.scatter(b, x, s, state_base_tiled(&self.shape, self.bv), |b, j, n| {
            b.store(n, params[j], column_base.clone(), 0, 1, Idx::c(1))
        });
    }

    /// The state entering the sequence (`h0`, each `<name>0`).
    pub(super) fn load_entering(&self, b: &mut Builder, layout: &ParamLayout) -> ValueId {
        let (base, k) = (extra_state_base(&self.shape, Ty::VecK, self.bv).0, self.shape.k);
        let base = &base;
        self.gather(b, layout.h0, state_base_tiled(&self.shape, self.bv), |b, j| {
            b.load(layout.extras[self.columns[j]].0, base.clone(), 0, 1, 1, k, Idx::c(1))
        })
    }

    /// The state leaving the sequence (`hT`, each `<name>T`).
    pub(super) fn store_final(&self, b: &mut Builder, layout: &ParamLayout, x: ValueId) {
        let base = extra_state_base(&self.shape, Ty::VecK, self.bv).0;
        self.scatter(b, x, layout.ht, state_base_tiled(&self.shape, self.bv), |b, j, n| {
            b.store(n, layout.extras[self.columns[j]].1, base.clone(), 0, 1, Idx::c(1))
        });
    }

    /// Index of this grid point's column state entering chunk `index` in `chunk.<name>`
    /// `[B, NT, H, K]`; with `tiles` > 1, in a tensor with a column per V-tile (`[B, NT, H, NV, K]`): where
    /// the columns differ from tile to tile (their adjoints).
    fn column_base(&self, index: Idx, tiles: usize) -> Idx {
        let n_chunks = Idx::var(IdxVar::SeqLen).ceil_div(self.slot_tokens() as i64);
        let slot = Idx::var(IdxVar::Batch).mul(n_chunks).add(index);
        let head = slot.mul(Idx::c(self.shape.heads as i64)).add(Idx::var(IdxVar::Head));
        let column = match tiles {
            1 => head,
            n => head.mul(Idx::c(n as i64)).add(Idx::var(IdxVar::VTile)),
        };
        column.mul(Idx::c(self.shape.k as i64))
    }

    /// Tokens per slot of `chunk.h`.
    fn slot_tokens(&self) -> usize {
        self.chunk * self.boundary_every
    }

    /// Stores the state entering chunk `Iter` to `chunk.h` (and `chunk.<name>`): to slot
    /// `Iter`, or with `boundary_every` = m > 1 to slot `Iter / m` when m divides `Iter`
    /// (other chunks store no rows).
    pub(super) fn store_boundary(&self, b: &mut Builder, rule: &Rule, x: ValueId) {
        let (slot, keep) = match self.boundary_every as i64 {
            1 => (Idx::var(IdxVar::Iter), Idx::c(1)),
            m => {
                // floor(Iter / m), and 1 when Iter is a multiple of m, else 0.
                let slot = Idx::var(IdxVar::Iter).add(Idx::c(1)).ceil_div(m).sub(Idx::c(1));
                let rest = Idx::var(IdxVar::Iter).sub(slot.clone().mul(Idx::c(m)));
                (slot, Idx::c(1).sub(rest.min(Idx::c(1))))
            }
        };
        self.store_slot(b, rule, x, (BOUNDARY_STATES, 1), slot, keep);
    }

    /// Stores `x` to slot `slot` of the per-chunk tensor `tensor` (`chunk.h`, or another of
    /// its shape) and its columns to `<tensor>.<name>` (a column per V-tile when
    /// `column_tiles` > 1), when `keep` is 1 (no rows when 0).
    pub(super) fn store_slot(
        &self,
        b: &mut Builder,
        rule: &Rule,
        x: ValueId,
        (tensor, column_tiles): (&str, usize),
        slot: Idx,
        keep: Idx,
    ) {
        let h = b.param(tensor, Access::Write);
        let params: Vec<usize> =
            self.columns.iter().map(|&i| b.param(slot_column(tensor, &rule.states[i].name), Access::Write)).collect();
        let base = self.column_base(slot.clone(), column_tiles);
        let rows = keep.clone().mul(Idx::c(self.shape.k as i64));
        let at = boundary_base_at(&self.shape, self.slot_tokens(), self.bv, slot);
        self.scatter_rows(b, x, h, at, rows, |b, j, n| b.store(n, params[j], base.clone(), 0, 1, keep.clone()));
    }

    /// The state entering chunk `index`, from `chunk.h` (and `chunk.<name>`).
    pub(super) fn load_boundary(&self, b: &mut Builder, rule: &Rule, index: Idx) -> ValueId {
        self.load_slot(b, rule, (BOUNDARY_STATES, 1), index)
    }

    /// Slot `index` of the per-chunk tensor `tensor` and its columns (as [`Carried::store_slot`]).
    pub(super) fn load_slot(
        &self,
        b: &mut Builder,
        rule: &Rule,
        (tensor, column_tiles): (&str, usize),
        index: Idx,
    ) -> ValueId {
        let h = b.param(tensor, Access::Read);
        let params: Vec<usize> =
            self.columns.iter().map(|&i| b.param(slot_column(tensor, &rule.states[i].name), Access::Read)).collect();
        let base = self.column_base(index.clone(), column_tiles);
        let k = self.shape.k;
        self.gather(b, h, boundary_base_at(&self.shape, self.slot_tokens(), self.bv, index), |b, j| {
            b.load(params[j], base.clone(), 0, 1, 1, k, Idx::c(1))
        })
    }
}

/// The column of the UT factor `factor` (`chunk.u`, ...) for the extra state `name`
/// (`[B, T, H]`): the factor's value columns run on into the state's column.
pub fn factor_column(factor: &str, name: &str) -> String {
    format!("{factor}.{name}")
}

/// The chunk-boundary tensor of the extra state `name` (`[B, NT, H, K]`), next to `chunk.h`.
pub fn boundary_column(name: &str) -> String {
    slot_column(BOUNDARY_STATES, name)
}

/// The column tensor of extra state `name` beside the per-chunk tensor `tensor`.
pub fn slot_column(tensor: &str, name: &str) -> String {
    format!("{tensor}.{name}")
}

/// The inputs `e` reads, each once, in order.
fn inputs_of(e: &Expr) -> Vec<usize> {
    let mut found = vec![];
    let mut stack = vec![e];
    while let Some(x) = stack.pop() {
        if let ExprKind::Input(i) = x.kind {
            if !found.contains(&i) {
                found.push(i);
            }
        }
        stack.extend(x.children());
    }
    found.sort();
    found
}

/// `parts` (one row count) side by side: their columns in order.
fn side_by_side(b: &mut Builder, parts: &[ValueId]) -> ValueId {
    let transposed: Vec<ValueId> = parts.iter().map(|&p| b.transpose(p)).collect();
    let stacked = b.concat(&transposed);
    b.transpose(stacked)
}

/// Columns `start .. start + len` of `x`.
fn columns(b: &mut Builder, x: ValueId, start: usize, len: usize) -> ValueId {
    split_columns(b, x, &[(start, len)])[0]
}

/// Several column ranges `(start, len)` of `x`, transposing it once.
fn split_columns(b: &mut Builder, x: ValueId, ranges: &[(usize, usize)]) -> Vec<ValueId> {
    let t = b.transpose(x);
    ranges
        .iter()
        .map(|&(start, len)| {
            let r = b.rows(t, start, len);
            b.transpose(r)
        })
        .collect()
}

/// Index of this grid point's state in slot `index` of `chunk.h` `[B, NT, H, K, V]` (a slot
/// per `chunk` tokens), at its first V column.
pub(super) fn boundary_base_at(shape: &Shape, chunk: usize, bv: Option<usize>, index: Idx) -> Idx {
    let n_chunks = Idx::var(IdxVar::SeqLen).ceil_div(chunk as i64);
    let kv = (shape.k * shape.v) as i64;
    let slot = Idx::var(IdxVar::Batch).mul(n_chunks).add(index);
    let base = slot.mul(Idx::c(shape.heads as i64)).add(Idx::var(IdxVar::Head)).mul(Idx::c(kv));
    match bv {
        Some(_) => base.add(v_offset(bv)),
        None => base,
    }
}

/// One chunk's canonical vectors and gates (of the chunk its index names: iteration `Iter`
/// of the chunk loop in the forward), and the pieces of the chunk algebra built from them:
/// the low-rank values R, the output rows, the state leaving the chunk, the UT factors.
pub(super) struct ChunkTerms {
    shape: Shape,
    sched: Schedule,
    gate: Gate,
    bs: usize,
    nb: usize,
    t0: Idx,
    valid: Idx,
    q: ValueId,
    /// Write terms (key, value) other than the one folded into the solve.
    writes: Vec<(ValueId, ValueId)>,
    /// Their values, block by block.
    vw_blocks: Vec<Vec<ValueId>>,
    /// For each low-rank term, the value of the write folded into its solve (its key is
    /// the term's `a`).
    merged_vw: Vec<Option<ValueId>>,
    /// The low-rank terms: `a`, and `b` with whether it is gated inclusively.
    low_rank: Vec<(ValueId, (ValueId, bool))>,
    coef: Option<ValueId>,
    extra: Option<ValueId>,
    read_before: bool,
    bin: Option<ValueId>,
    bex: Option<ValueId>,
    /// The value-side gate's cumulative logs (inclusive, exclusive; f64, `[C, BV]`).
    vgates: Option<(ValueId, ValueId)>,
    sc: Scores,
    /// The elimination of each diagonal block's coupled solve, formed once (the factors' two
    /// solves share it).
    diagonal: HashMap<usize, Elimination>,
    /// The rule inputs the prologue loaded (input index, the chunk's tile).
    pub(super) loads: Vec<(usize, ValueId)>,
    /// Each output block formed (its first row in the chunk, its value), in order.
    pub(super) outputs: Vec<(usize, ValueId)>,
    /// Whether output blocks are stored (else only collected in `outputs`).
    pub(super) store_outputs: bool,
    /// The extra states carried as columns after S's, by name.
    columns: Vec<String>,
    /// The output as a function of the state reads (`Output::epilogue`), with what lowering
    /// it block by block needs; the value side is then `cols` columns of S followed by one
    /// per extra column.
    epilogue: Option<Epilogue>,
}

/// An output epilogue and its lowering context.
struct Epilogue {
    rule: Rule,
    layout: ParamLayout,
    expr: Expr,
    /// Columns of S per grid point (V or the V-tile's BV); the extra columns follow.
    cols: usize,
}

impl ChunkTerms {
    /// The prologue: every canonical vector for the chunk's tokens (zero past the sequence
    /// end) and the cumulative gates (f64).
    pub(super) fn new(
        b: &mut Builder,
        layout: &ParamLayout,
        rule: &Rule,
        canon: &Canonical,
        shape: Shape,
        sched: Schedule,
        index: Idx,
    ) -> Result<ChunkTerms, PlanError> {
        let c = sched.chunk;
        let gate = match &canon.log_gate {
            None => Gate::None,
            Some(g) if g.ty == Ty::VecK => Gate::Vector,
            Some(_) => Gate::Scalar,
        };
        if canon.log_vgate.is_some() && !canon.low_rank.is_empty() {
            return Err(PlanError(
                "a value-side gate together with a low-rank transition is not chunked yet; use the recurrent backend"
                    .into(),
            ));
        }
        // Per-channel gates (either side) are re-centred block by block.
        let per_channel = gate == Gate::Vector || canon.log_vgate.is_some();
        let bs = if per_channel { sched.sub_chunk.clamp(1, c) } else { c };
        if !c.is_multiple_of(bs) {
            return Err(PlanError(format!("the sub-chunk ({bs}) must divide the chunk ({c})")));
        }
        let t0 = index.mul(Idx::c(c as i64));
        let valid = Idx::c(c as i64).min(Idx::var(IdxVar::SeqLen).sub(t0.clone()));
        let mut lw = Lowerer::new(rule, shape, layout, c, t0.clone(), valid.clone());
        lw.input_elem = sched.input;
        lw.bv = sched.bv;
        let mut pro = Prologue { lw: &mut lw, rows: c, valid: valid.clone() };

        let g = match &canon.log_gate {
            Some(e) => {
                let g = pro.tile(b, e, true)?;
                Some(b.cast(g, DType::F64))
            }
            None => None,
        };
        let vg = match &canon.log_vgate {
            Some(e) => {
                let g = pro.tile(b, e, true)?;
                Some(b.cast(g, DType::F64))
            }
            None => None,
        };
        let q = pro.tile(b, &canon.output.query, true)?;
        // A write whose key is the low-rank vector `a` (DeltaNet, Gated DeltaNet, KDA: both
        // are k) is folded into the solve: with U = R + VW the system becomes
        // (I - A_ba) U = VW + (b ⊙ e^Bex) S0 + ..., and U replaces R in the output and the
        // state. U is the small pseudo-value beta (v - S^T k) (DESIGN form (c)); keeping R and
        // VW apart would sum two chunk-sized terms that cancel, losing f32 precision.
        // Each low-rank term takes at most one write, and each write goes to one term.
        let mut merged: Vec<Option<usize>> = vec![];
        for (a, _) in &canon.low_rank {
            let w = (0..canon.writes.len()).find(|&w| same(&canon.writes[w].0, a) && !merged.contains(&Some(w)));
            merged.push(w);
        }
        // Extra [K] states are columns of S: a column's write joins S's write with the same
        // key as one more value column, or stands alone with zeros in S's columns.
        let ncols = canon.columns.len();
        let cols = sched.bv.unwrap_or(shape.v);
        // A key that is S's times a scalar joins too, the scalar moved into the value
        // (`beta k` beside S's `k`): a write folded into a low-rank solve must stay in it, or
        // the column's pseudo-values cancel in f32 as S's would.
        let mut joined: Vec<Vec<Option<Expr>>> = vec![vec![None; ncols]; canon.writes.len()];
        let mut alone: Vec<(&Expr, usize, &Expr)> = vec![];
        for (j, col) in canon.columns.iter().enumerate() {
            for (kw, value) in &col.writes {
                let free = |w: &usize| joined[*w][j].is_none();
                let exact = canon.writes.iter().position(|(k, _)| same(k, kw)).filter(free);
                let scaled = || {
                    let (factor, core) = scalar_factor(kw);
                    let factor = factor?;
                    let w = canon.writes.iter().position(|(k, _)| same(k, &core)).filter(free)?;
                    Some((w, mul(value, &factor, value.span)))
                };
                match exact.map(|w| (w, value.clone())).or_else(scaled) {
                    Some((w, v)) => joined[w][j] = Some(v),
                    None => alone.push((kw, j, value)),
                }
            }
        }
        let widened = |b: &mut Builder, pro: &mut Prologue, s_part: ValueId, extra: &[Option<Expr>]| {
            if extra.is_empty() {
                return Ok::<_, PlanError>(s_part);
            }
            let mut parts = vec![s_part];
            for x in extra {
                parts.push(match x {
                    Some(e) => pro.tile(b, e, true)?,
                    None => b.constant(0.0, TileTy::f32(c, 1)),
                });
            }
            Ok(side_by_side(b, &parts))
        };
        let mut merged_vw = vec![None; canon.low_rank.len()];
        let mut writes: Vec<(ValueId, ValueId)> = vec![];
        for (w, (kw, vw)) in canon.writes.iter().enumerate() {
            let vw = pro.tile(b, vw, true)?;
            let vw = widened(b, &mut pro, vw, &joined[w])?;
            match merged.iter().position(|&m| m == Some(w)) {
                Some(r) => merged_vw[r] = Some(vw),
                None => writes.push((pro.tile(b, kw, true)?, vw)),
            }
        }
        for (kw, j, value) in alone {
            let mut extra = vec![None; ncols];
            extra[j] = Some(value.clone());
            let zeros = b.constant(0.0, TileTy::f32(c, cols));
            let vw = widened(b, &mut pro, zeros, &extra)?;
            writes.push((pro.tile(b, kw, true)?, vw));
        }
        // `b` reads the state after the token's own decay. When the decay is a factor of it
        // (b = w b', every gated delta rule), b' is gated inclusively, `b' e^Bin` for `b e^Bex`:
        // the same terms, without a tile of exponentials for b and with the other operands'
        // gate, whose factors the backends then share.
        let mut low_rank = vec![];
        for (r, (a, bv)) in canon.low_rank.iter().enumerate() {
            let decayed_b = canon.low_rank_decayed.get(r).and_then(|b| b.as_ref());
            let (bv, inclusive) = match decayed_b.filter(|_| canon.log_gate.is_some()) {
                Some(b2) => (b2, true),
                None => (bv, false),
            };
            low_rank.push((pro.tile(b, a, true)?, (pro.tile(b, bv, true)?, inclusive)));
        }
        let coef = canon.output.coef.as_ref().map(|e| pro.tile(b, e, false)).transpose()?;
        let extra = canon.output.extra.as_ref().map(|e| pro.tile(b, e, false)).transpose()?;
        // The epilogue is lowered block by block from the prologue's input tiles, so that
        // every input is loaded once and the backward sees every use of it.
        if let Some(e) = &canon.output.epilogue {
            for i in inputs_of(e) {
                pro.lw.input(b, i);
            }
        }

        let loads = lw.loaded_inputs();
        let gates = g.map(|g| (b.cumsum(g, false), b.cumsum(g, true)));
        let vgates = vg.map(|g| (b.cumsum(g, false), b.cumsum(g, true)));
        let (bin, bex) = (gates.map(|g| g.0), gates.map(|g| g.1));
        let sc = Scores { gate, bs, pivots: bex, cache: HashMap::new() };
        let nb = c / bs;
        let vw_blocks = writes.iter().map(|&(_, vw)| (0..nb).map(|j| b.rows(vw, j * bs, bs)).collect()).collect();
        Ok(ChunkTerms {
            shape,
            sched,
            gate,
            bs,
            nb,
            t0,
            valid,
            q,
            writes,
            vw_blocks,
            merged_vw,
            low_rank,
            coef,
            extra,
            read_before: canon.output.read == Read::Before,
            bin,
            bex,
            vgates,
            sc,
            diagonal: HashMap::new(),
            loads,
            outputs: vec![],
            store_outputs: true,
            columns: canon.columns.iter().map(|col| rule.states[col.state].name.clone()).collect(),
            epilogue: canon.output.epilogue.clone().map(|expr| Epilogue {
                rule: rule.clone(),
                layout: layout.clone(),
                expr,
                cols,
            }),
        })
    }

    /// `b`'s gate: inclusive when the decay is a factor of `b`, else exclusive.
    fn bv_gate(&self, inclusive: bool) -> Option<ValueId> {
        if inclusive {
            self.bin
        } else {
            self.bex
        }
    }

    /// Forward substitution for block `i` of the low-rank values X (one tile per term) in
    /// `X_r - sum_r' A_{b_r a_r'} X_r' = RHS_r`: given the blocks of X before `i` and the start
    /// of block `i` of each RHS, the off-diagonal terms `sum_{j<i} A[i,j] X_j` (and, with
    /// `writes`, `sum_{j<=i} A_bk[i,j] VW_j`) go into the right sides, and the diagonal block's
    /// coupled system is solved by block elimination ([`Elimination`]; one unit-lower solve
    /// at rank 1).
    fn solve_block(
        &mut self,
        b: &mut Builder,
        x_blocks: &[Vec<ValueId>],
        i: usize,
        starts: Vec<ValueId>,
        writes: bool,
    ) -> Vec<ValueId> {
        let terms = self.low_rank.clone();
        let mut rhs = vec![];
        for (r, (&(_, (bv, inclusive)), start)) in terms.iter().zip(starts).enumerate() {
            let bg = (bv, self.bv_gate(inclusive));
            let mut acc = start;
            for (&(a, _), xs) in terms.iter().zip(x_blocks) {
                acc = self.sc.apply(b, bg, (a, self.bin), (xs, None), i, true, acc);
            }
            if writes {
                acc = self.add_writes_rhs(b, r, i, acc);
            }
            rhs.push(acc);
        }
        let elim = match self.diagonal.get(&i) {
            Some(e) => e.clone(),
            None => {
                let mut blocks = vec![];
                for &(_, (bv, inclusive)) in &terms {
                    let bg = (bv, self.bv_gate(inclusive));
                    let row: Vec<ValueId> =
                        terms.iter().map(|&(a, _)| self.sc.scores(b, bg, (a, self.bin), i, i, true)).collect();
                    blocks.push(row);
                }
                let e = Elimination::new(b, blocks);
                self.diagonal.insert(i, e.clone());
                e
            }
        };
        elim.solve(b, rhs)
    }

    /// `acc + sum_{j<=i} A_bk[i,j] VW_j` over the writes not folded into a solve, for the
    /// low-rank term `r`: block `i` of the part of its right side that comes from the chunk's
    /// own values.
    fn add_writes_rhs(&mut self, b: &mut Builder, r: usize, i: usize, acc: ValueId) -> ValueId {
        let (_, (bv, inclusive)) = self.low_rank[r];
        let bg = (bv, self.bv_gate(inclusive));
        let mut rhs = acc;
        for (&(kw, vw), vws) in self.writes.iter().zip(&self.vw_blocks) {
            rhs = self.sc.apply(b, bg, (kw, self.bin), (vws, Some(vw)), i, true, rhs);
        }
        rhs
    }

    /// The chunk's blocks in order, each in the order the fused kernel forms it: the
    /// output's term from `s0`, the block's low-rank values R (solved here with `s0`, or, with
    /// `from_factors`, formed as `U~ + W S0` from the factors the split program's prep
    /// stored), then the rest of the output, stored to `o_param` when given. Returns R's
    /// blocks (empty without a low-rank transition; the pseudo-values U = R + VW when a write
    /// is folded in) for the state update.
    pub(super) fn blocks(
        &mut self,
        b: &mut Builder,
        s0: ValueId,
        from_factors: bool,
        o_param: Option<usize>,
    ) -> Result<Vec<Vec<ValueId>>, PlanError> {
        let bs = self.bs;
        let bq = if self.read_before { self.bex } else { self.bin };
        let factors = (from_factors && !self.low_rank.is_empty()).then(|| self.load_factors(b));
        let mut r_blocks: Vec<Vec<ValueId>> = vec![vec![]; self.low_rank.len()];
        for i in 0..self.nb {
            let i0 = i * bs;
            let o = o_param.map(|_| {
                let qg = self.sc.decayed(b, self.q, bq, i);
                let o = b.dot(qg, s0, false, false, None);
                match self.vgates {
                    // ... then the value side's decay from the chunk start, column by column.
                    Some((vin, vex)) => {
                        let vq = b.rows(if self.read_before { vex } else { vin }, i0, bs);
                        let e = exp_f32(b, vq);
                        b.mul(o, e)
                    }
                    None => o,
                }
            });
            if !self.low_rank.is_empty() {
                let xs: Vec<ValueId> = match &factors {
                    Some(f) => f
                        .iter()
                        .map(|&(w, u)| {
                            let (wi, ui) = (b.rows(w, i0, bs), b.rows(u, i0, bs));
                            b.dot(wi, s0, false, false, Some(ui))
                        })
                        .collect(),
                    None => {
                        // rhs_i = bg_i S0 + (the folded values) + sum_{j<=i} A_bk[i,j] VW_j
                        let mut starts = vec![];
                        for r in 0..self.low_rank.len() {
                            let (_, (bv, inclusive)) = self.low_rank[r];
                            let bg = self.sc.decayed(b, bv, self.bv_gate(inclusive), i);
                            let merged_i = self.merged_vw[r].map(|vw| b.rows(vw, i0, bs));
                            starts.push(b.dot(bg, s0, false, false, merged_i));
                        }
                        self.solve_block(b, &r_blocks, i, starts, true)
                    }
                };
                for (blocks, x) in r_blocks.iter_mut().zip(xs) {
                    blocks.push(x);
                }
            }
            if let (Some(o), Some(o_param)) = (o, o_param) {
                self.finish_output(b, o_param, o, i, &r_blocks)?;
            }
        }
        Ok(r_blocks)
    }

    /// The UT factors, stored row by row: W solves `(I - A_ba) W = Bv ⊙ e^Bg` (the coefficient
    /// of S0) and Ũ the S0-free right side, so that R = Ũ + W S0; one pair per low-rank term.
    fn store_factors(&mut self, b: &mut Builder) {
        let (bs, n) = (self.bs, self.low_rank.len());
        let (mut w_blocks, mut u_blocks) = (vec![vec![]; n], vec![vec![]; n]);
        for i in 0..self.nb {
            let mut starts = vec![];
            for r in 0..n {
                let (_, (bv, inclusive)) = self.low_rank[r];
                starts.push(self.sc.decayed(b, bv, self.bv_gate(inclusive), i));
            }
            let ws = self.solve_block(b, &w_blocks, i, starts, false);
            for (blocks, w) in w_blocks.iter_mut().zip(ws) {
                blocks.push(w);
            }
            let starts = (0..n)
                .map(|r| match self.merged_vw[r] {
                    Some(vw) => b.rows(vw, i * bs, bs),
                    None => b.constant(0.0, TileTy::f32(bs, self.shape.v + self.columns.len())),
                })
                .collect();
            let us = self.solve_block(b, &u_blocks, i, starts, true);
            for (blocks, u) in u_blocks.iter_mut().zip(us) {
                blocks.push(u);
            }
        }
        let v = self.shape.v;
        for r in 0..n {
            let (wname, uname) = factor_names(r);
            let pw = b.param(wname, Access::Write);
            let pu = b.param(uname.clone(), Access::Write);
            let pcols: Vec<usize> =
                self.columns.iter().map(|name| b.param(factor_column(&uname, name), Access::Write)).collect();
            for i in 0..self.nb {
                let i0 = i * bs;
                let at = self.t0.clone().add(Idx::c(i0 as i64));
                let valid = self.valid.clone().sub(Idx::c(i0 as i64));
                let (wbase, wstride) = token_base(&self.shape, at.clone(), self.shape.k);
                b.store(w_blocks[r][i], pw, wbase, wstride, 1, valid.clone());
                let u = u_blocks[r][i];
                let u_s = if pcols.is_empty() { u } else { columns(b, u, 0, v) };
                let (ubase, ustride) = v_token_base(&self.shape, at.clone(), self.sched.bv);
                b.store(u_s, pu, ubase, ustride, 1, valid.clone());
                for (j, &p) in pcols.iter().enumerate() {
                    let col = columns(b, u, v + j, 1);
                    let (base, stride) = token_base(&self.shape, at.clone(), 1);
                    b.store(col, p, base, stride, 1, valid.clone());
                }
            }
        }
    }

    /// The chunk's rows of W and Ũ of every low-rank term as the prep stored them (Ũ's columns
    /// of this V-tile).
    fn load_factors(&self, b: &mut Builder) -> Vec<(ValueId, ValueId)> {
        let (c, k) = (self.sched.chunk, self.shape.k);
        let cols = self.sched.bv.unwrap_or(self.shape.v);
        (0..self.low_rank.len())
            .map(|r| {
                let (wname, uname) = factor_names(r);
                let pw = b.param(wname, Access::Read);
                let pu = b.param(uname.clone(), Access::Read);
                let (wbase, wstride) = token_base(&self.shape, self.t0.clone(), k);
                let w = b.load(pw, wbase, wstride, 1, c, k, self.valid.clone());
                let (ubase, ustride) = v_token_base(&self.shape, self.t0.clone(), self.sched.bv);
                let u = b.load(pu, ubase, ustride, 1, c, cols, self.valid.clone());
                if self.columns.is_empty() {
                    return (w, u);
                }
                let mut parts = vec![u];
                for name in &self.columns {
                    let p = b.param(factor_column(&uname, name), Access::Read);
                    let (base, stride) = token_base(&self.shape, self.t0.clone(), 1);
                    parts.push(b.load(p, base, stride, 1, c, 1, self.valid.clone()));
                }
                (w, side_by_side(b, &parts))
            })
            .collect()
    }

    /// Adds block `i`'s intra-chunk terms to its output `o` (which holds the term from the
    /// entering state) and stores it.
    fn finish_output(
        &mut self,
        b: &mut Builder,
        o_param: usize,
        mut o: ValueId,
        i: usize,
        r_blocks: &[Vec<ValueId>],
    ) -> Result<(), PlanError> {
        let (bs, i0) = (self.bs, i * self.bs);
        let bq = if self.read_before { self.bex } else { self.bin };
        let sc = &mut self.sc;
        for (&(a, _), rs) in self.low_rank.iter().zip(r_blocks) {
            o = sc.apply(b, (self.q, bq), (a, self.bin), (&rs[..=i], None), i, self.read_before, o);
        }
        for (&(kw, vw), vws) in self.writes.iter().zip(&self.vw_blocks) {
            o = match self.vgates {
                Some(vgates) => value_gated(b, sc, (self.q, bq), (kw, self.bin), vws, vgates, (i, self.read_before), o),
                None => sc.apply(b, (self.q, bq), (kw, self.bin), (vws, Some(vw)), i, self.read_before, o),
            };
        }
        if let Some(cf) = self.coef {
            let cf = rows_of(b, cf, i0, bs);
            o = b.mul(o, cf);
        }
        if let Some(x) = self.extra {
            let x = rows_of(b, x, i0, bs);
            o = b.add(o, x);
        }
        if let Some(ep) = &self.epilogue {
            o = self.apply_epilogue(b, ep, o, i0)?;
        }
        self.outputs.push((i0, o));
        if self.store_outputs {
            let (obase, ostride) = v_token_base(&self.shape, self.t0.clone().add(Idx::c(i0 as i64)), self.sched.bv);
            b.store(o, o_param, obase, ostride, 1, self.valid.clone().sub(Idx::c(i0 as i64)));
        }
        Ok(())
    }

    /// The output rows `i0..` from their state reads `y` (S's columns, then each extra
    /// column's): the epilogue lowered for those tokens.
    fn apply_epilogue(&self, b: &mut Builder, ep: &Epilogue, y: ValueId, i0: usize) -> Result<ValueId, PlanError> {
        let rows = b.ty(y).rows;
        let at = self.t0.clone().add(Idx::c(i0 as i64));
        let valid = self.valid.clone().sub(Idx::c(i0 as i64));
        let mut lw = Lowerer::new(&ep.rule, self.shape, &ep.layout, rows, at, valid);
        lw.input_elem = self.sched.input;
        lw.bv = self.sched.bv;
        for &(i, tile) in &self.loads {
            let tile = if ep.rule.inputs[i].per_head { tile } else { b.rows(tile, i0, rows) };
            lw.reuse_input(i, tile);
        }
        let ranges: Vec<(usize, usize)> =
            std::iter::once((0, ep.cols)).chain((1..lw.reads.len()).map(|j| (ep.cols + j - 1, 1))).collect();
        for (slot, read) in lw.reads.iter_mut().zip(split_columns(b, y, &ranges)) {
            *slot = Some(read);
        }
        Ok(lw.tile(b, &ep.expr)?)
    }

    /// The state leaving the chunk.
    pub(super) fn next_state(&self, b: &mut Builder, s0: ValueId, r_blocks: &[Vec<ValueId>]) -> ValueId {
        let (bs, c) = (self.bs, self.sched.chunk);
        let mut s_next = s0;
        let total = self.bin.map(|bin| b.rows(bin, c - 1, 1));
        if let Some(total) = total {
            let d = exp_f32(b, total);
            let d = if self.gate == Gate::Vector { b.transpose(d) } else { d };
            s_next = b.mul(s0, d);
        }
        // The value side: S0's columns decay by the chunk's total, each write's value by
        // what follows it.
        let vtotal = self.vgates.map(|(vin, _)| b.rows(vin, c - 1, 1));
        if let Some(vt) = vtotal {
            let d = exp_f32(b, vt);
            s_next = b.mul(s_next, d);
        }
        for j in 0..self.nb {
            let decay = total.map(|total| {
                let bj = b.rows(self.bin.expect("gates"), j * bs, bs);
                let e = b.sub(total, bj);
                exp_f32(b, e)
            });
            let write = |b: &mut Builder, key: ValueId, val: ValueId, s: ValueId| {
                let kj = b.rows(key, j * bs, bs);
                let kj = match decay {
                    Some(d) => b.mul(kj, d),
                    None => kj,
                };
                b.dot(kj, val, true, false, Some(s))
            };
            for (&(kw, _), vws) in self.writes.iter().zip(&self.vw_blocks) {
                let vw = match (vtotal, self.vgates) {
                    (Some(vt), Some((vin, _))) => {
                        let vj = b.rows(vin, j * bs, bs);
                        let e = b.sub(vt, vj);
                        let e = exp_f32(b, e);
                        b.mul(vws[j], e)
                    }
                    _ => vws[j],
                };
                s_next = write(b, kw, vw, s_next);
            }
            for (&(a, _), rs) in self.low_rank.iter().zip(r_blocks) {
                if let Some(&rj) = rs.get(j) {
                    s_next = write(b, a, rj, s_next);
                }
            }
        }
        s_next
    }
}

/// `acc + sum_{j <= i} (scores(x, y)[i, j] @ z[j])` where the product also decays each value
/// column from token j to token i by the value-side gate: `o[r, c] = sum_s A[r, s] z[s, c]
/// e^(V_q[r, c] - V_in[s, c])` (`V_q` is the inclusive cumulative gate, or the exclusive one
/// with `strict`). The blocks before `i` are re-centred on the pivot P (the gate before block
/// i's first token): `e^(V_q - P)` after the sum and `e^(P - V_in)` on each value block, both
/// <= 1; the diagonal block is one pairwise gated product.
#[allow(clippy::too_many_arguments)]
fn value_gated(
    b: &mut Builder,
    sc: &mut Scores,
    x: (ValueId, Option<ValueId>),
    y: (ValueId, Option<ValueId>),
    z: &[ValueId],
    (vin, vex): (ValueId, ValueId),
    (i, strict): (usize, bool),
    acc: ValueId,
) -> ValueId {
    let (bs, i0) = (sc.bs, i * sc.bs);
    let vq = b.rows(if strict { vex } else { vin }, i0, bs);
    let pivot = b.rows(vex, i0, 1);
    let mut earlier: Option<ValueId> = None;
    for (j, &zj) in z.iter().enumerate().take(i) {
        let s = sc.scores(b, x, y, i, j, strict);
        let vj = b.rows(vin, j * bs, bs);
        let e = b.sub(pivot, vj);
        let e = exp_f32(b, e);
        let zj = b.mul(zj, e);
        earlier = Some(b.dot(s, zj, false, false, earlier));
    }
    let mut acc = acc;
    if let Some(sum) = earlier {
        let e = b.sub(vq, pivot);
        let e = exp_f32(b, e);
        let decayed = b.mul(sum, e);
        acc = b.add(acc, decayed);
    }
    let s = sc.scores(b, x, y, i, i, strict);
    let vi = b.rows(vin, i0, bs);
    let diagonal = b.gated_matmul(s, z[i], vi, vq, false, strict);
    b.add(acc, diagonal)
}

/// The diagonal block of a rank-R solve, `X_r - sum_r' A_{r r'} X_r' = RHS_r` with every
/// `A_{r r'}` strictly lower triangular (a token's low-rank values read the state before it,
/// so they never couple within one token), eliminated term by term. Each pivot `I - A_pp`
/// stays unit lower triangular: the updates `A_rp (I - A_pp)^-1 A_pr'` are products of
/// strictly lower factors. At rank 1 this is the single forward substitution.
#[derive(Clone)]
struct Elimination {
    /// Per pivot p: `-A_pp` as the eliminations before it left it (the solve takes the strict
    /// lower part of `l` in `(I + l) X = B`).
    pivots: Vec<ValueId>,
    /// Per pivot p: `(r', (I - A_pp)^-1 A_pr')` for each later term r'.
    reduced: Vec<Vec<(usize, ValueId)>>,
    /// `multipliers[r][p]` for p < r: `A_rp` when term p is eliminated from row r.
    multipliers: Vec<Vec<ValueId>>,
}

impl Elimination {
    /// `a[r][r']` is `A_{r r'}` (the diagonal block's masked scores).
    fn new(b: &mut Builder, mut a: Vec<Vec<ValueId>>) -> Elimination {
        let n = a.len();
        let (mut pivots, mut reduced, mut multipliers) = (vec![], vec![], vec![vec![]; n]);
        for p in 0..n {
            let l = b.neg(a[p][p]);
            let w: Vec<(usize, ValueId)> = (p + 1..n).map(|r2| (r2, b.solve_unit_lower(l, a[p][r2]))).collect();
            for r in p + 1..n {
                let arp = a[r][p];
                multipliers[r].push(arp);
                for &(r2, wr2) in &w {
                    a[r][r2] = b.dot(arp, wr2, false, false, Some(a[r][r2]));
                }
            }
            pivots.push(l);
            reduced.push(w);
        }
        Elimination { pivots, reduced, multipliers }
    }

    /// X for the right sides `rhs` (one per term).
    fn solve(&self, b: &mut Builder, mut rhs: Vec<ValueId>) -> Vec<ValueId> {
        let n = rhs.len();
        let mut y = vec![];
        for p in 0..n {
            let yp = b.solve_unit_lower(self.pivots[p], rhs[p]);
            for (r, later) in rhs.iter_mut().enumerate().skip(p + 1) {
                *later = b.dot(self.multipliers[r][p], yp, false, false, Some(*later));
            }
            y.push(yp);
        }
        let mut x = y.clone();
        for p in (0..n).rev() {
            for &(r2, w) in &self.reduced[p] {
                x[p] = b.dot(w, x[r2], false, false, Some(x[p]));
            }
        }
        x
    }
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
