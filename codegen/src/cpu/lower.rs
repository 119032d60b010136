//! Lowering of tile-IR statements to Cranelift IR: every op becomes loop nests over the
//! workspace regions planned by `midend::layout`.
//!
//! Loops are built from blocks whose parameters carry the counter and any loop-carried
//! values (accumulators, running pointers). Elementwise ops run along rows with f32x4 /
//! f64x2 vectors where every operand's column stride is 1 (or 0, a broadcast); `Dot` and
//! `SolveUnitLower` use register-blocked row kernels (up to four vectors of one output row
//! accumulated over the inner dimension).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, BlockArg, Endianness, FuncRef, InstBuilder, MemFlagsData, SourceLoc, Type, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

use super::home::{self, Home};
use super::vmath::VMath;
use super::{gemm, rows};
use crate::ir::*;
use crate::midend::layout::{Plan, Storage, YieldCopy};
use crate::midend::{Fusion, Prepared};

/// The math routines the generated code calls, in the order of [`super::MATH_F32`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Math {
    Exp = 0,
    Exp2,
    Log,
    Sigmoid,
    Softplus,
    Silu,
    Tanh,
    Pow,
}

/// Imported math functions: `f32[m as usize]` / `f64[m as usize]`.
pub(super) struct MathFns {
    pub f32: Vec<FuncRef>,
    pub f64: Vec<FuncRef>,
    /// The `Dot` microkernel (gemm.rs), where the host has one.
    pub gemm: Option<FuncRef>,
    /// The `GatedDot` routines for f32 and f64 gates (gated.rs), where the host has them.
    pub gated: Option<[FuncRef; 2]>,
    /// The `GatedMatMul` routines for f32 and f64 gates (gated_matmul.rs), where the host
    /// has them.
    pub gated_matmul: Option<[FuncRef; 2]>,
    /// The gate-factor routine (decay.rs), where the host has it.
    pub decay: Option<FuncRef>,
    /// The cumulative-gate routine (sums.rs), where the host has it.
    pub sums: Option<FuncRef>,
    /// The forward substitution routine (solve.rs), where the host has it.
    pub solve: Option<FuncRef>,
    /// `rows.rs`: bulk row copies for loads and stores (not at the portable level).
    pub copy_rows: Option<FuncRef>,
    /// `prefetch.rs`: hints the next iteration's input rows into cache.
    pub prefetch: FuncRef,
}

/// Source location of a `Store` of value v: `STORE_LOC + v` (see `Lower::block`).
pub(super) const STORE_LOC: u32 = 1 << 30;
/// Source location of a loop's carried-value copies and control.
pub(super) const LOOP_LOC: u32 = (1 << 31) - 1;

/// Memory access to a 2-D array of elements: element (i, j) at `ptr + (i*rs + j*cs) * size`.
#[derive(Clone, Copy, Debug)]
struct Acc {
    ptr: Value,
    rs: i64,
    cs: i64,
    dt: DType,
}

impl Acc {
    fn size(&self) -> i64 {
        self.dt.size() as i64
    }
}

/// Rows an elementwise loop covers.
#[derive(Clone, Copy)]
enum RowRange {
    /// All rows `0..n` (known statically).
    Full(usize),
    /// Rows `start..end` (run-time values).
    Dyn(Value, Value),
}

fn scalar_ty(dt: DType) -> Type {
    match dt {
        DType::F32 => types::F32,
        DType::F64 => types::F64,
    }
}

fn vector_ty(dt: DType) -> Type {
    match dt {
        DType::F32 => types::F32X4,
        DType::F64 => types::F64X2,
    }
}

/// f32 exp, exp2, sigmoid, silu, log and softplus are inline (vmath.rs); the rest call out.
fn inline_unary(op: UnOp, dt: DType) -> bool {
    dt == DType::F32 && matches!(op, UnOp::Exp | UnOp::Exp2 | UnOp::Sigmoid | UnOp::Silu | UnOp::Log | UnOp::Softplus)
}

/// A fused elementwise expression (see `midend::fuse`): leaves index the accesses read per element;
/// every node carries its dtype.
enum Ex {
    Leaf(usize),
    Const(f64, DType),
    Un(UnOp, DType, Box<Ex>),
    Bin(BinOp, DType, Box<Ex>, Box<Ex>),
    /// From, to.
    Cast(DType, DType, Box<Ex>),
    /// Which elements are kept, the fill of the others.
    Mask(MaskRow, f64, DType, Box<Ex>),
}

/// A mask's rule, per element at (i, j).
#[derive(Clone, Copy)]
enum MaskRow {
    /// `j < i` (strict) or `j <= i`.
    Tril(bool),
    /// `i <` the run-time limit.
    Before(Value),
}

impl Ex {
    /// Whether the tree can run on vectors of `root`'s dtype (the leaves are checked by `ew`).
    fn vec_ok(&self, root: DType) -> bool {
        match self {
            Ex::Leaf(_) => true,
            Ex::Const(_, d) => *d == root,
            Ex::Un(op, d, x) => {
                *d == root
                    && (inline_unary(*op, *d) || matches!(op, UnOp::Neg | UnOp::Sqrt | UnOp::Recip | UnOp::Abs))
                    && x.vec_ok(root)
            }
            Ex::Bin(op, d, a, b) => *d == root && *op != BinOp::Pow && a.vec_ok(root) && b.vec_ok(root),
            Ex::Cast(from, to, x) => from == to && x.vec_ok(root),
            Ex::Mask(_, _, d, x) => *d == root && x.vec_ok(root),
        }
    }

    /// Whether the tree can run on vectors with two elements per step where its dtypes differ
    /// (`Lower::mixed`): f64 nodes as f64x2, f32 nodes in the low half of f32x4.
    fn mixed_ok(&self) -> bool {
        match self {
            Ex::Leaf(_) | Ex::Const(..) => true,
            Ex::Un(op, d, x) => {
                (inline_unary(*op, *d) || matches!(op, UnOp::Neg | UnOp::Sqrt | UnOp::Recip | UnOp::Abs))
                    && x.mixed_ok()
            }
            Ex::Bin(op, _, a, b) => *op != BinOp::Pow && a.mixed_ok() && b.mixed_ok(),
            Ex::Cast(_, _, x) | Ex::Mask(_, _, _, x) => x.mixed_ok(),
        }
    }

    fn has_mask(&self) -> bool {
        match self {
            Ex::Leaf(_) | Ex::Const(..) => false,
            Ex::Un(_, _, x) | Ex::Cast(_, _, x) => x.has_mask(),
            Ex::Bin(_, _, a, b) => a.has_mask() || b.has_mask(),
            Ex::Mask(..) => true,
        }
    }
}

/// Bytes in one SIMD vector.
const VBYTES: i64 = 16;

type EwFn<'c, 'a, 'f> = dyn (FnMut(&mut Lower<'a, 'f>, Type, &[Value]) -> Value) + 'c;
/// A loop body: gets the counter and the carried values, returns the next carried values.
type LoopBody<'c, 'a, 'f> = dyn (FnMut(&mut Lower<'a, 'f>, Value, &[Value]) -> Vec<Value>) + 'c;

pub(super) struct Lower<'a, 'f> {
    b: &'a mut FunctionBuilder<'f>,
    kernel: &'a Kernel,
    fusion: &'a Fusion,
    plan: &'a Plan,
    math: &'a MathFns,
    fma: bool,
    params: Vec<Value>,
    ws: Value,
    batch: Value,
    head: Value,
    seq_len: Value,
    /// V-tile of the grid point (0 for a kernel over the whole V).
    vtile: Value,
    /// `[first, end)` of the loop's iterations for this call (clamped to `[0, count)`).
    iters: (Value, Value),
    /// Per loop (pre-order), the state update the mid-end writes in place (`midend::inplace`).
    in_place_dots: &'a [Option<ValueId>],
    /// The current loop's state update computed straight into its carried region: (the
    /// value, the region it is written to instead of its own).
    in_place: Option<(ValueId, Acc)>,
    /// The top-level loop's states kept in their state-out buffers (`home.rs`), if so.
    homes: Option<Vec<Home>>,
    /// Values that live in a state-out buffer (the homed carried values and loop results),
    /// from the homed loop's start on.
    homed: Vec<(ValueId, Acc)>,
    /// The homed loop's states, whose store after the loop copies only when the loop ran in
    /// the workspace.
    homed_results: Vec<Home>,
    iter: Variable,
    /// Whether a `Loop` body is being lowered (loads there prefetch one iteration ahead).
    in_loop: bool,
    next_loop: usize,
    flags: MemFlagsData,
    /// Set while `ew` lowers a tree with a `Mask`: rows are not merged, and `pos_row` /
    /// `pos_col` hold the row and (first) column of the element being computed.
    want_pos: bool,
    /// Set while `ew` lowers a vectorisable tree whose nodes mix f32 and f64: vectors then
    /// cover two elements (f64x2, and the low half of f32x4), casts are `fvpromote_low` /
    /// `fvdemote`. Two lanes of f64 at a time beat the scalar loop such trees had.
    mixed: bool,
    pos_row: Option<Value>,
    pos_col: Option<Value>,
}

