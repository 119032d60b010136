//! Workspace layout: where every tile value lives, and the checks that make lowering safe.
//! Target-neutral: the CPU backend maps the regions into its workspace, the PTX backend into
//! shared memory or per-CTA global scratch.
//!
//! Every non-view value gets a region of the per-call workspace (row-major, 64-byte aligned).
//! Views (`Rows`, `Transpose`) share their operand's region with a shifted offset or swapped
//! strides. Regions of values that are dead by the time another value is defined are reused:
//! each region has a live interval over the statement positions of a pre-order walk, and
//! regions whose (closed) intervals overlap never share bytes. A value used inside a loop
//! body but defined before the loop stays live until the loop's end (it is read again by the
//! next iteration); loop-carried regions live from the loop's start to its end and on through
//! the loop's results, which alias them.
//!
//! Double buffering ([`plan_with`], for a backend that prefetches the next iteration's loads):
//! the loads of a loop body that the caller picks get two copies, one per iteration parity, in
//! one region of the loop (live from the loop's start to its end, so no other value reuses it
//! while the copies of either parity may be in flight). The even copies come first, the odd
//! ones [`Pipeline::stride`] bytes later; such a value's [`Storage::phase`] is set, meaning
//! "in an odd iteration, add the stride". Everything else is laid out (and reused) as before.
//!
//! The walk also checks what lowering relies on (operands defined before use, shapes and
//! dtypes consistent with each op, parameter indices in range, positive `CeilDiv` divisors),
//! so that compiling never panics and generated code never touches the workspace out of
//! bounds.

use crate::ir::*;

/// Why a kernel cannot be laid out: it is malformed (a bug in the plan that built it).
#[derive(Clone, Debug, PartialEq)]
pub struct LayoutError(pub String);

/// Where a value's elements are: byte offset into the workspace, then row and column strides
/// in elements. Element (i, j) is at `off + (i*rs + j*cs) * dtype.size()`, plus the loop's
/// [`Pipeline::stride`] in odd iterations when `phase` is set (double-buffered loads only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    pub off: i64,
    pub rs: i64,
    pub cs: i64,
    pub phase: bool,
}

/// How a loop yield reaches its carried region at the end of an iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YieldCopy {
    /// The yield is the carried value itself: nothing to copy.
    Skip,
    /// Copy straight into the carried region.
    Direct,
    /// The yield reads a carried region that another copy may overwrite first: copy it to
    /// this temporary before any carried region is written, then from there.
    ViaTemp(Storage),
}

/// The double-buffered loads of one loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pipeline {
    /// The loads (`Let` ids in body order); their storage has `phase` set and gives the even
    /// copy.
    pub loads: Vec<ValueId>,
    /// Bytes from a load's even copy to its odd copy (a multiple of 64).
    pub stride: i64,
}

/// Storage of one `Loop` statement's carried values and its yield copies.
#[derive(Clone, Debug)]
pub struct LoopPlan {
    pub carried: Vec<Storage>,
    pub yields: Vec<YieldCopy>,
    /// The double-buffered loads of the body (None without any).
    pub pipeline: Option<Pipeline>,
}

/// The layout of a whole kernel.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Storage of every value (None for values that are never defined).
    pub storage: Vec<Option<Storage>>,
    /// One entry per `Loop` statement, in pre-order.
    pub loops: Vec<LoopPlan>,
    /// Total workspace bytes (a multiple of 64).
    pub bytes: usize,
}

const ALIGN: usize = 64;

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// A value's place before offsets are assigned: region plus element offset and strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VRef {
    region: usize,
    elem: i64,
    rs: i64,
    cs: i64,
    phase: bool,
}

#[derive(Clone, Debug)]
struct Region {
    bytes: usize,
    start: u32,
    end: u32,
    off: usize,
}

enum PendingYield {
    Skip,
    Direct,
    Temp(VRef),
}

struct Walk<'k> {
    kernel: &'k Kernel,
    regions: Vec<Region>,
    vals: Vec<Option<VRef>>,
    pos: u32,
    /// Open loops: start position and the regions from outside used in the body.
    open: Vec<(u32, Vec<usize>)>,
    loops: Vec<(Vec<VRef>, Vec<PendingYield>, Option<Pipeline>)>,
    /// Which loads of a loop body are double-buffered.
    double_buffer: &'k dyn Fn(&Op) -> bool,
    /// The current loop's double-buffered loads: their places in the loop's pipeline region.
    piped: Vec<(ValueId, VRef)>,
}

