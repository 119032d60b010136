//! The Cranelift CPU backend against the interpreter, op by op.
//!
//! Every kernel runs once through `interp::run` and once as compiled code on the same inputs;
//! output buffers are poisoned with NaN first (and the workspace with NaN bytes), so an
//! element one side leaves unwritten or reads uninitialised shows up as a NaN mismatch.
//! `check` compiles each kernel once per SIMD level the host has (`Simd::Portable`: all
//! Cranelift code; `Avx2` and `Avx512`: the rustc-compiled `Dot`, `GatedDot` and
//! `GatedMatMul` routines), so
//! every path is tested on a machine that has the features.

use chunkc_codegen::builder::Builder;
use chunkc_codegen::cpu::{compile, compile_with, CpuCompiled, Simd};
use chunkc_codegen::interp;
use chunkc_codegen::ir::*;
use chunkc_runtime::cpu_kernel::CpuKernel;
use chunkc_runtime::exec::{launch, Buffer, Order};

// ---- harness ---------------------------------------------------------------------------------

/// xorshift64: deterministic test data without dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

const SHAPES: [(usize, usize); 4] = [(1, 1), (3, 5), (17, 33), (64, 128)];

fn read(b: &mut Builder, name: &str) -> usize {
    b.param(name, Access::Read)
}

fn write(b: &mut Builder, name: &str) -> usize {
    b.param(name, Access::Write)
}

/// Loads a row-major `rows x cols` tile from the start of parameter `p`.
fn ld(b: &mut Builder, p: usize, rows: usize, cols: usize) -> ValueId {
    b.load(p, Idx::c(0), cols as i64, 1, rows, cols, Idx::c(rows as i64))
}

/// Stores a tile row-major at the start of parameter `p`.
fn st(b: &mut Builder, v: ValueId, p: usize) {
    let t = b.ty(v);
    b.store(v, p, Idx::c(0), t.cols as i64, 1, Idx::c(t.rows as i64));
}

fn run_jit(c: &CpuCompiled, bufs: &mut [Vec<f32>], batch: i64, head: i64, seq_len: i64) {
    // NaN bytes, so reading workspace the kernel has not written poisons the result.
    let mut ws = vec![0xffu8; c.workspace_bytes() + 64];
    let off = ws.as_ptr().align_offset(64);
    let ptrs: Vec<*mut f32> = bufs.iter_mut().map(|v| v.as_mut_ptr()).collect();
    unsafe { c.call(ptrs.as_ptr(), batch, head, seq_len, ws.as_mut_ptr().add(off)) };
}

fn poison(k: &Kernel, bufs: &mut [Vec<f32>]) {
    for (p, buf) in k.params.iter().zip(bufs) {
        if p.access == Access::Write {
            buf.fill(f32::NAN);
        }
    }
}

/// Element-wise comparison: NaN exactly where expected, otherwise
/// `|got - want| <= atol + rtol * |want|` (infinities must match exactly).
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() || g.is_nan() {
            w.is_nan() && g.is_nan()
        } else if w.is_infinite() || g.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}: element {i}: compiled {g:e}, interpreter {w:e} (rtol {rtol}, atol {atol})");
    }
}

/// Runs `k` at one grid point in both engines; compares every written parameter.
fn check_at(
    what: &str,
    k: &Kernel,
    inputs: &[Vec<f32>],
    point: (i64, i64, i64),
    rtol: f32,
    atol: f32,
) -> Vec<Vec<f32>> {
    let mut want = inputs.to_vec();
    poison(k, &mut want);
    let poisoned = want.clone();
    {
        let mut slices: Vec<&mut [f32]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
        interp::run(k, &mut slices, point.0, point.1, point.2).unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
    }
    let mut last = vec![];
    for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|s| s.available()) {
        let c = compile_with(k, simd).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut got = poisoned.clone();
        run_jit(&c, &mut got, point.0, point.1, point.2);
        for (p, param) in k.params.iter().enumerate() {
            if param.access == Access::Write {
                assert_close(&format!("{what} ({simd:?}), param {}", param.name), &got[p], &want[p], rtol, atol);
            }
        }
        last = got;
    }
    last
}

fn check(what: &str, k: &Kernel, inputs: &[Vec<f32>], rtol: f32, atol: f32) -> Vec<Vec<f32>> {
    check_at(what, k, inputs, (0, 0, 0), rtol, atol)
}

const RTOL: f32 = 1e-6;

/// Absolute tolerance for an f32-accumulated sum of `k` products of magnitude `scale`
/// against the interpreter's f64 sum (a generous multiple of the expected rounding error).
fn sum_atol(k: usize, scale: f32) -> f32 {
    2e-6 * (k.max(1) as f32) * scale
}

/// Relative tolerance for results of f32 `exp`, `exp2`, `sigmoid` and `silu`, which are NOT
/// bit-exact against the interpreter: the backend evaluates them inline in f32 (vmath.rs:
/// under 2 ulp of the true value, see `vector_exp_accuracy_sweep`), while the interpreter
/// computes in f64 and rounds once (0.5 ulp). 4 ulp of relative error (4 * 2^-23) covers both.
const EXP_RTOL: f32 = 4.0 * f32::EPSILON;

const UNOPS: [UnOp; 11] = [
    UnOp::Neg,
    UnOp::Exp,
    UnOp::Exp2,
    UnOp::Log,
    UnOp::Sigmoid,
    UnOp::Softplus,
    UnOp::Silu,
    UnOp::Sqrt,
    UnOp::Recip,
    UnOp::Abs,
    UnOp::Tanh,
];
const BINOPS: [BinOp; 11] = [
    BinOp::Add,
    BinOp::Sub,
    BinOp::Mul,
    BinOp::Div,
    BinOp::Pow,
    BinOp::Max,
    BinOp::Min,
    BinOp::Lt,
    BinOp::Le,
    BinOp::Equal,
    BinOp::Keep,
];

// ---- elementwise ---------------------------------------------------------------------------

