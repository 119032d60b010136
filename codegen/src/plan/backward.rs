//! The backward programs: the recurrent one of any rule (checkpointed reverse mode through
//! the token step, below), and the chunked ones of a rule linear in S ([`chunked`]: fused, or
//! split into FLA's phases), all built from one reverse of a recomputed segment
//! (`Pass::differentiate`).
//!
//! The loss is `L = sum(o * do) + sum(hT * dhT)` (flash-linear-attention's convention). The
//! recurrent program has two
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

use super::chunked::{build_phase_storing, Carried, ChunkTerms, Phase, BOUNDARY_STATES};
use super::{PlanError, ProgramShape, Schedule, Shape};
use crate::autodiff;
use crate::builder::Builder;
use crate::ir::*;
use crate::lower::{token_base, v_offset, v_token_base, Lowerer, ParamLayout};
use crate::program::{Dim, Program, Role, StaticSizes, TensorSpec};
use chunkc_dsl::ast::{Rule, Ty};
use chunkc_dsl::canon::Canonical;

/// The chunked backward program of a rule linear in S, fused or split as `sched.program`
/// says.
///
/// Fused: the fused forward, also storing the state entering every `boundary_every`-th chunk
/// (`chunk.h`), then a reverse pass over segments of `boundary_every` chunks that recomputes
/// each segment's chunk algebra (scores, decays, the state updates) from the stored state and
/// differentiates it. Storing every chunk (1) keeps `ceil(T / C)` states per head and
/// recomputes nothing but the chunk's own algebra; m > 1 keeps `ceil(T / (m C))` and
/// recomputes the states between them in every segment: memory against time, the schedule's
/// choice.
///
/// Split (FLA's decomposition, for GPUs): the split forward (its state pass stores every
/// chunk's entering state), a sequential reverse pass that carries only the state's adjoint
/// and stores the one leaving every chunk (`chunk.dh`), then a chunk-parallel pass that
/// differentiates every chunk at once from its two stored states: every input's gradient,
/// a per-head parameter's per chunk (summed by the caller).
///
/// Per-token inputs read as f32; V split into tiles as `sched.bv` says ([`VSplit`]). A chunk
/// op the differentiator has no rule for yet is reported as the reason.
pub fn chunked(
    rule: &Rule,
    canon: &Canonical,
    shape: Shape,
    sched: Schedule,
    boundary_every: usize,
) -> Result<Program, PlanError> {
    let c = sched.chunk;
    let m = boundary_every;
    if m == 0 {
        return Err(PlanError("the chunks between stored states must be at least 1".into()));
    }
    let sched = sched.with_input(ElemType::F32);
    let split = VSplit { bv: sched.bv, tiles: super::vtile::vtiles(rule, &shape, sched.bv, false)? };
    if sched.program == ProgramShape::Split {
        if m != 1 {
            return Err(PlanError(format!(
                "the split backward reads every chunk's stored state: it stores every {c} tokens, not every {}",
                c * m
            )));
        }
        return chunked_split(rule, canon, shape, sched, split);
    }
    let sched = sched.with_program(ProgramShape::Fused);
    let mut tensors = super::program::forward_tensors(rule, ElemType::F32);
    tensors.extend(per_chunk_states(rule, canon, BOUNDARY_STATES, 1));
    let tensors = with_gradients(rule, tensors, split, false)?;
    let forward = build_phase_storing(rule, canon, shape, sched, Phase::FusedWithStates, m)?;
    let every = if m > 1 { format!("_every{m}") } else { String::new() };
    let tiled = sched.bv.map(|bv| format!("_bv{bv}")).unwrap_or_default();
    let name = format!("{}_grad_chunked_c{c}{tiled}{every}", rule.name);
    let columns = canon.columns.iter().map(|x| x.state).collect();
    // The reverse pass reads `chunk.h` by segment: one slot per `m * C` tokens.
    let carried = Carried { shape, chunk: c * m, bv: sched.bv, columns, boundary_every: 1 };
    let io = ChunkBoundaries { rule, carried, split };
    let recompute = |b: &mut Builder, layout: &ParamLayout, start: &[ValueId], seg: Idx| {
        recompute_chunks(b, layout, (rule, canon, shape, sched), m, start[0], seg)
    };
    let reverse = reverse_pass(name.clone(), rule, shape, c * m, split, &io, recompute)?;
    let kernels = vec![forward, reverse];
    let sizes = StaticSizes { heads: shape.heads, k: shape.k, v: shape.v };
    // `Dim::Chunks` (the slots of `chunk.h`) counts segments of `m * C` tokens.
    Program::new(name, c * m, sizes, tensors, kernels).map_err(|e| PlanError(format!("internal error: {e}")))
}

/// The intermediate holding the adjoint of the state leaving every chunk (the split
/// backward's, beside `chunk.h`).
pub const BOUNDARY_ADJOINTS: &str = "chunk.dh";

