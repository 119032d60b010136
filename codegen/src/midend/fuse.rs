//! Fusion of elementwise chains, for any backend: what fuses depends on the backend's
//! abilities (its vector rule, its gemm, its fused routines), given as data.
//!
//! An elementwise value (`Unary`, `Binary`, `Cast`, `Mask`, `Const`) is *fused* when its only
//! use is as an operand of one later elementwise op (`Unary`, `Binary`, `Cast`, `Mask`) of the same statement
//! list (no loop boundary in between) with the same shape (a `Const` fuses at any shape: it
//! broadcasts). A fused value is never written: the op that finally materialises the chain
//! (its *root*) evaluates the whole expression tree per element, reading the tree's leaves
//! (materialised values) with their own strides and broadcasting, so a chain is one pass over
//! memory. Values with several uses, views' sources, operands of non-elementwise ops, stores,
//! loop inits and yields, and values crossing a loop boundary stay materialised.
//!
//! One fusion crosses into a non-elementwise op: a `mul(x, s)` whose only use is the
//! accumulator of a `Dot` that the gemm routine takes, with `s` a row scale (`[R x 1]` or a
//! scalar), is applied in the gemm's epilogue (`c = a @ b + diag(s) x`, [`row_scaled`]): the
//! chunk plans' state update `S' = diag(decay) S + K^T V` then makes one pass over the state
//! instead of two.
//!
//! The shared workspace planner (`layout.rs`) still reserves regions for fused values. Since
//! a root now reads its leaves at its own position rather than where the fused ops stood, the
//! backends plan a copy of the kernel in which every root is followed by a dead `Transpose`
//! view of each of its leaves: that keeps the leaves live through the root (a view takes no
//! region), and nothing else about the plan changes.

use super::Abilities;
use crate::ir::*;

/// What the fusion analysis decided for a kernel.
pub struct Fusion {
    /// `fused[v]`: `v` is computed inside its consumer and never materialised.
    pub fused: Vec<bool>,
    /// The defining op of every `Let` value.
    pub defs: Vec<Option<Op>>,
    /// The kernel the workspace is planned for (the original plus dead views; same values
    /// and loops in the same order, extra values appended).
    pub planning: Kernel,
    /// `scaled[m]`: `m` is a fused row-scaled accumulator `mul(x, s)` of a dot, as `(x, s)`.
    pub scaled: Vec<Option<(ValueId, ValueId)>>,
    /// `scaled_a[m]`: `m` is a fused row-scaled left operand `mul(x, s)` of a dot, as `(x, s)`:
    /// the gemm scales the product's rows instead.
    pub scaled_a: Vec<Option<(ValueId, ValueId)>>,
}

fn is_elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary { .. } | Op::Binary { .. } | Op::Cast { .. } | Op::Const { .. } | Op::Mask { .. })
}

/// Ops that can evaluate a fused operand inline.
fn is_consumer(op: &Op) -> bool {
    matches!(op, Op::Unary { .. } | Op::Binary { .. } | Op::Cast { .. } | Op::Mask { .. })
}

struct Scan {
    uses: Vec<u32>,
    /// A use that needs the value materialised.
    hard: Vec<bool>,
    /// Block of the definition, and of the single soft consumer.
    def_block: Vec<usize>,
    use_block: Vec<usize>,
    /// Shape of the consumer's result.
    use_shape: Vec<(usize, usize)>,
    defs: Vec<Option<Op>>,
    /// The op using the value (the last one seen; only read for single-use values).
    consumer: Vec<Option<ValueId>>,
    blocks: usize,
}

