//! The recurrent backward program of any rule: checkpointed reverse mode through the
//! token step.
//!
//! The loss is `L = sum(o * do) + sum(hT * dhT)` (flash-linear-attention's convention). Two
//! sequential phases, each walking segments of `every` tokens with the segment unrolled:
//! - forward: the rule's step token by token, writing `o`, `hT` and the state entering every
//!   segment (`grad.checkpoints`, `[B, NT, H, K, V]` with NT = ceil(T / every));
//! - backward: the segments in reverse. Each recomputes its tokens from its checkpoint, then
//!   the reverse of that straight-line code (`autodiff`) carries `dL/dS` from the segment's
//!   end to its start and yields every input's gradient at its tokens; the per-head
//!   parameters' gradients add up across segments and are written per batch row
//!   (`d<name>.by_batch`, `[B, H, D]`: the caller sums over B, as no grid point owns all of a
//!   head). `dh0` is the adjoint left at the start.
//!
//! The step is the one the recurrent forward lowers, so any checked rule (linear in S or
//! not) gets its backward; memory is one state per segment plus a segment's unrolled values.
//! Tokens past T in the last segment replay token T - 1 on inputs that exist, and a mask
//! keeps the state as it was, so they change nothing (and produce nothing NaN to multiply
//! by zero).

use super::chunked::{boundary_base_at, build_phase, ChunkTerms, Phase, BOUNDARY_STATES};
use super::{PlanError, ProgramShape, Schedule, Shape};
use crate::autodiff;
use crate::builder::Builder;
use crate::ir::*;
use crate::lower::{state_base, token_base, Lowerer, ParamLayout};
use crate::program::{Dim, Program, Role, StaticSizes, TensorSpec};
use chunkc_dsl::ast::{Rule, Ty};
use chunkc_dsl::canon::Canonical;

/// The chunked backward program of a rule linear in S: the fused forward, also storing the
/// state entering every chunk (`chunk.h`), then a reverse pass over the
/// chunks that recomputes each chunk's algebra (scores, decays, the state update) from its
/// entering state and differentiates it. Per-token inputs read as f32, the whole V per grid
/// point. A chunk op the differentiator has no rule for yet is reported as the reason.
pub fn chunked(rule: &Rule, canon: &Canonical, shape: Shape, sched: Schedule) -> Result<Program, PlanError> {
    let c = sched.chunk;
    let sched = sched.with_program(ProgramShape::Fused).with_bv(None).with_input(ElemType::F32);
    let mut tensors = super::program::forward_tensors(rule, ElemType::F32);
    tensors.push(TensorSpec {
        name: BOUNDARY_STATES.into(),
        dims: vec![Dim::Batch, Dim::Chunks, Dim::Heads, Dim::K, Dim::V],
        elem: ElemType::F32,
        role: Role::Intermediate,
        optional: false,
    });
    let tensors = with_gradients(rule, tensors)?;
    let forward = build_phase(rule, canon, shape, sched, Phase::FusedWithStates)?;
    let name = format!("{}_grad_chunked_c{c}", rule.name);
    let reverse = reverse_pass(
        name.clone(),
        rule,
        shape,
        c,
        BOUNDARY_STATES,
        |j| boundary_base_at(&shape, c, None, j),
        |b, layout, start, j| {
            let mut terms = ChunkTerms::new(b, layout, rule, canon, shape, sched, j.clone())?;
            terms.store_outputs = false;
            let r = terms.blocks(b, start, false, Some(layout.o))?;
            let end = terms.next_state(b, start, &r);
            let t0 = j.mul(Idx::c(c as i64));
            let valid = Idx::c(c as i64).min(Idx::var(IdxVar::SeqLen).sub(t0.clone()));
            let outputs = terms
                .outputs
                .iter()
                .map(|&(i0, o)| (t0.clone().add(Idx::c(i0 as i64)), valid.clone().sub(Idx::c(i0 as i64)), o))
                .collect();
            let loads = terms.loads.iter().map(|&(i, v)| (i, t0.clone(), valid.clone(), v)).collect();
            Ok(Recomputed { end, outputs, loads, spans: vec![(t0, valid, c)] })
        },
    )?;
    let kernels = vec![forward, reverse];
    let sizes = StaticSizes { heads: shape.heads, k: shape.k, v: shape.v };
    Program::new(name, c, sizes, tensors, kernels).map_err(|e| PlanError(format!("internal error: {e}")))
}

/// The intermediate holding the state entering every segment.
pub const CHECKPOINTS: &str = "grad.checkpoints";

/// The name of input `name`'s gradient tensor (a per-head parameter's is per batch row, to
/// be summed over B: see the module doc).
pub fn gradient_name(rule: &Rule, input: usize) -> String {
    let inp = &rule.inputs[input];
    if inp.per_head {
        format!("d{}.by_batch", inp.name)
    } else {
        format!("d{}", inp.name)
    }
}