impl<'a, 'f> Lower<'a, 'f> {
    /// Emits the whole function body into `b` (whose entry block must be current, with the
    /// six ABI parameters given here).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        b: &'a mut FunctionBuilder<'f>,
        prepared: &'a Prepared,
        math: &'a MathFns,
        fma: bool,
        abi: [Value; 8],
    ) {
        let Prepared { kernel, fusion, plan, in_place } = prepared;
        let [params_ptr, batch, head, seq_len, ws, vtile, first_iter, end_iter] = abi;
        let flags = MemFlagsData::new().with_notrap();
        let params = (0..kernel.params.len())
            .map(|p| b.ins().load(types::I64, flags.with_readonly(), params_ptr, (p * 8) as i32))
            .collect();
        let iter = b.declare_var(types::I64);
        let zero = b.ins().iconst(types::I64, 0);
        b.def_var(iter, zero);
        let homes = super::home::analyse(kernel, fusion, plan);
        let mut l = Lower {
            b,
            kernel,
            fusion,
            plan,
            in_place_dots: in_place,
            math,
            fma,
            params,
            ws,
            batch,
            head,
            seq_len,
            vtile,
            iters: (first_iter, end_iter),
            in_place: None,
            homes,
            homed: vec![],
            homed_results: vec![],
            iter,
            in_loop: false,
            next_loop: 0,
            flags,
            want_pos: false,
            mixed: false,
            pos_row: None,
            pos_col: None,
        };
        l.block(&kernel.body);
        l.b.ins().return_(&[]);
    }

    // ---- small helpers -------------------------------------------------------------------

    fn iconst(&mut self, x: i64) -> Value {
        self.b.ins().iconst(types::I64, x)
    }

    /// `p + bytes`.
    fn offset(&mut self, p: Value, bytes: i64) -> Value {
        if bytes == 0 {
            p
        } else {
            self.b.ins().iadd_imm_s(p, bytes)
        }
    }

    /// `p + i * bytes`.
    fn scaled(&mut self, p: Value, i: Value, bytes: i64) -> Value {
        if bytes == 0 {
            return p;
        }
        let d = self.b.ins().imul_imm_s(i, bytes);
        self.b.ins().iadd(p, d)
    }

    fn load(&mut self, ty: Type, p: Value, off: i64) -> Value {
        match i32::try_from(off) {
            Ok(o) => self.b.ins().load(ty, self.flags, p, o),
            Err(_) => {
                let q = self.offset(p, off);
                self.b.ins().load(ty, self.flags, q, 0)
            }
        }
    }

    fn store(&mut self, v: Value, p: Value, off: i64) {
        match i32::try_from(off) {
            Ok(o) => {
                self.b.ins().store(self.flags, v, p, o);
            }
            Err(_) => {
                let q = self.offset(p, off);
                self.b.ins().store(self.flags, v, q, 0);
            }
        }
    }

    /// A float constant of type `ty` (scalar or vector).
    fn fconst(&mut self, ty: Type, x: f64) -> Value {
        let lane = ty.lane_type();
        let s = if lane == types::F32 { self.b.ins().f32const(x as f32) } else { self.b.ins().f64const(x) };
        if ty.is_vector() {
            self.b.ins().splat(ty, s)
        } else {
            s
        }
    }

    /// `acc + x * y`, fused where the host has FMA.
    fn madd(&mut self, x: Value, y: Value, acc: Value) -> Value {
        if self.fma {
            self.b.ins().fma(x, y, acc)
        } else {
            let p = self.b.ins().fmul(x, y);
            self.b.ins().fadd(acc, p)
        }
    }

    /// The inline f32 math emitter (vmath.rs).
    fn vmath(&mut self) -> VMath<'_, 'f> {
        VMath { b: &mut *self.b, fma: self.fma }
    }

    /// `e^d` as f32 for an exponent `d` of the gates' dtype: f64 gates take the f64 `exp`
    /// and round, f32 gates the inline vector-math one (as the interpreter's `GatedDot`).
    fn gate_exp(&mut self, gdt: DType, d: Value) -> Value {
        if gdt == DType::F64 {
            let e = self.call(Math::Exp, gdt, &[d]);
            self.b.ins().fdemote(types::F32, e)
        } else {
            self.vmath().exp(types::F32, d)
        }
    }

    fn call(&mut self, m: Math, dt: DType, args: &[Value]) -> Value {
        let f = match dt {
            DType::F32 => self.math.f32[m as usize],
            DType::F64 => self.math.f64[m as usize],
        };
        let inst = self.b.ins().call(f, args);
        self.b.inst_results(inst)[0]
    }

    /// Storage of a value as an access with the workspace pointer.
    fn val(&mut self, v: ValueId) -> Acc {
        if let Some(&(_, acc)) = self.homed.iter().find(|(x, _)| *x == v) {
            return acc;
        }
        match self.in_place {
            Some((x, acc)) if x == v => acc,
            _ => {
                let s = self.plan.storage[v.0 as usize].expect("layout checked that values are defined before use");
                self.at(s, self.kernel.ty(v).dtype)
            }
        }
    }

    fn at(&mut self, s: Storage, dt: DType) -> Acc {
        let ptr = self.offset(self.ws, s.off);
        Acc { ptr, rs: s.rs, cs: s.cs, dt }
    }

    /// Lowers an index expression to an i64 value.
    fn idx(&mut self, e: &Idx) -> Value {
        match e {
            Idx::Const(c) => self.iconst(*c),
            Idx::Var(IdxVar::Batch) => self.batch,
            Idx::Var(IdxVar::Head) => self.head,
            Idx::Var(IdxVar::SeqLen) => self.seq_len,
            Idx::Var(IdxVar::VTile) => self.vtile,
            Idx::Var(IdxVar::Iter) => self.b.use_var(self.iter),
            Idx::Add(x, y) | Idx::Sub(x, y) | Idx::Mul(x, y) | Idx::Min(x, y) => {
                let (p, q) = (self.idx(x), self.idx(y));
                match e {
                    Idx::Add(..) => self.b.ins().iadd(p, q),
                    Idx::Sub(..) => self.b.ins().isub(p, q),
                    Idx::Mul(..) => self.b.ins().imul(p, q),
                    _ => self.b.ins().smin(p, q),
                }
            }
            Idx::CeilDiv(x, d) => {
                // floor((x + d - 1) / d) for d > 0: truncating division, minus one when the
                // dividend is negative and not a multiple of d.
                let x = self.idx(x);
                let n = self.b.ins().iadd_imm_s(x, d - 1);
                let q = self.b.ins().sdiv_imm_s(n, *d);
                let back = self.b.ins().imul_imm_s(q, *d);
                let inexact = self.b.ins().icmp(IntCC::NotEqual, back, n);
                let neg = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, n, 0);
                let fix = self.b.ins().band(inexact, neg);
                let fix = self.b.ins().uextend(types::I64, fix);
                self.b.ins().isub(q, fix)
            }
        }
    }

    /// `clamp(x, 0, hi)`.
    fn clamp_rows(&mut self, x: Value, hi: usize) -> Value {
        let zero = self.iconst(0);
        let hi = self.iconst(hi as i64);
        let x = self.b.ins().smax(x, zero);
        self.b.ins().smin(x, hi)
    }

    /// `for i in start..end (step 1)`, carrying `init` through the iterations; returns the
    /// carried values after the last iteration (`init` when there is none).
    fn for_loop(&mut self, start: Value, end: Value, init: &[Value], body: &mut LoopBody<'_, 'a, 'f>) -> Vec<Value> {
        let header = self.b.create_block();
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        let i = self.b.append_block_param(header, types::I64);
        let mut carried = vec![];
        let mut out = vec![];
        for v in init {
            let ty = self.b.func.dfg.value_type(*v);
            carried.push(self.b.append_block_param(header, ty));
            out.push(self.b.append_block_param(exit, ty));
        }
        let mut args: Vec<BlockArg> = vec![start.into()];
        args.extend(init.iter().map(|v| BlockArg::from(*v)));
        self.b.ins().jump(header, &args);

        self.b.switch_to_block(header);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, i, end);
        let exit_args: Vec<BlockArg> = carried.iter().map(|v| BlockArg::from(*v)).collect();
        self.b.ins().brif(more, inner, &[], exit, &exit_args);

        self.b.switch_to_block(inner);
        let next = body(self, i, &carried);
        assert_eq!(next.len(), carried.len(), "loop body returns one value per carried value");
        let i1 = self.b.ins().iadd_imm_s(i, 1);
        let mut args: Vec<BlockArg> = vec![i1.into()];
        args.extend(next.iter().map(|v| BlockArg::from(*v)));
        self.b.ins().jump(header, &args);

        self.b.switch_to_block(exit);
        out
    }

    /// `for i in 0..n` over a static count, without carried values.
    fn for_n(&mut self, n: usize, body: &mut dyn FnMut(&mut Self, Value)) {
        if n == 0 {
            return;
        }
        if n == 1 {
            let zero = self.iconst(0);
            body(self, zero);
            return;
        }
        let (s, e) = (self.iconst(0), self.iconst(n as i64));
        self.for_loop(s, e, &[], &mut |l, i, _| {
            body(l, i);
            vec![]
        });
    }

    // ---- elementwise -------------------------------------------------------------------

    /// `out[i, j] = f(ins[0][i, j], ...)` for the rows in `rows` and `j < cols`. `f` gets the
    /// operand values (scalars of each operand's dtype, or vectors when `vec_ok`, all dtypes
    /// agree and every column stride is 0 or 1) and the type to produce.
    fn ew(&mut self, rows: RowRange, cols: usize, ins: &[Acc], out: Acc, vec_ok: bool, f: &mut EwFn<'_, 'a, 'f>) {
        if cols == 0 {
            return;
        }
        let mut all: Vec<Acc> = ins.to_vec();
        all.push(out);
        // A range of full contiguous rows (in every operand) is one long row.
        let (rows, cols) = match rows {
            RowRange::Full(r) if r > 1 && !self.want_pos && all.iter().all(|a| a.rs == cols as i64 * a.cs) => {
                (RowRange::Full(1), r * cols)
            }
            r => (r, cols),
        };
        let lanes = if self.mixed { 2 } else { VBYTES as usize / out.dt.size() };
        let vec = vec_ok
            && cols >= lanes
            && all.iter().all(|a| (self.mixed || a.dt == out.dt) && (a.cs == 0 || a.cs == 1))
            && out.cs == 1;
        let mut row = |l: &mut Self, i: Option<Value>| {
            let ptrs: Vec<Value> = all
                .iter()
                .map(|a| match i {
                    Some(i) => l.scaled(a.ptr, i, a.rs * a.size()),
                    None => a.ptr,
                })
                .collect();
            if l.want_pos {
                l.pos_row = Some(i.unwrap_or_else(|| l.iconst(0)));
            }
            l.ew_row(&all, &ptrs, cols, vec, f);
        };
        match rows {
            RowRange::Full(0) => {}
            RowRange::Full(1) => row(self, None),
            RowRange::Full(r) => self.for_n(r, &mut |l, i| row(l, Some(i))),
            RowRange::Dyn(s, e) => {
                self.for_loop(s, e, &[], &mut |l, i, _| {
                    row(l, Some(i));
                    vec![]
                });
            }
        }
    }

    /// Where `ew` runs with `want_pos`, sets the column of the next element (or vector).
    fn set_pos_col_const(&mut self, j: i64) {
        if self.want_pos {
            self.pos_col = Some(self.iconst(j));
        }
    }

    /// One row of [`Self::ew`]; `ptrs` point at the row's first element of each access.
    fn ew_row(&mut self, all: &[Acc], ptrs: &[Value], cols: usize, vec: bool, f: &mut EwFn<'_, 'a, 'f>) {
        let n = all.len() - 1;
        let out = all[n];
        let mut done = 0;
        if vec {
            let vty = vector_ty(out.dt);
            let mixed = self.mixed;
            let lanes = if mixed { 2 } else { VBYTES as usize / out.dt.size() };
            let chunks = cols / lanes;
            // Bytes one step covers in an access of dtype `dt` (a whole vector unless mixed).
            let step = |dt: DType| lanes as i64 * dt.size() as i64;
            let bits = MemFlagsData::new().with_endianness(Endianness::Little);
            let mut chunk = |l: &mut Self, ptrs: &[Value], c: i64| {
                let mut xs = vec![];
                for (a, p) in all[..n].iter().zip(ptrs) {
                    let aty = vector_ty(a.dt);
                    if a.cs == 0 {
                        let s = l.load(scalar_ty(a.dt), *p, 0);
                        xs.push(l.b.ins().splat(aty, s));
                    } else if mixed && a.dt == DType::F32 {
                        // Two f32 (8 bytes) into the low half of a vector.
                        let s = l.load(types::F64, *p, c * step(a.dt));
                        let v = l.b.ins().scalar_to_vector(types::F64X2, s);
                        xs.push(l.b.ins().bitcast(types::F32X4, bits, v));
                    } else {
                        xs.push(l.load(aty, *p, c * step(a.dt)));
                    }
                }
                let y = f(l, vty, &xs);
                if mixed && out.dt == DType::F32 {
                    let v = l.b.ins().bitcast(types::F64X2, bits, y);
                    let s = l.b.ins().extractlane(v, 0);
                    l.store(s, ptrs[n], c * step(out.dt));
                } else {
                    l.store(y, ptrs[n], c * step(out.dt));
                }
            };
            if chunks <= 8 {
                for c in 0..chunks {
                    self.set_pos_col_const((c * lanes) as i64);
                    chunk(self, ptrs, c as i64);
                }
            } else {
                let (s, e) = (self.iconst(0), self.iconst(chunks as i64));
                self.for_loop(s, e, &[], &mut |l, c, _| {
                    let moved: Vec<Value> =
                        all.iter().zip(ptrs).map(|(a, p)| l.scaled(*p, c, a.cs * step(a.dt))).collect();
                    if l.want_pos {
                        l.pos_col = Some(l.b.ins().imul_imm_s(c, lanes as i64));
                    }
                    chunk(l, &moved, 0);
                    vec![]
                });
            }
            done = chunks * lanes;
        }
        let mut scalar = |l: &mut Self, ptrs: &[Value], j: i64| {
            let xs: Vec<Value> =
                all[..n].iter().zip(ptrs).map(|(a, p)| l.load(scalar_ty(a.dt), *p, j * a.cs * a.size())).collect();
            let y = f(l, scalar_ty(out.dt), &xs);
            l.store(y, ptrs[n], j * out.cs * out.size());
        };
        if vec || cols - done <= 16 {
            for j in done..cols {
                self.set_pos_col_const(j as i64);
                scalar(self, ptrs, j as i64);
            }
        } else {
            let (s, e) = (self.iconst(done as i64), self.iconst(cols as i64));
            self.for_loop(s, e, &[], &mut |l, j, _| {
                let moved: Vec<Value> = all.iter().zip(ptrs).map(|(a, p)| l.scaled(*p, j, a.cs * a.size())).collect();
                if l.want_pos {
                    l.pos_col = Some(j);
                }
                scalar(l, &moved, 0);
                vec![]
            });
        }
    }

    /// Copies a whole tile (same dtype) from `src` to `dst`.
    fn copy(&mut self, ty: TileTy, src: Acc, dst: Acc) {
        self.ew(RowRange::Full(ty.rows), ty.cols, &[src], dst, true, &mut |_, _, x| x[0]);
    }

    // ---- statements ----------------------------------------------------------------------

    fn block(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            // Source locations tag the machine code with the statement it came from, for the
            // per-op profile map (mod.rs, `CHUNKC_PERF_MAP`): a `Let` with its value id + 1,
            // a store with `STORE_LOC` plus its value id, loop copies with `LOOP_LOC`.
            let loc = match s {
                Stmt::Let { id, .. } => id.0 + 1,
                Stmt::Store { value, .. } => STORE_LOC + value.0,
                Stmt::Loop { .. } => LOOP_LOC,
            };
            self.b.set_srcloc(SourceLoc::new(loc));
            match s {
                Stmt::Let { id, op } => self.op(*id, op),
                Stmt::Store { value, param, base, row_stride, col_stride, valid_rows } => {
                    if let Some(h) = self.homed_results.iter().find(|h| h.result == *value).cloned() {
                        // A homed state's one store (`resume`'s condition): nothing to do
                        // when the loop ran in the state-out buffer. (Stores of the carried
                        // value inside the loop, such as chunk boundaries, copy it out as
                        // any store does.)
                        let src = self.val(*value);
                        let dst = self.global(*param, base, *row_stride, *col_stride);
                        self.copy_state_unless_same(&h, src, dst);
                        continue;
                    }
                    let ty = self.kernel.ty(*value);
                    if self.in_loop && *col_stride == 1 && base.uses(IdxVar::Iter) {
                        // The same rows one chunk ahead: their lines then come in (and their
                        // pages are walked) while this chunk computes, not at the store.
                        self.prefetch_next(*param, base, *row_stride, ty.rows, ty.cols, valid_rows);
                    }
                    let src = self.val(*value);
                    let dst = self.global(*param, base, *row_stride, *col_stride);
                    let valid = self.idx(valid_rows);
                    let nv = self.clamp_rows(valid, ty.rows);
                    let f32_rows = *col_stride == 1 && src.cs == 1 && ty.dtype == DType::F32 && src.dt == DType::F32;
                    if let Some(f) = self.math.copy_rows.filter(|_| f32_rows && ty.cols >= rows::MIN_COLS) {
                        let (srs, drs, cols) =
                            (self.iconst(src.rs), self.iconst(*row_stride), self.iconst(ty.cols as i64));
                        self.b.ins().call(f, &[src.ptr, srs, dst.ptr, drs, nv, cols, nv]);
                        continue;
                    }
                    let zero = self.iconst(0);
                    let dt = ty.dtype;
                    self.ew(RowRange::Dyn(zero, nv), ty.cols, &[src], dst, dt == DType::F32, &mut |l, _, x| {
                        if dt == DType::F64 {
                            l.b.ins().fdemote(types::F32, x[0])
                        } else {
                            x[0]
                        }
                    });
                }
                Stmt::Loop { count, carried, body, yields, results: _ } => {
                    let plan = self.plan;
                    let lp = &plan.loops[self.next_loop];
                    self.next_loop += 1;
                    let n = self.idx(count);
                    let in_place = self.in_place_dots.get(self.next_loop - 1).copied().flatten();
                    let homes = if self.next_loop == 1 { self.homes.take() } else { None };
                    let mut dsts = vec![];
                    if let Some(homes) = homes {
                        let (first, end) = self.iters;
                        let zero = self.iconst(0);
                        let first = self.b.ins().smax(first, zero);
                        let end = self.b.ins().smin(end, n);
                        let runs = self.b.ins().isub(end, first);
                        let short = self.b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, runs, home::SHORT_CALL);
                        for (h, &region) in homes.iter().zip(&lp.carried) {
                            let dst = self.home_state(h, region, short);
                            self.homed.extend([(h.carried, dst), (h.result, dst)]);
                            self.homed_results.push(h.clone());
                            dsts.push(dst);
                        }
                    } else {
                        for (k, (c, init)) in carried.iter().enumerate() {
                            let ty = self.kernel.ty(*c);
                            let dst = self.at(lp.carried[k], ty.dtype);
                            let src = self.val(*init);
                            self.copy(ty, src, dst);
                            dsts.push(dst);
                        }
                    }
                    self.in_place = in_place.map(|y| (y, dsts[0]));
                    // The iterations this call runs (all of them unless the executor resumes).
                    let (first, end) = self.iters;
                    let zero = self.iconst(0);
                    let first = self.b.ins().smax(first, zero);
                    let end = self.b.ins().smin(end, n);
                    self.for_loop(first, end, &[], &mut |l, it, _| {
                        l.b.def_var(l.iter, it);
                        l.in_loop = true;
                        l.block(body);
                        l.in_loop = false;
                        l.b.set_srcloc(SourceLoc::new(LOOP_LOC));
                        // Yields that read a carried region go through temporaries first.
                        for (k, y) in yields.iter().enumerate() {
                            if let YieldCopy::ViaTemp(t) = lp.yields[k] {
                                let ty = l.kernel.ty(*y);
                                let src = l.val(*y);
                                let tmp = l.at(t, ty.dtype);
                                l.copy(ty, src, tmp);
                            }
                        }
                        for (k, y) in yields.iter().enumerate() {
                            let ty = l.kernel.ty(*y);
                            if in_place == Some(*y) {
                                continue;
                            }
                            let src = match lp.yields[k] {
                                YieldCopy::Skip => continue,
                                YieldCopy::Direct => l.val(*y),
                                YieldCopy::ViaTemp(t) => l.at(t, ty.dtype),
                            };
                            l.copy(ty, src, dsts[k]);
                        }
                        vec![]
                    });
                    self.in_place = None;
                    // The results alias the carried regions (see `midend::layout`).
                }
            }
        }
    }

    /// Where a homed state (`home.rs`) lives during this call, with the state copied in:
    /// its state-out buffer when the call is short (`short`) or the buffer is aligned to a
    /// cache line, else its carried `region` of the workspace (same strides). The copy is left
    /// out when the state is already there (a pool slot, a resumed time block).
    fn home_state(&mut self, h: &Home, region: Storage, short: Value) -> Acc {
        let src = self.global(h.in_param, &h.base, h.row_stride, h.col_stride);
        let out = self.global(h.out_param, &h.base, h.row_stride, h.col_stride);
        let ws = self.at(region, DType::F32);
        let misaligned = self.b.ins().band_imm_s(out.ptr, home::LINE - 1);
        let aligned = self.b.ins().icmp_imm_s(IntCC::Equal, misaligned, 0);
        let there = self.b.ins().bor(short, aligned);
        let ptr = self.b.ins().select(there, out.ptr, ws.ptr);
        let dst = Acc { ptr, ..out };
        self.copy_state_unless_same(h, src, dst);
        dst
    }

    /// Copies a homed state's rows from `src` to `dst` unless the two are the same memory.
    fn copy_state_unless_same(&mut self, h: &Home, src: Acc, dst: Acc) {
        let differ = self.b.ins().icmp(IntCC::NotEqual, src.ptr, dst.ptr);
        let (copy, join) = (self.b.create_block(), self.b.create_block());
        self.b.ins().brif(differ, copy, &[], join, &[]);
        self.b.switch_to_block(copy);
        self.b.seal_block(copy);
        let rows = self.iconst(h.rows as i64);
        match self.math.copy_rows.filter(|_| h.col_stride == 1 && h.cols >= rows::MIN_COLS) {
            Some(f) => {
                let (rs, cols) = (self.iconst(h.row_stride), self.iconst(h.cols as i64));
                self.b.ins().call(f, &[src.ptr, rs, dst.ptr, rs, rows, cols, rows]);
            }
            None => self.ew(RowRange::Full(h.rows), h.cols, &[src], dst, true, &mut |_, _, x| x[0]),
        }
        self.b.ins().jump(join, &[]);
        self.b.switch_to_block(join);
        self.b.seal_block(join);
    }

    /// Prefetches what a load (or store) of contiguous rows will touch in the next loop iteration (the
    /// same index expressions with `Iter + 1`; past the last iteration no rows are valid).
    fn prefetch_next(&mut self, param: usize, base: &Idx, rs: i64, rows: usize, cols: usize, valid: &Idx) {
        let it = self.b.use_var(self.iter);
        let next = self.b.ins().iadd_imm_s(it, 1);
        self.b.def_var(self.iter, next);
        let src = self.global(param, base, rs, 1);
        let valid = self.idx(valid);
        self.b.def_var(self.iter, it);
        let nv = self.clamp_rows(valid, rows);
        let stride = self.iconst(rs * 4);
        let bytes = self.iconst(cols as i64 * 4);
        self.b.ins().call(self.math.prefetch, &[src.ptr, nv, stride, bytes]);
    }

    /// Access to parameter `param` at element `base` with the given strides (f32).
    fn global(&mut self, param: usize, base: &Idx, rs: i64, cs: i64) -> Acc {
        let base = self.idx(base);
        let ptr = self.scaled(self.params[param], base, 4);
        Acc { ptr, rs, cs, dt: DType::F32 }
    }

    fn op(&mut self, id: ValueId, op: &Op) {
        let ty = self.kernel.ty(id);
        if op.is_view() || self.fusion.fused[id.0 as usize] {
            return;
        }
        if self.homes.as_ref().is_some_and(|hs| hs.iter().any(|h| h.init == id)) {
            // A homed state's load: the loop's start copies it into the state-out buffer.
            return;
        }
        let out = self.val(id);
        match op {
            Op::Load { elem, param, base, row_stride, col_stride, rows, cols, valid_rows } => {
                if self.in_loop && *col_stride == 1 && base.uses(IdxVar::Iter) {
                    self.prefetch_next(*param, base, *row_stride, *rows, *cols, valid_rows);
                }
                let src = self.global(*param, base, *row_stride, *col_stride);
                let valid = self.idx(valid_rows);
                let nv = self.clamp_rows(valid, *rows);
                let f32_rows = *elem == ElemType::F32 && *col_stride == 1 && out.cs == 1 && out.dt == DType::F32;
                if let Some(f) = self.math.copy_rows.filter(|_| f32_rows && *cols >= rows::MIN_COLS) {
                    let args = [src.ptr, self.iconst(*row_stride), out.ptr, self.iconst(out.rs), nv];
                    let args = [&args[..], &[self.iconst(*cols as i64), self.iconst(*rows as i64)]].concat();
                    self.b.ins().call(f, &args);
                    return;
                }
                let (zero, all) = (self.iconst(0), self.iconst(*rows as i64));
                self.ew(RowRange::Dyn(zero, nv), *cols, &[src], out, true, &mut |_, _, x| x[0]);
                self.ew(RowRange::Dyn(nv, all), *cols, &[], out, true, &mut |l, t, _| l.fconst(t, 0.0));
            }
            Op::Const { value, .. } => {
                let v = *value;
                self.ew(RowRange::Full(ty.rows), ty.cols, &[], out, true, &mut |l, t, _| l.fconst(t, v));
            }
            Op::IdxValue(e) => {
                let x = self.idx(e);
                let mut v = self.b.ins().fcvt_from_sint(types::F64, x);
                if ty.dtype == DType::F32 {
                    v = self.b.ins().fdemote(types::F32, v);
                }
                self.store(v, out.ptr, 0);
            }
            Op::Unary { .. } | Op::Binary { .. } | Op::Cast { .. } => self.fused_ew(op, ty, out),
            Op::Mask { x, .. } if self.fusion.fused[x.0 as usize] => self.fused_ew(op, ty, out),
            Op::Dot { a, b, ta, tb, acc } => {
                let xa = self.kernel.ty(*a);
                let mut sb = self.val(*b);
                if *tb {
                    std::mem::swap(&mut sb.rs, &mut sb.cs);
                }
                let k = if *ta { xa.rows } else { xa.cols };
                let gemm_takes = self.math.gemm.is_some() && Self::gemm_takes(out, (ty.rows, ty.cols, k), sb);
                // A row-scaled left operand the gemm applies to the product's rows (`midend::fuse`).
                // Should the gemm not take the product after all, the operand is computed
                // into the region the planner keeps for it.
                let (mut sa, row_scale) = match self.fusion.scaled_a[a.0 as usize] {
                    Some((x, s)) if gemm_takes => (self.val(x), Some(self.row_scale(s))),
                    Some(_) => {
                        let def = self.fusion.defs[a.0 as usize].clone().expect("fused values are defined");
                        let at = self.val(*a);
                        self.fused_ew(&def, xa, at);
                        (at, None)
                    }
                    None => (self.val(*a), None),
                };
                if *ta {
                    std::mem::swap(&mut sa.rs, &mut sa.cs);
                }
                let sc = match acc {
                    // A row-scaled accumulator the gemm applies (`midend::fuse`).
                    Some(c) if self.fusion.fused[c.0 as usize] => {
                        let (x, s) =
                            self.fusion.scaled[c.0 as usize].expect("only scaled accumulators fuse into a dot");
                        Some((self.val(x), Some(self.row_scale(s))))
                    }
                    Some(c) => Some((self.val(*c), None)),
                    None => None,
                };
                self.dot(out, sa, sb, (ty.rows, ty.cols, k), sc, row_scale);
            }
            Op::Cumsum { x, exclusive } => match (&self.fusion.defs[x.0 as usize], self.math.sums) {
                // The cast is fused into the running sum (`midend::fuse::summed_casts`).
                (Some(Op::Cast { x: g, .. }), Some(f)) if self.fusion.fused[x.0 as usize] => {
                    let src = self.val(*g);
                    assert!(src.cs == 1 && out.cs == 1, "the gate sums read and write rows");
                    let args = [ty.rows as i64, ty.cols as i64].map(|v| self.iconst(v));
                    let (xrs, ors, ex) = (self.iconst(src.rs), self.iconst(out.rs), self.iconst(*exclusive as i64));
                    self.b.ins().call(f, &[args[0], args[1], src.ptr, xrs, out.ptr, ors, ex]);
                }
                _ => {
                    let src = self.val(*x);
                    self.cumsum(ty, src, out, *exclusive);
                }
            },
            Op::RowSum { x } => {
                let src = self.val(*x);
                let cols = self.kernel.ty(*x).cols;
                self.row_sum(ty, cols, src, out);
            }
            Op::Mask { x, mask, fill } => {
                let src = self.val(*x);
                self.mask(ty, src, out, mask, *fill);
            }
            Op::GatedDot { a, ga, b, gb, strict } => {
                let (sa, sga, sb, sgb) = (self.val(*a), self.val(*ga), self.val(*b), self.val(*gb));
                let c = self.kernel.ty(*a).cols;
                self.gated_dot(ty.rows, c, [sa, sga, sb, sgb], out, *strict);
            }
            Op::GatedMatMul { m, x, gx, gy, transposed, strict } => {
                let ops = [self.val(*m), self.val(*x), self.val(*gx), self.val(*gy)];
                self.gated_matmul(ty.rows, ty.cols, ops, out, *transposed, *strict);
            }
            Op::SolveUnitLower { l, b } => {
                let (sl, sb) = (self.val(*l), self.val(*b));
                self.solve(ty, sl, sb, out);
            }
            Op::Concat { parts } => {
                let mut at = 0;
                for p in parts {
                    let (src, rows) = (self.val(*p), self.kernel.ty(*p).rows as i64);
                    let ptr = self.offset(out.ptr, at * out.rs * out.size());
                    self.ew(
                        RowRange::Full(rows as usize),
                        ty.cols,
                        &[src],
                        Acc { ptr, ..out },
                        true,
                        &mut |_, _, x| x[0],
                    );
                    at += rows;
                }
            }
            Op::Rows { .. } | Op::Transpose { .. } => unreachable!("views are handled above"),
        }
    }

    // ---- fused elementwise trees --------------------------------------------------------

    /// The expression tree of elementwise `op` (of dtype `dt`), descending into fused
    /// operands; materialised operands become leaves (broadcast dimensions get stride 0).
    fn tree(&mut self, op: &Op, dt: DType, leaves: &mut Vec<Acc>) -> Ex {
        match op {
            Op::Const { value, .. } => Ex::Const(*value, dt),
            Op::Unary { op, x } => Ex::Un(*op, dt, Box::new(self.tree_arg(*x, leaves))),
            Op::Binary { op, a, b } => {
                let (a, b) = (self.tree_arg(*a, leaves), self.tree_arg(*b, leaves));
                Ex::Bin(*op, dt, Box::new(a), Box::new(b))
            }
            Op::Cast { x, dtype } => Ex::Cast(self.kernel.ty(*x).dtype, *dtype, Box::new(self.tree_arg(*x, leaves))),
            Op::Mask { x, mask, fill } => {
                let keep = match mask {
                    MaskKind::Tril { strict } => MaskRow::Tril(*strict),
                    MaskKind::RowsBefore(e) => MaskRow::Before(self.idx(e)),
                };
                Ex::Mask(keep, *fill, dt, Box::new(self.tree_arg(*x, leaves)))
            }
            _ => unreachable!("only elementwise ops fuse"),
        }
    }

    /// Lowers elementwise `op` and every fused operand chain below it (`midend::fuse`) in one pass.
    fn fused_ew(&mut self, op: &Op, ty: TileTy, out: Acc) {
        let mut leaves = vec![];
        let ex = self.tree(op, ty.dtype, &mut leaves);
        if self.decay_call(&ex, &leaves, ty, out) {
            return;
        }
        let same = ex.vec_ok(ty.dtype);
        let mixed = !same && ex.mixed_ok();
        self.want_pos = ex.has_mask();
        self.mixed = mixed;
        self.ew(RowRange::Full(ty.rows), ty.cols, &leaves, out, same || mixed, &mut |l, t, x| l.eval(&ex, t, x));
        self.want_pos = false;
        self.mixed = false;
    }

    /// Calls decay.rs for `mul(a, exp(cast_f32(x [- y])))`, or the factor `exp(cast_f32(x [-
    /// y]))` alone (a tile the backward reuses), optionally with a `Tril` mask filling -inf
    /// around the subtraction, when the accesses fit; false if it did not.
    fn decay_call(&mut self, ex: &Ex, leaves: &[Acc], ty: TileTy, out: Acc) -> bool {
        let Some(f) = self.math.decay else { return false };
        let (a, e) = match ex {
            Ex::Bin(BinOp::Mul, DType::F32, p, q) => match (&**p, &**q) {
                (Ex::Leaf(a), e) | (e, Ex::Leaf(a)) => (Some(*a), e),
                _ => return false,
            },
            e => (None, e),
        };
        let Ex::Un(UnOp::Exp, DType::F32, c) = e else { return false };
        let Ex::Cast(DType::F64, DType::F32, g) = &**c else { return false };
        let (g, tril) = match &**g {
            Ex::Mask(MaskRow::Tril(strict), fill, DType::F64, g) if *fill == f64::NEG_INFINITY => {
                (&**g, if *strict { 2 } else { 1 })
            }
            g => (g, 0),
        };
        let (x, y) = match g {
            Ex::Leaf(x) => (*x, None),
            Ex::Bin(BinOp::Sub, DType::F64, x, y) => match (&**x, &**y) {
                (Ex::Leaf(x), Ex::Leaf(y)) => (*x, Some(*y)),
                _ => return false,
            },
            _ => return false,
        };
        let (a, x, y) = (a.map(|a| leaves[a]), leaves[x], y.map(|y| leaves[y]));
        let fits = a.is_none_or(|a| a.dt == DType::F32 && a.cs == 1)
            && out.cs == 1
            && x.dt == DType::F64
            && (x.cs == 0 || x.cs == 1)
            && y.is_none_or(|y| y.dt == DType::F64 && (y.cs == 0 || y.cs == 1));
        if !fits {
            return false;
        }
        let mut args = vec![self.iconst(ty.rows as i64), self.iconst(ty.cols as i64)];
        match a {
            Some(a) => args.extend([a.ptr, self.iconst(a.rs)]),
            None => args.extend([self.iconst(0), self.iconst(0)]),
        }
        for acc in [Some(x), y] {
            match acc {
                Some(v) => args.extend([v.ptr, self.iconst(v.rs), self.iconst(v.cs)]),
                None => args.extend([self.iconst(0), self.iconst(0), self.iconst(0)]),
            }
        }
        args.extend([out.ptr, self.iconst(out.rs), self.iconst(tril)]);
        self.b.ins().call(f, &args);
        true
    }

    fn tree_arg(&mut self, v: ValueId, leaves: &mut Vec<Acc>) -> Ex {
        let fusion: &'a Fusion = self.fusion;
        let t = self.kernel.ty(v);
        if fusion.fused[v.0 as usize] {
            let op = fusion.defs[v.0 as usize].as_ref().expect("fused values are defined");
            return self.tree(op, t.dtype, leaves);
        }
        let mut s = self.val(v);
        if t.rows == 1 {
            s.rs = 0;
        }
        if t.cols == 1 {
            s.cs = 0;
        }
        leaves.push(s);
        Ex::Leaf(leaves.len() - 1)
    }

    /// Evaluates `ex` for one element (scalars) or one vector of elements; `t` is the type
    /// of the root, `xs` the leaf values.
    fn eval(&mut self, ex: &Ex, t: Type, xs: &[Value]) -> Value {
        // Vectors of one dtype, or of each node's own dtype in mixed mode (`Lower::mixed`).
        let ty = |d: DType| if t.is_vector() { vector_ty(d) } else { scalar_ty(d) };
        match ex {
            Ex::Leaf(k) => xs[*k],
            Ex::Const(v, d) => self.fconst(ty(*d), *v),
            Ex::Un(op, d, x) => {
                let x = self.eval(x, t, xs);
                self.unary(*op, *d, ty(*d), x)
            }
            Ex::Bin(op, d, a, b) => {
                let a = self.eval(a, t, xs);
                let b = self.eval(b, t, xs);
                self.binary(*op, *d, a, b)
            }
            Ex::Mask(keep, fill, d, x) => {
                let x = self.eval(x, t, xs);
                let ty = ty(*d);
                let f = self.fconst(ty, *fill);
                let (i, j) = (self.pos_row.expect("mask trees run with positions"), self.pos_col.expect("column"));
                match *keep {
                    MaskRow::Before(lim) => {
                        let c = self.b.ins().icmp(IntCC::SignedLessThan, i, lim);
                        self.b.ins().select(c, x, f)
                    }
                    MaskRow::Tril(strict) => {
                        // Keep j < i (+1 unless strict), lane by lane.
                        let end = if strict { i } else { self.b.ins().iadd_imm_s(i, 1) };
                        if !ty.is_vector() {
                            let c = self.b.ins().icmp(IntCC::SignedLessThan, j, end);
                            return self.b.ins().select(c, x, f);
                        }
                        let (ity, lane, lanes) = if ty == types::F32X4 {
                            (types::I32X4, types::I32, 4)
                        } else {
                            (types::I64X2, types::I64, 2)
                        };
                        let (j, end) = if lane == types::I32 {
                            (self.b.ins().ireduce(types::I32, j), self.b.ins().ireduce(types::I32, end))
                        } else {
                            (j, end)
                        };
                        let mut jv = self.b.ins().splat(ity, j);
                        let zero = self.b.ins().iconst(lane, 0);
                        let mut iota = self.b.ins().splat(ity, zero);
                        for q in 1..lanes {
                            let c = self.b.ins().iconst(lane, q);
                            iota = self.b.ins().insertlane(iota, c, q as u8);
                        }
                        jv = self.b.ins().iadd(jv, iota);
                        let ev = self.b.ins().splat(ity, end);
                        let c = self.b.ins().icmp(IntCC::SignedLessThan, jv, ev);
                        let bits = MemFlagsData::new().with_endianness(Endianness::Little);
                        let xi = self.b.ins().bitcast(ity, bits, x);
                        let fi = self.b.ins().bitcast(ity, bits, f);
                        let r = self.b.ins().bitselect(c, xi, fi);
                        self.b.ins().bitcast(ty, bits, r)
                    }
                }
            }
            Ex::Cast(from, to, x) => {
                let x = self.eval(x, t, xs);
                let vector = t.is_vector();
                match (from, to) {
                    (DType::F32, DType::F64) if vector => self.b.ins().fvpromote_low(x),
                    (DType::F64, DType::F32) if vector => self.b.ins().fvdemote(x),
                    (DType::F32, DType::F64) => self.b.ins().fpromote(types::F64, x),
                    (DType::F64, DType::F32) => self.b.ins().fdemote(types::F32, x),
                    _ => x,
                }
            }
        }
    }

    fn unary(&mut self, op: UnOp, dt: DType, t: Type, x: Value) -> Value {
        let inline = inline_unary(op, dt);
        match op {
            UnOp::Exp if inline => self.vmath().exp(t, x),
            UnOp::Exp2 if inline => self.vmath().exp2(t, x),
            UnOp::Sigmoid if inline => self.vmath().sigmoid(t, x),
            UnOp::Silu if inline => self.vmath().silu(t, x),
            UnOp::Log if inline => self.vmath().log(t, x),
            UnOp::Softplus if inline => self.vmath().softplus(t, x),
            UnOp::Neg => self.b.ins().fneg(x),
            UnOp::Abs => self.b.ins().fabs(x),
            UnOp::Tanh => self.call(Math::Tanh, dt, &[x]),
            UnOp::Sqrt => self.b.ins().sqrt(x),
            UnOp::Recip => {
                let one = self.fconst(t, 1.0);
                self.b.ins().fdiv(one, x)
            }
            UnOp::Exp => self.call(Math::Exp, dt, &[x]),
            UnOp::Exp2 => self.call(Math::Exp2, dt, &[x]),
            UnOp::Log => self.call(Math::Log, dt, &[x]),
            UnOp::Sigmoid => self.call(Math::Sigmoid, dt, &[x]),
            UnOp::Softplus => self.call(Math::Softplus, dt, &[x]),
            UnOp::Silu => self.call(Math::Silu, dt, &[x]),
        }
    }

    fn binary(&mut self, op: BinOp, dt: DType, x: Value, y: Value) -> Value {
        match op {
            BinOp::Add => self.b.ins().fadd(x, y),
            BinOp::Sub => self.b.ins().fsub(x, y),
            BinOp::Mul => self.b.ins().fmul(x, y),
            BinOp::Div => self.b.ins().fdiv(x, y),
            BinOp::Max => self.b.ins().fmax(x, y),
            BinOp::Min => self.b.ins().fmin(x, y),
            BinOp::Pow => self.call(Math::Pow, dt, &[x, y]),
            BinOp::Lt | BinOp::Le | BinOp::Equal => {
                let cc = match op {
                    BinOp::Lt => FloatCC::LessThan,
                    BinOp::Le => FloatCC::LessThanOrEqual,
                    _ => FloatCC::Equal,
                };
                let t = self.b.func.dfg.value_type(x);
                let (one, zero) = (self.fconst(t, 1.0), self.fconst(t, 0.0));
                self.select(cc, (x, y), one, zero)
            }
            BinOp::Keep => {
                let t = self.b.func.dfg.value_type(y);
                let zero = self.fconst(t, 0.0);
                self.select(FloatCC::NotEqual, (x, zero), y, zero)
            }
        }
    }

    /// `then` where `a cc b` holds, else `other`, lane by lane on vectors (the all-ones lanes
    /// of a vector comparison pick bits from `then`).
    fn select(&mut self, cc: FloatCC, (a, b): (Value, Value), then: Value, other: Value) -> Value {
        let c = self.b.ins().fcmp(cc, a, b);
        let t = self.b.func.dfg.value_type(then);
        if !t.is_vector() {
            return self.b.ins().select(c, then, other);
        }
        let ity = if t == types::F32X4 { types::I32X4 } else { types::I64X2 };
        let bits = MemFlagsData::new().with_endianness(Endianness::Little);
        let (ti, oi) = (self.b.ins().bitcast(ity, bits, then), self.b.ins().bitcast(ity, bits, other));
        let r = self.b.ins().bitselect(c, ti, oi);
        self.b.ins().bitcast(t, bits, r)
    }

    // ---- reductions and the matrix ops ---------------------------------------------------

    /// The inner kernel of `Dot` and `SolveUnitLower`: for `p in 0..count`,
    /// `acc[q] (+|-)= a(p) * b(p)[q]`, where `a(p)` is the f32 at `a_ptr + p*a_step` (splat
    /// when `ty` is a vector) and `b(p)[q]` is the `ty` at `b_ptr + p*b_step + q*item`.
    #[allow(clippy::too_many_arguments)]
    fn axpy_loop(
        &mut self,
        count: Value,
        (a_ptr, a_step): (Value, i64),
        (b_ptr, b_step): (Value, i64),
        ty: Type,
        item: i64,
        neg: bool,
        init: Vec<Value>,
    ) -> Vec<Value> {
        let mut carry = vec![a_ptr, b_ptr];
        carry.extend(init);
        let zero = self.iconst(0);
        let out = self.for_loop(zero, count, &carry, &mut |l, _, c| {
            let (ap, bp) = (c[0], c[1]);
            let mut x = l.load(types::F32, ap, 0);
            if neg {
                x = l.b.ins().fneg(x);
            }
            if ty.is_vector() {
                x = l.b.ins().splat(ty, x);
            }
            let mut next = vec![l.offset(ap, a_step), l.offset(bp, b_step)];
            for (q, s) in c[2..].iter().enumerate() {
                let y = l.load(ty, bp, q as i64 * item);
                next.push(l.madd(x, y, *s));
            }
            next
        });
        out[2..].to_vec()
    }

    /// `out = a @ b (+ acc)`, with `a` m x k and `b` k x n already transposed as the op says.
    /// `out = diag(os) (a @ b) + diag(s) acc`. Both scales are optional (a pointer and its row
    /// stride, 0 for one scale) and present only where the scaling was fused into the product
    /// (`row_scale`: `os`, which only the gemm applies; `acc`'s own: `s`).
    /// Whether the gemm routine (where there is one) takes an `m x n` product over `k`.
    fn gemm_takes(out: Acc, (m, n, k): (usize, usize, usize), b: Acc) -> bool {
        out.cs == 1 && gemm::takes(m, n, k, b.cs)
    }

    /// A row-scale tile `s` (`[R x 1]`, or `[1 x 1]` for one scale) as the gemm takes it:
    /// (pointer, row stride, 0 to broadcast).
    fn row_scale(&mut self, s: ValueId) -> (Value, i64) {
        let acc = self.val(s);
        (acc.ptr, if self.kernel.ty(s).rows == 1 { 0 } else { acc.rs })
    }

    fn dot(
        &mut self,
        out: Acc,
        a: Acc,
        b: Acc,
        (m, n, k): (usize, usize, usize),
        acc: Option<(Acc, Option<(Value, i64)>)>,
        row_scale: Option<(Value, i64)>,
    ) {
        if let Some(f) = self.math.gemm.filter(|_| Self::gemm_takes(out, (m, n, k), b)) {
            let mut args: Vec<Value> = [m, n, k].iter().map(|&x| self.iconst(x as i64)).collect();
            for (x, rs, cs) in [(a.ptr, a.rs, Some(a.cs)), (b.ptr, b.rs, Some(b.cs)), (out.ptr, out.rs, None)] {
                args.push(x);
                args.push(self.iconst(rs));
                if let Some(cs) = cs {
                    args.push(self.iconst(cs));
                }
            }
            match acc {
                Some((c, _)) => args.extend([c.ptr, self.iconst(c.rs), self.iconst(c.cs)]),
                None => args.extend([self.iconst(0), self.iconst(0), self.iconst(0)]),
            }
            for scale in [acc.and_then(|(_, s)| s), row_scale] {
                match scale {
                    Some((s, s_rs)) => args.extend([s, self.iconst(s_rs)]),
                    None => args.extend([self.iconst(0), self.iconst(0)]),
                }
            }
            self.b.ins().call(f, &args);
            return;
        }
        assert!(row_scale.is_none(), "a product row scale is passed only where the gemm takes the product");
        // The inline products below take a plain accumulator. A scaled one (fused only where
        // the gemm takes the product, so this is a fallback) is scaled into `out` first:
        // every inline path reads an element of a contiguous accumulator just before it writes
        // the same element of `out`, so `out` may be the accumulator.
        let rows_of_b = b.cs == 1 && n >= 4;
        // The row-contiguous path below scales a contiguous accumulator as it reads it.
        let (acc, acc_scale) = match acc {
            Some((c, Some(scale))) if rows_of_b && c.cs == 1 => (Some(c), Some(scale)),
            Some((c, Some((s, s_rs)))) => {
                let scale = Acc { ptr: s, rs: s_rs, cs: 0, dt: DType::F32 };
                self.ew(RowRange::Full(m), n, &[c, scale], out, true, &mut |l, _, x| l.b.ins().fmul(x[0], x[1]));
                (Some(out), None)
            }
            other => (other.map(|(c, _)| c), None),
        };
        let kk = self.iconst(k as i64);
        if rows_of_b {
            // Rows of b are contiguous: each output row is built from blocks of up to four
            // f32x4 accumulators, a splat of a[i, p] times b[p, j..] for every p.
            let acc_in_reg = acc.is_some_and(|c| c.cs == 1);
            self.for_n(m, &mut |l, i| {
                let arow = l.scaled(a.ptr, i, a.rs * 4);
                let crow = l.scaled(out.ptr, i, out.rs * 4);
                let accrow = acc.map(|c| l.scaled(c.ptr, i, c.rs * 4));
                let row_scale = acc_scale.map(|(s, s_rs)| {
                    let p = l.scaled(s, i, s_rs * 4);
                    l.load(types::F32, p, 0)
                });
                let mut j0 = 0;
                while j0 < n {
                    let left = n - j0;
                    let (ty, items, width) =
                        if left >= 4 { (types::F32X4, (left / 4).min(4), 4) } else { (types::F32, left, 1) };
                    let init: Vec<Value> = (0..items).map(|_| l.fconst(ty, 0.0)).collect();
                    let bp = l.offset(b.ptr, j0 as i64 * 4);
                    let item = width as i64 * 4;
                    let sums = l.axpy_loop(kk, (arow, a.cs * 4), (bp, b.rs * 4), ty, item, false, init);
                    for (q, mut s) in sums.into_iter().enumerate() {
                        let j = (j0 + q * width) as i64;
                        if let (Some(c), Some(p)) = (acc, accrow) {
                            if acc_in_reg || width == 1 {
                                let x = l.load(ty, p, j * c.cs * 4);
                                s = match row_scale {
                                    Some(r) if ty.is_vector() => {
                                        let r = l.b.ins().splat(ty, r);
                                        l.madd(x, r, s)
                                    }
                                    Some(r) => l.madd(x, r, s),
                                    None => l.b.ins().fadd(s, x),
                                };
                            }
                        }
                        l.store(s, crow, j * 4 * out.cs);
                    }
                    j0 += items * width;
                }
            });
            if let Some(c) = acc.filter(|_| !acc_in_reg) {
                // The vector part still lacks a strided accumulator.
                let nv = n / 4 * 4;
                self.ew(RowRange::Full(m), nv, &[out, c], out, false, &mut |l, _, x| l.b.ins().fadd(x[0], x[1]));
            }
        } else if a.cs == 1 && b.rs == 1 && k >= 4 {
            // Both operands are contiguous along k: vector dot products of one row of a with
            // up to four columns of b at once (a's vector is loaded once for all four), then
            // horizontal sums.
            let kv = k / 4;
            self.for_n(m, &mut |l, i| {
                let arow = l.scaled(a.ptr, i, a.rs * 4);
                let crow = l.scaled(out.ptr, i, out.rs * 4);
                let accrow = acc.map(|c| l.scaled(c.ptr, i, c.rs * 4));
                let block = |l: &mut Self, j0: Value, cols: usize| {
                    let bcol = l.scaled(b.ptr, j0, b.cs * 4);
                    let mut carry = vec![arow, bcol];
                    carry.extend((0..cols).map(|_| l.fconst(types::F32X4, 0.0)));
                    let (s, e) = (l.iconst(0), l.iconst(kv as i64));
                    let vs = l.for_loop(s, e, &carry, &mut |l, _, c| {
                        let x = l.load(types::F32X4, c[0], 0);
                        let mut next = vec![l.offset(c[0], 16), l.offset(c[1], 16)];
                        for q in 0..cols {
                            let y = l.load(types::F32X4, c[1], q as i64 * b.cs * 4);
                            next.push(l.madd(x, y, c[2 + q]));
                        }
                        next
                    });
                    let cp = l.scaled(crow, j0, out.cs * 4);
                    let accp = acc.zip(accrow).map(|(c, p)| (c, l.scaled(p, j0, c.cs * 4)));
                    for (q, v) in vs[2..].iter().enumerate() {
                        let lane = |l: &mut Self, q: u8| l.b.ins().extractlane(*v, q);
                        let (x0, x1, x2, x3) = (lane(l, 0), lane(l, 1), lane(l, 2), lane(l, 3));
                        let (s01, s23) = (l.b.ins().fadd(x0, x1), l.b.ins().fadd(x2, x3));
                        let mut sum = l.b.ins().fadd(s01, s23);
                        for p in kv * 4..k {
                            let x = l.load(types::F32, arow, p as i64 * 4);
                            let y = l.load(types::F32, bcol, (q as i64 * b.cs + p as i64) * 4);
                            sum = l.madd(x, y, sum);
                        }
                        if let Some((c, p)) = accp {
                            let x = l.load(types::F32, p, q as i64 * c.cs * 4);
                            sum = l.b.ins().fadd(sum, x);
                        }
                        l.store(sum, cp, q as i64 * out.cs * 4);
                    }
                };
                let (s, e) = (l.iconst(0), l.iconst((n / 4) as i64));
                l.for_loop(s, e, &[], &mut |l, jb, _| {
                    let j0 = l.b.ins().imul_imm_s(jb, 4);
                    block(l, j0, 4);
                    vec![]
                });
                let (s, e) = (l.iconst((n / 4 * 4) as i64), l.iconst(n as i64));
                l.for_loop(s, e, &[], &mut |l, j, _| {
                    block(l, j, 1);
                    vec![]
                });
            });
        } else if a.rs == 1 && m >= 4 {
            // Columns of a are contiguous (a is a transposed operand): build each output
            // column from vectors down the rows, a splat of b[p, j] times a[i.., p], and store
            // the lanes with the output's row stride.
            let (s, e) = (self.iconst(0), self.iconst(n as i64));
            self.for_loop(s, e, &[], &mut |l, j, _| {
                let bcol = l.scaled(b.ptr, j, b.cs * 4);
                let ccol = l.scaled(out.ptr, j, out.cs * 4);
                let acccol = acc.map(|c| (c, l.scaled(c.ptr, j, c.cs * 4)));
                let mut i0 = 0;
                while i0 < m {
                    let left = m - i0;
                    let (ty, items, width) =
                        if left >= 4 { (types::F32X4, (left / 4).min(4), 4) } else { (types::F32, left, 1) };
                    let init: Vec<Value> = (0..items).map(|_| l.fconst(ty, 0.0)).collect();
                    let ap = l.offset(a.ptr, i0 as i64 * 4);
                    let sums = l.axpy_loop(kk, (bcol, b.rs * 4), (ap, a.cs * 4), ty, width as i64 * 4, false, init);
                    for (q, v) in sums.into_iter().enumerate() {
                        for lane in 0..width {
                            let i = (i0 + q * width + lane) as i64;
                            let mut x = if width == 1 { v } else { l.b.ins().extractlane(v, lane as u8) };
                            if let Some((c, p)) = acccol {
                                let y = l.load(types::F32, p, i * c.rs * 4);
                                x = l.b.ins().fadd(x, y);
                            }
                            l.store(x, ccol, i * out.rs * 4);
                        }
                    }
                    i0 += items * width;
                }
                vec![]
            });
        } else {
            // General strides: one scalar dot product per element.
            self.for_n(m, &mut |l, i| {
                let arow = l.scaled(a.ptr, i, a.rs * 4);
                let crow = l.scaled(out.ptr, i, out.rs * 4);
                let (s, e) = (l.iconst(0), l.iconst(n as i64));
                l.for_loop(s, e, &[], &mut |l, j, _| {
                    let bcol = l.scaled(b.ptr, j, b.cs * 4);
                    let z = l.fconst(types::F32, 0.0);
                    let mut sum = l.axpy_loop(kk, (arow, a.cs * 4), (bcol, b.rs * 4), types::F32, 0, false, vec![z])[0];
                    if let Some(c) = acc {
                        let cp = l.scaled(c.ptr, i, c.rs * 4);
                        let cp = l.scaled(cp, j, c.cs * 4);
                        let x = l.load(types::F32, cp, 0);
                        sum = l.b.ins().fadd(sum, x);
                    }
                    let op = l.scaled(crow, j, out.cs * 4);
                    l.store(sum, op, 0);
                    vec![]
                });
            });
        }
    }

    /// Forward substitution, row by row: `out[i] = b[i] - sum_{p<i} l[i, p] * out[p]`.
    fn solve(&mut self, ty: TileTy, l: Acc, b: Acc, out: Acc) {
        let (n, m) = (ty.rows, ty.cols);
        self.copy(ty, b, out);
        if n < 2 || m == 0 {
            return;
        }
        if let Some(f) = self.math.solve.filter(|_| out.cs == 1) {
            let args = [n as i64, m as i64].map(|x| self.iconst(x));
            let (lrs, lcs, ors) = (self.iconst(l.rs), self.iconst(l.cs), self.iconst(out.rs));
            self.b.ins().call(f, &[args[0], args[1], l.ptr, lrs, lcs, out.ptr, ors]);
            return;
        }
        let (s, e) = (self.iconst(1), self.iconst(n as i64));
        self.for_loop(s, e, &[], &mut |lw, i, _| {
            let lrow = lw.scaled(l.ptr, i, l.rs * 4);
            let crow = lw.scaled(out.ptr, i, out.rs * 4);
            let mut j0 = 0;
            while j0 < m {
                let left = m - j0;
                let (vty, items, width) =
                    if left >= 4 { (types::F32X4, (left / 4).min(4), 4) } else { (types::F32, left, 1) };
                let item = width as i64 * 4;
                let init: Vec<Value> =
                    (0..items).map(|q| lw.load(vty, crow, (j0 as i64) * 4 + q as i64 * item)).collect();
                let bp = lw.offset(out.ptr, j0 as i64 * 4);
                let sums = lw.axpy_loop(i, (lrow, l.cs * 4), (bp, out.rs * 4), vty, item, true, init);
                for (q, s) in sums.into_iter().enumerate() {
                    lw.store(s, crow, (j0 as i64) * 4 + q as i64 * item);
                }
                j0 += items * width;
            }
            vec![]
        });
    }

    fn cumsum(&mut self, ty: TileTy, x: Acc, out: Acc, exclusive: bool) {
        let size = x.size();
        let lanes = VBYTES as usize / ty.dtype.size();
        let chunks = if x.cs == 1 && out.cs == 1 && ty.cols >= lanes { ty.cols / lanes } else { 0 };
        // `width` adjacent vectors (or scalars) of columns summed down the rows together:
        // independent running sums hide the latency of the add chain.
        let columns = |l: &mut Self, vty: Type, width: usize, xp: Value, op: Value| {
            let item = vty.bytes() as i64;
            let mut init = vec![l.fconst(vty, 0.0); width];
            init.extend([xp, op]);
            let (s, e) = (l.iconst(0), l.iconst(ty.rows as i64));
            l.for_loop(s, e, &init, &mut |l, _, c| {
                let (xp, op) = (c[width], c[width + 1]);
                let mut next = vec![];
                for (q, &s) in c[..width].iter().enumerate() {
                    let v = l.load(vty, xp, q as i64 * item);
                    let s1 = l.b.ins().fadd(s, v);
                    l.store(if exclusive { s } else { s1 }, op, q as i64 * item);
                    next.push(s1);
                }
                next.extend([l.offset(xp, x.rs * size), l.offset(op, out.rs * size)]);
                next
            });
        };
        let column = |l: &mut Self, vty: Type, xp: Value, op: Value| columns(l, vty, 1, xp, op);
        let vty = vector_ty(ty.dtype);
        const GROUP: usize = 4;
        self.for_n(chunks / GROUP, &mut |l, g| {
            let xp = l.scaled(x.ptr, g, VBYTES * GROUP as i64);
            let op = l.scaled(out.ptr, g, VBYTES * GROUP as i64);
            columns(l, vty, GROUP, xp, op);
        });
        let rest = chunks - chunks % GROUP;
        if rest < chunks {
            let xp = self.offset(x.ptr, rest as i64 * VBYTES);
            let op = self.offset(out.ptr, rest as i64 * VBYTES);
            columns(self, vty, chunks % GROUP, xp, op);
        }
        let (s, e) = (self.iconst((chunks * lanes) as i64), self.iconst(ty.cols as i64));
        let sty = scalar_ty(ty.dtype);
        self.for_loop(s, e, &[], &mut |l, j, _| {
            let xp = l.scaled(x.ptr, j, x.cs * size);
            let op = l.scaled(out.ptr, j, out.cs * size);
            column(l, sty, xp, op);
            vec![]
        });
    }

    /// Row sums, accumulated in f64 from the first element on (as the interpreter does).
    fn row_sum(&mut self, ty: TileTy, cols: usize, x: Acc, out: Acc) {
        let dt = ty.dtype;
        let size = x.size();
        self.for_n(ty.rows, &mut |l, i| {
            let xp = l.scaled(x.ptr, i, x.rs * size);
            let op = l.scaled(out.ptr, i, out.rs * size);
            let wide = |l: &mut Self, p: Value| {
                let v = l.load(scalar_ty(dt), p, 0);
                if dt == DType::F32 {
                    l.b.ins().fpromote(types::F64, v)
                } else {
                    v
                }
            };
            let first = if cols == 0 { l.fconst(types::F64, 0.0) } else { wide(l, xp) };
            let (s, e) = (l.iconst(1), l.iconst(cols as i64));
            let xp1 = l.offset(xp, x.cs * size);
            let sum = l.for_loop(s, e, &[first, xp1], &mut |l, _, c| {
                let v = wide(l, c[1]);
                vec![l.b.ins().fadd(c[0], v), l.offset(c[1], x.cs * size)]
            })[0];
            let r = if dt == DType::F32 { l.b.ins().fdemote(types::F32, sum) } else { sum };
            l.store(r, op, 0);
        });
    }

    fn mask(&mut self, ty: TileTy, x: Acc, out: Acc, mask: &MaskKind, fill: f64) {
        let limit = match mask {
            MaskKind::RowsBefore(e) => Some(self.idx(e)),
            MaskKind::Tril { .. } => None,
        };
        let sty = scalar_ty(ty.dtype);
        let size = x.size();
        self.for_n(ty.rows, &mut |l, i| {
            let cols = l.iconst(ty.cols as i64);
            let keep = match (mask, limit) {
                (MaskKind::Tril { strict }, _) => {
                    let end = if *strict { i } else { l.b.ins().iadd_imm_s(i, 1) };
                    l.b.ins().smin(end, cols)
                }
                (_, Some(lim)) => {
                    let before = l.b.ins().icmp(IntCC::SignedLessThan, i, lim);
                    let zero = l.iconst(0);
                    l.b.ins().select(before, cols, zero)
                }
                _ => unreachable!("RowsBefore has a limit"),
            };
            let xrow = l.scaled(x.ptr, i, x.rs * size);
            let orow = l.scaled(out.ptr, i, out.rs * size);
            let zero = l.iconst(0);
            l.for_loop(zero, keep, &[], &mut |l, j, _| {
                let xp = l.scaled(xrow, j, x.cs * size);
                let v = l.load(sty, xp, 0);
                let op = l.scaled(orow, j, out.cs * size);
                l.store(v, op, 0);
                vec![]
            });
            l.for_loop(keep, cols, &[], &mut |l, j, _| {
                let f = l.fconst(sty, fill);
                let op = l.scaled(orow, j, out.cs * size);
                l.store(f, op, 0);
                vec![]
            });
        });
    }

    /// [`Op::GatedMatMul`] as scalar loops: for each output row r and column, the pairs of
    /// the triangle only (p in 0..=r, or r..n transposed; strict drops p = r).
    #[allow(clippy::too_many_arguments)]
    fn gated_matmul(
        &mut self,
        n: usize,
        cols: usize,
        [m, x, gx, gy]: [Acc; 4],
        out: Acc,
        transposed: bool,
        strict: bool,
    ) {
        let gdt = gx.dt;
        let gs = gx.size();
        let contiguous = [x, gx, gy, out].iter().all(|a| a.cs == 1 && a.rs >= 0);
        if let Some(fs) = self.math.gated_matmul.filter(|_| contiguous && n > 0 && cols > 0) {
            let f = fs[(gdt == DType::F64) as usize];
            let flags = (transposed as i64) | ((strict as i64) << 1);
            let mut args = vec![self.iconst(n as i64), self.iconst(cols as i64)];
            args.extend([m.ptr, self.iconst(m.rs), self.iconst(m.cs)]);
            args.extend([x.ptr, self.iconst(x.rs), gx.ptr, self.iconst(gx.rs), gy.ptr, self.iconst(gy.rs)]);
            args.extend([out.ptr, self.iconst(out.rs), self.iconst(flags)]);
            self.b.ins().call(f, &args);
            return;
        }
        self.for_n(n, &mut |l, r| {
            let (lo, hi) = match (transposed, strict) {
                (false, false) => (l.iconst(0), l.b.ins().iadd_imm_s(r, 1)),
                (false, true) => (l.iconst(0), r),
                (true, false) => (r, l.iconst(n as i64)),
                (true, true) => (l.b.ins().iadd_imm_s(r, 1), l.iconst(n as i64)),
            };
            let orow = l.scaled(out.ptr, r, out.rs * 4);
            let gyrow = l.scaled(gy.ptr, r, gy.rs * gs);
            let (mr_step, mp_step) = if transposed { (m.cs, m.rs) } else { (m.rs, m.cs) };
            let mrow = l.scaled(m.ptr, r, mr_step * 4);
            let zero = l.iconst(0);
            let width = l.iconst(cols as i64);
            l.for_loop(zero, width, &[], &mut |l, c, _| {
                let gyv = {
                    let at = l.scaled(gyrow, c, gy.cs * gs);
                    l.load(scalar_ty(gdt), at, 0)
                };
                let xcol = l.scaled(x.ptr, c, x.cs * 4);
                let gxcol = l.scaled(gx.ptr, c, gx.cs * gs);
                let z = l.fconst(types::F32, 0.0);
                let sum = l.for_loop(lo, hi, &[z], &mut |l, p, v| {
                    let mv = {
                        let at = l.scaled(mrow, p, mp_step * 4);
                        l.load(types::F32, at, 0)
                    };
                    let xv = {
                        let at = l.scaled(xcol, p, x.rs * 4);
                        l.load(types::F32, at, 0)
                    };
                    let gxv = {
                        let at = l.scaled(gxcol, p, gx.rs * gs);
                        l.load(scalar_ty(gdt), at, 0)
                    };
                    let d = if transposed { l.b.ins().fsub(gxv, gyv) } else { l.b.ins().fsub(gyv, gxv) };
                    let e = l.gate_exp(gdt, d);
                    let mx = l.b.ins().fmul(mv, xv);
                    let t = l.b.ins().fmul(mx, e);
                    vec![l.b.ins().fadd(v[0], t)]
                })[0];
                let at = l.scaled(orow, c, out.cs * 4);
                l.store(sum, at, 0);
                vec![]
            });
        });
    }

    fn gated_dot(&mut self, n: usize, c: usize, [a, ga, b, gb]: [Acc; 4], out: Acc, strict: bool) {
        let gdt = ga.dt;
        let gs = ga.size();
        let contiguous = [a, ga, b, gb].iter().all(|x| x.cs == 1 && x.rs >= 0);
        if let Some(fs) = self.math.gated.filter(|_| contiguous && n > 0 && c > 0) {
            let f = fs[(gdt == DType::F64) as usize];
            let mut args = vec![self.iconst(n as i64), self.iconst(c as i64)];
            for x in [a, ga, b, gb] {
                args.push(x.ptr);
                args.push(self.iconst(x.rs));
            }
            args.extend([out.ptr, self.iconst(out.rs), self.iconst(out.cs), self.iconst(strict as i64)]);
            self.b.ins().call(f, &args);
            return;
        }
        self.for_n(n, &mut |l, i| {
            let arow = l.scaled(a.ptr, i, a.rs * 4);
            let garow = l.scaled(ga.ptr, i, ga.rs * gs);
            let orow = l.scaled(out.ptr, i, out.rs * 4);
            let kept = if strict { i } else { l.b.ins().iadd_imm_s(i, 1) };
            let zero = l.iconst(0);
            l.for_loop(zero, kept, &[], &mut |l, j, _| {
                let brow = l.scaled(b.ptr, j, b.rs * 4);
                let gbrow = l.scaled(gb.ptr, j, gb.rs * gs);
                let z = l.fconst(types::F32, 0.0);
                let (s, e) = (l.iconst(0), l.iconst(c as i64));
                let sum = l.for_loop(s, e, &[z, arow, garow, brow, gbrow], &mut |l, _, v| {
                    let x = l.load(types::F32, v[1], 0);
                    let y = l.load(types::F32, v[3], 0);
                    let gx = l.load(scalar_ty(gdt), v[2], 0);
                    let gy = l.load(scalar_ty(gdt), v[4], 0);
                    let d = l.b.ins().fsub(gx, gy);
                    let e = l.gate_exp(gdt, d);
                    let xy = l.b.ins().fmul(x, y);
                    let t = l.b.ins().fmul(xy, e);
                    vec![
                        l.b.ins().fadd(v[0], t),
                        l.offset(v[1], a.cs * 4),
                        l.offset(v[2], ga.cs * gs),
                        l.offset(v[3], b.cs * 4),
                        l.offset(v[4], gb.cs * gs),
                    ]
                })[0];
                let op = l.scaled(orow, j, out.cs * 4);
                l.store(sum, op, 0);
                vec![]
            });
            let end = l.iconst(n as i64);
            l.for_loop(kept, end, &[], &mut |l, j, _| {
                let z = l.fconst(types::F32, 0.0);
                let op = l.scaled(orow, j, out.cs * 4);
                l.store(z, op, 0);
                vec![]
            });
        });
    }
}