/// A candidate fuses unless that would turn a vectorised consumer into a scalar loop (a
/// chain through a dtype change or a math call fuses only into consumers that are scalar
/// anyway): an extra pass over a tile costs less than losing the vectors.
struct Decide<'k> {
    kernel: &'k Kernel,
    vectorises: fn(&Kernel, &Op, DType) -> bool,
    defs: &'k [Option<Op>],
    consumer: &'k [Option<ValueId>],
    candidate: Vec<bool>,
    /// Fuse whatever the vector rule says: the exp and the cast of a gate-factor tree that
    /// `decay.rs` evaluates in one call (see [`decay_chains`]).
    forced: Vec<bool>,
    /// (fused, the tree rooted here runs on vectors).
    memo: Vec<Option<(bool, bool)>>,
}

impl Decide<'_> {
    fn fused(&mut self, v: ValueId) -> (bool, bool) {
        let i = v.0 as usize;
        if let Some(m) = self.memo[i] {
            return m;
        }
        let r = match &self.defs[i] {
            Some(op) if is_elementwise(op) => {
                let mut vec = (self.vectorises)(self.kernel, op, self.kernel.ty(v).dtype);
                for o in op.operands() {
                    let (f, ov) = self.fused(o);
                    vec &= !f || ov;
                }
                let fuse = self.candidate[i]
                    && (self.forced[i] || vec || {
                        let c = self.consumer[i].expect("a candidate has a consumer");
                        let cop = self.defs[c.0 as usize].as_ref().expect("consumers are defined");
                        !(self.vectorises)(self.kernel, cop, self.kernel.ty(c).dtype)
                    });
                (fuse, vec)
            }
            _ => (false, false),
        };
        self.memo[i] = Some(r);
        r
    }
}

impl Scan {
    /// A use by a statement rather than an op (a store, a loop init or yield).
    fn hard_use(&mut self, v: ValueId) {
        self.uses[v.0 as usize] += 1;
        self.hard[v.0 as usize] = true;
    }

    fn block(&mut self, k: &Kernel, stmts: &[Stmt]) {
        let blk = self.blocks;
        self.blocks += 1;
        for s in stmts {
            match s {
                Stmt::Let { id, op } => {
                    let t = k.ty(*id);
                    for o in op.operands() {
                        let i = o.0 as usize;
                        self.uses[i] += 1;
                        self.consumer[i] = Some(*id);
                        if is_consumer(op) {
                            self.use_block[i] = blk;
                            self.use_shape[i] = (t.rows, t.cols);
                        } else {
                            self.hard[i] = true;
                        }
                    }
                    self.def_block[id.0 as usize] = blk;
                    self.defs[id.0 as usize] = Some(op.clone());
                }
                Stmt::Store { value, .. } => self.hard_use(*value),
                Stmt::Loop { carried, body, yields, .. } => {
                    for (_, init) in carried {
                        self.hard_use(*init);
                    }
                    self.block(k, body);
                    for y in yields {
                        self.hard_use(*y);
                    }
                }
            }
        }
    }
}

/// Marks the `Exp` and the f64 -> f32 `Cast` of every `mul(x, exp(cast_f32(e)))` whose inner
/// values are single-use candidates, and the `Cast` of every `exp(cast_f32(e))` that is its
/// own root (a factor the backward reads several times): with the decay routine (`decay.rs`)
/// the whole tree is one 16-lane pass, better than the two passes the vector rule would make
/// of it.
fn decay_chains(kernel: &Kernel, s: &Scan, candidate: &[bool]) -> Vec<bool> {
    let n = kernel.values.len();
    let mut forced = vec![false; n];
    let def = |v: ValueId| s.defs[v.0 as usize].as_ref();
    for (e, op) in s.defs.iter().enumerate() {
        let Some(Op::Unary { op: UnOp::Exp, x: c }) = op else { continue };
        let Some(Op::Cast { x: g, dtype: DType::F32 }) = def(*c) else { continue };
        let owned = candidate[c.0 as usize] && s.consumer[c.0 as usize] == Some(ValueId(e as u32));
        if kernel.ty(*g).dtype == DType::F64 && owned {
            forced[c.0 as usize] = true;
        }
    }
    for (m, op) in s.defs.iter().enumerate() {
        let Some(Op::Binary { op: BinOp::Mul, a, b }) = op else { continue };
        if kernel.values[m].dtype != DType::F32 {
            continue;
        }
        for e in [*a, *b] {
            let (ei, owned) = (e.0 as usize, |v: ValueId, by: usize| {
                candidate[v.0 as usize] && s.consumer[v.0 as usize] == Some(ValueId(by as u32))
            });
            let Some(Op::Unary { op: UnOp::Exp, x: c }) = def(e) else { continue };
            let Some(Op::Cast { x: g, dtype: DType::F32 }) = def(*c) else { continue };
            if kernel.ty(*g).dtype == DType::F64 && owned(e, m) && owned(*c, ei) {
                forced[ei] = true;
                forced[c.0 as usize] = true;
                break;
            }
        }
    }
    forced
}