/// `tensor` (`[B, NT, H, K, V]`) and a column tensor beside it for each extra `[K]` state
/// (`[B, NT, H, K]`, or a column per V-tile with `column_tiles` > 1).
fn per_chunk_states(rule: &Rule, canon: &Canonical, tensor: &str, column_tiles: usize) -> Vec<TensorSpec> {
    let intermediate =
        |name: String, dims| TensorSpec { name, dims, elem: ElemType::F32, role: Role::Intermediate, optional: false };
    let mut out = vec![intermediate(tensor.into(), vec![Dim::Batch, Dim::Chunks, Dim::Heads, Dim::K, Dim::V])];
    let tiles = (column_tiles > 1).then_some(Dim::VTiles(column_tiles));
    for col in &canon.columns {
        let name = super::chunked::slot_column(tensor, &rule.states[col.state].name);
        let dims = [Dim::Batch, Dim::Chunks, Dim::Heads].into_iter().chain(tiles).chain([Dim::K]).collect();
        out.push(intermediate(name, dims));
    }
    out
}

/// The split backward ([`chunked`]).
fn chunked_split(
    rule: &Rule,
    canon: &Canonical,
    shape: Shape,
    sched: Schedule,
    split: VSplit,
) -> Result<Program, PlanError> {
    let c = sched.chunk;
    let forward = super::program::chunked(rule, canon, shape, sched)?;
    let mut tensors = forward.spec.tensors.clone();
    tensors.extend(per_chunk_states(rule, canon, BOUNDARY_ADJOINTS, split.tiles));
    let tensors = with_gradients(rule, tensors, split, true)?;
    let tiled = sched.bv.map(|bv| format!("_bv{bv}")).unwrap_or_default();
    let name = format!("{}_grad_chunked_c{c}{tiled}_split", rule.name);
    let columns: Vec<usize> = canon.columns.iter().map(|x| x.state).collect();
    let carried = Carried { shape, chunk: c, bv: sched.bv, columns, boundary_every: 1 };
    let io = ChunkBoundaries { rule, carried, split };
    let recompute = |b: &mut Builder, layout: &ParamLayout, start: &[ValueId], j: Idx| {
        recompute_chunks(b, layout, (rule, canon, shape, sched), 1, start[0], j)
    };
    let passes = SplitPasses { rule, shape, split, io: &io, recompute };
    let states = passes.adjoint_states(format!("{name}_states"))?;
    let local = passes.local_gradients(format!("{name}_local"))?;
    let mut kernels = forward.kernels;
    kernels.extend([states, local]);
    let sizes = StaticSizes { heads: shape.heads, k: shape.k, v: shape.v };
    Program::new(name, c, sizes, tensors, kernels).map_err(|e| PlanError(format!("internal error: {e}")))
}

/// Segment `seg` of `m` chunks recomputed from `state` (the state entering it): its outputs,
/// the inputs it loaded, and the state leaving it. A chunk past T loads no rows: its gates
/// are 0 and its keys zero, so it leaves the state as it was and writes nothing.
fn recompute_chunks(
    b: &mut Builder,
    layout: &ParamLayout,
    (rule, canon, shape, sched): (&Rule, &Canonical, Shape, Schedule),
    m: usize,
    mut state: ValueId,
    seg: Idx,
) -> Result<Recomputed, PlanError> {
    let c = sched.chunk;
    let mut rec = Recomputed { end: vec![], outputs: vec![], loads: vec![], spans: vec![] };
    for u in 0..m {
        let j = seg.clone().mul(Idx::c(m as i64)).add(Idx::c(u as i64));
        let mut terms = ChunkTerms::new(b, layout, rule, canon, shape, sched, j.clone())?;
        terms.store_outputs = false;
        let r = terms.blocks(b, state, false, Some(layout.o))?;
        state = terms.next_state(b, state, &r);
        let t0 = j.mul(Idx::c(c as i64));
        let valid = Idx::c(c as i64).min(Idx::var(IdxVar::SeqLen).sub(t0.clone()));
        rec.outputs.extend(
            terms
                .outputs
                .iter()
                .map(|&(i0, o)| (t0.clone().add(Idx::c(i0 as i64)), valid.clone().sub(Idx::c(i0 as i64)), o)),
        );
        rec.loads.extend(terms.loads.iter().map(|&(i, v)| (i, t0.clone(), valid.clone(), v)));
        rec.spans.push((t0, valid, c));
    }
    rec.end = vec![state];
    Ok(rec)
}

/// The intermediate holding the state entering every segment.
pub const CHECKPOINTS: &str = "grad.checkpoints";