fn err<T>(msg: impl Into<String>) -> Result<T, LayoutError> {
    Err(LayoutError(msg.into()))
}

/// Plans the workspace of `kernel`, checking it on the way.
pub fn plan(kernel: &Kernel) -> Result<Plan, LayoutError> {
    plan_with(kernel, &|_| false)
}

/// [`plan`], with double buffers for the loads directly in a loop body for which
/// `double_buffer` holds (see the module doc).
pub fn plan_with(kernel: &Kernel, double_buffer: &dyn Fn(&Op) -> bool) -> Result<Plan, LayoutError> {
    let mut w = Walk {
        kernel,
        regions: vec![],
        vals: vec![None; kernel.values.len()],
        pos: 0,
        open: vec![],
        loops: vec![],
        double_buffer,
        piped: vec![],
    };
    check_chunk_parallel(kernel)?;
    w.block(&kernel.body)?;
    let bytes = w.assign_offsets();
    let at = |r: &VRef, dt: DType| Storage {
        off: (w.regions[r.region].off as i64) + r.elem * dt.size() as i64,
        rs: r.rs,
        cs: r.cs,
        phase: r.phase,
    };
    let storage = w.vals.iter().enumerate().map(|(v, r)| r.map(|r| at(&r, kernel.values[v].dtype))).collect();
    let loops = w
        .loops
        .iter()
        .map(|(carried, yields, pipeline)| {
            // Carried regions are fresh (element offset 0); the dtype only scales `elem`.
            let carried = carried.iter().map(|r| at(r, DType::F32)).collect();
            let yields = yields
                .iter()
                .map(|y| match y {
                    PendingYield::Skip => YieldCopy::Skip,
                    PendingYield::Direct => YieldCopy::Direct,
                    PendingYield::Temp(r) => YieldCopy::ViaTemp(at(r, DType::F32)),
                })
                .collect();
            LoopPlan { carried, yields, pipeline: pipeline.clone() }
        })
        .collect();
    Ok(Plan { storage, loops, bytes })
}

/// A chunk-parallel kernel's loop must be its only one and carry nothing, and nothing
/// outside it may read what an iteration computes: its iterations run in any order, on any
/// worker.
fn check_chunk_parallel(kernel: &Kernel) -> Result<(), LayoutError> {
    if !kernel.chunk_parallel {
        return Ok(());
    }
    let loops: Vec<&Stmt> = kernel.body.iter().filter(|s| matches!(s, Stmt::Loop { .. })).collect();
    match loops[..] {
        [Stmt::Loop { carried, .. }] if carried.is_empty() => Ok(()),
        [_] => err(format!("chunk-parallel kernel {} carries values from one iteration to the next", kernel.name)),
        _ => err(format!("chunk-parallel kernel {} has {} loops; it needs exactly one", kernel.name, loops.len())),
    }
}

fn check_idx(e: &Idx) -> Result<(), LayoutError> {
    match e {
        Idx::Const(_) | Idx::Var(_) => Ok(()),
        Idx::Add(a, b) | Idx::Sub(a, b) | Idx::Mul(a, b) | Idx::Min(a, b) => {
            check_idx(a)?;
            check_idx(b)
        }
        Idx::CeilDiv(a, d) => {
            if *d <= 0 {
                return err(format!("ceil_div by {d}: the divisor must be a positive constant"));
            }
            check_idx(a)
        }
    }
}

