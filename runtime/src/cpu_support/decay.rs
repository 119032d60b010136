//! A rustc-compiled AVX-512 routine for the gate factors of chunked kernels:
//!
//! ```text
//! out[i, j] = a[i, j] * exp(f32(x[i, j] - y[i, j]))     (f64 x, y; y optional)
//! ```
//!
//! optionally with a lower-triangular mask (masked elements use exp = 0, as `exp(-inf)`
//! would). This is the tree `mul(a, exp(cast_f32(sub(x, y))))` the chunked plan builds for
//! every decayed operand (`q e^B`, `k e^(B_C - B)`, re-centred sub-chunk factors, the scalar
//! gate's decay mask). Cranelift's vectors are 128 bits and the f64 -> f32 cast splits such a
//! tree into two passes (`midend::fuse`); here it is one pass at 16 lanes. The exp is `gated.rs`'s
//! (the vmath.rs algorithm lane for lane), the cast rounds to nearest and the subtraction is
//! in f64, so the results are bit-identical to the Cranelift lowering of the same tree.
//! `lower.rs` calls it when the tree has exactly this form and the accesses fit (column stride
//! 1, or 0 for broadcast `x` / `y`).

use super::Simd;

/// C signature: `(rows, cols, a, a_rs, x, x_rs, x_cs, y, y_rs, y_cs, out, out_rs, tril)`.
/// Strides are in elements (f32 for `a`, `out`; f64 for `x`, `y`); `a` and `out` have column
/// stride 1. `a` is null for the factor alone (`exp(...)`: a of ones, so the same bits), `y`
/// null for no subtraction. `tril`: 0 none, 1 keep `j <= i`, 2 keep `j < i`.
pub type DecayFn =
    unsafe extern "C" fn(i64, i64, *const f32, i64, *const f64, i64, i64, *const f64, i64, i64, *mut f32, i64, i64);

/// Symbol the generated code imports.
pub const DECAY_SYMBOL: &str = "chunkc_decay_f64";

/// The routine for `simd`, or None (the tree then stays Cranelift code).
pub fn select(simd: Simd) -> Option<DecayFn> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        return Some(x86::decay_avx512);
    }
    let _ = simd;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::gated::x86::exp16;
    use std::arch::x86_64::*;

    /// 16 f64 starting at `p` (column stride `cs` 0 or 1; lanes outside `m` are 0 and unread).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const f64, cs: i64, m: u16) -> (__m512d, __m512d) {
        if cs == 0 {
            let v = _mm512_set1_pd(*p);
            (v, v)
        } else {
            (_mm512_maskz_loadu_pd(m as u8, p), _mm512_maskz_loadu_pd((m >> 8) as u8, p.add(8)))
        }
    }

    /// # Safety
    /// Every pointer must cover the `rows x cols` elements its strides address (see
    /// [`super::DecayFn`]); the host must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn decay_avx512(
        rows: i64,
        cols: i64,
        a: *const f32,
        a_rs: i64,
        x: *const f64,
        x_rs: i64,
        x_cs: i64,
        y: *const f64,
        y_rs: i64,
        y_cs: i64,
        out: *mut f32,
        out_rs: i64,
        tril: i64,
    ) {
        for i in 0..rows {
            let limit = match tril {
                1 => i + 1,
                2 => i,
                _ => cols,
            };
            let ar = if a.is_null() { a } else { a.offset((i * a_rs) as isize) };
            let (xr, orow) = (x.offset((i * x_rs) as isize), out.offset((i * out_rs) as isize));
            let yr = if y.is_null() { y } else { y.offset((i * y_rs) as isize) };
            let mut j = 0;
            while j < cols {
                let n = (cols - j).min(16);
                let m: u16 = if n == 16 { u16::MAX } else { ((1u32 << n) - 1) as u16 };
                let (mut lo, mut hi) = load16(xr.offset((j * x_cs) as isize), x_cs, m);
                if !yr.is_null() {
                    let (ylo, yhi) = load16(yr.offset((j * y_cs) as isize), y_cs, m);
                    lo = _mm512_sub_pd(lo, ylo);
                    hi = _mm512_sub_pd(hi, yhi);
                }
                let (lo, hi) = (_mm256_castps_pd(_mm512_cvtpd_ps(lo)), _mm256_castps_pd(_mm512_cvtpd_ps(hi)));
                let e = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(lo), hi));
                let mut e = exp16(e);
                if limit < j + 16 {
                    let keep = if limit <= j { 0 } else { ((1u32 << (limit - j)) - 1) as u16 };
                    e = _mm512_maskz_mov_ps(keep, e);
                }
                if !ar.is_null() {
                    e = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ar.offset(j as isize)), e);
                }
                _mm512_mask_storeu_ps(orow.offset(j as isize), m, e);
                j += 16;
            }
        }
    }
}