/// How a reverse pass splits V: the columns of each grid point (None: all of V) and the
/// V-tiles per head.
///
/// The loss is a sum over V columns, and nothing in a rule that may be split mixes them
/// ([`super::vtile`]), so each V-tile's backward gives its own columns' gradients whole (`dv`,
/// `dh0`, a value gate's) and, for everything shared by the columns (keys, queries, gates,
/// betas, per-head parameters, extra `[K]` states), its part of a sum over the tiles: those
/// gradients are written per V-tile ([`PARTIAL_SUFFIX`]) and the caller adds the parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VSplit {
    pub bv: Option<usize>,
    pub tiles: usize,
}

impl VSplit {
    /// The whole V on every grid point.
    pub const WHOLE: VSplit = VSplit { bv: None, tiles: 1 };

    fn cols(&self, shape: &Shape) -> usize {
        self.bv.unwrap_or(shape.v)
    }

    /// Whether the gradient of a value of type `ty` is a sum of one part per V-tile.
    fn partial(&self, ty: Ty) -> bool {
        self.tiles > 1 && ty != Ty::VecV
    }
}

/// Appended to a gradient's name when the backward writes one part per V-tile
/// (`dk.by_vtile`, `[B, T, H, NV, K]`; `dn0.by_vtile`, `[B, H, NV, K]`).
pub const PARTIAL_SUFFIX: &str = ".by_vtile";

/// The name of input `name`'s gradient tensor: `d<name>`; a per-head parameter's is per
/// batch row, to be summed over B (`d<name>.by_batch`, see the module doc); with V-tiles, a
/// gradient shared by the columns is per V-tile, to be summed over them ([`VSplit`]).
pub fn gradient_name(rule: &Rule, input: usize, split: VSplit) -> String {
    let inp = &rule.inputs[input];
    if inp.per_head {
        format!("d{}.by_batch", inp.name)
    } else if split.partial(inp.ty) {
        format!("d{}{PARTIAL_SUFFIX}", inp.name)
    } else {
        format!("d{}", inp.name)
    }
}

