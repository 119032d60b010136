//! The rustc-compiled `GatedMatMul` kernel that the generated code calls (the reverse of the
//! gated scores; `lower.rs` decides: `x`, `gx`, `gy` and `out` must be contiguous along `c`):
//!
//! ```text
//! out[r, c] = sum_{p <= r} m[r, p] x[p, c] exp(gy[r, c] - gx[p, c])    (strict: p < r)
//! out[r, c] = sum_{p >= r} m[p, r] x[p, c] exp(gx[p, c] - gy[r, c])    transposed (strict: p > r)
//! ```
//!
//! Vectorised over `c`, 8 lanes (AVX2 + FMA; an AVX-512 host runs it too); whole vectors
//! load as vectors, a tail of fewer than 8 columns lane by lane. The exponent is
//! formed in the gates' dtype (f64 gates: subtracted in f64, then rounded to f32), the exp
//! is `gated.rs`'s `exp8` (vmath.rs's algorithm lane for lane), each term is
//! `fma(m x, e, sum)`. Only the triangle's pairs are evaluated. A tail of `c` that is not a
//! whole vector is zero-padded (`x = 0`, exponent 0: the term is 0).

use super::Simd;

/// The kernel's C signature: `(n, c, m, m_rs, m_cs, x, x_rs, gx, gx_rs, gy, gy_rs, out,
/// out_rs, flags)`; `m` is `n x n` with any strides, the rest `n x c` with column stride 1.
/// Integers are elements (of the gates' dtype for `gx_rs`, `gy_rs`); `flags` bit 0 is
/// `transposed`, bit 1 `strict`.
pub type GatedMatMulFn = unsafe extern "C" fn(
    i64,
    i64,
    *const f32,
    i64,
    i64,
    *const f32,
    i64,
    *const u8,
    i64,
    *const u8,
    i64,
    *mut f32,
    i64,
    i64,
);

/// Symbol names the generated code imports (f32 gates, f64 gates).
pub const SYMBOLS: [&str; 2] = ["chunkc_gated_matmul_g32", "chunkc_gated_matmul_g64"];

