//! Software prefetch of the next loop iteration's input rows.
//!
//! A chunked kernel reads its per-token inputs (layout `[B, T, H, K]`) one head at a time,
//! so a chunk's tile is `C` rows of `K` floats spaced `H * K` floats apart: with the usual
//! head counts every row starts a new 4 KB page. The hardware prefetchers do not follow
//! such a pattern and each row costs a TLB walk and a DRAM round trip, which profiles showed
//! as about 5% of a GLA kernel per input tile. `lower.rs` therefore calls [`prefetch_rows`]
//! for the same load one iteration ahead, so those misses overlap the current chunk's
//! arithmetic. Cranelift has no prefetch instruction, hence a rustc-compiled routine.

/// Symbol the generated code imports.
pub(super) const PREFETCH_SYMBOL: &str = "chunkc_prefetch_rows";

/// Prefetches `rows` rows of `bytes` bytes each, starting at `p`, `stride` bytes apart, into
/// the L2 cache. Only issues hints: any address is safe, nothing is read architecturally.
pub(super) extern "C" fn prefetch_rows(p: i64, rows: i64, stride: i64, bytes: i64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        for r in 0..rows.max(0) {
            let row = p.wrapping_add(r.wrapping_mul(stride));
            let mut off = 0;
            while off < bytes {
                // SAFETY: a prefetch is a hint and never faults, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(off) as *const i8) };
                off += 64;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, rows, stride, bytes);
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefetching_any_address_is_harmless() {
        let v = vec![1.0f32; 4096];
        super::prefetch_rows(v.as_ptr() as i64, 16, 1024, 512);
        super::prefetch_rows(0, 3, 1 << 40, 256);
        assert_eq!(v[4095], 1.0);
    }
}