/// The name of the gradient of extra state `name`'s initial value (`d<name>0`, or its parts
/// per V-tile).
pub fn initial_gradient_name(s: &chunkc_dsl::ast::StateDecl, split: VSplit) -> String {
    if split.partial(s.ty) {
        format!("d{}{PARTIAL_SUFFIX}", s.initial_name())
    } else {
        format!("d{}", s.initial_name())
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

/// The forward's tensors, the cotangents `do` and optional `dhT`, the checkpoints (`S`'s,
/// then each extra state's) and the gradients.
fn tensors(rule: &Rule, input: ElemType) -> Result<Vec<TensorSpec>, PlanError> {
    use Dim::*;
    let mut tensors = super::program::forward_tensors(rule, input);
    let intermediate =
        |name: String, dims| TensorSpec { name, dims, elem: ElemType::F32, role: Role::Intermediate, optional: false };
    tensors.push(intermediate(CHECKPOINTS.into(), vec![Batch, Chunks, Heads, K, V]));
    for s in &rule.states {
        tensors.push(intermediate(
            extra_checkpoints(&s.name),
            vec![Batch, Chunks, Heads, if s.ty == Ty::VecK { K } else { V }],
        ));
    }
    with_gradients(rule, tensors, VSplit::WHOLE, false)
}

/// The intermediate holding extra state `name` as it enters every segment.
fn extra_checkpoints(name: &str) -> String {
    format!("{CHECKPOINTS}.{name}")
}

/// `tensors` (a forward program's) with the cotangents `do` and optional `dhT`, and the
/// gradients (per V-tile where `split` makes them partial).
/// With `per_chunk`, a per-head parameter's gradient is written per chunk too
/// (`[B, NT, H, (NV,) D]`).
fn with_gradients(
    rule: &Rule,
    mut tensors: Vec<TensorSpec>,
    split: VSplit,
    per_chunk: bool,
) -> Result<Vec<TensorSpec>, PlanError> {
    use Dim::*;
    let f32_tensor =
        |name: String, dims: Vec<Dim>, role| TensorSpec { name, dims, elem: ElemType::F32, role, optional: false };
    tensors.push(f32_tensor("do".into(), vec![Batch, SeqLen, Heads, V], Role::Input));
    tensors.push(TensorSpec { optional: true, ..f32_tensor("dhT".into(), vec![Batch, Heads, K, V], Role::Input) });
    for (i, inp) in rule.inputs.iter().enumerate() {
        let name = gradient_name(rule, i, split);
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
        let lead: &[Dim] = match (inp.per_head, per_chunk) {
            (true, false) => &[Batch, Heads],
            (true, true) => &[Batch, Chunks, Heads],
            (false, _) => &[Batch, SeqLen, Heads],
        };
        let parts = split.partial(inp.ty).then_some(VTiles(split.tiles));
        tensors.push(f32_tensor(name, lead.iter().copied().chain(parts).chain(width).collect(), Role::Output));
    }
    tensors.push(f32_tensor("dh0".into(), vec![Batch, Heads, K, V], Role::Output));
    for s in &rule.states {
        let width = if s.ty == Ty::VecK { K } else { V };
        let cotangent = f32_tensor(format!("d{}", s.final_name()), vec![Batch, Heads, width], Role::Input);
        tensors.push(TensorSpec { optional: true, ..cotangent });
        let parts = split.partial(s.ty).then_some(VTiles(split.tiles));
        let dims = [Batch, Heads].into_iter().chain(parts).chain([width]).collect();
        tensors.push(f32_tensor(initial_gradient_name(s, split), dims, Role::Output));
    }
    Ok(tensors)
}

/// Index of segment `j`'s checkpoint of a state of `size` elements per head in
/// `[B, NT, H, ...]`.
fn checkpoint_base(shape: &Shape, every: usize, j: Idx, size: usize) -> Idx {
    let segments = Idx::var(IdxVar::SeqLen).ceil_div(every as i64);
    Idx::var(IdxVar::Batch)
        .mul(segments)
        .add(j)
        .mul(Idx::c(shape.heads as i64))
        .add(Idx::var(IdxVar::Head))
        .mul(Idx::c(size as i64))
}

/// Where a reverse pass finds the states entering each segment, the cotangents of the states
/// leaving the sequence, and where the gradients of those entering it go. The states are
/// tiles in an order of the implementor's choosing, the same in all three.
trait SegmentStates {
    fn entering(&self, b: &mut Builder, segment: Idx) -> Vec<ValueId>;
    fn final_cotangents(&self, b: &mut Builder) -> Vec<ValueId>;
    fn store_initial_gradients(&self, b: &mut Builder, gradients: &[ValueId]);
}

/// The recurrent program's states: S (K x V) and each extra state (a `[1, D]` tile),
/// checkpointed every segment.
struct Checkpoints<'a> {
    rule: &'a Rule,
    shape: Shape,
    every: usize,
}

impl Checkpoints<'_> {
    /// (elements per head, rows, columns, row stride) of each state, S first.
    fn states(&self) -> Vec<(usize, usize, usize, i64)> {
        let (k, v) = (self.shape.k, self.shape.v);
        let mut all = vec![(k * v, k, v, v as i64)];
        all.extend(self.rule.states.iter().map(|s| (s.width(k, v), 1, s.width(k, v), 0)));
        all
    }

    /// Index of this grid point's state of `size` elements per head in `[B, H, ...]`.
    fn head_base(&self, size: usize) -> Idx {
        Idx::var(IdxVar::Batch)
            .mul(Idx::c(self.shape.heads as i64))
            .add(Idx::var(IdxVar::Head))
            .mul(Idx::c(size as i64))
    }

    /// A parameter per state, S's named `s_name`, each extra state's `extra(state)`.
    fn params(
        &self,
        b: &mut Builder,
        access: Access,
        s_name: &str,
        extra: impl Fn(&chunkc_dsl::ast::StateDecl) -> String,
    ) -> Vec<usize> {
        let names = std::iter::once(s_name.to_string()).chain(self.rule.states.iter().map(extra));
        names.map(|name| b.param(name, access)).collect()
    }

    fn load_all(&self, b: &mut Builder, params: &[usize], base: impl Fn(usize) -> Idx) -> Vec<ValueId> {
        params
            .iter()
            .zip(self.states())
            .map(|(&p, (size, rows, cols, stride))| b.load(p, base(size), stride, 1, rows, cols, Idx::c(rows as i64)))
            .collect()
    }

    fn store_all(&self, b: &mut Builder, params: &[usize], xs: &[ValueId], base: impl Fn(usize) -> Idx) {
        for ((&p, (size, rows, _, stride)), &x) in params.iter().zip(self.states()).zip(xs) {
            b.store(x, p, base(size), stride, 1, Idx::c(rows as i64));
        }
    }
}

impl SegmentStates for Checkpoints<'_> {
    fn entering(&self, b: &mut Builder, segment: Idx) -> Vec<ValueId> {
        let params = self.params(b, Access::Read, CHECKPOINTS, |s| extra_checkpoints(&s.name));
        self.load_all(b, &params, |size| checkpoint_base(&self.shape, self.every, segment.clone(), size))
    }
    fn final_cotangents(&self, b: &mut Builder) -> Vec<ValueId> {
        let params = self.params(b, Access::Read, "dhT", |s| format!("d{}", s.final_name()));
        self.load_all(b, &params, |size| self.head_base(size))
    }
    fn store_initial_gradients(&self, b: &mut Builder, gradients: &[ValueId]) {
        let params = self.params(b, Access::Write, "dh0", |s| format!("d{}", s.initial_name()));
        self.store_all(b, &params, gradients, |size| self.head_base(size));
    }
}

/// The chunked program's state: S with the extra columns beside it ([`Carried`]), stored at
/// every chunk boundary by the forward.
/// With V-tiles, the extra columns are every tile's: their cotangents seed the first tile
/// only (so that the parts add up to one seed), and their gradients are parts.
struct ChunkBoundaries<'a> {
    rule: &'a Rule,
    carried: Carried,
    split: VSplit,
}