#[test]
fn unary_ops_in_both_dtypes() {
    let mut rng = Rng::new(1);
    for (rows, cols) in SHAPES {
        for op in UNOPS {
            for dt in [DType::F32, DType::F64] {
                let mut b = Builder::new("unary");
                let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
                let v = ld(&mut b, x, rows, cols);
                let v = b.cast(v, dt);
                let u = b.unary(op, v);
                st(&mut b, u, y); // f64 tiles are rounded by the store
                let k = b.finish();
                // Wide range: covers softplus's |x| > 20 branches, log/sqrt of negatives (NaN),
                // and exp overflow in f32.
                let mut xs = rng.vec(rows * cols, 30.0);
                xs[0] = if op == UnOp::Exp { 100.0 } else { xs[0] };
                if rows * cols > 2 {
                    xs[1] = f32::NAN;
                    xs[2] = 0.0;
                }
                check(&format!("{op:?} {dt:?} {rows}x{cols}"), &k, &[xs, vec![0.0; rows * cols]], RTOL, 0.0);
            }
        }
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let mut rng = Rng::new(2);
    for (rows, cols) in SHAPES {
        // (a shape, b shape): same, row vector, column vector, scalar, and outer broadcasts.
        let pairs = [
            ((rows, cols), (rows, cols)),
            ((rows, cols), (1, cols)),
            ((rows, 1), (rows, cols)),
            ((rows, cols), (1, 1)),
            ((1, 1), (rows, cols)),
            ((1, cols), (rows, 1)),
        ];
        for op in BINOPS {
            for dt in [DType::F32, DType::F64] {
                for (sa, sb) in pairs {
                    let mut b = Builder::new("binary");
                    let (pa, pb, py) = (read(&mut b, "a"), read(&mut b, "b"), write(&mut b, "y"));
                    let va = ld(&mut b, pa, sa.0, sa.1);
                    let vb = ld(&mut b, pb, sb.0, sb.1);
                    let (va, vb) = (b.cast(va, dt), b.cast(vb, dt));
                    let y = b.binary(op, va, vb);
                    st(&mut b, y, py);
                    let k = b.finish();
                    let mut xa = rng.vec(sa.0 * sa.1, 3.0);
                    let mut xb = rng.vec(sb.0 * sb.1, 3.0);
                    if xa.len() > 3 {
                        xa[3] = f32::NAN; // Max must propagate NaN from either side
                    }
                    if xb.len() > 1 {
                        xb[1] = f32::NAN;
                        xb[0] = 0.0;
                    }
                    // A zero condition for Keep, and a tie for the comparisons, min and max.
                    if xa.len() > 2 && xb.len() > 2 {
                        xa[1] = 0.0;
                        xa[2] = xb[2];
                    }
                    let n = rows.max(sa.0) * cols.max(sa.1);
                    check(&format!("{op:?} {dt:?} {sa:?} {sb:?}"), &k, &[xa, xb, vec![0.0; n]], RTOL, 0.0);
                }
            }
        }
    }
}

#[test]
fn casts_round_to_nearest() {
    let mut rng = Rng::new(3);
    for (rows, cols) in SHAPES {
        let mut b = Builder::new("cast");
        let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
        let v = ld(&mut b, x, rows, cols);
        let w = b.cast(v, DType::F64);
        let third = b.constant(1.0 / 3.0, TileTy::f64(1, 1));
        let w = b.mul(w, third); // not representable in f32: the cast back must round
        let v = b.cast(w, DType::F32);
        st(&mut b, v, y);
        let k = b.finish();
        check(&format!("cast {rows}x{cols}"), &k, &[rng.vec(rows * cols, 1e3), vec![0.0; rows * cols]], 0.0, 0.0);
    }
}

#[test]
fn constants_and_index_values() {
    let mut b = Builder::new("consts");
    let y = write(&mut b, "y");
    let mut col = 0;
    let mut put = |b: &mut Builder, v: ValueId| {
        let t = b.ty(v);
        for i in 0..t.rows {
            let r = b.rows(v, i, 1);
            b.store(r, y, Idx::c(col), 1, 1, Idx::c(1));
            col += t.cols as i64;
        }
    };
    for (value, ty) in [
        (1.0 / 3.0, TileTy::f32(3, 5)),
        (1.0 / 3.0, TileTy::f64(2, 7)),
        (f64::NEG_INFINITY, TileTy::f32(1, 4)),
        (f64::NAN, TileTy::f64(2, 2)),
        (-0.0, TileTy::f32(17, 3)),
    ] {
        let c = b.constant(value, ty);
        put(&mut b, c);
    }
    use IdxVar::*;
    let t = || Idx::var(SeqLen);
    for e in [
        Idx::var(Batch),
        Idx::var(Head),
        t(),
        t().ceil_div(4),
        t().sub(Idx::c(100)).ceil_div(7), // negative: floor semantics
        t().sub(Idx::c(98)).ceil_div(7),
        t().mul(Idx::var(Head)).add(Idx::var(Batch)),
        t().min(Idx::c(5)),
        Idx::var(Iter), // 0 outside loops
        Idx::c((1 << 40) + 1),
    ] {
        let v = b.idx_value(e);
        put(&mut b, v);
    }
    let k = b.finish();
    for (bi, h, t) in [(0, 0, 0), (2, 3, 37), (1, 5, 1000)] {
        check_at(&format!("consts at {bi},{h},{t}"), &k, &[vec![0.0; 200]], (bi, h, t), 0.0, 0.0);
    }
}

// ---- loads and stores ------------------------------------------------------------------------

#[test]
fn loads_and_stores_with_tails_and_strides() {
    let mut rng = Rng::new(4);
    let t = || Idx::var(IdxVar::SeqLen);
    for (rows, cols) in SHAPES {
        let mut b = Builder::new("io");
        let (x, y1, y2, y3) = (read(&mut b, "x"), write(&mut b, "y1"), write(&mut b, "y2"), write(&mut b, "y3"));
        // Load with a tail (valid rows from T), stride 3 rows, column stride 2, offset base.
        let v = b.load(x, Idx::c(5), 3 * cols as i64, 2, rows, cols, t());
        // Plain store of the whole tile: the zero rows are stored too.
        st(&mut b, v, y1);
        // Transposed, strided store with its own tail: valid rows = T - 2.
        b.store(v, y2, Idx::c(1), 1, rows as i64 + 3, t().sub(Idx::c(2)));
        // A store of an f64 tile, row stride 2*cols and column stride 2.
        let w = b.cast(v, DType::F64);
        let w = b.exp(w);
        b.store(w, y3, Idx::var(IdxVar::Head), 2 * cols as i64, 2, t().min(Idx::c(rows as i64)));
        let k = b.finish();
        let xs = rng.vec(5 + 3 * cols * rows + 2 * cols, 1.0);
        let ins = [xs, vec![0.0; rows * cols], vec![0.0; 1 + cols * (rows + 3)], vec![0.0; 2 + 2 * cols * rows]];
        for seq in [0, 1, rows as i64 / 2, rows as i64, rows as i64 + 7, -3] {
            check_at(&format!("io {rows}x{cols} T={seq}"), &k, &ins, (0, 1, seq), RTOL, 0.0);
        }
    }
}

#[test]
fn broadcast_loads_with_zero_strides() {
    // A load with column stride 0 repeats one element along the row.
    let mut b = Builder::new("bload");
    let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
    let v = b.load(x, Idx::c(1), 1, 0, 6, 9, Idx::c(4));
    st(&mut b, v, y);
    let k = b.finish();
    check("bload", &k, &[Rng::new(5).vec(8, 1.0), vec![0.0; 54]], 0.0, 0.0);
}

// ---- dot -------------------------------------------------------------------------------------

#[test]
fn dot_all_transposes_with_and_without_acc() {
    let mut rng = Rng::new(6);
    // Also shapes for the AVX-512 kernel's partial blocks: 9 rows (8 + 1), 48 columns (32 +
    // 16 in place), 24 (one packed 32-wide block), 40 (32 + 8).
    let dims = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (2, 4, 3),
        (5, 8, 12),
        (64, 128, 64),
        (16, 64, 16),
        (7, 3, 21),
        (9, 20, 48),
        (12, 17, 24),
        (10, 9, 40),
    ];
    for (m, kk, n) in dims {
        for ta in [false, true] {
            for tb in [false, true] {
                for with_acc in [false, true] {
                    let mut b = Builder::new("dot");
                    let (pa, pb, pc, py) =
                        (read(&mut b, "a"), read(&mut b, "b"), read(&mut b, "c"), write(&mut b, "y"));
                    let a = if ta { ld(&mut b, pa, kk, m) } else { ld(&mut b, pa, m, kk) };
                    let bb = if tb { ld(&mut b, pb, n, kk) } else { ld(&mut b, pb, kk, n) };
                    let acc = with_acc.then(|| ld(&mut b, pc, m, n));
                    let y = b.dot(a, bb, ta, tb, acc);
                    st(&mut b, y, py);
                    let k = b.finish();
                    let ins = [rng.vec(m * kk, 1.0), rng.vec(kk * n, 1.0), rng.vec(m * n, 4.0), vec![0.0; m * n]];
                    let what = format!("dot {m}x{kk}x{n} ta={ta} tb={tb} acc={with_acc}");
                    check(&what, &k, &ins, RTOL, sum_atol(kk, 1.0));
                }
            }
        }
    }
}