/// Tokens per segment for sequences of `seq_len`: about sqrt(T) (the checkpoints' memory
/// against the segment's), a power of two, at most 16 (the segment is unrolled).
pub fn checkpoint_interval(seq_len: usize) -> usize {
    let root = (seq_len.max(1) as f64).sqrt().ceil() as usize;
    root.next_power_of_two().min(16)
}

/// The backward program: per-token inputs read as `input`, segments of `every` tokens.
pub fn recurrent(rule: &Rule, shape: Shape, input: ElemType, every: usize) -> Result<Program, PlanError> {
    if every == 0 {
        return Err(PlanError("the checkpoint interval must be at least 1".into()));
    }
    let tensors = tensors(rule, input)?;
    let kernels = vec![forward(rule, shape, input, every)?, backward(rule, shape, input, every)?];
    let name = format!("{}_grad_recurrent_c{every}", rule.name);
    let sizes = StaticSizes { heads: shape.heads, k: shape.k, v: shape.v };
    Program::new(name, every, sizes, tensors, kernels).map_err(|e| PlanError(format!("internal error: {e}")))
}

/// The forward's tensors, the cotangents `do` and optional `dhT`, the checkpoints and the
/// gradients.
fn tensors(rule: &Rule, input: ElemType) -> Result<Vec<TensorSpec>, PlanError> {
    use Dim::*;
    let mut tensors = super::program::forward_tensors(rule, input);
    tensors.push(TensorSpec {
        name: CHECKPOINTS.into(),
        dims: vec![Batch, Chunks, Heads, K, V],
        elem: ElemType::F32,
        role: Role::Intermediate,
        optional: false,
    });
    with_gradients(rule, tensors)
}

/// `tensors` (a forward program's) with the cotangents `do` and optional `dhT`, and the
/// gradients.
fn with_gradients(rule: &Rule, mut tensors: Vec<TensorSpec>) -> Result<Vec<TensorSpec>, PlanError> {
    use Dim::*;
    let f32_tensor =
        |name: String, dims: Vec<Dim>, role| TensorSpec { name, dims, elem: ElemType::F32, role, optional: false };
    tensors.push(f32_tensor("do".into(), vec![Batch, SeqLen, Heads, V], Role::Input));
    tensors.push(TensorSpec { optional: true, ..f32_tensor("dhT".into(), vec![Batch, Heads, K, V], Role::Input) });
    for (i, inp) in rule.inputs.iter().enumerate() {
        let name = gradient_name(rule, i);
        if let Some(clash) = tensors.iter().find(|t| t.name == name) {
            return Err(PlanError(format!(
                "the gradient of input `{}` would be called `{name}`, which is already the name of {}; rename the input",
                inp.name,
                if clash.role == Role::Input { "an input" } else { "a tensor of the program" }
            )));
        }
        let width = match inp.ty {
            Ty::VecK => Some(K),
            Ty::VecV => Some(V),
            _ => None,
        };
        let lead: &[Dim] = if inp.per_head { &[Batch, Heads] } else { &[Batch, SeqLen, Heads] };
        tensors.push(f32_tensor(name, lead.iter().copied().chain(width).collect(), Role::Output));
    }
    tensors.push(f32_tensor("dh0".into(), vec![Batch, Heads, K, V], Role::Output));
    Ok(tensors)
}

/// Index of segment `j`'s checkpoint in `[B, NT, H, K, V]`.
fn checkpoint_base(shape: &Shape, every: usize, j: Idx) -> Idx {
    let segments = Idx::var(IdxVar::SeqLen).ceil_div(every as i64);
    let kv = (shape.k * shape.v) as i64;
    Idx::var(IdxVar::Batch)
        .mul(segments)
        .add(j)
        .mul(Idx::c(shape.heads as i64))
        .add(Idx::var(IdxVar::Head))
        .mul(Idx::c(kv))
}

/// One token of the step: the state after it, `o`, and the inputs it loaded (by input
/// index).
struct Token {
    state: ValueId,
    o: ValueId,
    loads: Vec<(usize, ValueId)>,
}

/// What lowering the rule's step needs besides the builder.
struct Step<'a> {
    rule: &'a Rule,
    shape: Shape,
    layout: &'a ParamLayout,
    /// Element type of the per-token inputs.
    input: ElemType,
}

