//! The functions generated CPU code calls by name (the symbols a JIT registers, and that a
//! kernel compiled ahead of time links against): f32 and f64 math, each computed in f64 and
//! rounded once, exactly as the tile IR defines it (`chunkc_codegen::ir::UnOp::eval` calls
//! [`sigmoid`], [`softplus`] and [`silu`] here), and a software prefetch.
//!
//! Every routine is `#[no_mangle]`, so that an object file from `chunkc-build` resolves it
//! when the program links this crate.

/// The logistic function, by its stable branches (no overflow for large |x|).
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}

/// log(1 + e^x), as the rule language defines it: x above 20, e^x below -20.
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// x * sigmoid(x).
pub fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

#[no_mangle]
pub extern "C" fn chunkc_exp_f32(x: f32) -> f32 {
    (x as f64).exp() as f32
}
#[no_mangle]
pub extern "C" fn chunkc_exp2_f32(x: f32) -> f32 {
    (x as f64).exp2() as f32
}
#[no_mangle]
pub extern "C" fn chunkc_log_f32(x: f32) -> f32 {
    (x as f64).ln() as f32
}
#[no_mangle]
pub extern "C" fn chunkc_sigmoid_f32(x: f32) -> f32 {
    sigmoid(x as f64) as f32
}
#[no_mangle]
pub extern "C" fn chunkc_softplus_f32(x: f32) -> f32 {
    softplus(x as f64) as f32
}
#[no_mangle]
pub extern "C" fn chunkc_silu_f32(x: f32) -> f32 {
    silu(x as f64) as f32
}
#[no_mangle]
pub extern "C" fn chunkc_tanh_f32(x: f32) -> f32 {
    (x as f64).tanh() as f32
}
#[no_mangle]
pub extern "C" fn chunkc_pow_f32(x: f32, y: f32) -> f32 {
    (x as f64).powf(y as f64) as f32
}
#[no_mangle]
pub extern "C" fn chunkc_exp_f64(x: f64) -> f64 {
    x.exp()
}
#[no_mangle]
pub extern "C" fn chunkc_exp2_f64(x: f64) -> f64 {
    x.exp2()
}
#[no_mangle]
pub extern "C" fn chunkc_log_f64(x: f64) -> f64 {
    x.ln()
}
#[no_mangle]
pub extern "C" fn chunkc_sigmoid_f64(x: f64) -> f64 {
    sigmoid(x)
}
#[no_mangle]
pub extern "C" fn chunkc_softplus_f64(x: f64) -> f64 {
    softplus(x)
}
#[no_mangle]
pub extern "C" fn chunkc_silu_f64(x: f64) -> f64 {
    silu(x)
}
#[no_mangle]
pub extern "C" fn chunkc_tanh_f64(x: f64) -> f64 {
    x.tanh()
}
#[no_mangle]
pub extern "C" fn chunkc_pow_f64(x: f64, y: f64) -> f64 {
    x.powf(y)
}

pub type Un32 = extern "C" fn(f32) -> f32;
pub type Un64 = extern "C" fn(f64) -> f64;

/// Unary f32 routines, in the order of the lowering's math table (pow comes after them).
pub const MATH_F32: [(&str, Un32); 7] = [
    ("chunkc_exp_f32", chunkc_exp_f32),
    ("chunkc_exp2_f32", chunkc_exp2_f32),
    ("chunkc_log_f32", chunkc_log_f32),
    ("chunkc_sigmoid_f32", chunkc_sigmoid_f32),
    ("chunkc_softplus_f32", chunkc_softplus_f32),
    ("chunkc_silu_f32", chunkc_silu_f32),
    ("chunkc_tanh_f32", chunkc_tanh_f32),
];
pub const MATH_F64: [(&str, Un64); 7] = [
    ("chunkc_exp_f64", chunkc_exp_f64),
    ("chunkc_exp2_f64", chunkc_exp2_f64),
    ("chunkc_log_f64", chunkc_log_f64),
    ("chunkc_sigmoid_f64", chunkc_sigmoid_f64),
    ("chunkc_softplus_f64", chunkc_softplus_f64),
    ("chunkc_silu_f64", chunkc_silu_f64),
    ("chunkc_tanh_f64", chunkc_tanh_f64),
];
pub const POW_F32: (&str, extern "C" fn(f32, f32) -> f32) = ("chunkc_pow_f32", chunkc_pow_f32);
pub const POW_F64: (&str, extern "C" fn(f64, f64) -> f64) = ("chunkc_pow_f64", chunkc_pow_f64);

// ---- software prefetch ------------------------------------------------------------------
//
// Software prefetch of the next loop iteration's input rows.
//
// A chunked kernel reads its per-token inputs (layout `[B, T, H, K]`) one head at a time,
// so a chunk's tile is `C` rows of `K` floats spaced `H * K` floats apart: with the usual
// head counts every row starts a new 4 KB page. The hardware prefetchers do not follow
// such a pattern and each row costs a TLB walk and a DRAM round trip, which profiles showed
// as about 5% of a GLA kernel per input tile. The lowering therefore calls `chunkc_prefetch_rows`
// for the same load one iteration ahead, so those misses overlap the current chunk's
// arithmetic. Cranelift has no prefetch instruction, hence a rustc-compiled routine.

/// Symbol the generated code imports.
pub const PREFETCH_SYMBOL: &str = "chunkc_prefetch_rows";

/// Prefetches `rows` rows of `bytes` bytes each, starting at `p`, `stride` bytes apart, into
/// the L2 cache. Only issues hints: any address is safe, nothing is read architecturally.
#[no_mangle]
pub extern "C" fn chunkc_prefetch_rows(p: i64, rows: i64, stride: i64, bytes: i64) {
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
        super::chunkc_prefetch_rows(v.as_ptr() as i64, 16, 1024, 512);
        super::chunkc_prefetch_rows(0, 3, 1 << 40, 256);
        assert_eq!(v[4095], 1.0);
    }
}