#[test]
fn dot_with_transposed_accumulator_and_view_operands() {
    let mut rng = Rng::new(7);
    // The last two are large enough (m*n*k >= 4096) for the microkernel path, with partial
    // row and column blocks.
    for (m, kk, n) in [(3, 5, 7), (16, 12, 20), (9, 4, 4), (13, 40, 37), (70, 24, 33)] {
        let mut b = Builder::new("dot_views");
        let (pa, pb, pc, py) = (read(&mut b, "a"), read(&mut b, "b"), read(&mut b, "c"), write(&mut b, "y"));
        // a: rows 2..2+m of a (m+3) x k tile, then as ta (Transpose of Rows).
        let a = ld(&mut b, pa, m + 3, kk);
        let a = b.rows(a, 2, m);
        let a = b.transpose(a); // k x m
                                // b: Rows of a Transpose: the tile is n x (k+2); its transpose (k+2) x n, rows 1..1+k.
        let bt = ld(&mut b, pb, n, kk + 2);
        let bt = b.transpose(bt);
        let bv = b.rows(bt, 1, kk);
        // acc: the transpose of an n x m tile.
        let c = ld(&mut b, pc, n, m);
        let c = b.transpose(c);
        let y = b.dot(a, bv, true, false, Some(c));
        st(&mut b, y, py);
        let y2 = b.dot(bv, a, true, false, None); // n x m from the same views
        let t = b.ty(y2);
        b.store(y2, py, Idx::c((m * n) as i64), t.cols as i64, 1, Idx::c(t.rows as i64));
        // Contiguous rows of op(b) with the transposed accumulator.
        let bp = ld(&mut b, pb, kk, n);
        let y3 = b.dot(a, bp, true, false, Some(c));
        b.store(y3, py, Idx::c((2 * m * n) as i64), n as i64, 1, Idx::c(m as i64));
        let k = b.finish();
        let ins = [rng.vec((m + 3) * kk, 1.0), rng.vec(n * (kk + 2), 1.0), rng.vec(n * m, 1.0), vec![0.0; 3 * m * n]];
        check(&format!("dot views {m}x{kk}x{n}"), &k, &ins, RTOL, sum_atol(kk, 1.0));
    }
}

// ---- scans, reductions, masks ----------------------------------------------------------------

#[test]
fn cumsum_row_sum_in_both_dtypes() {
    let mut rng = Rng::new(8);
    for (rows, cols) in SHAPES {
        for dt in [DType::F32, DType::F64] {
            for exclusive in [false, true] {
                let mut b = Builder::new("scan");
                let (x, y, z, w) = (read(&mut b, "x"), write(&mut b, "y"), write(&mut b, "z"), write(&mut b, "w"));
                let v = ld(&mut b, x, rows, cols);
                let v = b.cast(v, dt);
                let c = b.cumsum(v, exclusive);
                st(&mut b, c, y);
                let s = b.row_sum(v);
                st(&mut b, s, z);
                // Down the columns of the transpose: a strided operand.
                let vt = b.transpose(v);
                let ct = b.cumsum(vt, exclusive);
                st(&mut b, ct, w);
                let k = b.finish();
                let n = rows * cols;
                let ins = [rng.vec(n, 1.0), vec![0.0; n], vec![0.0; rows], vec![0.0; n]];
                // Cumsums round in the dtype after each add, as the interpreter does: exact.
                // Row sums are carried in f64 like the interpreter: exact.
                check(&format!("scan {dt:?} {rows}x{cols} excl={exclusive}"), &k, &ins, 0.0, 0.0);
            }
        }
    }
}

#[test]
fn masks_tril_and_rows_before() {
    let mut rng = Rng::new(9);
    let t = || Idx::var(IdxVar::SeqLen);
    for (rows, cols) in [(1, 1), (3, 5), (5, 3), (17, 33), (64, 64)] {
        for dt in [DType::F32, DType::F64] {
            for fill in [f64::NEG_INFINITY, f64::NAN, 0.0] {
                let mut b = Builder::new("mask");
                let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
                let v = ld(&mut b, x, rows, cols);
                let v = b.cast(v, dt);
                let kinds = [
                    MaskKind::Tril { strict: false },
                    MaskKind::Tril { strict: true },
                    MaskKind::RowsBefore(t().sub(Idx::c(3))),
                ];
                for (q, kind) in kinds.into_iter().enumerate() {
                    let m = b.mask(v, kind, fill);
                    b.store(m, y, Idx::c((q * rows * cols) as i64), cols as i64, 1, Idx::c(rows as i64));
                }
                let k = b.finish();
                let ins = [rng.vec(rows * cols, 1.0), vec![0.0; 3 * rows * cols]];
                for seq in [0, 4, rows as i64 + 3, 100] {
                    check_at(&format!("mask {dt:?} {rows}x{cols} {fill}"), &k, &ins, (0, 0, seq), 0.0, 0.0);
                }
            }
        }
    }
}

// ---- gated dot, solve ------------------------------------------------------------------------

#[test]
fn gated_dot_only_evaluates_kept_elements() {
    let mut rng = Rng::new(10);
    // c = 128 and 64: whole vectors; 40 and 33: vector tails (AVX2 8 lanes, AVX-512 16).
    for (n, c) in [(1, 1), (5, 3), (17, 33), (64, 16), (16, 128), (9, 40), (3, 64)] {
        for gdt in [DType::F32, DType::F64] {
            for strict in [false, true] {
                let mut b = Builder::new("gated");
                let (pa, pb, pg, py) = (read(&mut b, "a"), read(&mut b, "b"), read(&mut b, "g"), write(&mut b, "y"));
                let a = ld(&mut b, pa, n, c);
                let bb = ld(&mut b, pb, n, c);
                // Strongly decaying cumulative gates: above the diagonal ga - gb is large and
                // positive (exp overflows), so evaluating it would give inf or NaN.
                let g = ld(&mut b, pg, n, c);
                let g = b.cast(g, gdt);
                let g = b.cumsum(g, false);
                let y = b.gated_dot(a, g, bb, g, strict);
                st(&mut b, y, py);
                let k = b.finish();
                let gates: Vec<f32> = rng.vec(n * c, 1.0).iter().map(|x| -40.0 * (x.abs() + 0.5)).collect();
                let ins = [rng.vec(n * c, 1.0), rng.vec(n * c, 1.0), gates, vec![0.0; n * n]];
                let what = format!("gated_dot {n}x{c} {gdt:?} strict={strict}");
                check(&what, &k, &ins, RTOL, sum_atol(c, 1.0));
            }
        }
    }
}

