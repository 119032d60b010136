//! The machine's f32 FMA peak on one core, measured: the yardstick for "percent of peak".
//!
//! [`fma_loop`] runs independent chains of vector FMAs whose operands never leave registers
//! (twelve accumulators: more than latency x issue width on current x86 cores, so the FMA
//! units, not the dependency chains, bound it). Only the rate matters, so the values are a
//! contraction towards a fixed point that can neither overflow nor go subnormal.

use super::Simd;

/// Independent accumulator chains per loop iteration.
pub const CHAINS: u64 = 12;

/// f32 lanes of one vector at `simd` (0 where the host has no such routine).
pub fn lanes(simd: Simd) -> u64 {
    match simd {
        Simd::Avx512 if simd.available() => 16,
        Simd::Avx2 if simd.available() => 8,
        _ => 0,
    }
}

/// FLOPs of `fma_loop(simd, iters)`: 2 per lane per FMA.
pub fn flops(simd: Simd, iters: u64) -> u64 {
    2 * lanes(simd) * CHAINS * iters
}

/// Runs `iters` iterations of `CHAINS` vector FMAs at `simd`; returns a checksum (to keep
/// the work alive). Does nothing and returns 0 where the host lacks the level.
pub fn fma_loop(simd: Simd, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if lanes(simd) == 16 {
            // SAFETY: `lanes` checked that the host has AVX-512F.
            return unsafe { x86::fma512(iters) };
        }
        if lanes(simd) == 8 {
            // SAFETY: `lanes` checked that the host has AVX2 and FMA.
            return unsafe { x86::fma256(iters) };
        }
    }
    let _ = iters;
    0.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let mut acc = [_mm512_set1_ps(1.0); super::CHAINS as usize];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.5), _mm256_set1_ps(0.25));
        let mut acc = [_mm256_set1_ps(1.0); super::CHAINS as usize];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_converges_to_its_fixed_point() {
        for simd in [Simd::Avx512, Simd::Avx2] {
            let n = lanes(simd);
            if n == 0 {
                continue;
            }
            // x -> x/2 + 1/4 converges to 1/2 in every lane of every chain.
            let s = fma_loop(simd, 200);
            assert!((s - 0.5 * (n * CHAINS) as f32).abs() < 1e-3, "{simd:?}: {s}");
        }
    }
}
