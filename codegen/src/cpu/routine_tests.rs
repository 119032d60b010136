//! Tests of the rustc-compiled routines (`chunkc_runtime::cpu_support`) that need the
//! compiler: each routine against the Cranelift lowering of the same op, bit for bit.

/// Compiles `k` at `simd` and runs it once at grid point (0, 0) with T = 1 on `bufs` (one
/// per parameter, the output last); returns the output.
fn run_once(k: &crate::ir::Kernel, simd: super::Simd, bufs: &[Vec<f32>]) -> Vec<f32> {
    use chunkc_runtime::cpu_kernel::CpuKernel;
    // The builder drops parameters the kernel never touches (and renumbers the rest): a
    // buffer per declared parameter would then hand the kernel the wrong ones.
    assert_eq!(bufs.len(), k.params.len(), "one buffer per parameter the kernel kept");
    let c = super::compile_with(k, simd).expect("compiles");
    let mut bufs = bufs.to_vec();
    let mut ws = vec![0u8; c.workspace_bytes() + 64];
    let off = ws.as_ptr().align_offset(64);
    let ptrs: Vec<*mut f32> = bufs.iter_mut().map(|v| v.as_mut_ptr()).collect();
    // SAFETY: the buffers hold every element the kernel addresses; the workspace is aligned
    // and as large as asked.
    unsafe { c.call(ptrs.as_ptr(), 0, 0, 1, ws.as_mut_ptr().add(off)) };
    bufs.pop().expect("output")
}

/// The decay routine against the Cranelift lowering.
mod decay {
    use crate::builder::Builder;
    use crate::cpu::Simd;
    use crate::ir::*;

    /// `y = x * exp(f32(g - p))` on a `rows x cols` tile, `p` one broadcast row, with the
    /// optional tril mask; `sub`: false drops `- p`; `times_x`: false drops `x *` (the factor
    /// alone, as the backward keeps it).
    fn kernel(rows: usize, cols: usize, sub: bool, tril: Option<bool>, times_x: bool) -> Kernel {
        let mut b = Builder::new("decay");
        let (px, pg, pp, py) = (
            b.param("x", Access::Read),
            b.param("g", Access::Read),
            b.param("p", Access::Read),
            b.param("y", Access::Write),
        );
        let n = Idx::c(rows as i64);
        let x = b.load(px, Idx::c(0), cols as i64, 1, rows, cols, n.clone());
        let g = b.load(pg, Idx::c(0), cols as i64, 1, rows, cols, n.clone());
        let p = b.load(pp, Idx::c(0), cols as i64, 1, 1, cols, Idx::c(1));
        let g = b.cast(g, DType::F64);
        let p = b.cast(p, DType::F64);
        let mut e = if sub { b.sub(g, p) } else { g };
        if let Some(strict) = tril {
            e = b.mask(e, MaskKind::Tril { strict }, f64::NEG_INFINITY);
        }
        let e = b.cast(e, DType::F32);
        let e = b.exp(e);
        let y = if times_x { b.mul(x, e) } else { e };
        b.store(y, py, Idx::c(0), cols as i64, 1, n);
        b.finish()
    }

    fn run(k: &Kernel, simd: Simd, bufs: &[Vec<f32>]) -> Vec<f32> {
        super::run_once(k, simd, bufs)
    }

    #[test]
    fn the_routine_matches_the_cranelift_lowering_bit_for_bit() {
        if !Simd::Avx512.available() {
            return;
        }
        for (rows, cols) in [(16, 128), (5, 19), (3, 40)] {
            let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let g: Vec<f32> = (0..rows * cols).map(|i| -((i * 53 % 89) as f32) / 3.0).collect();
            let p: Vec<f32> = (0..cols).map(|j| -(j as f32) / 5.0).collect();
            let bufs = [x, g, p, vec![f32::NAN; rows * cols]];
            for (sub, times_x) in [(true, true), (false, true), (true, false)] {
                for tril in [None, Some(false), Some(true)] {
                    let k = kernel(rows, cols, sub, tril, times_x);
                    // Without `- p` the kernel has no parameter p, without `x *` no x.
                    let kept = |i: usize| (sub || i != 2) && (times_x || i != 0);
                    let bufs: Vec<Vec<f32>> =
                        bufs.iter().enumerate().filter(|&(i, _)| kept(i)).map(|(_, b)| b.clone()).collect();
                    let fast = run(&k, Simd::Avx512, &bufs);
                    let slow = run(&k, Simd::Avx2, &bufs);
                    let same = fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{rows}x{cols} sub={sub} times_x={times_x} tril={tril:?}:\n{fast:?}\n{slow:?}");
                }
            }
        }
    }
}

/// The solve routine against the Cranelift lowering.
mod solve {
    use crate::builder::Builder;
    use crate::cpu::Simd;
    use crate::ir::*;

    fn run(n: usize, m: usize, simd: Simd, l: &[f32], b: &[f32]) -> Vec<f32> {
        let mut k = Builder::new("solve");
        let (pl, pb, px) = (k.param("l", Access::Read), k.param("b", Access::Read), k.param("x", Access::Write));
        let lt = k.load(pl, Idx::c(0), n as i64, 1, n, n, Idx::c(n as i64));
        let bt = k.load(pb, Idx::c(0), m as i64, 1, n, m, Idx::c(n as i64));
        let x = k.solve_unit_lower(lt, bt);
        k.store(x, px, Idx::c(0), m as i64, 1, Idx::c(n as i64));
        super::run_once(&k.finish(), simd, &[l.to_vec(), b.to_vec(), vec![f32::NAN; n * m]])
    }

    #[test]
    fn the_routine_matches_the_cranelift_lowering_bit_for_bit() {
        if !Simd::Avx512.available() {
            return;
        }
        for (n, m) in [(64, 128), (16, 128), (7, 21), (5, 70), (3, 1)] {
            let l: Vec<f32> = (0..n * n).map(|i| ((i * 29 % 61) as f32 - 30.0) / 200.0).collect();
            let b: Vec<f32> = (0..n * m).map(|i| ((i * 41 % 97) as f32 - 48.0) / 9.0).collect();
            let fast = run(n, m, Simd::Avx512, &l, &b);
            let slow = run(n, m, Simd::Avx2, &l, &b);
            assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()), "{n}x{m}");
        }
    }
}