/// The kernels for `simd` (f32 gates, f64 gates), or None (then `GatedMatMul` stays
/// Cranelift code).
pub fn select(simd: Simd) -> Option<[GatedMatMulFn; 2]> {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(simd, Simd::Avx2 | Simd::Avx512) {
            return Some([x86::gated_matmul_avx2::<false>, x86::gated_matmul_avx2::<true>]);
        }
    }
    let _ = simd;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::gated::x86::exp8;
    use std::arch::x86_64::*;

    /// # Safety
    /// Operands valid for the reads and writes the arguments describe; only registered when
    /// the host has AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn gated_matmul_avx2<const G64: bool>(
        n: i64,
        c: i64,
        m: *const f32,
        m_rs: i64,
        m_cs: i64,
        x: *const f32,
        x_rs: i64,
        gx: *const u8,
        gx_rs: i64,
        gy: *const u8,
        gy_rs: i64,
        out: *mut f32,
        out_rs: i64,
        flags: i64,
    ) {
        // SAFETY: the caller's contract; the host has AVX2 and FMA (checked by `select`).
        unsafe { run::<G64>(n, c, (m, m_rs, m_cs), (x, x_rs), (gx, gx_rs), (gy, gy_rs), (out, out_rs), flags) }
    }

    /// The gate at element `at` (of the gates' dtype) as f64.
    ///
    /// # Safety
    /// `at` inside the gate tile.
    #[inline]
    unsafe fn gate<const G64: bool>(g: *const u8, at: i64) -> f64 {
        // SAFETY: the caller's contract.
        unsafe {
            if G64 {
                *(g as *const f64).offset(at as isize)
            } else {
                *(g as *const f32).offset(at as isize) as f64
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run<const G64: bool>(
        n: i64,
        c: i64,
        (m, m_rs, m_cs): (*const f32, i64, i64),
        (x, x_rs): (*const f32, i64),
        (gx, gx_rs): (*const u8, i64),
        (gy, gy_rs): (*const u8, i64),
        (out, out_rs): (*mut f32, i64),
        flags: i64,
    ) {
        let (transposed, strict) = (flags & 1 != 0, flags & 2 != 0);
        // SAFETY (every access below): rows and columns stay inside the n x n and n x c
        // tiles the caller describes; vector lanes past `c` are read from and written to
        // the zero-padded stack arrays only.
        unsafe {
            for r in 0..n {
                let (lo, hi) = match (transposed, strict) {
                    (false, false) => (0, r + 1),
                    (false, true) => (0, r),
                    (true, false) => (r, n),
                    (true, true) => (r + 1, n),
                };
                let mut col = 0;
                // Whole vectors: the lanes load as vectors (f64 gates as two halves).
                while col + 8 <= c {
                    let mrow = |p: i64| if transposed { p * m_rs + r * m_cs } else { r * m_rs + p * m_cs };
                    let mut acc = _mm256_setzero_ps();
                    if G64 {
                        let gyp = (gy as *const f64).offset((r * gy_rs + col) as isize);
                        let (gy_lo, gy_hi) = (_mm256_loadu_pd(gyp), _mm256_loadu_pd(gyp.add(4)));
                        for p in lo..hi {
                            let gxp = (gx as *const f64).offset((p * gx_rs + col) as isize);
                            let (gx_lo, gx_hi) = (_mm256_loadu_pd(gxp), _mm256_loadu_pd(gxp.add(4)));
                            let (d_lo, d_hi) = if transposed {
                                (_mm256_sub_pd(gx_lo, gy_lo), _mm256_sub_pd(gx_hi, gy_hi))
                            } else {
                                (_mm256_sub_pd(gy_lo, gx_lo), _mm256_sub_pd(gy_hi, gx_hi))
                            };
                            let d = _mm256_set_m128(_mm256_cvtpd_ps(d_hi), _mm256_cvtpd_ps(d_lo));
                            let xv = _mm256_loadu_ps(x.offset((p * x_rs + col) as isize));
                            let mx = _mm256_mul_ps(_mm256_set1_ps(*m.offset(mrow(p) as isize)), xv);
                            acc = _mm256_fmadd_ps(mx, exp8(d), acc);
                        }
                    } else {
                        let gyv = _mm256_loadu_ps((gy as *const f32).offset((r * gy_rs + col) as isize));
                        for p in lo..hi {
                            let gxv = _mm256_loadu_ps((gx as *const f32).offset((p * gx_rs + col) as isize));
                            let d = if transposed { _mm256_sub_ps(gxv, gyv) } else { _mm256_sub_ps(gyv, gxv) };
                            let xv = _mm256_loadu_ps(x.offset((p * x_rs + col) as isize));
                            let mx = _mm256_mul_ps(_mm256_set1_ps(*m.offset(mrow(p) as isize)), xv);
                            acc = _mm256_fmadd_ps(mx, exp8(d), acc);
                        }
                    }
                    _mm256_storeu_ps(out.offset((r * out_rs + col) as isize), acc);
                    col += 8;
                }
                // A tail of fewer than 8 columns: lane by lane into zero-padded arrays.
                while col < c {
                    let w = (c - col).min(8) as usize;
                    let mut gy_lanes = [0f64; 8];
                    for (l, g) in gy_lanes.iter_mut().enumerate().take(w) {
                        *g = gate::<G64>(gy, r * gy_rs + col + l as i64);
                    }
                    let mut acc = _mm256_setzero_ps();
                    for p in lo..hi {
                        let mv =
                            *m.offset((if transposed { p * m_rs + r * m_cs } else { r * m_rs + p * m_cs }) as isize);
                        let (mut xl, mut dl) = ([0f32; 8], [0f32; 8]);
                        for l in 0..w {
                            xl[l] = *x.offset((p * x_rs + col + l as i64) as isize);
                            let gp = gate::<G64>(gx, p * gx_rs + col + l as i64);
                            // The exponent in the gates' dtype, then f32.
                            dl[l] = if G64 {
                                (if transposed { gp - gy_lanes[l] } else { gy_lanes[l] - gp }) as f32
                            } else {
                                let (a, b) = (gp as f32, gy_lanes[l] as f32);
                                if transposed {
                                    a - b
                                } else {
                                    b - a
                                }
                            };
                        }
                        let e = exp8(_mm256_loadu_ps(dl.as_ptr()));
                        let mx = _mm256_mul_ps(_mm256_set1_ps(mv), _mm256_loadu_ps(xl.as_ptr()));
                        acc = _mm256_fmadd_ps(mx, e, acc);
                    }
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                    for (l, v) in lanes.iter().enumerate().take(w) {
                        *out.offset((r * out_rs + col + l as i64) as isize) = *v;
                    }
                    col += 8;
                }
            }
        }
    }
}