/// The scaled tile `x` and row scale `s` of `mul(x, s)` (either operand order) when the
/// product `m` has that form: `x` the product's shape, `s` `[rows x 1]` or `[1 x 1]`, all f32.
fn row_scaled(kernel: &Kernel, defs: &[Option<Op>], m: ValueId) -> Option<(ValueId, ValueId)> {
    let Some(Op::Binary { op: BinOp::Mul, a, b }) = &defs[m.0 as usize] else { return None };
    let t = kernel.ty(m);
    let f32s = [m, *a, *b].iter().all(|v| kernel.ty(*v).dtype == DType::F32);
    let is_scale = |v: ValueId| {
        let s = kernel.ty(v);
        s.cols == 1 && (s.rows == t.rows || s.rows == 1)
    };
    let is_acc = |v: ValueId| kernel.ty(v).rows == t.rows && kernel.ty(v).cols == t.cols;
    [(*a, *b), (*b, *a)].into_iter().find(|&(x, s)| f32s && t.cols > 1 && is_acc(x) && is_scale(s))
}

/// Marks the `mul(x, s)` accumulators the gemm applies itself (module doc): single-use, in the
/// dot's block, of a dot the gemm takes whatever its strides, with both leaves materialised.
fn scaled_accumulators(
    kernel: &Kernel,
    s: &Scan,
    fused: &[bool],
    takes: fn(usize, usize, usize) -> bool,
) -> Vec<Option<(ValueId, ValueId)>> {
    let mut out = vec![None; kernel.values.len()];
    for (d, op) in s.defs.iter().enumerate() {
        let Some(Op::Dot { a, b, ta, acc: Some(m), .. }) = op else { continue };
        let mi = m.0 as usize;
        let k = if *ta { kernel.ty(*a).rows } else { kernel.ty(*a).cols };
        let t = kernel.ty(*m);
        let Some((x, sc)) = row_scaled(kernel, &s.defs, *m) else { continue };
        let single = s.uses[mi] == 1 && s.def_block[mi] == s.def_block[d] && m != a && m != b;
        if single && !fused[x.0 as usize] && !fused[sc.0 as usize] && takes(t.rows, t.cols, k) {
            out[mi] = Some((x, sc));
        }
    }
    out
}

/// Marks the `mul(x, s)` left operands (row-scaled, untransposed, single-use, in the dot's
/// statement list) of dots the gemm takes: `(diag(s) x) b = diag(s) (x b)`, one multiply per
/// element of the product instead of a pass over `x`.
fn scaled_left_operands(
    kernel: &Kernel,
    s: &Scan,
    fused: &[bool],
    takes: fn(usize, usize, usize) -> bool,
) -> Vec<Option<(ValueId, ValueId)>> {
    let mut out = vec![None; kernel.values.len()];
    for (d, op) in s.defs.iter().enumerate() {
        let Some(Op::Dot { a, b, ta: false, acc, .. }) = op else { continue };
        let ai = a.0 as usize;
        let Some((x, sc)) = row_scaled(kernel, &s.defs, *a) else { continue };
        let (t, k) = (kernel.ty(ValueId(d as u32)), kernel.ty(*a).cols);
        let single = s.uses[ai] == 1 && s.def_block[ai] == s.def_block[d] && a != b && *acc != Some(*a);
        let operands_kept = !fused[x.0 as usize] && !fused[sc.0 as usize] && !fused[ai];
        if single && operands_kept && takes(t.rows, t.cols, k) {
            out[ai] = Some((x, sc));
        }
    }
    out
}

