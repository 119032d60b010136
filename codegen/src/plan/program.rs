//! The forward programs of a rule: which phases run, over which tensors.
//!
//! - recurrent: one sequential phase, token by token (any rule);
//! - chunked, fused ([`ProgramShape::Fused`]): one sequential phase over the chunks that
//!   carries the state and writes `o` as it goes (right on a CPU: one core walks a head's
//!   chunks with its state in cache);
//! - chunked, split ([`ProgramShape::Split`], FLA's decomposition on GPUs): for a low-rank
//!   transition (the delta class) a chunk-parallel prep of the UT factors (`chunk.w`,
//!   `chunk.u`: the solve's parts with and without the entering state); a sequential state
//!   pass that writes the state entering every chunk into `chunk.h` `[B, NT, H, K, V]` and
//!   `hT`; then a chunk-parallel output pass that reads them.
//!
//! Both chunked programs come from the same chunk algebra (`chunked::chunk_step`); a phase
//! differs only in where its entering state comes from and what it stores.

use super::chunked::{self, Phase, BOUNDARY_STATES};
use super::{recurrent, PlanError, ProgramShape, Schedule, Shape};
use crate::ir::ElemType;
use crate::program::{Dim, Program, Role, StaticSizes, TensorSpec};
use chunkc_dsl::ast::{Rule, Ty};
use chunkc_dsl::canon::Canonical;

/// The forward's tensors: the rule's inputs (per-token ones in `input`, per-head ones f32),
/// the optional initial state `h0`, the outputs `o` and `hT` (f32), and each extra state's
/// optional `<name>0` and output `<name>T` (`[B, H, D]`, f32).
pub fn forward_tensors(rule: &Rule, input: ElemType) -> Vec<TensorSpec> {
    use Dim::*;
    let mut tensors: Vec<TensorSpec> = rule
        .inputs
        .iter()
        .map(|i| {
            let width = match i.ty {
                Ty::VecK => Some(K),
                Ty::VecV => Some(V),
                _ => None,
            };
            let lead: &[Dim] = if i.per_head { &[Heads] } else { &[Batch, SeqLen, Heads] };
            let elem = if i.per_head { ElemType::F32 } else { input };
            let dims = lead.iter().copied().chain(width).collect();
            TensorSpec { name: i.name.clone(), dims, elem, role: Role::Input, optional: false }
        })
        .collect();
    let state = vec![Batch, Heads, K, V];
    let f32_tensor = |name: &str, dims: Vec<Dim>, role| TensorSpec {
        name: name.into(),
        dims,
        elem: ElemType::F32,
        role,
        optional: false,
    };
    tensors.push(TensorSpec { optional: true, ..f32_tensor("h0", state.clone(), Role::Input) });
    tensors.push(f32_tensor("o", vec![Batch, SeqLen, Heads, V], Role::Output));
    tensors.push(f32_tensor("hT", state, Role::Output));
    for s in &rule.states {
        let dims = vec![Batch, Heads, if s.ty == Ty::VecK { K } else { V }];
        tensors.push(TensorSpec { optional: true, ..f32_tensor(&s.initial_name(), dims.clone(), Role::Input) });
        tensors.push(f32_tensor(&s.final_name(), dims, Role::Output));
    }
    tensors
}

fn compiled_for(shape: &Shape) -> StaticSizes {
    StaticSizes { heads: shape.heads, k: shape.k, v: shape.v }
}

fn spec_error(e: crate::program::SpecError) -> PlanError {
    PlanError(format!("internal error: {e}"))
}

/// The forward program `sched` asks for: the recurrent one, or the chunked one (fused or
/// split) of a canonical rule (`canon`: the rule's canonical form, or why it has none).
pub fn forward(
    rule: &Rule,
    canon: Result<&Canonical, PlanError>,
    shape: Shape,
    sched: &Schedule,
) -> Result<Program, PlanError> {
    sched.validate().map_err(PlanError)?;
    match sched.kernel {
        crate::schedule::KernelKind::Recurrent => recurrent(rule, shape, sched.input, sched.bv),
        crate::schedule::KernelKind::Chunked => chunked(rule, canon?, shape, *sched),
    }
}

/// The recurrent program: one sequential phase, one token per iteration.
pub fn recurrent(rule: &Rule, shape: Shape, input: ElemType, bv: Option<usize>) -> Result<Program, PlanError> {
    let kernel = recurrent::build(rule, shape, input, bv)?;
    let tensors = forward_tensors(rule, input);
    Program::new(kernel.name.clone(), 1, compiled_for(&shape), tensors, vec![kernel]).map_err(spec_error)
}

/// The chunked program the schedule asks for (fused or split).
pub fn chunked(rule: &Rule, canon: &Canonical, shape: Shape, sched: Schedule) -> Result<Program, PlanError> {
    let mut tensors = forward_tensors(rule, sched.input);
    let phases = match sched.program {
        ProgramShape::Fused => vec![Phase::Fused],
        ProgramShape::Split => {
            let intermediate = |name: &str, dims: Vec<Dim>| TensorSpec {
                name: name.into(),
                dims,
                elem: ElemType::F32,
                role: Role::Intermediate,
                optional: false,
            };
            let phases = chunked::split_phases(canon);
            if phases.contains(&Phase::Factors) {
                for r in 0..canon.low_rank.len() {
                    let (w, u) = chunked::factor_names(r);
                    tensors.push(intermediate(&w, vec![Dim::Batch, Dim::SeqLen, Dim::Heads, Dim::K]));
                    tensors.push(intermediate(&u, vec![Dim::Batch, Dim::SeqLen, Dim::Heads, Dim::V]));
                    for col in &canon.columns {
                        let name = chunked::factor_column(&u, &rule.states[col.state].name);
                        tensors.push(intermediate(&name, vec![Dim::Batch, Dim::SeqLen, Dim::Heads]));
                    }
                }
            }
            tensors.push(intermediate(BOUNDARY_STATES, vec![Dim::Batch, Dim::Chunks, Dim::Heads, Dim::K, Dim::V]));
            for col in &canon.columns {
                let name = chunked::boundary_column(&rule.states[col.state].name);
                tensors.push(intermediate(&name, vec![Dim::Batch, Dim::Chunks, Dim::Heads, Dim::K]));
            }
            phases
        }
    };
    let kernels = phases
        .into_iter()
        .map(|p| chunked::build_phase(rule, canon, shape, sched, p))
        .collect::<Result<Vec<_>, _>>()?;
    let name = format!("{}_chunked_c{}_{}", rule.name, sched.chunk, sched.program.name());
    Program::new(name, sched.chunk, compiled_for(&shape), tensors, kernels).map_err(spec_error)
}