#[test]
fn gated_matmul_only_evaluates_the_triangle() {
    let mut rng = Rng::new(12);
    for (n, c) in [(1, 1), (5, 3), (17, 33), (16, 128), (9, 40)] {
        for gdt in [DType::F32, DType::F64] {
            for (transposed, strict) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut b = Builder::new("gated_matmul");
                let (pm, px, pg, py) = (read(&mut b, "m"), read(&mut b, "x"), read(&mut b, "g"), write(&mut b, "y"));
                let m = ld(&mut b, pm, n, n);
                let x = ld(&mut b, px, n, c);
                // Strongly decaying cumulative gates: outside the triangle the exponent is
                // large and positive (exp overflows), so evaluating it would give inf or NaN.
                let g = ld(&mut b, pg, n, c);
                let g = b.cast(g, gdt);
                let g = b.cumsum(g, false);
                let y = b.gated_matmul(m, x, g, g, transposed, strict);
                st(&mut b, y, py);
                let k = b.finish();
                let gates: Vec<f32> = rng.vec(n * c, 1.0).iter().map(|x| -40.0 * (x.abs() + 0.5)).collect();
                let ins = [rng.vec(n * n, 1.0), rng.vec(n * c, 1.0), gates, vec![0.0; n * c]];
                let what = format!("gated_matmul {n}x{c} {gdt:?} transposed={transposed} strict={strict}");
                check(&what, &k, &ins, RTOL, sum_atol(n, 1.0));
            }
        }
    }
}

#[test]
fn gated_dot_on_views() {
    let mut rng = Rng::new(11);
    let (n, c) = (6, 10);
    let mut b = Builder::new("gated_views");
    let (pa, pg, py) = (read(&mut b, "a"), read(&mut b, "g"), write(&mut b, "y"));
    // Operands are Rows of a Transpose (strided) and Transpose of Rows.
    let at = ld(&mut b, pa, c, n + 2);
    let at = b.transpose(at); // (n+2) x c
    let a = b.rows(at, 1, n);
    let bb = ld(&mut b, pa, n + 4, c);
    let bb = b.rows(bb, 3, n);
    let gt = ld(&mut b, pg, c, n);
    let g = b.transpose(gt);
    let g = b.mul(g, g);
    let g = b.neg(g);
    let y = b.gated_dot(a, g, bb, g, false);
    st(&mut b, y, py);
    let k = b.finish();
    let ins = [rng.vec((n + 4) * c.max(n + 2), 1.0), rng.vec(c * n, 1.0), vec![0.0; n * n]];
    check("gated views", &k, &ins, RTOL, sum_atol(c, 1.0));
}

#[test]
fn solve_unit_lower_forward_substitution() {
    let mut rng = Rng::new(12);
    for (n, m) in [(1, 1), (3, 5), (17, 33), (64, 64), (64, 3), (8, 4)] {
        for transposed in [false, true] {
            let mut b = Builder::new("solve");
            let (pl, pb, py) = (read(&mut b, "l"), read(&mut b, "b"), write(&mut b, "y"));
            let l = ld(&mut b, pl, n, n);
            let l = if transposed { b.transpose(l) } else { l };
            let rhs = if transposed {
                let t = ld(&mut b, pb, m, n);
                b.transpose(t)
            } else {
                ld(&mut b, pb, n, m)
            };
            let x = b.solve_unit_lower(l, rhs);
            st(&mut b, x, py);
            let k = b.finish();
            // Small strictly-lower entries keep the substitution well conditioned; the diagonal
            // and upper triangle hold large garbage the solve must ignore.
            let mut lv = rng.vec(n * n, 0.1);
            for i in 0..n {
                for j in i..n {
                    let at = if transposed { j * n + i } else { i * n + j };
                    lv[at] = 1e3 * (1.0 + i as f32);
                }
            }
            let ins = [lv, rng.vec(n * m, 1.0), vec![0.0; n * m]];
            check(&format!("solve {n}x{m} t={transposed}"), &k, &ins, RTOL, sum_atol(n, 1.0));
        }
    }
}

// ---- views everywhere ------------------------------------------------------------------------

#[test]
fn views_as_operands_of_every_op_kind() {
    let mut rng = Rng::new(13);
    let (r, c) = (7, 9);
    let mut b = Builder::new("views");
    let (px, py) = (read(&mut b, "x"), write(&mut b, "y"));
    let x = ld(&mut b, px, r + 4, c + 3); // 11 x 12
                                          // Rows of Transpose: c+3 x r+4 -> rows 1..1+c: c x (r+4).
    let xt = b.transpose(x);
    let rt = b.rows(xt, 1, c);
    // Transpose of Rows: rows 2..2+r: r x (c+3) -> (c+3) x r.
    let rr = b.rows(x, 2, r);
    let tr = b.transpose(rr);
    let tr = b.rows(tr, 0, c); // c x r
    let rt = {
        let t = b.transpose(rt); // (r+4) x c
        let t = b.rows(t, 3, r); // r x c
        b.transpose(t) // c x r
    };
    let mut outs = vec![];
    outs.push(b.exp(rt));
    outs.push(b.add(rt, tr));
    let row = b.rows(tr, 4, 1); // 1 x r view, broadcast down the rows
    outs.push(b.mul(rt, row));
    let col = {
        let t = b.transpose(x);
        let t = b.rows(t, 5, 1); // 1 x (r+4)
        let t = b.transpose(t); // (r+4) x 1
        b.rows(t, 2, c) // c x 1 column view
    };
    outs.push(b.binary(BinOp::Max, col, rt));
    let f64v = b.cast(tr, DType::F64);
    let f64v = b.transpose(f64v);
    let f64v = b.transpose(f64v);
    outs.push(b.cast(f64v, DType::F32));
    outs.push(b.cumsum(rt, true));
    let s = b.row_sum(tr);
    outs.push(b.mul(s, rt));
    outs.push(b.mask(tr, MaskKind::Tril { strict: false }, f64::NEG_INFINITY));
    outs.push(b.dot(rt, tr, false, true, None)); // c x c
    let sq = b.rows(outs[8], 0, c);
    outs.push(b.solve_unit_lower(sq, tr));
    let neg = b.neg(tr);
    outs.push(b.gated_dot(rt, neg, tr, neg, true));
    let mut off = 0;
    for v in outs {
        let t = b.ty(v);
        // Store each output transposed, through a view: a strided store.
        let vt = b.transpose(v);
        b.store(vt, py, Idx::c(off), 1, t.cols as i64, Idx::c(t.cols as i64));
        off += t.len() as i64;
    }
    let k = b.finish();
    let ins = [rng.vec((r + 4) * (c + 3), 1.0), vec![0.0; off as usize]];
    check("views", &k, &ins, 1e-5, 1e-4);
}

// ---- loops -----------------------------------------------------------------------------------