impl SegmentStates for ChunkBoundaries<'_> {
    fn entering(&self, b: &mut Builder, segment: Idx) -> Vec<ValueId> {
        vec![self.carried.load_boundary(b, self.rule, segment)]
    }
    fn final_cotangents(&self, b: &mut Builder) -> Vec<ValueId> {
        let first_tile_only = Idx::c(1).sub(Idx::var(IdxVar::VTile).min(Idx::c(1)));
        let rows = if self.split.tiles > 1 { first_tile_only } else { Idx::c(1) };
        vec![self.carried.load_named(b, self.rule, "dhT", |s| format!("d{}", s.final_name()), rows)]
    }
    fn store_initial_gradients(&self, b: &mut Builder, gradients: &[ValueId]) {
        let split = self.split;
        let k = self.carried.shape.k as i64;
        let head = Idx::var(IdxVar::Batch).mul(Idx::c(self.carried.shape.heads as i64)).add(Idx::var(IdxVar::Head));
        let column_base = match split.tiles {
            1 => head.mul(Idx::c(k)),
            n => head.mul(Idx::c(n as i64)).add(Idx::var(IdxVar::VTile)).mul(Idx::c(k)),
        };
        let name = |s: &chunkc_dsl::ast::StateDecl| initial_gradient_name(s, split);
        self.carried.store_named(b, self.rule, gradients[0], "dh0", name, column_base);
    }
}

