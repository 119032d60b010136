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
//! loop: 6 x 16 with AVX2 + FMA (12 ymm accumulators), 8 x 32 with AVX-512F (16 zmm
//! accumulators; the last block of a row is 8 x 16 when at most 16 columns are left). Sums are f32, in order of `p` for each
//! element (one FMA per product), then `acc` is added, as the IR's `Dot` contract allows.
//!
//! The rows of the product may be scaled too, `c = diag(os) (a @ b) + ...` (one multiply per
//! element in the epilogue): a row-scaled `a` (`(diag(e^g) Q) S`, a scalar gate's decayed
//! query) then needs no scaled copy of itself (`midend::fuse` decides).
//!
//! `acc` may come with a row scale `s` (`c = a @ b + diag(s) acc`, one FMA per element):
//! the chunk plans' state update `S' = diag(decay) S + K^T V` then reads the state once, in
//! the product's epilogue, instead of in a separate scaling pass over the 64 KB state first
//! (`midend::fuse` decides; [`scale_row`] is the product it computes).
//!
//! [`select`] picks the kernel for the host when the JIT module is built (None where there
//! is none: then `Dot` stays Cranelift code).

use std::cell::RefCell;

/// The kernel's C signature: `(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, acc, acc_rs,
/// acc_cs, s, s_rs, os, os_rs)`; `c`'s column stride is 1; `acc` may be null, and so may `s`
/// and `os` (no scale; a row stride of 0 broadcasts one scale to every row). All integers
/// are elements.
pub type GemmFn = unsafe extern "C" fn(
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
    *const f32,
    i64,
    *const f32,
    i64,
);

/// Arguments the generated code passes the kernel.
pub const GEMM_ARGS: usize = 18;

/// Products below this many multiply-adds stay inline Cranelift code: the call and the
/// packing of `b` cost more than the gemm saves.
pub const GEMM_MIN_MACS: usize = 4096;

/// Whether the lowering calls the gemm for an `m x n` product over `k` (when the backend has
/// one): large enough, over more than one term (an outer product, `k = 1`, is one multiply
/// per element: the inline loop does it without packing `b`; a recurrent kernel's rank-1
/// state update ran 1.06-1.08x faster so, docs/performance.md round 13), and either `b`'s
/// rows are contiguous or there are enough rows of `a` to pay for packing a transposed `b`.
pub fn takes(m: usize, n: usize, k: usize, b_cs: i64) -> bool {
    m * n * k >= GEMM_MIN_MACS && k >= 2 && (b_cs == 1 || m >= 8)
}

/// Whether [`takes`] holds for every layout of `b`.
pub fn takes_any_layout(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= GEMM_MIN_MACS && k >= 2 && m >= 8
}

/// The scale of row `row` (of `acc` or of the product): 1 without a scale.
///
/// # Safety
/// `s`, when not null, readable at `row * s_rs`.
#[inline(always)]
unsafe fn scale_row(s: *const f32, s_rs: isize, row: isize) -> f32 {
    if s.is_null() {
        1.0
    } else {
        // SAFETY: the caller's contract.
        unsafe { *s.offset(row * s_rs) }
    }
}

/// Symbol name the generated code imports.
pub const GEMM_SYMBOL: &str = "chunkc_sgemm_f32";