/// Linear-attention style scan over chunks of a sequence with a tail: carries a state
/// `S += K^T V` and a running column sum of V; stores `O = K S` per chunk and both finals.
fn chunked_scan(chunk: usize, dk: usize, dv: usize) -> Kernel {
    use IdxVar::*;
    let mut b = Builder::new("scan");
    let (pk, pv, po, ps, pz) =
        (read(&mut b, "k"), read(&mut b, "v"), write(&mut b, "o"), write(&mut b, "s"), write(&mut b, "z"));
    let t = || Idx::var(SeqLen);
    let start = || Idx::var(Iter).mul(Idx::c(chunk as i64));
    let s0 = b.constant(0.0, TileTy::f32(dk, dv));
    let z0 = b.constant(0.0, TileTy::f32(1, dv));
    let inner = b.begin_loop(t().ceil_div(chunk as i64), &[s0, z0]);
    let (s, z) = (inner[0], inner[1]);
    let valid = t().sub(start()).min(Idx::c(chunk as i64));
    let kc = b.load(pk, start().mul(Idx::c(dk as i64)), dk as i64, 1, chunk, dk, valid.clone());
    let vc = b.load(pv, start().mul(Idx::c(dv as i64)), dv as i64, 1, chunk, dv, valid.clone());
    let o = b.dot(kc, s, false, false, None);
    b.store(o, po, start().mul(Idx::c(dv as i64)), dv as i64, 1, valid);
    let s2 = b.dot(kc, vc, true, false, Some(s));
    let cs = b.cumsum(vc, false);
    let last = b.rows(cs, chunk - 1, 1);
    let z2 = b.add(z, last);
    let out = b.end_loop(&[s2, z2]);
    st(&mut b, out[0], ps);
    st(&mut b, out[1], pz);
    b.finish()
}

#[test]
fn loop_carrying_two_tiles_over_chunks_with_a_tail() {
    let mut rng = Rng::new(14);
    let (chunk, dk, dv, tmax) = (8, 16, 12, 40);
    let k = chunked_scan(chunk, dk, dv);
    let ins =
        [rng.vec(tmax * dk, 1.0), rng.vec(tmax * dv, 1.0), vec![0.0; tmax * dv], vec![0.0; dk * dv], vec![0.0; dv]];
    for seq in [37, 40, 5, 8, 1, 0] {
        // seq = 0: count 0, no iteration; the results are the inits and `o` stays unwritten.
        let got = check_at(&format!("scan T={seq}"), &k, &ins, (0, 0, seq), RTOL, sum_atol(tmax, 2.0));
        if seq == 0 {
            assert!(got[2].iter().all(|x| x.is_nan()), "no iteration ran, so no chunk was stored");
            assert!(got[3].iter().chain(&got[4]).all(|&x| x == 0.0), "results are the inits");
        }
    }
}

/// A decayed state scan as the chunked plans build it: `O = K S` (the old state) first, then
/// `S' = K^T V + d * S` as the yield. The CPU backend computes `S'` straight into the carried
/// region (cpu/inplace.rs) when nothing after the dot reads `S`; `read_old_state_late` adds a
/// read of `S` after the dot (its row sums, stored), which must make it keep the copy. Both
/// must match the interpreter, whose every value has its own storage.
fn decayed_scan(read_old_state_late: bool) -> Kernel {
    use IdxVar::*;
    let (chunk, dk, dv) = (8usize, 16usize, 12usize);
    let mut b = Builder::new("decayed");
    let (pk, pv, ps0, po, ps, pz) = (
        read(&mut b, "k"),
        read(&mut b, "v"),
        read(&mut b, "s0"),
        write(&mut b, "o"),
        write(&mut b, "s"),
        write(&mut b, "z"),
    );
    let t = || Idx::var(SeqLen);
    let start = || Idx::var(Iter).mul(Idx::c(chunk as i64));
    let s0 = ld(&mut b, ps0, dk, dv);
    let inner = b.begin_loop(t().ceil_div(chunk as i64), &[s0]);
    let s = inner[0];
    let valid = t().sub(start()).min(Idx::c(chunk as i64));
    let kc = b.load(pk, start().mul(Idx::c(dk as i64)), dk as i64, 1, chunk, dk, valid.clone());
    let vc = b.load(pv, start().mul(Idx::c(dv as i64)), dv as i64, 1, chunk, dv, valid.clone());
    let o = b.dot(kc, s, false, false, None);
    b.store(o, po, start().mul(Idx::c(dv as i64)), dv as i64, 1, valid);
    let d = b.scalar(0.9);
    let decayed = b.mul(s, d);
    let s2 = b.dot(kc, vc, true, false, Some(decayed));
    if read_old_state_late {
        let z = b.row_sum(s);
        b.store(z, pz, start().mul(Idx::c(dk as i64)), 1, 1, Idx::c(dk as i64));
    }
    let out = b.end_loop(&[s2]);
    st(&mut b, out[0], ps);
    b.finish()
}

#[test]
fn a_state_update_in_place_matches_the_interpreter() {
    let mut rng = Rng::new(21);
    let (dk, dv, tmax) = (16, 12, 40);
    for late in [false, true] {
        let k = decayed_scan(late);
        let ins = [
            rng.vec(tmax * dk, 1.0),
            rng.vec(tmax * dv, 1.0),
            rng.vec(dk * dv, 1.0),
            vec![0.0; tmax * dv],
            vec![0.0; dk * dv],
            vec![0.0; tmax * dk],
        ];
        for seq in [37, 8, 1] {
            check_at(&format!("decayed late={late} T={seq}"), &k, &ins, (0, 0, seq), RTOL, sum_atol(tmax, 4.0));
        }
    }
}

/// `S' = K^T V + diag(d) S` with `d` per row of the state (a `[K x 1]` view of a loaded
/// `[1 x K]`) or one scalar, on a product large enough for the gemm: at the AVX levels the
/// scaling fuses into the gemm's epilogue and the update goes in place (cpu/fuse.rs), at the
/// portable level it stays a pass; every level must match the interpreter.
fn row_scaled_scan(per_row: bool) -> Kernel {
    use IdxVar::*;
    let (chunk, dk, dv) = (32usize, 16usize, 16usize);
    let mut b = Builder::new("row_scaled");
    let (pk, pv, pd, ps0, po, ps) = (
        read(&mut b, "k"),
        read(&mut b, "v"),
        read(&mut b, "d"),
        read(&mut b, "s0"),
        write(&mut b, "o"),
        write(&mut b, "s"),
    );
    let t = || Idx::var(SeqLen);
    let start = || Idx::var(Iter).mul(Idx::c(chunk as i64));
    let s0 = ld(&mut b, ps0, dk, dv);
    let s = b.begin_loop(t().ceil_div(chunk as i64), &[s0])[0];
    let valid = t().sub(start()).min(Idx::c(chunk as i64));
    let kc = b.load(pk, start().mul(Idx::c(dk as i64)), dk as i64, 1, chunk, dk, valid.clone());
    let vc = b.load(pv, start().mul(Idx::c(dv as i64)), dv as i64, 1, chunk, dv, valid.clone());
    let o = b.dot(kc, s, false, false, None);
    b.store(o, po, start().mul(Idx::c(dv as i64)), dv as i64, 1, valid);
    let d = if per_row {
        let row = b.load(pd, Idx::var(Iter).mul(Idx::c(dk as i64)), dk as i64, 1, 1, dk, Idx::c(1));
        b.transpose(row)
    } else {
        b.load(pd, Idx::var(Iter), 1, 1, 1, 1, Idx::c(1))
    };
    let decayed = b.mul(s, d);
    let s2 = b.dot(kc, vc, true, false, Some(decayed));
    let out = b.end_loop(&[s2]);
    st(&mut b, out[0], ps);
    b.finish()
}

