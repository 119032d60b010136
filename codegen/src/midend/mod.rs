//! The target-neutral mid-end: the passes every backend runs on a kernel before it lowers it,
//! with each backend's abilities given as data ([`Abilities`]), in the order [`prepare`] runs
//! them:
//! - `masks`: drops the rows masks that are the identity on their operand;
//! - `accumulate`: a product added to a value takes it as its accumulator;
//! - `fuse`: which elementwise values are computed inside their one consumer (never
//!   written), and which row scales the backend's gemm applies itself;
//! - `layout`: where every value lives in the workspace (regions reused once dead; double
//!   buffers for a backend that prefetches the next iteration's loads), checking the kernel;
//! - `inplace`: which loop's state update is written straight into its carried region.
//!
//! A backend then lowers the [`Prepared`] kernel: the CPU one to Cranelift code and calls of
//! its SIMD routines, the PTX one to SIMT code.

mod accumulate;
pub mod fuse;
pub mod inplace;
pub mod layout;
mod masks;

use crate::ir::{DType, Kernel, Op, Stmt, ValueId};
pub use fuse::Fusion;
pub use layout::{LayoutError, Plan};

/// What a backend can do, as far as the mid-end's decisions depend on it.
#[derive(Clone, Copy)]
pub struct Abilities {
    /// Whether an elementwise op runs on vectors in the backend's lowering: a chain through
    /// an op that does not fuses only into a consumer that does not either (an extra pass
    /// over a tile costs less than losing the vectors). A SIMT backend says yes to all.
    pub vectorises: fn(&Kernel, &Op, DType) -> bool,
    /// Whether the backend's gemm, for an `m x n` product over `k`, applies a row scale of its
    /// accumulator or of its left operand itself (`c = diag(s)(a b) + diag(t) acc`); None: it
    /// has no such gemm.
    pub scaled_gemm: Option<fn(usize, usize, usize) -> bool>,
    /// Whether the backend's `Dot` applies a row scale of its accumulator itself (`c = a b +
    /// diag(s) acc`, one multiply per element as it reads `acc`) for an `m x n` product over
    /// `k`; None: never. (A scaled left operand stays `scaled_gemm`'s: only a gemm takes it.)
    pub scaled_accumulator: Option<fn(usize, usize, usize) -> bool>,
    /// A routine evaluates `mul(x, exp(cast_f32(e)))` (a gate factor) in one pass.
    pub decay_routine: bool,
    /// A routine takes `cumsum(cast_f64(x))` of an f32 `x` in one pass.
    pub sums_routine: bool,
}

impl Abilities {
    /// A backend with no fused routines whose every elementwise op is vector code (one
    /// element per thread): every single-use elementwise chain fuses.
    pub fn simt() -> Abilities {
        Abilities {
            vectorises: |_, _, _| true,
            scaled_gemm: None,
            scaled_accumulator: None,
            decay_routine: false,
            sums_routine: false,
        }
    }
}

/// A kernel ready to lower: the kernel after the mid-end's rewrites, what fuses, where every
/// value lives, and the state updates written in place.
pub struct Prepared {
    pub kernel: Kernel,
    pub fusion: Fusion,
    pub plan: Plan,
    /// Per `Loop` statement in pre-order: the `Dot` whose result is written straight into
    /// the loop's carried region (no copy at the end of an iteration), if any.
    pub in_place: Vec<Option<ValueId>>,
}

/// Runs the mid-end on `kernel` for a backend with `abilities`. The kernel is checked first
/// (a malformed one is an error, never a panic).
pub fn prepare(kernel: &Kernel, abilities: &Abilities) -> Result<Prepared, LayoutError> {
    layout::plan(kernel)?;
    let kernel = accumulate::fold_sums_into_products(&masks::drop_redundant_masks(kernel));
    let fusion = fuse::analyse(&kernel, abilities);
    let plan = layout::plan(&fusion.planning)?;
    let mut prepared = Prepared { kernel, fusion, plan, in_place: vec![] };
    prepared.in_place = in_place_updates(&prepared);
    Ok(prepared)
}

impl Prepared {
    /// Plans the workspace again with double buffers for the loads of loop bodies for which
    /// `double_buffer` holds (`layout::plan_with`); the in-place updates follow the new plan.
    pub fn replan(&mut self, double_buffer: &dyn Fn(&Op) -> bool) -> Result<(), LayoutError> {
        self.plan = layout::plan_with(&self.fusion.planning, double_buffer)?;
        self.in_place = in_place_updates(self);
        Ok(())
    }
}

/// The state updates that may be written in place: a loop's yield that `inplace` proves
/// safe, and that the plan copies straight into the carried region.
fn in_place_updates(p: &Prepared) -> Vec<Option<ValueId>> {
    fn walk(stmts: &[Stmt], p: &Prepared, out: &mut Vec<Option<ValueId>>) {
        for s in stmts {
            if let Stmt::Loop { carried, body, yields, .. } = s {
                let direct =
                    p.plan.loops.get(out.len()).is_some_and(|lp| lp.yields.first() == Some(&layout::YieldCopy::Direct));
                out.push(inplace::state_dot(carried, body, yields, &p.fusion).filter(|_| direct));
                walk(body, p, out);
            }
        }
    }
    let mut out = vec![];
    walk(&p.kernel.body, p, &mut out);
    out
}