/// The kernel for `simd` (which the host has), or None.
pub fn select(simd: super::Simd) -> Option<GemmFn> {
    #[cfg(target_arch = "x86_64")]
    {
        match simd {
            super::Simd::Avx512 => return Some(x86::sgemm_avx512),
            super::Simd::Avx2 => return Some(x86::sgemm_avx2),
            super::Simd::Portable => {}
        }
    }
    let _ = simd;
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
    #[cfg(target_arch = "x86_64")]
    if rs == 1 && std::is_x86_feature_detected!("avx") {
        // b is a transposed operand (contiguous along p): 8 x 8 block transposes.
        // SAFETY: the caller's contract; the host has AVX.
        unsafe { x86::pack_t8(out, b, cs, k, n, np) };
        return np;
    }
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
pub(crate) mod x86 {
    use super::{pack_b, scale_row, PANEL};
    use std::arch::x86_64::*;

    /// `out[p*np + j] = b[p + j*cs]` for `p < k`, `j < n` (a transpose), by 8 x 8 blocks.
    ///
    /// # Safety
    /// `b` readable at those offsets, `out` at least `k * np` long, `np >= n`.
    #[target_feature(enable = "avx")]
    pub unsafe fn pack_t8(out: &mut [f32], b: *const f32, cs: isize, k: usize, n: usize, np: usize) {
        debug_assert!(out.len() >= k * np && np >= n);
        let o = out.as_mut_ptr();
        // SAFETY (whole body): reads of b[p + j*cs] and writes of out[p*np + j] with p < k,
        // j < n, as the caller guarantees.
        unsafe {
            let (k8, n8) = (k / 8 * 8, n / 8 * 8);
            for j0 in (0..n8).step_by(8) {
                let src = |r: usize| b.offset((j0 + r) as isize * cs);
                for p0 in (0..k8).step_by(8) {
                    let r: [__m256; 8] = std::array::from_fn(|q| _mm256_loadu_ps(src(q).add(p0)));
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let rows = [
                        _mm256_permute2f128_ps::<0x20>(u0, u4),
                        _mm256_permute2f128_ps::<0x20>(u1, u5),
                        _mm256_permute2f128_ps::<0x20>(u2, u6),
                        _mm256_permute2f128_ps::<0x20>(u3, u7),
                        _mm256_permute2f128_ps::<0x31>(u0, u4),
                        _mm256_permute2f128_ps::<0x31>(u1, u5),
                        _mm256_permute2f128_ps::<0x31>(u2, u6),
                        _mm256_permute2f128_ps::<0x31>(u3, u7),
                    ];
                    for (q, v) in rows.iter().enumerate() {
                        _mm256_storeu_ps(o.add((p0 + q) * np + j0), *v);
                    }
                }
                for p in k8..k {
                    for r in 0..8 {
                        *o.add(p * np + j0 + r) = *src(r).add(p);
                    }
                }
            }
            for j in n8..n {
                let src = b.offset(j as isize * cs);
                for p in 0..k {
                    *o.add(p * np + j) = *src.add(p);
                }
            }
        }
    }

    const NR: usize = 16;
    const MR: usize = 6;
    /// Rows per AVX-512 block.
    const MR512: usize = 8;

    /// AVX2 + FMA entry point (see the module docs for the contract).
    ///
    /// # Safety
    /// Operands valid for the strided reads and writes described by the arguments; only
    /// registered when the host has AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn sgemm_avx2(
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
        s: *const f32,
        s_rs: i64,
        os: *const f32,
        os_rs: i64,
    ) {
        // SAFETY: the caller's contract; the host has AVX2 and FMA (checked by `select`).
        unsafe {
            let acc = (acc, acc_rs, acc_cs, s, s_rs, os, os_rs);
            with_gemm(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, acc, NR, |g, m, n| g.run(m, n))
        }
    }

    /// AVX-512F entry point (see the module docs for the contract): 8 x 32 blocks (16 zmm
    /// accumulators), 8 x 16 for a last block of at most 16 columns.
    ///
    /// # Safety
    /// Operands valid for the strided reads and writes described by the arguments; only
    /// registered when the host has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn sgemm_avx512(
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
        s: *const f32,
        s_rs: i64,
        os: *const f32,
        os_rs: i64,
    ) {
        // SAFETY: the caller's contract; the host has AVX-512F (checked by `select`).
        unsafe {
            let acc = (acc, acc_rs, acc_cs, s, s_rs, os, os_rs);
            with_gemm(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, acc, 16, |g, m, n| g.run512(m, n))
        }
    }

    /// Sets up a [`Gemm`] (b in place when its rows are contiguous and a whole number of
    /// `nr`-wide blocks, else packed to a multiple of `nr` columns) and runs `f` on it.
    ///
    /// # Safety
    /// The entry points' contract.
    #[allow(clippy::too_many_arguments)]
    unsafe fn with_gemm(
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
        (acc, acc_rs, acc_cs, s, s_rs, os, os_rs): (*const f32, i64, i64, *const f32, i64, *const f32, i64),
        nr: usize,
        f: impl FnOnce(&Gemm, usize, usize),
    ) {
        let (m, n, k) = (m.max(0) as usize, n.max(0) as usize, k.max(0) as usize);
        if m == 0 || n == 0 {
            return;
        }
        PANEL.with(|panel| {
            let mut panel = panel.borrow_mut();
            // SAFETY: the caller's contract.
            unsafe {
                let (bp, np) = if b_cs == 1 && n % nr == 0 && b_rs >= n as i64 {
                    (b, b_rs as usize)
                } else {
                    let np = pack_b(&mut panel, b, b_rs as isize, b_cs as isize, k, n, nr);
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
                    s,
                    s_rs: s_rs as isize,
                    os,
                    os_rs: os_rs as isize,
                };
                f(&g, m, n);
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
        /// Row scale of `acc` (null: none).
        s: *const f32,
        s_rs: isize,
        /// Row scale of the product (null: none).
        os: *const f32,
        os_rs: isize,
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
                    let scale = scale_row(self.s, self.s_rs, row);
                    let (mut s0r, mut s1r) = (s0[r], s1[r]);
                    if !self.os.is_null() {
                        let o = _mm256_set1_ps(scale_row(self.os, self.os_rs, row));
                        (s0r, s1r) = (_mm256_mul_ps(s0r, o), _mm256_mul_ps(s1r, o));
                    }
                    if w == NR && (accp.is_none() || self.acc_cs == 1) {
                        let (mut v0, mut v1) = (s0r, s1r);
                        if let Some(q) = accp {
                            let x = _mm256_set1_ps(scale);
                            v0 = _mm256_fmadd_ps(_mm256_loadu_ps(q), x, v0);
                            v1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(8)), x, v1);
                        }
                        _mm256_storeu_ps(cp, v0);
                        _mm256_storeu_ps(cp.add(8), v1);
                    } else {
                        let mut t = [0.0f32; NR];
                        _mm256_storeu_ps(t.as_mut_ptr(), s0r);
                        _mm256_storeu_ps(t.as_mut_ptr().add(8), s1r);
                        for (q, x) in t.iter().enumerate().take(w) {
                            let mut y = *x;
                            if let Some(ap) = accp {
                                y = (*ap.offset(q as isize * self.acc_cs)).mul_add(scale, y);
                            }
                            *cp.add(q) = y;
                        }
                    }
                }
            }
        }
    }

    impl Gemm {
        #[target_feature(enable = "avx512f")]
        unsafe fn run512(&self, m: usize, n: usize) {
            let mut j = 0;
            while j < n {
                let w = (n - j).min(32);
                let mut i = 0;
                while i < m {
                    let h = (m - i).min(MR512);
                    // SAFETY: i + h <= m, j + w <= n (the caller's contract covers those).
                    unsafe {
                        if w > 16 {
                            self.block512_h::<2>(h, i, j, w);
                        } else {
                            self.block512_h::<1>(h, i, j, w);
                        }
                    }
                    i += h;
                }
                j += w;
            }
        }

        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn block512_h<const V: usize>(&self, h: usize, i: usize, j: usize, w: usize) {
            // SAFETY: forwarded.
            unsafe {
                match h {
                    8 => self.block512::<8, V>(i, j, w),
                    7 => self.block512::<7, V>(i, j, w),
                    6 => self.block512::<6, V>(i, j, w),
                    5 => self.block512::<5, V>(i, j, w),
                    4 => self.block512::<4, V>(i, j, w),
                    3 => self.block512::<3, V>(i, j, w),
                    2 => self.block512::<2, V>(i, j, w),
                    _ => self.block512::<1, V>(i, j, w),
                }
            }
        }

        /// Rows `i..i+R`, columns `j..j+w` (w <= 16 V) of `c`, V zmm vectors per row.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn block512<const R: usize, const V: usize>(&self, i: usize, j: usize, w: usize) {
            // SAFETY (whole body): reads of a at rows i..i+R and p < k, of the panel at rows
            // p < k and columns j..j+16V <= np (np is a multiple of 16 and w > 16(V-1)),
            // writes of c at rows i..i+R and columns j..j+w, all within the caller's contract.
            unsafe {
                let mut s = [[_mm512_setzero_ps(); V]; R];
                let mut ap = self.a.offset(i as isize * self.a_rs);
                let mut bp = self.bp.add(j);
                for _ in 0..self.k {
                    let mut bv = [_mm512_setzero_ps(); V];
                    for (v, x) in bv.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(bp.add(16 * v));
                    }
                    for (r, sr) in s.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(*ap.offset(r as isize * self.a_rs));
                        for v in 0..V {
                            sr[v] = _mm512_fmadd_ps(x, bv[v], sr[v]);
                        }
                    }
                    ap = ap.offset(self.a_cs);
                    bp = bp.add(self.np);
                }
                for (r, sr) in s.iter_mut().enumerate() {
                    let row = (i + r) as isize;
                    if !self.os.is_null() {
                        let o = _mm512_set1_ps(scale_row(self.os, self.os_rs, row));
                        sr.iter_mut().for_each(|v| *v = _mm512_mul_ps(*v, o));
                    }
                    let cp = self.c.offset(row * self.c_rs).add(j);
                    let accp = if self.acc.is_null() {
                        None
                    } else {
                        Some(self.acc.offset(row * self.acc_rs + j as isize * self.acc_cs))
                    };
                    let scale = scale_row(self.s, self.s_rs, row);
                    if accp.is_none() || self.acc_cs == 1 {
                        let x = _mm512_set1_ps(scale);
                        for (v, sum) in sr.iter().enumerate() {
                            let left = w.saturating_sub(16 * v).min(16);
                            let mk: __mmask16 = if left == 16 { !0 } else { ((1u32 << left) - 1) as __mmask16 };
                            let mut y = *sum;
                            if let Some(q) = accp {
                                y = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q.add(16 * v)), x, y);
                            }
                            _mm512_mask_storeu_ps(cp.add(16 * v), mk, y);
                        }
                    } else {
                        let mut t = [0.0f32; 32];
                        for (v, x) in sr.iter().enumerate() {
                            _mm512_storeu_ps(t.as_mut_ptr().add(16 * v), *x);
                        }
                        for (q, x) in t.iter().enumerate().take(w) {
                            let mut y = *x;
                            if let Some(ap) = accp {
                                y = (*ap.offset(q as isize * self.acc_cs)).mul_add(scale, y);
                            }
                            *cp.add(q) = y;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every level's kernel against f64 for `c = diag(os) (a @ b) + diag(s) acc`: shapes with
    /// partial register blocks, a strided and a contiguous accumulator, a per-row, a
    /// broadcast and no scale of each kind, and `c` written over its own accumulator.
    #[test]
    fn the_row_scaled_product_and_accumulator_match_f64() {
        let levels: Vec<super::super::Simd> =
            [super::super::Simd::Avx512, super::super::Simd::Avx2].into_iter().filter(|s| s.available()).collect();
        for simd in levels {
            let f = select(simd).expect("a gemm for an available level");
            for (m, n, k) in [(128, 128, 16), (37, 45, 9), (8, 16, 32), (3, 70, 5)] {
                let (a, b) = (data(m * k, 1), data(k * n, 2));
                for acc_transposed in [false, true] {
                    for (scale, out_scale) in
                        [(Some(1i64), None), (Some(0), Some(1i64)), (None, Some(0)), (None, None), (Some(1), Some(1))]
                    {
                        let acc = data(m * n, 3);
                        let s = data(m, 4);
                        let os = data(m, 5);
                        // acc[i, j] at i*acc_rs + j*acc_cs.
                        let (acc_rs, acc_cs) = if acc_transposed { (1, m as i64) } else { (n as i64, 1) };
                        let want: Vec<f64> = (0..m * n)
                            .map(|e| {
                                let (i, j) = (e / n, e % n);
                                let dot: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
                                let x = acc[(i as i64 * acc_rs + j as i64 * acc_cs) as usize] as f64;
                                let sc = match scale {
                                    Some(rs) => s[i * rs as usize] as f64,
                                    None => 1.0,
                                };
                                let osc = out_scale.map_or(1.0, |rs| os[i * rs as usize] as f64);
                                osc * dot + sc * x
                            })
                            .collect();
                        let (sp, s_rs) = match scale {
                            Some(rs) => (s.as_ptr(), rs),
                            None => (std::ptr::null(), 0),
                        };
                        let (osp, os_rs) = match out_scale {
                            Some(rs) => (os.as_ptr(), rs),
                            None => (std::ptr::null(), 0),
                        };
                        let check = |c: &[f32], what: &str| {
                            for (e, (&got, &w)) in c.iter().zip(&want).enumerate() {
                                assert!(
                                    (got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                    "{what} {simd:?} {m}x{n}x{k} {acc_transposed} {scale:?} {out_scale:?} [{e}]: {got} vs {w}"
                                );
                            }
                        };
                        // Into fresh NaNs, then (for a contiguous accumulator) in place: c as
                        // its own accumulator, which the kernel allows since it reads an
                        // accumulator element before it writes that element.
                        let mut fresh = vec![f32::NAN; m * n];
                        let mut own = acc.clone();
                        let runs: &mut [(&mut Vec<f32>, bool, &str)] =
                            &mut [(&mut fresh, false, "fresh"), (&mut own, true, "in place")];
                        for (c, in_place, what) in runs.iter_mut() {
                            if *in_place && acc_transposed {
                                continue;
                            }
                            let cp = c.as_mut_ptr();
                            let (accp, acc_rs, acc_cs) = if *in_place {
                                (cp as *const f32, n as i64, 1)
                            } else {
                                (acc.as_ptr(), acc_rs, acc_cs)
                            };
                            // SAFETY: every operand is allocated at the sizes its strides address.
                            unsafe {
                                f(
                                    m as i64,
                                    n as i64,
                                    k as i64,
                                    a.as_ptr(),
                                    k as i64,
                                    1,
                                    b.as_ptr(),
                                    n as i64,
                                    1,
                                    cp,
                                    n as i64,
                                    accp,
                                    acc_rs,
                                    acc_cs,
                                    sp,
                                    s_rs,
                                    osp,
                                    os_rs,
                                )
                            };
                            check(c, what);
                        }
                    }
                }
            }
        }
    }
}