impl Step<'_> {
    /// Token `t` on `state`. A token past T (possible when `may_be_past_end`) replays token
    /// T - 1 and keeps the state.
    fn token(&self, b: &mut Builder, state: ValueId, t: Idx, may_be_past_end: bool) -> Result<Token, PlanError> {
        let last = Idx::var(IdxVar::SeqLen).sub(Idx::c(1));
        let mut lw = Lowerer::new(self.rule, self.shape, self.layout, 1, t.clone().min(last), Idx::c(1));
        lw.input_elem = self.input;
        lw.state = Some(state);
        let o = super::recurrent::lower_step(b, &mut lw)?;
        let mut next = lw.state.unwrap_or(state);
        if may_be_past_end {
            // Row masks over the whole K x V tile: all rows kept or none.
            let k = self.shape.k as i64;
            let before_end = Idx::var(IdxVar::SeqLen).sub(t.clone()).mul(Idx::c(k));
            let past_end = t.sub(Idx::var(IdxVar::SeqLen)).add(Idx::c(1)).mul(Idx::c(k));
            let updated = b.mask(next, MaskKind::RowsBefore(before_end), 0.0);
            let kept = b.mask(state, MaskKind::RowsBefore(past_end), 0.0);
            next = b.add(updated, kept);
        }
        Ok(Token { state: next, o, loads: lw.loaded_inputs() })
    }
}

/// Token `u` of segment `j`.
fn token_index(every: usize, j: &Idx, u: usize) -> Idx {
    j.clone().mul(Idx::c(every as i64)).add(Idx::c(u as i64))
}

/// Rows of a one-token tile at token `t` that exist: 1 before T, none after.
fn rows_at(t: &Idx) -> Idx {
    Idx::var(IdxVar::SeqLen).sub(t.clone())
}

/// The forward phase: `o`, `hT` and the checkpoints.
fn forward(rule: &Rule, shape: Shape, input: ElemType, every: usize) -> Result<Kernel, PlanError> {
    let mut b = Builder::new(format!("{}_grad_forward_c{every}", rule.name));
    let layout = ParamLayout::declare(&mut b, rule);
    let step = Step { rule, shape, layout: &layout, input };
    let checkpoints = b.param(CHECKPOINTS, Access::Write);
    let (k, v) = (shape.k, shape.v);
    let sbase = state_base(&shape);
    let h0 = b.load(layout.h0, sbase.clone(), v as i64, 1, k, v, Idx::c(k as i64));
    let segments = Idx::var(IdxVar::SeqLen).ceil_div(every as i64);
    let carried = b.begin_loop(segments, &[h0]);
    let j = Idx::var(IdxVar::Iter);
    b.store(carried[0], checkpoints, checkpoint_base(&shape, every, j.clone()), v as i64, 1, Idx::c(k as i64));
    let mut state = carried[0];
    for u in 0..every {
        let t = token_index(every, &j, u);
        let token = step.token(&mut b, state, t.clone(), u > 0)?;
        let (obase, ostride) = token_base(&shape, t.clone(), v);
        b.store(token.o, layout.o, obase, ostride, 1, rows_at(&t));
        state = token.state;
    }
    let last = b.end_loop(&[state]);
    b.store(last[0], layout.ht, sbase, v as i64, 1, Idx::c(k as i64));
    Ok(b.finish())
}

/// The backward phase of the recurrent program: the segments in reverse, each recomputed
/// token by token from its checkpoint.
fn backward(rule: &Rule, shape: Shape, input: ElemType, every: usize) -> Result<Kernel, PlanError> {
    let name = format!("{}_grad_c{every}", rule.name);
    reverse_pass(
        name,
        rule,
        shape,
        every,
        CHECKPOINTS,
        |j| checkpoint_base(&shape, every, j),
        |b, layout, start, j| {
            let step = Step { rule, shape, layout, input };
            let mut state = start;
            let mut seg = Recomputed { end: start, outputs: vec![], loads: vec![], spans: vec![] };
            for u in 0..every {
                let t = token_index(every, &j, u);
                let token = step.token(b, state, t.clone(), u > 0)?;
                state = token.state;
                seg.outputs.push((t.clone(), rows_at(&t), token.o));
                seg.loads.extend(token.loads.iter().map(|&(i, v)| (i, t.clone(), rows_at(&t), v)));
                seg.spans.push((t.clone(), rows_at(&t), 1));
            }
            seg.end = state;
            Ok(seg)
        },
    )
}

/// A segment recomputed from its entering state (the region [`reverse_pass`] differentiates).
struct Recomputed {
    /// The state leaving the segment.
    end: ValueId,
    /// Output rows: first token, rows that exist, the rows x V value.
    outputs: Vec<(Idx, Idx, ValueId)>,
    /// Inputs loaded: input index, first token, rows that exist, the tile.
    loads: Vec<(usize, Idx, Idx, ValueId)>,
    /// The segment's token rows: first token, rows that exist, rows (where an input the step
    /// never reads gets its zero gradient written).
    spans: Vec<(Idx, Idx, usize)>,
}