/// One token of the step: the states after it (S, then the extra states), `o`, and the
/// inputs it loaded (by input index).
struct Token {
    states: Vec<ValueId>,
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
    /// Token `t` on `states` (S, then the extra states). A token past T (possible when
    /// `may_be_past_end`) replays token T - 1 and keeps the states.
    fn token(&self, b: &mut Builder, states: &[ValueId], t: Idx, may_be_past_end: bool) -> Result<Token, PlanError> {
        let last = Idx::var(IdxVar::SeqLen).sub(Idx::c(1));
        let mut lw = Lowerer::new(self.rule, self.shape, self.layout, 1, t.clone().min(last), Idx::c(1));
        lw.input_elem = self.input;
        lw.state = Some(states[0]);
        for (slot, &x) in lw.extras.iter_mut().zip(&states[1..]) {
            *slot = Some(x);
        }
        let o = super::recurrent::lower_step(b, &mut lw)?;
        let mut next = vec![lw.state.unwrap_or(states[0])];
        next.extend(lw.extras.iter().zip(&states[1..]).map(|(x, &entering)| x.unwrap_or(entering)));
        if may_be_past_end {
            // Row masks over each whole state tile: all rows kept or none.
            for (x, &entering) in next.iter_mut().zip(states) {
                let rows = b.ty(entering).rows as i64;
                let before_end = Idx::var(IdxVar::SeqLen).sub(t.clone()).mul(Idx::c(rows));
                let past_end = t.clone().sub(Idx::var(IdxVar::SeqLen)).add(Idx::c(1)).mul(Idx::c(rows));
                let updated = b.mask(*x, MaskKind::RowsBefore(before_end), 0.0);
                let kept = b.mask(entering, MaskKind::RowsBefore(past_end), 0.0);
                *x = b.add(updated, kept);
            }
        }
        Ok(Token { states: next, o, loads: lw.loaded_inputs() })
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

/// The forward phase: `o`, the final states and the checkpoints.
fn forward(rule: &Rule, shape: Shape, input: ElemType, every: usize) -> Result<Kernel, PlanError> {
    let mut b = Builder::new(format!("{}_grad_forward_c{every}", rule.name));
    let layout = ParamLayout::declare(&mut b, rule);
    let step = Step { rule, shape, layout: &layout, input };
    let io = Checkpoints { rule, shape, every };
    let v = shape.v;
    let entering: Vec<usize> = std::iter::once(layout.h0).chain(layout.extras.iter().map(|e| e.0)).collect();
    let inits = io.load_all(&mut b, &entering, |size| io.head_base(size));
    let segments = Idx::var(IdxVar::SeqLen).ceil_div(every as i64);
    let carried = b.begin_loop(segments, &inits);
    let j = Idx::var(IdxVar::Iter);
    let checkpoints = io.params(&mut b, Access::Write, CHECKPOINTS, |s| extra_checkpoints(&s.name));
    io.store_all(&mut b, &checkpoints, &carried, |size| checkpoint_base(&shape, every, j.clone(), size));
    let mut states = carried;
    for u in 0..every {
        let t = token_index(every, &j, u);
        let token = step.token(&mut b, &states, t.clone(), u > 0)?;
        let (obase, ostride) = token_base(&shape, t.clone(), v);
        b.store(token.o, layout.o, obase, ostride, 1, rows_at(&t));
        states = token.states;
    }
    let last = b.end_loop(&states);
    let leaving: Vec<usize> = std::iter::once(layout.ht).chain(layout.extras.iter().map(|e| e.1)).collect();
    io.store_all(&mut b, &leaving, &last, |size| io.head_base(size));
    Ok(b.finish())
}

/// The backward phase of the recurrent program: the segments in reverse, each recomputed
/// token by token from its checkpoint.
fn backward(rule: &Rule, shape: Shape, input: ElemType, every: usize) -> Result<Kernel, PlanError> {
    let name = format!("{}_grad_c{every}", rule.name);
    reverse_pass(name, rule, shape, every, VSplit::WHOLE, &Checkpoints { rule, shape, every }, |b, layout, start, j| {
        let step = Step { rule, shape, layout, input };
        let mut states = start.to_vec();
        let mut seg = Recomputed { end: vec![], outputs: vec![], loads: vec![], spans: vec![] };
        for u in 0..every {
            let t = token_index(every, &j, u);
            let token = step.token(b, &states, t.clone(), u > 0)?;
            states = token.states;
            seg.outputs.push((t.clone(), rows_at(&t), token.o));
            seg.loads.extend(token.loads.iter().map(|&(i, v)| (i, t.clone(), rows_at(&t), v)));
            seg.spans.push((t.clone(), rows_at(&t), 1));
        }
        seg.end = states;
        Ok(seg)
    })
}

/// A segment recomputed from its entering state (the region [`differentiate`] differentiates).
struct Recomputed {
    /// The states leaving the segment (as [`SegmentStates`] orders them).
    end: Vec<ValueId>,
    /// Output rows: first token, rows that exist, the rows x V value.
    outputs: Vec<(Idx, Idx, ValueId)>,
    /// Inputs loaded: input index, first token, rows that exist, the tile.
    loads: Vec<(usize, Idx, Idx, ValueId)>,
    /// The segment's token rows: first token, rows that exist, rows (where an input the step
    /// never reads gets its zero gradient written).
    spans: Vec<(Idx, Idx, usize)>,
}

/// Recomputes a segment's region from its entering states.
type Recompute<'a> = dyn Fn(&mut Builder, &ParamLayout, &[ValueId], Idx) -> Result<Recomputed, PlanError> + 'a;

/// A segment recomputed and differentiated: the region, its entering states, and the adjoint
/// of every value of it that a seed reached.
struct Differentiated {
    seg: Recomputed,
    start: Vec<ValueId>,
    adjoints: std::collections::HashMap<ValueId, ValueId>,
}

impl Differentiated {
    fn adjoint(&self, b: &mut Builder, v: ValueId) -> ValueId {
        match self.adjoints.get(&v) {
            Some(&g) => g,
            None => b.constant(0.0, b.ty(v)),
        }
    }

    /// The adjoints of the states entering the segment.
    fn entering(&self, b: &mut Builder) -> Vec<ValueId> {
        self.start.iter().map(|&x| self.adjoint(b, x)).collect()
    }
}

/// What the passes of a backward share: the rule, the shape, the V split, the parameters of
/// the kernel being built, and where the gradients go.
struct Pass<'a> {
    rule: &'a Rule,
    shape: Shape,
    split: VSplit,
    /// Tokens per iteration of the kernel's loop (a segment, a chunk).
    tokens: usize,
    layout: ParamLayout,
    d_o: usize,
}

impl<'a> Pass<'a> {
    fn new(b: &mut Builder, rule: &'a Rule, shape: Shape, split: VSplit, tokens: usize) -> Pass<'a> {
        b.set_vtiles(split.tiles);
        let layout = ParamLayout::declare(b, rule);
        let d_o = b.param("do", Access::Read);
        Pass { rule, shape, split, tokens, layout, d_o }
    }

    fn width(&self, i: usize) -> usize {
        self.rule.inputs[i].width(self.shape.k, self.shape.v)
    }

    /// The columns of input i's tiles: a `[V]` input's are this V-tile's.
    fn cols(&self, i: usize) -> usize {
        if self.rule.inputs[i].ty == Ty::VecV {
            self.split.cols(&self.shape)
        } else {
            self.width(i)
        }
    }

    fn per_head(&self) -> Vec<usize> {
        (0..self.rule.inputs.len()).filter(|&i| self.rule.inputs[i].per_head).collect()
    }

    /// Segment `j` recomputed from its entering states (`io`) and differentiated, seeded by
    /// `end_cotangents` at the states leaving it and by `do` at its outputs.
    fn differentiate(
        &self,
        b: &mut Builder,
        io: &dyn SegmentStates,
        j: Idx,
        end_cotangents: &[ValueId],
        recompute: &Recompute,
    ) -> Result<Differentiated, PlanError> {
        let mark = b.next_value();
        let start = io.entering(b, j.clone());
        let seg = recompute(b, &self.layout, &start, j)?;
        let region = b.lets_since(mark);
        let mut seeds: Vec<(ValueId, ValueId)> = seg.end.iter().copied().zip(end_cotangents.iter().copied()).collect();
        for (first, valid, o) in &seg.outputs {
            let (obase, ostride) = v_token_base(&self.shape, first.clone(), self.split.bv);
            let rows = b.ty(*o).rows;
            let d_o_rows = b.load(self.d_o, obase, ostride, 1, rows, self.split.cols(&self.shape), valid.clone());
            seeds.push((*o, d_o_rows));
        }
        let mut leaves = start.clone();
        leaves.extend(seg.loads.iter().map(|l| l.3));
        let adjoints = autodiff::reverse(b, &region, &leaves, &seeds)
            .map_err(|e| PlanError(format!("rule `{}`: {e}", self.rule.name)))?;
        Ok(Differentiated { seg, start, adjoints })
    }

    /// The gradient parameters, in input order.
    fn gradient_params(&self, b: &mut Builder) -> Vec<usize> {
        (0..self.rule.inputs.len()).map(|i| b.param(gradient_name(self.rule, i, self.split), Access::Write)).collect()
    }

    /// Where input i's gradient rows start at token `first`, and their stride.
    fn gradient_at(&self, i: usize, first: Idx) -> (Idx, i64) {
        let ty = self.rule.inputs[i].ty;
        let w = self.width(i);
        if ty == Ty::VecV {
            v_token_base(&self.shape, first, self.split.bv)
        } else if self.split.partial(ty) {
            let (base, stride) = token_base(&self.shape, first, self.split.tiles * w);
            (base.add(Idx::var(IdxVar::VTile).mul(Idx::c(w as i64))), stride)
        } else {
            token_base(&self.shape, first, w)
        }
    }

    /// Stores the gradients of the per-token inputs at the segment's rows (zeros for an input
    /// the step never reads); returns the adjoint of each per-head parameter ([`Pass::per_head`]
    /// order), summed over the segment.
    fn store_per_token(&self, b: &mut Builder, grads: &[usize], d: &Differentiated) -> Vec<ValueId> {
        let per_head = self.per_head();
        let mut sums: Vec<Option<ValueId>> = vec![None; per_head.len()];
        for (i, first, valid, load) in &d.seg.loads {
            let g = d.adjoint(b, *load);
            if let Some(slot) = per_head.iter().position(|p| p == i) {
                sums[slot] = Some(match sums[slot] {
                    Some(s) => b.add(s, g),
                    None => g,
                });
            } else {
                let (base, stride) = self.gradient_at(*i, first.clone());
                b.store(g, grads[*i], base, stride, 1, valid.clone());
            }
        }
        for i in (0..self.rule.inputs.len()).filter(|i| !per_head.contains(i)) {
            if !d.seg.loads.iter().any(|l| l.0 == i) {
                for (first, valid, rows) in &d.seg.spans {
                    let zero = b.constant(0.0, TileTy::f32(*rows, self.cols(i)));
                    let (base, stride) = self.gradient_at(i, first.clone());
                    b.store(zero, grads[i], base, stride, 1, valid.clone());
                }
            }
        }
        per_head
            .iter()
            .zip(sums)
            .map(|(&i, s)| s.unwrap_or_else(|| b.constant(0.0, TileTy::f32(1, self.cols(i)))))
            .collect()
    }

    /// Stores each per-head parameter's gradient `sums` ([`Pass::per_head`] order) to its row
    /// of `d<name>.by_batch`: `[B, H, (NV,) D]`, or with `chunk` `[B, NT, H, (NV,) D]`.
    fn store_per_head(&self, b: &mut Builder, grads: &[usize], sums: &[ValueId], chunk: Option<Idx>) {
        let heads = self.shape.heads as i64;
        for (&i, &sum) in self.per_head().iter().zip(sums) {
            let w = self.width(i) as i64;
            let lead = match &chunk {
                Some(j) => {
                    let chunks = Idx::var(IdxVar::SeqLen).ceil_div(self.tokens as i64);
                    Idx::var(IdxVar::Batch).mul(chunks).add(j.clone())
                }
                None => Idx::var(IdxVar::Batch),
            };
            let row = lead.mul(Idx::c(heads)).add(Idx::var(IdxVar::Head));
            let ty = self.rule.inputs[i].ty;
            let base = if ty == Ty::VecV {
                row.mul(Idx::c(w)).add(v_offset(self.split.bv))
            } else if self.split.partial(ty) {
                row.mul(Idx::c(self.split.tiles as i64)).add(Idx::var(IdxVar::VTile)).mul(Idx::c(w))
            } else {
                row.mul(Idx::c(w))
            };
            b.store(sum, grads[i], base, w, 1, Idx::c(1));
        }
    }
}

/// A reverse pass over the segments of `every` tokens, last first: each is recomputed by
/// `recompute` from its entering states (`io`), and the reverse of that straight-line code
/// carries the states' adjoints from the segment's end to its start, seeded by `do` at its
/// outputs. Gradients of per-token inputs are stored at their rows;
/// those of per-head parameters add up over the segments and are stored per batch row.
fn reverse_pass(
    name: String,
    rule: &Rule,
    shape: Shape,
    every: usize,
    split: VSplit,
    io: &dyn SegmentStates,
    recompute: impl Fn(&mut Builder, &ParamLayout, &[ValueId], Idx) -> Result<Recomputed, PlanError>,
) -> Result<Kernel, PlanError> {
    let mut b = Builder::new(name);
    let pass = Pass::new(&mut b, rule, shape, split, every);
    let grads = pass.gradient_params(&mut b);
    let per_head = pass.per_head();
    let mut inits = io.final_cotangents(&mut b);
    let n_states = inits.len();
    inits.extend(per_head.iter().map(|&i| b.constant(0.0, TileTy::f32(1, pass.cols(i)))));
    let segments = Idx::var(IdxVar::SeqLen).ceil_div(every as i64);
    let carried = b.begin_loop(segments.clone(), &inits);
    let j = segments.sub(Idx::c(1)).sub(Idx::var(IdxVar::Iter));
    let d = pass.differentiate(&mut b, io, j, &carried[..n_states], &recompute)?;
    let mut yields = d.entering(&mut b);
    let segment_sums = pass.store_per_token(&mut b, &grads, &d);
    yields.extend(carried[n_states..].iter().zip(segment_sums).map(|(&s, g)| b.add(s, g)));
    let results = b.end_loop(&yields);
    io.store_initial_gradients(&mut b, &results[..n_states]);
    pass.store_per_head(&mut b, &grads, &results[n_states..], None);
    Ok(b.finish())
}

/// The split backward's two reverse passes, built from the same parts.
struct SplitPasses<'a, R> {
    rule: &'a Rule,
    shape: Shape,
    split: VSplit,
    io: &'a ChunkBoundaries<'a>,
    recompute: R,
}

impl<R: Fn(&mut Builder, &ParamLayout, &[ValueId], Idx) -> Result<Recomputed, PlanError>> SplitPasses<'_, R> {
    fn begin(&self, name: String) -> (Builder, Pass<'_>, Idx) {
        let mut b = Builder::new(name);
        let pass = Pass::new(&mut b, self.rule, self.shape, self.split, self.io.carried.chunk);
        (b, pass, Idx::var(IdxVar::SeqLen).ceil_div(self.io.carried.chunk as i64))
    }