impl Walk<'_> {
    fn ty(&self, v: ValueId) -> Result<TileTy, LayoutError> {
        match self.kernel.values.get(v.0 as usize) {
            Some(t) => Ok(*t),
            None => err(format!("{v} is not a value of kernel {}", self.kernel.name)),
        }
    }

    fn check_param(&self, p: usize) -> Result<(), LayoutError> {
        if p >= self.kernel.params.len() {
            return err(format!("parameter {p} out of range ({} parameters)", self.kernel.params.len()));
        }
        Ok(())
    }

    fn new_region(&mut self, ty: TileTy) -> VRef {
        self.regions.push(Region { bytes: ty.len() * ty.dtype.size(), start: self.pos, end: self.pos, off: 0 });
        VRef { region: self.regions.len() - 1, elem: 0, rs: ty.cols as i64, cs: 1, phase: false }
    }

    /// Marks `v` as read at the current position.
    fn use_val(&mut self, v: ValueId) -> Result<VRef, LayoutError> {
        self.ty(v)?;
        let Some(r) = self.vals[v.0 as usize] else {
            return err(format!("{v} is used before it is defined"));
        };
        if r.phase && !self.piped.iter().any(|(_, p)| p.region == r.region) {
            // Its parity is that of an iteration of its own loop only.
            return err(format!("{v} is double-buffered but read outside its loop"));
        }
        let reg = &mut self.regions[r.region];
        reg.end = reg.end.max(self.pos);
        let start = reg.start;
        for (ls, outer) in &mut self.open {
            if start < *ls {
                outer.push(r.region);
            }
        }
        Ok(r)
    }

    fn define(&mut self, v: ValueId, r: VRef) -> Result<(), LayoutError> {
        self.ty(v)?;
        let slot = &mut self.vals[v.0 as usize];
        if slot.is_some() {
            return err(format!("{v} is defined twice"));
        }
        *slot = Some(r);
        Ok(())
    }

    fn block(&mut self, stmts: &[Stmt]) -> Result<(), LayoutError> {
        for s in stmts {
            self.pos += 1;
            match s {
                Stmt::Let { id, op } => {
                    let ty = self.ty(*id)?;
                    let want = self.result_ty(op)?;
                    // An index value may be declared in either dtype (the interpreter rounds to it).
                    let idx_ok = matches!(op, Op::IdxValue(_)) && ty.rows == 1 && ty.cols == 1;
                    if ty != want && !idx_ok {
                        return err(format!("{id} is declared {ty:?} but {op:?} gives {want:?}"));
                    }
                    let mut refs = vec![];
                    for o in op.operands() {
                        refs.push(self.use_val(o)?);
                    }
                    let r = match op {
                        Op::Rows { start, .. } => VRef { elem: refs[0].elem + *start as i64 * refs[0].rs, ..refs[0] },
                        Op::Transpose { .. } => VRef { rs: refs[0].cs, cs: refs[0].rs, ..refs[0] },
                        _ => match self.piped.iter().find(|(v, _)| v == id) {
                            Some((_, r)) => *r,
                            None => self.new_region(ty),
                        },
                    };
                    self.define(*id, r)?;
                }
                Stmt::Store { value, param, base, valid_rows, .. } => {
                    self.check_param(*param)?;
                    check_idx(base)?;
                    check_idx(valid_rows)?;
                    self.use_val(*value)?;
                }
                Stmt::Loop { count, carried, body, yields, results } => {
                    check_idx(count)?;
                    if yields.len() != carried.len() || results.len() != carried.len() {
                        return err(format!(
                            "loop with {} carried values, {} yields and {} results",
                            carried.len(),
                            yields.len(),
                            results.len()
                        ));
                    }
                    if !self.piped.is_empty() {
                        return err("loops do not nest");
                    }
                    let slot = self.loops.len();
                    self.loops.push((vec![], vec![], None));
                    let ls = self.pos;
                    let mut inner = vec![];
                    for (c, init) in carried {
                        let (tc, ti) = (self.ty(*c)?, self.ty(*init)?);
                        if tc != ti {
                            return err(format!("carried {c} is {tc:?} but its init {init} is {ti:?}"));
                        }
                        self.use_val(*init)?;
                        inner.push(self.new_region(tc));
                    }
                    for ((c, _), r) in carried.iter().zip(&inner) {
                        self.define(*c, *r)?;
                    }
                    let pipeline = self.pipeline_region(body)?;
                    self.open.push((ls, vec![]));
                    self.block(body)?;
                    self.pos += 1;
                    let le = self.pos;
                    let mut ys = vec![];
                    for ((y, (c, _)), r) in yields.iter().zip(carried).zip(results) {
                        let (ty, tc, tr) = (self.ty(*y)?, self.ty(*c)?, self.ty(*r)?);
                        if ty != tc || tr != tc {
                            return err(format!("loop yield {y} ({ty:?}) or result {r} ({tr:?}) differs from {tc:?}"));
                        }
                        ys.push(self.use_val(*y)?);
                    }
                    let (_, outer) = self.open.pop().expect("loop was opened");
                    for r in outer {
                        self.regions[r].end = self.regions[r].end.max(le);
                    }
                    for r in &inner {
                        self.regions[r.region].end = self.regions[r.region].end.max(le);
                    }
                    if let Some((_, r)) = self.piped.first() {
                        self.regions[r.region].end = self.regions[r.region].end.max(le);
                    }
                    self.piped.clear();
                    let mut copies = vec![];
                    for (k, y) in ys.iter().enumerate() {
                        copies.push(if *y == inner[k] {
                            PendingYield::Skip
                        } else if inner.iter().any(|c| c.region == y.region) {
                            PendingYield::Temp(self.new_region(self.ty(yields[k])?))
                        } else {
                            PendingYield::Direct
                        });
                    }
                    for (r, c) in results.iter().zip(&inner) {
                        self.define(*r, *c)?;
                    }
                    self.loops[slot] = (inner, copies, pipeline);
                }
            }
        }
        Ok(())
    }

    /// Opens the region of a loop's double-buffered loads (at the loop's start): each load's
    /// even copy at a 64-byte aligned offset, all odd copies `stride` bytes later. Fills
    /// `self.piped`; None when the body has no such load.
    fn pipeline_region(&mut self, body: &[Stmt]) -> Result<Option<Pipeline>, LayoutError> {
        let mut loads = vec![];
        let mut at = 0usize;
        for s in body {
            if let Stmt::Let { id, op } = s {
                if matches!(op, Op::Load { .. }) && (self.double_buffer)(op) {
                    let ty = self.ty(*id)?;
                    loads.push((*id, at, ty.cols));
                    at += align_up(ty.len() * ty.dtype.size());
                }
            }
        }
        if loads.is_empty() {
            return Ok(None);
        }
        let stride = at;
        self.regions.push(Region { bytes: 2 * stride, start: self.pos, end: self.pos, off: 0 });
        let region = self.regions.len() - 1;
        for &(id, off, cols) in &loads {
            // Loads are f32 tiles: the element offset is the byte offset / 4.
            let r = VRef { region, elem: (off / 4) as i64, rs: cols as i64, cs: 1, phase: true };
            self.piped.push((id, r));
        }
        Ok(Some(Pipeline { loads: loads.iter().map(|l| l.0).collect(), stride: stride as i64 }))
    }

    /// The type `op` produces, or an error if its operands do not fit it.
    fn result_ty(&self, op: &Op) -> Result<TileTy, LayoutError> {
        let f32_only = |v: ValueId, what: &str| -> Result<TileTy, LayoutError> {
            let t = self.ty(v)?;
            if t.dtype != DType::F32 {
                return err(format!("{what}: {v} must be f32, is {t:?}"));
            }
            Ok(t)
        };
        Ok(match op {
            Op::Load { param, base, valid_rows, rows, cols, .. } => {
                self.check_param(*param)?;
                check_idx(base)?;
                check_idx(valid_rows)?;
                TileTy::f32(*rows, *cols)
            }
            Op::Const { ty, .. } => *ty,
            Op::IdxValue(e) => {
                check_idx(e)?;
                TileTy::f32(1, 1)
            }
            Op::Unary { x, .. } | Op::Cumsum { x, .. } | Op::Mask { x, .. } => {
                if let Op::Mask { mask: MaskKind::RowsBefore(e), .. } = op {
                    check_idx(e)?;
                }
                self.ty(*x)?
            }
            Op::Binary { a, b, .. } => {
                let (ta, tb) = (self.ty(*a)?, self.ty(*b)?);
                let dim = |x: usize, y: usize| {
                    if x == y || y == 1 {
                        Some(x)
                    } else if x == 1 {
                        Some(y)
                    } else {
                        None
                    }
                };
                match (dim(ta.rows, tb.rows), dim(ta.cols, tb.cols)) {
                    (Some(rows), Some(cols)) if ta.dtype == tb.dtype => TileTy { rows, cols, dtype: ta.dtype },
                    _ => return err(format!("binary op on {ta:?} and {tb:?}")),
                }
            }
            Op::Cast { x, dtype } => TileTy { dtype: *dtype, ..self.ty(*x)? },
            Op::Dot { a, b, ta, tb, acc } => {
                let (xa, xb) = (f32_only(*a, "dot")?, f32_only(*b, "dot")?);
                let (m, k1) = if *ta { (xa.cols, xa.rows) } else { (xa.rows, xa.cols) };
                let (k2, n) = if *tb { (xb.cols, xb.rows) } else { (xb.rows, xb.cols) };
                if k1 != k2 {
                    return err(format!("dot: inner dimensions differ ({xa:?}, {xb:?}, ta={ta}, tb={tb})"));
                }
                if let Some(c) = acc {
                    let xc = f32_only(*c, "dot accumulator")?;
                    if (xc.rows, xc.cols) != (m, n) {
                        return err(format!("dot: accumulator {xc:?} is not {m}x{n}"));
                    }
                }
                TileTy::f32(m, n)
            }
            Op::RowSum { x } => TileTy { cols: 1, ..self.ty(*x)? },
            Op::Rows { x, start, len } => {
                let t = self.ty(*x)?;
                if start + len > t.rows {
                    return err(format!("rows {start}..{} of {t:?}", start + len));
                }
                TileTy { rows: *len, ..t }
            }
            Op::Transpose { x } => {
                let t = self.ty(*x)?;
                TileTy { rows: t.cols, cols: t.rows, dtype: t.dtype }
            }
            Op::Concat { parts } => {
                let tys = parts.iter().map(|p| self.ty(*p)).collect::<Result<Vec<_>, _>>()?;
                let Some(first) = tys.first() else { return err("concat of no parts") };
                if tys.iter().any(|t| t.cols != first.cols || t.dtype != first.dtype) {
                    return err(format!("concat of parts with different columns or dtypes: {tys:?}"));
                }
                TileTy { rows: tys.iter().map(|t| t.rows).sum(), ..*first }
            }
            Op::GatedDot { a, ga, b, gb, .. } => {
                let (xa, xb) = (f32_only(*a, "gated_dot")?, f32_only(*b, "gated_dot")?);
                let (xga, xgb) = (self.ty(*ga)?, self.ty(*gb)?);
                let same = |x: TileTy, y: TileTy| x.rows == y.rows && x.cols == y.cols;
                if !same(xa, xb) || !same(xa, xga) || !same(xb, xgb) || xga.dtype != xgb.dtype {
                    return err(format!("gated_dot on {xa:?}, {xga:?}, {xb:?}, {xgb:?}"));
                }
                TileTy::f32(xa.rows, xb.rows)
            }
            Op::GatedMatMul { m, x, gx, gy, .. } => {
                let (xm, xx) = (f32_only(*m, "gated_matmul")?, f32_only(*x, "gated_matmul")?);
                let (xgx, xgy) = (self.ty(*gx)?, self.ty(*gy)?);
                let same = |p: TileTy, q: TileTy| p.rows == q.rows && p.cols == q.cols;
                if xm.rows != xm.cols
                    || xm.rows != xx.rows
                    || !same(xx, xgx)
                    || !same(xx, xgy)
                    || xgx.dtype != xgy.dtype
                {
                    return err(format!("gated_matmul on {xm:?}, {xx:?}, {xgx:?}, {xgy:?}"));
                }
                xx
            }
            Op::SolveUnitLower { l, b } => {
                let (xl, xb) = (f32_only(*l, "solve")?, f32_only(*b, "solve")?);
                if xl.rows != xl.cols || xl.rows != xb.rows {
                    return err(format!("solve_unit_lower with {xl:?} and {xb:?}"));
                }
                xb
            }
        })
    }

    /// First-fit offsets for all regions; returns the total size.
    fn assign_offsets(&mut self) -> usize {
        let mut order: Vec<usize> = (0..self.regions.len()).collect();
        order.sort_by_key(|&r| (self.regions[r].start, std::cmp::Reverse(self.regions[r].bytes)));
        let mut placed: Vec<usize> = vec![];
        let mut total = 0;
        for r in order {
            let (start, end, bytes) = (self.regions[r].start, self.regions[r].end, align_up(self.regions[r].bytes));
            if bytes == 0 {
                continue;
            }
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .map(|&p| &self.regions[p])
                .filter(|p| p.start <= end && start <= p.end)
                .map(|p| (p.off, p.off + align_up(p.bytes)))
                .collect();
            busy.sort_unstable();
            let mut off = 0;
            for (lo, hi) in busy {
                if off + bytes <= lo {
                    break;
                }
                off = off.max(hi);
            }
            self.regions[r].off = off;
            total = total.max(off + bytes);
            placed.push(r);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;

    /// A loop that loads two tiles per iteration and adds them into the carried state.
    fn looped() -> (Kernel, ValueId, ValueId) {
        let mut b = Builder::new("piped");
        let x = b.param("x", Access::Read);
        let o = b.param("o", Access::Write);
        let zero = b.constant(0.0, TileTy::f32(4, 8));
        let it = b.begin_loop(Idx::c(3), &[zero]);
        let base = Idx::var(IdxVar::Iter).mul(Idx::c(32));
        let l1 = b.load(x, base.clone(), 8, 1, 4, 8, Idx::c(4));
        let l2 = b.load(x, base.add(Idx::c(96)), 8, 1, 4, 8, Idx::c(4));
        let s = b.add(l1, l2);
        let y = b.add(it[0], s);
        let res = b.end_loop(&[y]);
        b.store(res[0], o, Idx::c(0), 8, 1, Idx::c(4));
        (b.finish(), l1, l2)
    }

    #[test]
    fn double_buffered_loads_get_two_parity_copies() {
        let (k, l1, l2) = looped();
        let single = plan(&k).expect("plan");
        assert!(single.loops[0].pipeline.is_none());
        assert!(single.storage.iter().flatten().all(|s| !s.phase));
        let piped = plan_with(&k, &|op| matches!(op, Op::Load { .. })).expect("plan");
        let pipe = piped.loops[0].pipeline.clone().expect("a pipeline");
        assert_eq!(pipe.loads, [l1, l2]);
        // Two 128-byte tiles, each 64-byte aligned: the odd copies start 256 bytes later.
        assert_eq!(pipe.stride, 256);
        let (s1, s2) = (piped.storage[l1.0 as usize].expect("l1"), piped.storage[l2.0 as usize].expect("l2"));
        assert!(s1.phase && s2.phase);
        assert_eq!(s2.off - s1.off, 128);
        // Both parities of both loads are disjoint from every other value live in the loop.
        let lo = s1.off.min(s2.off);
        let hi = lo + 2 * pipe.stride;
        for (v, st) in piped.storage.iter().enumerate() {
            let Some(st) = st else { continue };
            if st.phase {
                continue;
            }
            let bytes = (k.values[v].len() * k.values[v].dtype.size()) as i64;
            assert!(st.off + bytes <= lo || st.off >= hi, "%{v} at {} overlaps the buffers {lo}..{hi}", st.off);
        }
        assert!(piped.bytes >= single.bytes + 256, "the odd copies cost their bytes once more");
    }

    #[test]
    fn a_double_buffered_load_read_after_its_loop_is_refused() {
        let mut b = Builder::new("escape");
        let x = b.param("x", Access::Read);
        let o = b.param("o", Access::Write);
        let zero = b.constant(0.0, TileTy::f32(4, 8));
        let it = b.begin_loop(Idx::c(3), &[zero]);
        let l = b.load(x, Idx::var(IdxVar::Iter).mul(Idx::c(32)), 8, 1, 4, 8, Idx::c(4));
        let y = b.add(it[0], l);
        let res = b.end_loop(&[y]);
        let z = b.add(res[0], l);
        b.store(z, o, Idx::c(0), 8, 1, Idx::c(4));
        let k = b.finish();
        plan(&k).expect("single stage lays it out");
        let e = plan_with(&k, &|op| matches!(op, Op::Load { .. })).expect_err("no parity after the loop");
        assert!(e.0.contains("outside its loop"), "{}", e.0);
    }
}