#[test]
fn a_row_scaled_state_update_matches_the_interpreter_at_every_level() {
    let mut rng = Rng::new(33);
    let (dk, dv, tmax) = (16, 16, 100);
    for per_row in [true, false] {
        let k = row_scaled_scan(per_row);
        let ins = [
            rng.vec(tmax * dk, 1.0),
            rng.vec(tmax * dv, 1.0),
            rng.vec(4 * dk, 1.0),
            rng.vec(dk * dv, 1.0),
            vec![0.0; tmax * dv],
            vec![0.0; dk * dv],
        ];
        for seq in [100, 33, 1] {
            check_at(
                &format!("row scaled per_row={per_row} T={seq}"),
                &k,
                &ins,
                (0, 0, seq),
                RTOL,
                sum_atol(tmax, 8.0),
            );
        }
    }
}

#[test]
fn loop_yields_that_alias_carried_values() {
    let mut rng = Rng::new(15);
    let n = 5;
    let mut b = Builder::new("swap");
    let (px, py) = (read(&mut b, "x"), write(&mut b, "y"));
    let a0 = ld(&mut b, px, n, n);
    let b0 = b.exp(a0);
    let c0 = b.neg(a0);
    let d0 = b.constant(1.0, TileTy::f64(2, 3));
    let inner = b.begin_loop(Idx::var(IdxVar::SeqLen), &[a0, b0, c0, d0]);
    let (a, bb, c, d) = (inner[0], inner[1], inner[2], inner[3]);
    // Swap a and b; c becomes its own transpose plus the iteration index; d is yielded as is.
    let it = b.idx_value(Idx::var(IdxVar::Iter));
    let ct = b.transpose(c);
    let ab = b.add(a, it);
    let out = b.end_loop(&[bb, ab, ct, d]);
    let _ = (inner, ab);
    // b0 = exp(a0) is compared to EXP_RTOL (inline f32 exp); everything else stays exact
    // (a, c, d are moved or negated copies of exact values).
    let mut off = 0;
    for v in out {
        let t = b.ty(v);
        b.store(v, py, Idx::c(off), t.cols as i64, 1, Idx::c(t.rows as i64));
        off += t.len() as i64;
    }
    let k = b.finish();
    for seq in [0, 1, 2, 3, 6] {
        let ins = [rng.vec(n * n, 1.0), vec![0.0; off as usize]];
        check_at(&format!("swap T={seq}"), &k, &ins, (0, 0, seq), EXP_RTOL, 0.0);
    }
}

#[test]
fn loop_body_reads_values_defined_before_the_loop() {
    // `w` is last read early in the body; it must stay intact for the next iterations even
    // though later body values could otherwise reuse its workspace.
    let mut rng = Rng::new(18);
    let n = 16;
    let mut b = Builder::new("outer");
    let (px, py) = (read(&mut b, "x"), write(&mut b, "y"));
    let w = ld(&mut b, px, n, n);
    let s0 = b.constant(0.5, TileTy::f32(n, n));
    let inner = b.begin_loop(Idx::c(4), &[s0]);
    let u = b.mul(inner[0], w);
    let v = b.neg(u);
    let v = b.exp(v);
    let out = b.end_loop(&[v]);
    st(&mut b, out[0], py);
    let k = b.finish();
    // The yield is an f32 exp of the previous iteration's exp (times w), so this compares to
    // a relative bound instead of bit-exactly: each exp is within EXP_RTOL of the
    // interpreter's, and exp multiplies its argument's relative error by |argument| (up to
    // ~5 here) every iteration, so 4 iterations need 64 ulp. A clobbered `w` would still show
    // up as NaN (the workspace is NaN-poisoned) or as a wrong value far outside that.
    check("outer", &k, &[rng.vec(n * n, 1.0), vec![0.0; n * n]], 16.0 * EXP_RTOL, 0.0);
}

#[test]
fn values_and_iter_after_a_loop_match_the_interpreter() {
    // Outside a loop, Iter keeps the last iteration's value in the interpreter; so does the
    // compiled code.
    let mut b = Builder::new("after");
    let y = write(&mut b, "y");
    let z = b.scalar(0.0);
    let inner = b.begin_loop(Idx::var(IdxVar::SeqLen), &[z]);
    let one = b.scalar(1.0);
    let next = b.add(inner[0], one);
    let out = b.end_loop(&[next]);
    let it = b.idx_value(Idx::var(IdxVar::Iter));
    b.store(out[0], y, Idx::c(0), 1, 1, Idx::c(1));
    b.store(it, y, Idx::c(1), 1, 1, Idx::c(1));
    let k = b.finish();
    for seq in [0, 1, 4] {
        check_at(&format!("after T={seq}"), &k, &[vec![0.0; 2]], (0, 0, seq), 0.0, 0.0);
    }
}

// ---- the executor ----------------------------------------------------------------------------

#[test]
fn launch_over_a_grid_on_three_threads() {
    use IdxVar::*;
    let (batch, heads, rows, cols, seq) = (2usize, 3usize, 9usize, 6usize, 7i64);
    let per = rows * cols;
    let mut b = Builder::new("grid");
    let (px, py) = (read(&mut b, "x"), write(&mut b, "y"));
    let point = || Idx::var(Batch).mul(Idx::c(heads as i64)).add(Idx::var(Head));
    let base = || point().mul(Idx::c(per as i64));
    let x = b.load(px, base(), cols as i64, 1, rows, cols, Idx::var(SeqLen));
    let g = b.dot(x, x, true, false, None); // cols x cols
    let g = b.exp(g);
    let e = b.dot(x, g, false, false, Some(x));
    let h = b.idx_value(point());
    let e = b.mul(e, h);
    b.store(e, py, base(), cols as i64, 1, Idx::c(rows as i64));
    let k = b.finish();
    let c = compile(&k).unwrap();
    let xs = Rng::new(16).vec(batch * heads * per, 0.5);
    let mut got = vec![f32::NAN; batch * heads * per];
    unsafe {
        launch(
            &*c,
            &mut [Buffer::In(&xs), Buffer::Out(&mut got)],
            batch,
            heads,
            seq as usize,
            Order { threads: 3, time_block: 0, poison_scratch: true },
        )
    };
    let mut want = vec![f32::NAN; batch * heads * per];
    for bi in 0..batch as i64 {
        for hi in 0..heads as i64 {
            let mut xin = xs.clone();
            interp::run(&k, &mut [&mut xin, &mut want], bi, hi, seq).unwrap();
        }
    }
    assert_close("grid", &got, &want, 1e-5, sum_atol(rows, 10.0));
}

#[test]
fn empty_tiles() {
    let mut b = Builder::new("empty");
    let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
    let e = ld(&mut b, x, 3, 0);
    let s = b.row_sum(e); // 3 x 1 sums of nothing
    st(&mut b, s, y);
    let z = ld(&mut b, x, 0, 4);
    let d = b.dot(e, z, false, false, None); // 3 x 4 with an empty inner dimension
    b.store(d, y, Idx::c(3), 4, 1, Idx::c(3));
    let k = b.finish();
    let got = check("empty", &k, &[vec![1.0; 4], vec![0.0; 15]], 0.0, 0.0);
    assert!(got[1].iter().all(|&v| v == 0.0));
}