/// Decides which values fuse for a backend with `abilities`, and builds the kernel to plan the
/// workspace for.
pub fn analyse(kernel: &Kernel, abilities: &Abilities) -> Fusion {
    let &Abilities { vectorises, scaled_gemm, scaled_accumulator, decay_routine: decay, sums_routine: sums } =
        abilities;
    let n = kernel.values.len();
    let mut s = Scan {
        uses: vec![0; n],
        hard: vec![false; n],
        def_block: vec![usize::MAX; n],
        use_block: vec![usize::MAX - 1; n],
        use_shape: vec![(0, 0); n],
        defs: vec![None; n],
        consumer: vec![None; n],
        blocks: 0,
    };
    s.block(kernel, &kernel.body);
    let candidate: Vec<bool> = (0..n)
        .map(|v| {
            let Some(op) = &s.defs[v] else { return false };
            let t = kernel.values[v];
            let shape_ok = matches!(op, Op::Const { .. }) || s.use_shape[v] == (t.rows, t.cols);
            is_elementwise(op) && s.uses[v] == 1 && !s.hard[v] && s.def_block[v] == s.use_block[v] && shape_ok
        })
        .collect();
    let forced = if decay { decay_chains(kernel, &s, &candidate) } else { vec![false; n] };
    let mut d =
        Decide { kernel, vectorises, defs: &s.defs, consumer: &s.consumer, candidate, forced, memo: vec![None; n] };
    let mut fused: Vec<bool> = (0..n).map(|v| d.fused(ValueId(v as u32)).0).collect();
    let scaled = match scaled_accumulator {
        Some(takes) => scaled_accumulators(kernel, &s, &fused, takes),
        None => vec![None; n],
    };
    fused.iter_mut().zip(&scaled).for_each(|(f, s)| *f |= s.is_some());
    let scaled_a = match scaled_gemm {
        Some(takes) => scaled_left_operands(kernel, &s, &fused, takes),
        None => vec![None; n],
    };
    fused.iter_mut().zip(&scaled_a).for_each(|(f, s)| *f |= s.is_some());
    if sums {
        for c in summed_casts(kernel, &s, &fused) {
            fused[c.0 as usize] = true;
        }
    }
    let mut planning = kernel.clone();
    planning.body = with_leaf_uses(&mut planning.values, &kernel.body, &fused, &s.defs);
    Fusion { fused, defs: s.defs, planning, scaled, scaled_a }
}

/// The casts `cast_f64(x)` of f32 values that only a `Cumsum` reads (in the same statement
/// list): `sums.rs` takes the cast into the running sum. `x` must be materialised and not a
/// transposed view (the routine reads rows of it).
fn summed_casts(kernel: &Kernel, s: &Scan, fused: &[bool]) -> Vec<ValueId> {
    let mut out = vec![];
    for (u, op) in s.defs.iter().enumerate() {
        let Some(Op::Cumsum { x: c, .. }) = op else { continue };
        let ci = c.0 as usize;
        let Some(Op::Cast { x, dtype: DType::F64 }) = &s.defs[ci] else { continue };
        let xi = x.0 as usize;
        let readable = kernel.ty(*x).dtype == DType::F32
            && !fused[xi]
            && !matches!(s.defs[xi], Some(Op::Transpose { .. }))
            && !fused[ci];
        if readable && s.uses[ci] == 1 && s.def_block[ci] == s.def_block[u] {
            out.push(*c);
        }
    }
    out
}

