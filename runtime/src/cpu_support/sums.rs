//! A rustc-compiled AVX-512 routine for the chunk plans' cumulative gates:
//!
//! ```text
//! out[i, j] = sum_{r <= i} f64(x[r, j])      (r < i when exclusive)
//! ```
//!
//! the tree `cumsum(cast_f64(g))` every per-channel gate starts with. Cranelift runs the
//! cast and the sum as two passes of two-lane f64 vectors; here it is one pass at eight. The
//! sums are taken in the same order (row by row, in f64), so the results are bit-identical
//! to the Cranelift lowering. `midend::fuse` marks the cast fused into its cumsum when the backend
//! has this routine and `lower.rs` calls it.

use super::Simd;

/// C signature: `(rows, cols, x, x_rs, out, out_rs, exclusive)`; strides in elements (f32 for
/// `x`, f64 for `out`), column stride 1 for both.
pub type SumsFn = unsafe extern "C" fn(i64, i64, *const f32, i64, *mut f64, i64, i64);

/// Symbol the generated code imports.
pub const SUMS_SYMBOL: &str = "chunkc_gate_sums";

/// The routine for `simd`, or None (the cast and the cumsum then stay Cranelift code).
pub fn select(simd: Simd) -> Option<SumsFn> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        return Some(x86::sums_avx512);
    }
    let _ = simd;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// `x` covers `rows` rows of `cols` f32 `x_rs` apart, `out` `rows` rows of `cols` f64
    /// `out_rs` apart; the host has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn sums_avx512(
        rows: i64,
        cols: i64,
        x: *const f32,
        x_rs: i64,
        out: *mut f64,
        out_rs: i64,
        exclusive: i64,
    ) {
        let (rows, cols) = (rows.max(0) as usize, cols.max(0) as usize);
        let (x_rs, out_rs) = (x_rs as isize, out_rs as isize);
        let mut c0 = 0;
        while c0 < cols {
            let left = (cols - c0).min(16);
            let m: __mmask16 = if left == 16 { !0 } else { ((1u32 << left) - 1) as __mmask16 };
            let (m0, m1) = (m as __mmask8, (m >> 8) as __mmask8);
            let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for i in 0..rows as isize {
                // SAFETY (block): reads and writes of row i at columns c0 + lanes of m, within
                // the caller's contract.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(m, x.offset(i * x_rs).add(c0));
                    let (vlo, vhi) =
                        (_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
                    let o = out.offset(i * out_rs).add(c0);
                    if exclusive != 0 {
                        _mm512_mask_storeu_pd(o, m0, lo);
                        _mm512_mask_storeu_pd(o.add(8), m1, hi);
                    }
                    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(vlo));
                    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(vhi));
                    if exclusive == 0 {
                        _mm512_mask_storeu_pd(o, m0, lo);
                        _mm512_mask_storeu_pd(o.add(8), m1, hi);
                    }
                }
            }
            c0 += 16;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    #[test]
    fn running_sums_are_the_sequential_f64_sums_bit_for_bit() {
        let Some(f) = super::select(super::Simd::Avx512).filter(|_| super::Simd::Avx512.available()) else { return };
        let (rows, cols, x_rs, out_rs) = (13, 37, 41, 39);
        let x: Vec<f32> = (0..rows * x_rs).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3).collect();
        for exclusive in [false, true] {
            let mut out = vec![f64::NAN; rows * out_rs];
            // SAFETY: the host has AVX-512F; the buffers cover the strides passed.
            unsafe {
                f(rows as i64, cols as i64, x.as_ptr(), x_rs as i64, out.as_mut_ptr(), out_rs as i64, exclusive as i64)
            };
            for j in 0..out_rs {
                let mut s = 0.0f64;
                for i in 0..rows {
                    let got = out[i * out_rs + j];
                    if j >= cols {
                        assert!(got.is_nan(), "column {j} is past the tile and must stay unwritten");
                        continue;
                    }
                    let before = s;
                    s += x[i * x_rs + j] as f64;
                    let want = if exclusive { before } else { s };
                    assert_eq!(got.to_bits(), want.to_bits(), "({i}, {j}) exclusive {exclusive}");
                }
            }
        }
    }
}