#[test]
fn compiled_kernels_can_be_shared_between_threads() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<CpuCompiled>();
}

// ---- workspace and errors --------------------------------------------------------------------

#[test]
fn dead_values_share_workspace() {
    let mut b = Builder::new("chain");
    let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
    let mut v = ld(&mut b, x, 64, 64);
    for q in 0..20 {
        v = if q % 2 == 0 { b.neg(v) } else { b.exp(v) };
    }
    st(&mut b, v, y);
    let k = b.finish();
    let c = compile(&k).unwrap();
    let tile = 64 * 64 * 4;
    assert!(c.workspace_bytes() <= 3 * tile, "workspace {} for a chain of 64x64 tiles", c.workspace_bytes());
    check("chain", &k, &[Rng::new(17).vec(64 * 64, 0.1), vec![0.0; 64 * 64]], RTOL, 0.0);
}

#[test]
fn invalid_kernels_are_errors_not_panics() {
    let mut b = Builder::new("bad_div");
    let y = write(&mut b, "y");
    let v = b.idx_value(Idx::var(IdxVar::SeqLen).ceil_div(0));
    st(&mut b, v, y);
    let e = compile(&b.finish()).unwrap_err();
    assert!(e.to_string().contains("ceil_div"), "{e}");

    let k = Kernel {
        name: "use_before_def".into(),
        params: vec![Param { name: "y".into(), access: Access::Write }],
        values: vec![TileTy::f32(1, 1), TileTy::f32(1, 1)],
        body: vec![
            Stmt::Let { id: ValueId(1), op: Op::Unary { op: UnOp::Neg, x: ValueId(0) } },
            Stmt::Let { id: ValueId(0), op: Op::Const { value: 1.0, ty: TileTy::f32(1, 1) } },
        ],
        vtiles: 1,
        chunk_parallel: false,
    };
    let e = compile(&k).unwrap_err();
    assert!(e.to_string().contains("before it is defined"), "{e}");

    let mut k2 = k.clone();
    k2.body = vec![Stmt::Store {
        value: ValueId(0),
        param: 3,
        base: Idx::c(0),
        row_stride: 1,
        col_stride: 1,
        valid_rows: Idx::c(1),
    }];
    assert!(compile(&k2).is_err());
}

// ---- inline f32 math accuracy --------------------------------------------------------------

/// Sweeps f32 inputs through the compiled f32 `exp`, `exp2`, `sigmoid` and `silu` (inline
/// vector code, vmath.rs) and checks them against f64 references: every 61st bit pattern
/// (all signs, exponents and mantissa spreads: normal and subnormal inputs and results,
/// overflow, ±0, ±inf, NaN). Error is measured in ulps of the f32 result (the subnormal ulp
/// 2^-149 below the normal range): at most 2 ulp for exp / exp2 (the Cephes polynomial and
/// the scaling are under 1.5 ulp over the whole range), 3 for sigmoid and 3.5 for silu (a
/// division, an add and for silu a multiply on top of exp; measured 2.6 and 3.1), 2 for log
/// (measured 0.82) and 3.5 for softplus (exp, log and a division; measured 3.2). Special values must match exactly (inf, 0, NaN).
#[test]
fn vector_exp_accuracy_sweep() {
    use chunkc_dsl::ast::sigmoid;
    const N: usize = 1 << 16;
    const COLS: usize = N + 3; // a scalar tail after the f32x4 chunks
    type Reference = fn(f64) -> f64;
    let ops: [(UnOp, Reference, f64); 6] = [
        (UnOp::Exp, f64::exp, 2.0),
        (UnOp::Exp2, f64::exp2, 2.0),
        (UnOp::Sigmoid, sigmoid, 3.0),
        (UnOp::Silu, |x| x * sigmoid(x), 3.5),
        (UnOp::Log, f64::ln, 2.0),
        (UnOp::Softplus, chunkc_dsl::ast::softplus, 3.5),
    ];
    let mut inputs: Vec<f32> = (0..u32::MAX / 61).map(|i| f32::from_bits(i * 61)).collect();
    inputs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 88.72283, 88.72284, -87.33655]);
    inputs.extend([-103.27893, -103.97208, -104.0, 127.99999, 128.0, -149.0, -149.5, -150.0, -126.0]);
    for (op, reference, max_ulp) in ops {
        let mut b = Builder::new("sweep");
        let (x, y) = (read(&mut b, "x"), write(&mut b, "y"));
        let v = ld(&mut b, x, 1, COLS);
        let u = b.unary(op, v);
        st(&mut b, u, y);
        let c = compile(&b.finish()).unwrap();
        let (mut worst, mut at) = (0.0f64, 0.0f32);
        for chunk in inputs.chunks(COLS) {
            let mut xs = chunk.to_vec();
            xs.resize(COLS, 0.0);
            let mut bufs = vec![xs, vec![f32::NAN; COLS]];
            run_jit(&c, &mut bufs, 0, 0, 0);
            for (&xv, &got) in chunk.iter().zip(&bufs[1]) {
                let want = reference(xv as f64);
                let w32 = want as f32;
                if want.is_nan() || w32.is_infinite() || w32 == 0.0 {
                    // Special results: exact (NaN for NaN; inf, 0 where f32 overflows/underflows
                    // when rounded from the exact value; one subnormal ulp of slack for 0).
                    let ok = if want.is_nan() {
                        got.is_nan()
                    } else if w32.is_infinite() {
                        got == w32 || (got.is_finite() && (got as f64 - want).abs() / want.abs() < 2e-7)
                    } else {
                        got.abs() <= f32::from_bits(1)
                    };
                    assert!(ok, "{op:?}({xv:e}) = {got:e}, want {want:e}");
                    continue;
                }
                let ulp = if w32.abs() < f32::MIN_POSITIVE {
                    f32::from_bits(1) as f64
                } else {
                    let e = w32.abs().to_bits() & 0x7f80_0000;
                    f32::from_bits(e) as f64 * f32::EPSILON as f64
                };
                let err = (got as f64 - want).abs() / ulp;
                if err > worst || err.is_nan() {
                    (worst, at) = (err, xv);
                }
            }
        }
        eprintln!("{op:?}: max error {worst:.3} ulp at x = {at:e} ({} inputs)", inputs.len());
        assert!(worst <= max_ulp, "{op:?}: {worst} ulp at x = {at:e} (bound {max_ulp})");
    }
}

// ---- fused elementwise chains ----------------------------------------------------------------