/// The materialised values a root reads through its fused operands (with repeats).
pub fn leaves(op: &Op, fused: &[bool], defs: &[Option<Op>], out: &mut Vec<ValueId>) {
    for o in op.operands() {
        if fused[o.0 as usize] {
            leaves(defs[o.0 as usize].as_ref().expect("fused values are defined"), fused, defs, out);
        } else {
            out.push(o);
        }
    }
}

fn with_leaf_uses(values: &mut Vec<TileTy>, stmts: &[Stmt], fused: &[bool], defs: &[Option<Op>]) -> Vec<Stmt> {
    let mut out = vec![];
    for s in stmts {
        match s {
            Stmt::Let { id, op } => {
                out.push(s.clone());
                if fused[id.0 as usize] || !op.operands().iter().any(|o| fused[o.0 as usize]) {
                    continue;
                }
                let mut ls = vec![];
                leaves(op, fused, defs, &mut ls);
                ls.sort();
                ls.dedup();
                for x in ls {
                    let t = values[x.0 as usize];
                    values.push(TileTy { rows: t.cols, cols: t.rows, dtype: t.dtype });
                    let id = ValueId((values.len() - 1) as u32);
                    out.push(Stmt::Let { id, op: Op::Transpose { x } });
                }
            }
            Stmt::Store { .. } => out.push(s.clone()),
            Stmt::Loop { count, carried, body, yields, results } => out.push(Stmt::Loop {
                count: count.clone(),
                carried: carried.clone(),
                body: with_leaf_uses(values, body, fused, defs),
                yields: yields.clone(),
                results: results.clone(),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;

    /// The CPU backend's vector rule, as its tests assume: f32 math vectorises, f64 math and
    /// casts between dtypes do not.
    fn cpu_like(k: &Kernel, op: &Op, dt: DType) -> bool {
        match op {
            Op::Unary { op, .. } => matches!(op, UnOp::Neg | UnOp::Sqrt | UnOp::Recip) || dt == DType::F32,
            Op::Cast { x, dtype } => k.ty(*x).dtype == *dtype,
            _ => true,
        }
    }

    /// A gemm that takes products of at least 16 x 16 x 16.
    fn large(m: usize, n: usize, k: usize) -> bool {
        m >= 16 && n >= 16 && k >= 16
    }

    fn abilities(gemm: bool, sums: bool) -> Abilities {
        Abilities {
            vectorises: cpu_like,
            scaled_gemm: gemm.then_some(large),
            scaled_accumulator: gemm.then_some(large),
            decay_routine: false,
            sums_routine: sums,
        }
    }

    #[test]
    fn single_use_elementwise_chains_fuse_and_the_rest_stays() {
        let mut b = Builder::new("f");
        let (px, pp, py, pz) = (
            b.param("x", Access::Read),
            b.param("p", Access::Read),
            b.param("y", Access::Write),
            b.param("z", Access::Write),
        );
        let x = b.load(px, Idx::c(0), 8, 1, 4, 8, Idx::c(4));
        let p = b.load(pp, Idx::c(0), 8, 1, 1, 8, Idx::c(1));
        let p64 = b.cast(p, DType::F64); // broadcast operand of a bigger op: materialised
        let x64 = b.cast(x, DType::F64); // scalar, into a vector op: materialised
        let d = b.sub(x64, p64); // fused (a vector tree)
        let m = b.mask(d, MaskKind::Tril { strict: true }, f64::NEG_INFINITY); // fused
        let e = b.exp(m); // fused (an f64 exp is a call: scalar)
        let e32 = b.cast(e, DType::F32); // scalar tree, into a vector op: materialised
        let c = b.constant(2.0, TileTy::f32(1, 1)); // fused (a constant broadcasts)
        let twice = b.mul(e32, c); // used twice: materialised
        let y = b.add(twice, twice); // stored: materialised
        b.store(y, py, Idx::c(0), 8, 1, Idx::c(4));
        let n = b.neg(x); // feeds a dot: materialised
        let dot = b.dot(n, x, false, true, None);
        let s = b.exp(dot);
        let outer = b.neg(s); // crosses the loop boundary: materialised
        let st = b.begin_loop(Idx::c(2), &[outer])[0];
        let inner = b.exp(outer); // fused into the body op (its leaf is from outside)
        let next = b.mul(st, inner);
        let out = b.end_loop(&[next])[0];
        b.store(out, pz, Idx::c(0), 4, 1, Idx::c(4));
        let k = b.finish();
        let f = analyse(&k, &abilities(false, false));
        let fused = |v: ValueId| f.fused[v.0 as usize];
        for v in [d, m, e, c, s, inner] {
            assert!(fused(v), "{v} should fuse");
        }
        for v in [x, p, p64, x64, e32, twice, y, n, dot, outer, next] {
            assert!(!fused(v), "{v} should not fuse");
        }
        crate::midend::layout::plan(&f.planning).expect("the planning kernel is valid");
    }

    /// A gate factor `exp(cast_f32(mask(sub)))` read twice (as the backward reads it) is its
    /// own root: with the decay routine its cast fuses into it (one 16-lane pass), without
    /// the routine the vector rule keeps the cast a pass of its own.
    #[test]
    fn a_reused_gate_factor_fuses_its_cast_where_the_decay_routine_is() {
        let mut b = Builder::new("factor");
        let (pg, po) = (b.param("g", Access::Read), b.param("o", Access::Write));
        let g = b.load(pg, Idx::c(0), 8, 1, 8, 8, Idx::c(8));
        let g64 = b.cast(g, DType::F64);
        let t = b.transpose(g64);
        let d = b.sub(g64, t);
        let m = b.mask(d, MaskKind::Tril { strict: false }, f64::NEG_INFINITY);
        let c = b.cast(m, DType::F32);
        let e = b.exp(c); // read by two products: materialised, the tree's root
        let y = b.mul(g, e);
        let z = b.mul(y, e);
        b.store(z, po, Idx::c(0), 8, 1, Idx::c(8));
        let k = b.finish();
        let with = analyse(&k, &Abilities { decay_routine: true, ..abilities(false, false) });
        assert!(with.fused[c.0 as usize] && with.fused[m.0 as usize] && with.fused[d.0 as usize]);
        assert!(!with.fused[e.0 as usize], "the factor itself is read twice");
        crate::midend::layout::plan(&with.planning).expect("the planning kernel is valid");
        let without = analyse(&k, &abilities(false, false));
        assert!(!without.fused[c.0 as usize], "no routine: the f64 tree and the exp are two passes");
    }

    #[test]
    fn a_cast_only_a_cumsum_reads_fuses_where_the_sums_routine_is() {
        let mut b = Builder::new("sums");
        let (pg, po, pp) = (b.param("g", Access::Read), b.param("o", Access::Write), b.param("p", Access::Write));
        let g = b.load(pg, Idx::c(0), 8, 1, 4, 8, Idx::c(4));
        let g64 = b.cast(g, DType::F64); // only the cumsum reads it
        let sum = b.cumsum(g64, false);
        let h = b.exp(g);
        let h64 = b.cast(h, DType::F64); // read by a cumsum and a store
        let sum2 = b.cumsum(h64, true);
        b.store(sum, po, Idx::c(0), 8, 1, Idx::c(4));
        b.store(sum2, po, Idx::c(32), 8, 1, Idx::c(4));
        b.store(h64, pp, Idx::c(0), 8, 1, Idx::c(4));
        let k = b.finish();
        let with = analyse(&k, &abilities(false, true));
        assert!(with.fused[g64.0 as usize]);
        assert!(!with.fused[h64.0 as usize], "a cast with another use stays");
        assert!(!with.fused[g.0 as usize]);
        crate::midend::layout::plan(&with.planning).expect("the planning kernel is valid");
        let without = analyse(&k, &abilities(false, false));
        assert!(!without.fused[g64.0 as usize], "no routine: the cast is a pass of its own");
    }

    #[test]
    fn a_row_scaled_left_operand_fuses_only_into_a_large_dot() {
        for (m, fuses) in [(16, true), (4, false)] {
            let mut b = Builder::new("scaled_a");
            let (pa, ps, po) = (b.param("a", Access::Read), b.param("s", Access::Read), b.param("o", Access::Write));
            let x = b.load(pa, Idx::c(0), 16, 1, m, 16, Idx::c(m as i64));
            let w = b.load(pa, Idx::c(0), 16, 1, 16, 16, Idx::c(16));
            let s = b.load(ps, Idx::c(0), 1, 1, m, 1, Idx::c(m as i64));
            let q = b.mul(x, s); // the left operand of a dot without an accumulator
            let y = b.dot(q, w, false, false, None);
            b.store(y, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            let q2 = b.mul(x, s); // the same with an accumulator
            let z = b.dot(q2, w, false, false, Some(y));
            let q3 = b.mul(x, s); // also stored: stays
            let z3 = b.dot(q3, w, false, false, None);
            b.store(z3, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            b.store(q3, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            b.store(z, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            let k = b.finish();
            let f = analyse(&k, &abilities(true, false));
            assert_eq!(f.scaled_a[q.0 as usize], fuses.then_some((x, s)), "m = {m}");
            assert_eq!(f.fused[q.0 as usize], fuses);
            assert_eq!(f.scaled_a[q2.0 as usize], fuses.then_some((x, s)), "m = {m}, with an accumulator");
            assert!(!f.fused[q3.0 as usize] && f.scaled_a[q3.0 as usize].is_none());
            crate::midend::layout::plan(&f.planning).expect("the planning kernel is valid");
            let without = analyse(&k, &abilities(false, false));
            assert!(!without.fused[q.0 as usize], "no gemm: the scaling is a pass");
        }
    }

    #[test]
    fn a_row_scaled_accumulator_fuses_into_a_large_dot_only() {
        // acc = mul(x, s) for an m x 16 product over 16: with m = 16 the gemm takes it
        // (4096 multiply-adds), with m = 4 it stays inline and the scaling stays a pass.
        for (m, fuses) in [(16, true), (4, false)] {
            let mut b = Builder::new("scaled");
            let (pa, px, ps, po) = (
                b.param("a", Access::Read),
                b.param("x", Access::Read),
                b.param("s", Access::Read),
                b.param("o", Access::Write),
            );
            let a = b.load(pa, Idx::c(0), 16, 1, m, 16, Idx::c(m as i64));
            let w = b.load(pa, Idx::c(0), 16, 1, 16, 16, Idx::c(16));
            let x = b.load(px, Idx::c(0), 16, 1, m, 16, Idx::c(m as i64));
            let s = b.load(ps, Idx::c(0), 1, 1, m, 1, Idx::c(m as i64));
            let scaled = b.mul(s, x); // the scale first: either order is recognised
            let twice = b.mul(x, s); // used by the dot and a store: stays
            let y = b.dot(a, w, false, false, Some(scaled));
            b.store(y, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            let z = b.dot(a, w, false, false, Some(twice));
            b.store(z, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            b.store(twice, po, Idx::c(0), 16, 1, Idx::c(m as i64));
            let k = b.finish();
            let f = analyse(&k, &abilities(true, false));
            assert_eq!(f.fused[scaled.0 as usize], fuses, "m = {m}");
            assert_eq!(f.scaled[scaled.0 as usize], fuses.then_some((x, s)));
            assert!(!f.fused[twice.0 as usize]);
            crate::midend::layout::plan(&f.planning).expect("the planning kernel is valid");
        }
    }
}
