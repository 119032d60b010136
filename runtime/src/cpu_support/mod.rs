//! Everything generated CPU code calls by name: the symbols a JIT registers, and that a
//! kernel compiled ahead of time (`chunkc-build`) links against.
//!
//! - f32 and f64 math, each computed in f64 and rounded once, exactly as the tile IR defines
//!   it (`chunkc_codegen::ir::UnOp::eval` calls [`sigmoid`], [`softplus`] and [`silu`] here);
//! - a software prefetch;
//! - the rustc-compiled SIMD routines: the gemm microkernels ([`gemm`]), the gated dots
//!   ([`gated`], [`gated_matmul`]), the decay ([`decay`]), gate sums ([`sums`]), the
//!   triangular solve ([`solve`]) and the row copy ([`rows`]), per [`Simd`] level.
//!
//! Every routine is exported (`#[no_mangle]`), a SIMD routine under its name for its level
//! ([`level_symbol`]: `chunkc_sgemm_f32_avx2`), so that an object file resolves it when the
//! program links this crate and calls the same code as the JIT.

pub mod decay;
pub mod gated;
pub mod gated_matmul;
pub mod gemm;
pub mod rows;
pub mod solve;
pub mod sums;

/// Which rustc-compiled SIMD routines (`gemm.rs`, `gated.rs`) the generated code may call:
/// the compiler takes the best the host has, or the level asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Simd {
    /// None: everything is Cranelift code (the portable fallback).
    Portable,
    /// AVX2 + FMA routines (x86-64).
    Avx2,
    /// AVX-512F routines (x86-64).
    Avx512,
}

impl Simd {
    /// Whether this host can run the level's routines.
    pub fn available(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => std::is_x86_feature_detected!("avx512f") && Simd::Avx2.available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The level's name: `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// The best level this host has.
    pub fn best() -> Simd {
        [Simd::Avx512, Simd::Avx2].into_iter().find(|s| s.available()).unwrap_or(Simd::Portable)
    }
}

/// The name the routine `base` is exported under at `simd` (`chunkc_sgemm_f32_avx2`).
pub fn level_symbol(base: &str, simd: Simd) -> String {
    format!("{base}_{}", simd.name())
}

/// Exports the routine `$select` picks under `$name`: a level's routine called by a kernel
/// compiled ahead of time. The kernel's program checks the level is available before it
/// runs (`linked::LinkedProgram::new`), so the abort is unreachable from chunkc's code.
macro_rules! export {
    ($name:ident = $select:expr; ($($arg:ident: $ty:ty),*)) => {
        /// A level's SIMD routine, exported for kernels compiled ahead of time.
        ///
        /// # Safety
        /// The routine's own contract (its module's documentation); the CPU must have the level.
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) {
            match $select {
                // SAFETY: the caller upholds the routine's contract.
                Some(f) => unsafe { f($($arg),*) },
                None => std::process::abort(),
            }
        }
    };
}

macro_rules! export_levels {
    ($avx2:ident, $avx512:ident = |$s:ident| $select:expr; $args:tt) => {
        export!($avx2 = { let $s = Simd::Avx2; $select }; $args);
        export!($avx512 = { let $s = Simd::Avx512; $select }; $args);
    };
}

export_levels!(chunkc_sgemm_f32_avx2, chunkc_sgemm_f32_avx512 = |s| gemm::select(s);
    (m: i64, n: i64, k: i64, a: *const f32, a_rs: i64, a_cs: i64, b: *const f32, b_rs: i64, b_cs: i64,
     c: *mut f32, c_rs: i64, acc: *const f32, acc_rs: i64, acc_cs: i64, sc: *const f32, sc_rs: i64,
     sr: *const f32, sr_rs: i64));
export_levels!(chunkc_gated_dot_g32_avx2, chunkc_gated_dot_g32_avx512 = |s| gated::select(s).map(|f| f[0]);
    (n: i64, c: i64, a: *const f32, a_rs: i64, ga: *const u8, ga_rs: i64, b: *const f32, b_rs: i64,
     gb: *const u8, gb_rs: i64, out: *mut f32, out_rs: i64, out_cs: i64, strict: i64));
export_levels!(chunkc_gated_dot_g64_avx2, chunkc_gated_dot_g64_avx512 = |s| gated::select(s).map(|f| f[1]);
    (n: i64, c: i64, a: *const f32, a_rs: i64, ga: *const u8, ga_rs: i64, b: *const f32, b_rs: i64,
     gb: *const u8, gb_rs: i64, out: *mut f32, out_rs: i64, out_cs: i64, strict: i64));
export_levels!(chunkc_gated_matmul_g32_avx2, chunkc_gated_matmul_g32_avx512 = |s| gated_matmul::select(s).map(|f| f[0]);
    (n: i64, c: i64, m: *const f32, m_rs: i64, m_cs: i64, x: *const f32, x_rs: i64, gx: *const u8,
     gx_rs: i64, gy: *const u8, gy_rs: i64, out: *mut f32, out_rs: i64, flags: i64));
export_levels!(chunkc_gated_matmul_g64_avx2, chunkc_gated_matmul_g64_avx512 = |s| gated_matmul::select(s).map(|f| f[1]);
    (n: i64, c: i64, m: *const f32, m_rs: i64, m_cs: i64, x: *const f32, x_rs: i64, gx: *const u8,
     gx_rs: i64, gy: *const u8, gy_rs: i64, out: *mut f32, out_rs: i64, flags: i64));
export!(chunkc_decay_f64_avx512 = decay::select(Simd::Avx512);
    (rows: i64, cols: i64, a: *const f32, a_rs: i64, x: *const f64, x_rs: i64, x_cs: i64, y: *const f64,
     y_rs: i64, y_cs: i64, out: *mut f32, out_rs: i64, tril: i64));
export!(chunkc_gate_sums_avx512 = sums::select(Simd::Avx512);
    (rows: i64, cols: i64, x: *const f32, x_rs: i64, out: *mut f64, out_rs: i64, exclusive: i64));
export!(chunkc_solve_unit_lower_avx512 = solve::select(Simd::Avx512);
    (n: i64, m: i64, l: *const f32, l_rs: i64, l_cs: i64, x: *mut f32, x_rs: i64));
export!(chunkc_copy_rows = Some(rows::copy_rows);
    (src: *const f32, src_rs: i64, dst: *mut f32, dst_rs: i64, rows: i64, cols: i64, fill_to: i64));

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