    /// The sequential pass: the chunks in reverse, carrying only the states' adjoint; stores
    /// the adjoint leaving every chunk (`chunk.dh`) and the one entering the sequence
    /// (`dh0`). The chunk's reverse runs whole, and what does not reach the entering state
    /// (the inputs' gradients) is dropped as dead code.
    fn adjoint_states(&self, name: String) -> Result<Kernel, PlanError> {
        let (mut b, pass, chunks) = self.begin(name);
        let inits = self.io.final_cotangents(&mut b);
        let carried = b.begin_loop(chunks.clone(), &inits);
        let j = chunks.sub(Idx::c(1)).sub(Idx::var(IdxVar::Iter));
        // Each V-tile's adjoint of the extra columns is its own part: a column per tile.
        let slot = (BOUNDARY_ADJOINTS, self.split.tiles);
        self.io.carried.store_slot(&mut b, self.rule, carried[0], slot, j.clone(), Idx::c(1));
        let d = pass.differentiate(&mut b, self.io, j, &carried, &self.recompute)?;
        let yields = d.entering(&mut b);
        let results = b.end_loop(&yields);
        self.io.store_initial_gradients(&mut b, &results);
        Ok(b.finish())
    }

    /// The chunk-parallel pass: every chunk differentiated from its entering state
    /// (`chunk.h`) and the adjoint leaving it (`chunk.dh`); stores every per-token input's
    /// gradient at the chunk's rows and each per-head parameter's part from this chunk.
    fn local_gradients(&self, name: String) -> Result<Kernel, PlanError> {
        let (mut b, pass, chunks) = self.begin(name);
        b.set_chunk_parallel();
        let grads = pass.gradient_params(&mut b);
        b.begin_loop(chunks, &[]);
        let j = Idx::var(IdxVar::Iter);
        let leaving = self.io.carried.load_slot(&mut b, self.rule, (BOUNDARY_ADJOINTS, self.split.tiles), j.clone());
        let d = pass.differentiate(&mut b, self.io, j.clone(), &[leaving], &self.recompute)?;
        let sums = pass.store_per_token(&mut b, &grads, &d);
        pass.store_per_head(&mut b, &grads, &sums, Some(j));
        b.end_loop(&[]);
        Ok(b.finish())
    }
}
