//! rustc-compiled f32 matrix-product microkernels that the generated code calls for large
//! `Dot` ops (`lower.rs` decides; small products stay inline Cranelift code).
//!
//! ```text
//! c[i, j] = sum_p a[i, p] * b[p, j] (+ acc[i, j])      i < m, j < n, p < k
//! ```
//!
//! with every operand addressed by element strides, so each transpose combination of the IR
//! is just a choice of strides. `b` is read in place when its rows are contiguous and `n` is a
//! multiple of NR, else packed into a zero-padded row-major `k x NR*ceil(n/NR)` panel (per
//! thread, reused across calls); `a` is read in place (one broadcast per element);
//! register-blocked kernels keep an `MR x NR` block of `c` in registers over the whole `k`
//! loop: 6 x 16 with AVX2 + FMA (12 ymm accumulators). Sums are f32, in order of `p` for each
//! element (one FMA per product), then `acc` is added, as the IR's `Dot` contract allows.
//!
//! [`select`] picks the kernel for the host when the JIT module is built (None where there
//! is none: then `Dot` stays Cranelift code).

use std::cell::RefCell;

/// The kernel's C signature: `(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, acc, acc_rs,
/// acc_cs)`; `c`'s column stride is 1; `acc` may be null. All integers are elements.
pub(super) type GemmFn = unsafe extern "C" fn(
    i64,
    i64,
    i64,
    *const f32,
    i64,
    i64,
    *const f32,
    i64,
    i64,
    *mut f32,
    i64,
    *const f32,
    i64,
    i64,
);

/// Symbol name the generated code imports.
pub(super) const GEMM_SYMBOL: &str = "chunkc_sgemm_f32";

/// The best kernel for this host, or None.
pub(super) fn select() -> Option<GemmFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Some(x86::sgemm_avx2);
        }
    }
    None
}