/// A long chain in the shape of the chunked gate factors: `cast(exp(cast(sub(g, pivot))))`
/// with a broadcast row pivot, then mixed f32 ops with a broadcast column, a broadcast scalar
/// constant and the inline vector exp / sigmoid; every intermediate has one use, so the
/// backend evaluates the chain in one pass (the f64 part scalar, an all-f32 chain in vectors).
#[test]
fn fused_chains_with_broadcasting_and_mixed_dtypes() {
    let mut rng = Rng::new(41);
    for (rows, cols) in SHAPES {
        for via_f64 in [true, false] {
            let mut b = Builder::new("chain");
            let (pg, pp, px, ps, py) =
                (read(&mut b, "g"), read(&mut b, "pivot"), read(&mut b, "x"), read(&mut b, "s"), write(&mut b, "y"));
            let g = ld(&mut b, pg, rows, cols);
            let pivot = ld(&mut b, pp, 1, cols);
            let x = ld(&mut b, px, rows, cols);
            let s = ld(&mut b, ps, rows, 1);
            let e = if via_f64 {
                let (g, pivot) = (b.cast(g, DType::F64), b.cast(pivot, DType::F64));
                let d = b.sub(g, pivot);
                let e = b.exp(d);
                b.cast(e, DType::F32)
            } else {
                let d = b.sub(g, pivot);
                b.exp(d)
            };
            let y = b.mul(x, e);
            let y = b.add(y, s);
            let half = b.constant(0.5, TileTy::f32(1, 1));
            let y = b.mul(y, half);
            let y = b.unary(UnOp::Sigmoid, y);
            let y = b.neg(y);
            let full = b.constant(2.0, TileTy::f32(rows, cols));
            let y = b.binary(BinOp::Max, y, full);
            let y = b.sub(y, x);
            st(&mut b, y, py);
            let k = b.finish();
            let ins = [
                rng.vec(rows * cols, 2.0),
                rng.vec(cols, 2.0),
                rng.vec(rows * cols, 3.0),
                rng.vec(rows, 1.0),
                vec![0.0; rows * cols],
            ];
            check(&format!("chain {rows}x{cols} f64={via_f64}"), &k, &ins, 8.0 * EXP_RTOL, 1e-6);
        }
    }
}

/// A mask with an -inf fill inside a chain: `exp(mask(a - b, -inf)) * x`, for both mask kinds.
#[test]
fn fused_chains_around_masks_with_neg_inf_fill() {
    let mut rng = Rng::new(42);
    let t = || Idx::var(IdxVar::SeqLen);
    for (rows, cols) in [(1, 1), (5, 5), (17, 17), (64, 64)] {
        for dt in [DType::F32, DType::F64] {
            for kind in [MaskKind::Tril { strict: true }, MaskKind::Tril { strict: false }, MaskKind::RowsBefore(t())] {
                let mut b = Builder::new("masked_chain");
                let (pa, pb, px, py) = (read(&mut b, "a"), read(&mut b, "b"), read(&mut b, "x"), write(&mut b, "y"));
                let pm = write(&mut b, "m");
                let a = ld(&mut b, pa, rows, cols);
                let bb = ld(&mut b, pb, 1, cols);
                let x = ld(&mut b, px, rows, cols);
                let (a, bb) = (b.cast(a, dt), b.cast(bb, dt));
                let d = b.sub(a, bb);
                let m = b.mask(d, kind.clone(), f64::NEG_INFINITY);
                let e = b.exp(m);
                let e = b.cast(e, DType::F32);
                let y = b.mul(e, x);
                let y = b.neg(y);
                st(&mut b, y, py);
                // A mask as the root of a chain: mask(2 a - b, -inf) materialised by the mask.
                let two = b.constant(2.0, TileTy { rows: 1, cols: 1, dtype: dt });
                let a2 = b.mul(a, two);
                let d2 = b.sub(a2, bb);
                let m2 = b.mask(d2, kind.clone(), f64::NEG_INFINITY);
                b.store(m2, pm, Idx::c(0), cols as i64, 1, Idx::c(rows as i64));
                let k = b.finish();
                let ins = [
                    rng.vec(rows * cols, 1.0),
                    rng.vec(cols, 1.0),
                    rng.vec(rows * cols, 1.0),
                    vec![0.0; rows * cols],
                    vec![0.0; rows * cols],
                ];
                for seq in [0, 3, 100] {
                    check_at(
                        &format!("masked chain {dt:?} {kind:?} {rows}x{cols}"),
                        &k,
                        &ins,
                        (0, 0, seq),
                        EXP_RTOL,
                        0.0,
                    );
                }
            }
        }
    }
}

/// Values with two uses (twice in one op, in two ops, in an op and a store) stay
/// materialised; the chains around them still agree with the interpreter.
#[test]
fn values_used_twice_are_not_fused() {
    let mut rng = Rng::new(43);
    for (rows, cols) in SHAPES {
        let mut b = Builder::new("twice");
        let (px, pq, py, pz) = (read(&mut b, "x"), read(&mut b, "q"), write(&mut b, "y"), write(&mut b, "z"));
        let x = ld(&mut b, px, rows, cols);
        let q = ld(&mut b, pq, rows, cols);
        let a = b.neg(x); // used by two ops
        let c = b.mul(a, q);
        let d = b.add(a, c);
        let sq = b.exp(x); // used twice by one op
        let e = b.mul(sq, sq);
        let f = b.sub(d, e);
        let g = b.unary(UnOp::Sqrt, q); // stored and used
        st(&mut b, g, pz);
        let h = b.mul(f, g);
        st(&mut b, h, py);
        let k = b.finish();
        let ins =
            [rng.vec(rows * cols, 1.0), rng.vec(rows * cols, 2.0), vec![0.0; rows * cols], vec![0.0; rows * cols]];
        check(&format!("twice {rows}x{cols}"), &k, &ins, 4.0 * EXP_RTOL, 1e-6);
    }
}

/// A fused chain feeding a `Dot` (materialised for it), a chain reading the `Dot`'s result,
/// a chain inside a loop over a carried state and a value from before the loop (which
/// crosses the loop boundary, so it is not fused into the body).
#[test]
fn fused_chains_feeding_dots_and_inside_loops() {
    let mut rng = Rng::new(44);
    for (n, d) in [(4, 4), (16, 32), (64, 128)] {
        let mut b = Builder::new("chain_dot");
        let (pq, pg, pk, py, ps) =
            (read(&mut b, "q"), read(&mut b, "g"), read(&mut b, "k"), write(&mut b, "y"), write(&mut b, "s"));
        let q = ld(&mut b, pq, n, d);
        let g = ld(&mut b, pg, n, d);
        let kk = ld(&mut b, pk, n, d);
        let gq = b.exp(g);
        let qg = b.mul(q, gq);
        let s = b.dot(qg, kk, false, true, None);
        let s = b.exp(s);
        let s = b.neg(s);
        st(&mut b, s, py);
        let decay = b.neg(g);
        let decay = b.exp(decay); // defined before the loop, used inside
        let zero = b.constant(0.0, TileTy::f32(d, d));
        let st0 = b.begin_loop(Idx::c(3), &[zero])[0];
        let gate = b.rows(decay, 0, 1);
        let gate = b.transpose(gate);
        let kv = b.dot(kk, q, true, false, None);
        let scaled = b.mul(st0, gate);
        let half = b.constant(0.5, TileTy::f32(1, 1));
        let kv = b.mul(kv, half);
        let next = b.add(scaled, kv);
        let next = b.unary(UnOp::Neg, next);
        let out = b.end_loop(&[next])[0];
        st(&mut b, out, ps);
        let k = b.finish();
        let ins = [rng.vec(n * d, 0.5), rng.vec(n * d, 0.5), rng.vec(n * d, 0.5), vec![0.0; n * n], vec![0.0; d * d]];
        check(&format!("chain dot {n}x{d}"), &k, &ins, 1e-4, sum_atol(d, 2.0));
    }
}
