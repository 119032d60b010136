//! Throughput of single tile ops in the Cranelift CPU backend: `Dot` on the shapes the chunk
//! plans use (reported as elements/s = FLOP/s) and `exp` / `exp2` on an f32 tile (elements/s).
//!
//! `cargo bench -p chunkc-codegen --bench ops` (filter with e.g. `-- dot/Avx512/`); `Dot`
//! and `GatedDot` run once per SIMD level the host has (`Portable` = Cranelift code only). Each kernel runs
//! the op `REPS` times in a loop over tiles already in the workspace (`c = a @ b + c`, or
//! `y = exp(x)`), so loads and stores of parameters are amortised away; the loop-carried copy
//! of the result (m*n floats per iteration) is included.

use chunkc_codegen::builder::Builder;
use chunkc_codegen::cpu::{compile_with, Simd};
use chunkc_codegen::ir::*;
use chunkc_runtime::cpu_kernel::CpuKernel;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;

const REPS: i64 = 16;

/// Deterministic inputs in [-scale, scale).
fn data(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

struct Bench {
    compiled: chunkc_codegen::cpu::CpuCompiled,
    bufs: Vec<Vec<f32>>,
    ws: Vec<u8>,
}

impl Bench {
    fn new(k: &Kernel, bufs: Vec<Vec<f32>>) -> Bench {
        Bench::with(k, bufs, Simd::best())
    }
    fn with(k: &Kernel, bufs: Vec<Vec<f32>>, simd: Simd) -> Bench {
        let compiled = compile_with(k, simd).expect("compiles");
        let ws = vec![0u8; compiled.workspace_bytes() + 64];
        Bench { compiled, bufs, ws }
    }
    fn run(&mut self) {
        let off = self.ws.as_ptr().align_offset(64);
        let ptrs: Vec<*mut f32> = self.bufs.iter_mut().map(|v| v.as_mut_ptr()).collect();
        // SAFETY: the buffers are as large as the kernel's loads and stores, and the workspace
        // is aligned and as large as the kernel asked for.
        unsafe { self.compiled.call(ptrs.as_ptr(), 0, 0, 0, self.ws.as_mut_ptr().add(off)) };
    }
}

fn load(b: &mut Builder, p: usize, rows: usize, cols: usize) -> ValueId {
    b.load(p, Idx::c(0), cols as i64, 1, rows, cols, Idx::c(rows as i64))
}

/// The SIMD levels this host has (each benchmark runs once per level, e.g. `dot/Avx512/...`,
/// `dot/Portable/...` for the Cranelift code).
fn levels() -> Vec<Simd> {
    [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|s| s.available()).collect()
}

/// `c = op(a) @ op(b) + c`, `REPS` times.
fn dot_kernel(m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Kernel {
    let mut b = Builder::new("dot");
    let (pa, pb, pc) = (b.param("a", Access::Read), b.param("b", Access::Read), b.param("c", Access::Write));
    let a = if ta { load(&mut b, pa, k, m) } else { load(&mut b, pa, m, k) };
    let bb = if tb { load(&mut b, pb, n, k) } else { load(&mut b, pb, k, n) };
    let c0 = b.constant(0.0, TileTy::f32(m, n));
    let c = b.begin_loop(Idx::c(REPS), &[c0]);
    let c1 = b.dot(a, bb, ta, tb, Some(c[0]));
    let r = b.end_loop(&[c1]);
    b.store(r[0], pc, Idx::c(0), n as i64, 1, Idx::c(m as i64));
    b.finish()
}

fn dots(c: &mut Criterion) {
    // (name, m, k, n, ta, tb): the products of the chunked plans at chunk 64 (and 16).
    let shapes = [
        ("64x128@128x128", 64, 128, 128, false, false),
        ("64x128@(64x128)^T", 64, 128, 64, false, true),
        ("64x64@64x128", 64, 64, 128, false, false),
        ("(64x128)^T@64x128", 128, 64, 128, true, false),
        ("16x128@128x128", 16, 128, 128, false, false),
        ("16x128@(16x128)^T", 16, 128, 16, false, true),
        ("(16x128)^T@16x128", 128, 16, 128, true, false),
    ];
    let mut group = c.benchmark_group("dot");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for (name, m, k, n, ta, tb) in shapes {
        let kernel = dot_kernel(m, k, n, ta, tb);
        group.throughput(Throughput::Elements(2 * (m * n * k) as u64 * REPS as u64));
        for simd in levels() {
            let ins = vec![data(m * k, 0.01, 1), data(k * n, 0.01, 2), vec![0.0; m * n]];
            let mut bench = Bench::with(&kernel, ins, simd);
            group.bench_function(format!("{simd:?}/{name}"), |b| b.iter(|| bench.run()));
        }
    }
    group.finish();
}

/// `y = gated_dot(a, ga, b, gb)` on one `n x c` diagonal block (gates f32 or f64, decaying
/// cumulative sums as in the vector-gated plans), `REPS` times; elements = kernel calls of
/// the op (so time per element = time per GatedDot call).
fn gated_kernel(n: usize, c: usize, gdt: DType) -> Kernel {
    let mut b = Builder::new("gated");
    let (pa, pb, pg, py) = (
        b.param("a", Access::Read),
        b.param("b", Access::Read),
        b.param("g", Access::Read),
        b.param("y", Access::Write),
    );
    let a = load(&mut b, pa, n, c);
    let bb = load(&mut b, pb, n, c);
    let g = load(&mut b, pg, n, c);
    let g = b.cast(g, gdt);
    let g = b.cumsum(g, false);
    let y0 = b.constant(0.0, TileTy::f32(n, n));
    let _ = b.begin_loop(Idx::c(REPS), &[y0]);
    let y = b.gated_dot(a, g, bb, g, false);
    let r = b.end_loop(&[y]);
    b.store(r[0], py, Idx::c(0), n as i64, 1, Idx::c(n as i64));
    b.finish()
}

fn gated(c: &mut Criterion) {
    let mut group = c.benchmark_group("gated_dot");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(REPS as u64));
    for (n, k) in [(16, 128), (64, 128)] {
        for gdt in [DType::F32, DType::F64] {
            let kernel = gated_kernel(n, k, gdt);
            for simd in levels() {
                let gates: Vec<f32> = data(n * k, 0.5, 4).iter().map(|x| x - 0.6).collect();
                let ins = vec![data(n * k, 0.1, 1), data(n * k, 0.1, 2), gates, vec![0.0; n * n]];
                let mut bench = Bench::with(&kernel, ins, simd);
                group.bench_function(format!("{simd:?}/{n}x{n}x{k}/{gdt:?}"), |b| b.iter(|| bench.run()));
            }
        }
    }
    group.finish();
}

fn exps(c: &mut Criterion) {
    let (rows, cols) = (64, 128);
    let mut group = c.benchmark_group("unary_f32");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements((rows * cols) as u64 * REPS as u64));
    for op in [UnOp::Exp, UnOp::Exp2, UnOp::Sigmoid, UnOp::Silu, UnOp::Softplus, UnOp::Log] {
        let mut b = Builder::new("unary");
        let (px, py) = (b.param("x", Access::Read), b.param("y", Access::Write));
        let x = load(&mut b, px, rows, cols);
        let y0 = b.constant(0.0, TileTy::f32(rows, cols));
        let _ = b.begin_loop(Idx::c(REPS), &[y0]);
        let y = b.unary(op, x);
        let r = b.end_loop(&[y]);
        b.store(r[0], py, Idx::c(0), cols as i64, 1, Idx::c(rows as i64));
        let kernel = b.finish();
        // Gate-like arguments: mostly negative, some positive.
        let xs: Vec<f32> = data(rows * cols, 10.0, 3).iter().map(|x| x - 4.0).collect();
        let mut bench = Bench::new(&kernel, vec![xs, vec![0.0; rows * cols]]);
        group.bench_function(format!("{op:?}"), |b| b.iter(|| bench.run()));
    }
    group.finish();
}

criterion_group!(benches, dots, gated, exps);
criterion_main!(benches);