thread_local! {
    /// Packed panel of `b`, reused across calls on one thread.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs `b` (k x n, strides `rs`, `cs`) into `out` as row-major `k x np` (np = n rounded up
/// to `nr`), zero-padded.
///
/// # Safety
/// `b` must be valid for reads at every `p*rs + j*cs` with `p < k`, `j < n`.
unsafe fn pack_b(out: &mut Vec<f32>, b: *const f32, rs: isize, cs: isize, k: usize, n: usize, nr: usize) -> usize {
    let np = n.div_ceil(nr) * nr;
    out.clear();
    out.resize(k * np, 0.0);
    for p in 0..k {
        let row = &mut out[p * np..p * np + n];
        if cs == 1 {
            // SAFETY: the caller's contract, contiguous row.
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(b.offset(p as isize * rs), n) });
        } else {
            for (j, x) in row.iter_mut().enumerate() {
                // SAFETY: the caller's contract.
                *x = unsafe { *b.offset(p as isize * rs + j as isize * cs) };
            }
        }
    }
    np
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{pack_b, PANEL};
    use std::arch::x86_64::*;

    const NR: usize = 16;
    const MR: usize = 6;

    /// AVX2 + FMA entry point (see the module docs for the contract).
    ///
    /// # Safety
    /// Operands valid for the strided reads and writes described by the arguments; only
    /// registered when the host has AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe extern "C" fn sgemm_avx2(
        m: i64,
        n: i64,
        k: i64,
        a: *const f32,
        a_rs: i64,
        a_cs: i64,
        b: *const f32,
        b_rs: i64,
        b_cs: i64,
        c: *mut f32,
        c_rs: i64,
        acc: *const f32,
        acc_rs: i64,
        acc_cs: i64,
    ) {
        let (m, n, k) = (m.max(0) as usize, n.max(0) as usize, k.max(0) as usize);
        if m == 0 || n == 0 {
            return;
        }
        PANEL.with(|panel| {
            let mut panel = panel.borrow_mut();
            // SAFETY: the caller's contract; the host has AVX2 and FMA (checked by `select`).
            unsafe {
                // Rows of b that are contiguous and a whole number of blocks wide are used in
                // place; otherwise b is packed.
                let (bp, np) = if b_cs == 1 && n % NR == 0 && b_rs >= n as i64 {
                    (b, b_rs as usize)
                } else {
                    let np = pack_b(&mut panel, b, b_rs as isize, b_cs as isize, k, n, NR);
                    (panel.as_ptr(), np)
                };
                let g = Gemm {
                    k,
                    a,
                    a_rs: a_rs as isize,
                    a_cs: a_cs as isize,
                    bp,
                    np,
                    c,
                    c_rs: c_rs as isize,
                    acc,
                    acc_rs: acc_rs as isize,
                    acc_cs: acc_cs as isize,
                };
                g.run(m, n);
            }
        });
    }

    struct Gemm {
        k: usize,
        a: *const f32,
        a_rs: isize,
        a_cs: isize,
        bp: *const f32,
        np: usize,
        c: *mut f32,
        c_rs: isize,
        acc: *const f32,
        acc_rs: isize,
        acc_cs: isize,
    }

    impl Gemm {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run(&self, m: usize, n: usize) {
            let mut j = 0;
            while j < n {
                let w = (n - j).min(NR);
                let mut i = 0;
                while i < m {
                    let h = (m - i).min(MR);
                    // SAFETY: i + h <= m, j + w <= n (the caller's contract covers those).
                    unsafe {
                        match h {
                            6 => self.block::<6>(i, j, w),
                            5 => self.block::<5>(i, j, w),
                            4 => self.block::<4>(i, j, w),
                            3 => self.block::<3>(i, j, w),
                            2 => self.block::<2>(i, j, w),
                            _ => self.block::<1>(i, j, w),
                        }
                    }
                    i += h;
                }
                j += w;
            }
        }

        /// Rows `i..i+R`, columns `j..j+w` (w <= 16) of `c`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn block<const R: usize>(&self, i: usize, j: usize, w: usize) {
            // SAFETY (whole body): reads of a at rows i..i+R and p < k, of the panel at rows
            // p < k and columns j..j+16 <= np, writes of c at rows i..i+R and columns
            // j..j+w, all within the caller's contract.
            unsafe {
                let mut s0 = [_mm256_setzero_ps(); R];
                let mut s1 = [_mm256_setzero_ps(); R];
                let mut ap = self.a.offset(i as isize * self.a_rs);
                let mut bp = self.bp.add(j);
                for _ in 0..self.k {
                    let b0 = _mm256_loadu_ps(bp);
                    let b1 = _mm256_loadu_ps(bp.add(8));
                    for r in 0..R {
                        let x = _mm256_broadcast_ss(&*ap.offset(r as isize * self.a_rs));
                        s0[r] = _mm256_fmadd_ps(x, b0, s0[r]);
                        s1[r] = _mm256_fmadd_ps(x, b1, s1[r]);
                    }
                    ap = ap.offset(self.a_cs);
                    bp = bp.add(self.np);
                }
                for r in 0..R {
                    let row = (i + r) as isize;
                    let cp = self.c.offset(row * self.c_rs).add(j);
                    let accp = if self.acc.is_null() {
                        None
                    } else {
                        Some(self.acc.offset(row * self.acc_rs + j as isize * self.acc_cs))
                    };
                    if w == NR && (accp.is_none() || self.acc_cs == 1) {
                        let (mut v0, mut v1) = (s0[r], s1[r]);
                        if let Some(q) = accp {
                            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(q));
                            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(q.add(8)));
                        }
                        _mm256_storeu_ps(cp, v0);
                        _mm256_storeu_ps(cp.add(8), v1);
                    } else {
                        let mut t = [0.0f32; NR];
                        _mm256_storeu_ps(t.as_mut_ptr(), s0[r]);
                        _mm256_storeu_ps(t.as_mut_ptr().add(8), s1[r]);
                        for (q, x) in t.iter().enumerate().take(w) {
                            let mut y = *x;
                            if let Some(ap) = accp {
                                y += *ap.offset(q as isize * self.acc_cs);
                            }
                            *cp.add(q) = y;
                        }
                    }
                }
            }
        }
    }
}