/// A reverse pass over the segments of `every` tokens, last first: each is recomputed by
/// `recompute` from its entering state (read from `states` at `state_at(segment)`), and the
/// reverse of that straight-line code carries `dL/dS` from the segment's end to its start,
/// seeded by `do` at its outputs. Gradients of per-token inputs are stored at their rows;
/// those of per-head parameters add up over the segments and are stored per batch row.
fn reverse_pass(
    name: String,
    rule: &Rule,
    shape: Shape,
    every: usize,
    states: &str,
    state_at: impl Fn(Idx) -> Idx,
    recompute: impl FnOnce(&mut Builder, &ParamLayout, ValueId, Idx) -> Result<Recomputed, PlanError>,
) -> Result<Kernel, PlanError> {
    let mut b = Builder::new(name);
    let layout = ParamLayout::declare(&mut b, rule);
    let states = b.param(states, Access::Read);
    let d_o = b.param("do", Access::Read);
    let d_ht = b.param("dhT", Access::Read);
    let grads: Vec<usize> = (0..rule.inputs.len()).map(|i| b.param(gradient_name(rule, i), Access::Write)).collect();
    let dh0 = b.param("dh0", Access::Write);
    let (k, v, heads) = (shape.k, shape.v, shape.heads as i64);
    let sbase = state_base(&shape);
    let width = |i: usize| rule.inputs[i].width(k, v);
    let per_head: Vec<usize> = (0..rule.inputs.len()).filter(|&i| rule.inputs[i].per_head).collect();

    let d_state = b.load(d_ht, sbase.clone(), v as i64, 1, k, v, Idx::c(k as i64));
    let mut inits = vec![d_state];
    inits.extend(per_head.iter().map(|&i| b.constant(0.0, TileTy::f32(1, width(i)))));
    let segments = Idx::var(IdxVar::SeqLen).ceil_div(every as i64);
    let carried = b.begin_loop(segments.clone(), &inits);
    let j = segments.sub(Idx::c(1)).sub(Idx::var(IdxVar::Iter));

    // The segment again, from its entering state: the region to differentiate.
    let mark = b.next_value();
    let start = b.load(states, state_at(j.clone()), v as i64, 1, k, v, Idx::c(k as i64));
    let seg = recompute(&mut b, &layout, start, j)?;
    let region = b.lets_since(mark);

    let mut seeds = vec![(seg.end, carried[0])];
    for (first, valid, o) in &seg.outputs {
        let (obase, ostride) = token_base(&shape, first.clone(), v);
        let rows = b.ty(*o).rows;
        let d_o_rows = b.load(d_o, obase, ostride, 1, rows, v, valid.clone());
        seeds.push((*o, d_o_rows));
    }
    let mut leaves = vec![start];
    leaves.extend(seg.loads.iter().map(|l| l.3));
    let adjoints = autodiff::reverse(&mut b, &region, &leaves, &seeds)
        .map_err(|e| PlanError(format!("rule `{}`: {e}", rule.name)))?;
    let adjoint_or_zero = |b: &mut Builder, v: ValueId| match adjoints.get(&v) {
        Some(&g) => g,
        None => b.constant(0.0, b.ty(v)),
    };

    let mut yields = vec![adjoint_or_zero(&mut b, start)];
    let mut sums: Vec<ValueId> = carried[1..].to_vec();
    for (i, first, valid, load) in &seg.loads {
        let g = adjoint_or_zero(&mut b, *load);
        if let Some(slot) = per_head.iter().position(|p| p == i) {
            sums[slot] = b.add(sums[slot], g);
        } else {
            let (base, stride) = token_base(&shape, first.clone(), width(*i));
            b.store(g, grads[*i], base, stride, 1, valid.clone());
        }
    }
    // An input the step never reads has a zero gradient, written all the same.
    for i in (0..rule.inputs.len()).filter(|i| !per_head.contains(i)) {
        if !seg.loads.iter().any(|l| l.0 == i) {
            for (first, valid, rows) in &seg.spans {
                let zero = b.constant(0.0, TileTy::f32(*rows, width(i)));
                let (base, stride) = token_base(&shape, first.clone(), width(i));
                b.store(zero, grads[i], base, stride, 1, valid.clone());
            }
        }
    }
    yields.extend(sums);
    let results = b.end_loop(&yields);
    b.store(results[0], dh0, sbase, v as i64, 1, Idx::c(k as i64));
    for (&i, &sum) in per_head.iter().zip(&results[1..]) {
        let w = width(i) as i64;
        let row = Idx::var(IdxVar::Batch).mul(Idx::c(heads)).add(Idx::var(IdxVar::Head));
        b.store(sum, grads[i], row.mul(Idx::c(w)), w, 1, Idx::c(1));
    }
    Ok(b.finish())
}
