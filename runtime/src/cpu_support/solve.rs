//! A rustc-compiled AVX-512 forward substitution for `SolveUnitLower` (the UT transform of
//! the delta rules: a 64 x 64 system with 128 right-hand columns per chunk):
//!
//! ```text
//! x[i, :] = b[i, :] - sum_{j < i} l[i, j] * x[j, :]        (x starts as a copy of b)
//! ```
//!
//! Cranelift's 128-bit vectors made this about 8% of a gated delta rule chunk. Each row keeps
//! up to eight 16-lane accumulators (128 columns) in registers over the whole `j` loop; the
//! terms are added in order of `j` with one fused negative multiply-add each, exactly as the
//! Cranelift lowering does (`fma(-l, x, acc)`), so the results are bit-identical to it.

use super::Simd;

/// C signature: `(n, m, l, l_rs, l_cs, x, x_rs)`: `l` n x n (strides in elements), `x` n x m
/// with column stride 1, holding `b` on entry and the solution on return.
pub type SolveFn = unsafe extern "C" fn(i64, i64, *const f32, i64, i64, *mut f32, i64);

/// Symbol the generated code imports.
pub const SOLVE_SYMBOL: &str = "chunkc_solve_unit_lower";

/// The routine for `simd`, or None (the op then stays Cranelift code).
pub fn select(simd: Simd) -> Option<SolveFn> {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        return Some(x86::solve_avx512);
    }
    let _ = simd;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The system: `l` with its strides, `x` with its row stride, `m` columns.
    struct System {
        m: i64,
        l: *const f32,
        l_rs: i64,
        l_cs: i64,
        x: *mut f32,
        x_rs: i64,
    }

    /// Columns `c0 .. c0 + 16 V` (masked past `m`) of row `i`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn row_block<const V: usize>(s: &System, i: i64, c0: i64) {
        let mask = |q: usize| -> u16 {
            let left = s.m - c0 - 16 * q as i64;
            if left >= 16 {
                u16::MAX
            } else if left <= 0 {
                0
            } else {
                ((1u32 << left) - 1) as u16
            }
        };
        let xi = s.x.offset((i * s.x_rs + c0) as isize);
        let mut acc = [_mm512_setzero_ps(); V];
        for (q, a) in acc.iter_mut().enumerate() {
            *a = _mm512_maskz_loadu_ps(mask(q), xi.add(16 * q));
        }
        for j in 0..i {
            let w = _mm512_set1_ps(*s.l.offset((i * s.l_rs + j * s.l_cs) as isize));
            let xj = s.x.offset((j * s.x_rs + c0) as isize);
            for (q, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fnmadd_ps(w, _mm512_maskz_loadu_ps(mask(q), xj.add(16 * q)), *a);
            }
        }
        for (q, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(xi.add(16 * q), mask(q), *a);
        }
    }

    /// # Safety
    /// `l` and `x` must cover the elements their strides address for `n x n` and `n x m`;
    /// the host must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe extern "C" fn solve_avx512(n: i64, m: i64, l: *const f32, l_rs: i64, l_cs: i64, x: *mut f32, x_rs: i64) {
        let s = System { m, l, l_rs, l_cs, x, x_rs };
        for i in 1..n {
            let mut c0 = 0;
            while c0 < m {
                let left = m - c0;
                if left > 64 {
                    row_block::<8>(&s, i, c0);
                    c0 += 128;
                } else if left > 32 {
                    row_block::<4>(&s, i, c0);
                    c0 += 64;
                } else {
                    row_block::<2>(&s, i, c0);
                    c0 += 32;
                }
            }
        }
    }
}
