//! rustc-compiled `GatedDot` kernels that the generated code calls (`lower.rs` decides: the
//! four operands must be contiguous along `c`):
//!
//! ```text
//! out[i, j] = sum_c a[i, c] * b[j, c] * exp(ga[i, c] - gb[j, c])   j <= i (j < i if strict)
//! out[i, j] = 0                                                     otherwise
//! ```
//!
//! Two forms, at both SIMD levels. When `n <= 16` and every exponent is within
//! `SPLIT_RANGE` of row `n / 2`'s (the usual case: a sub-chunk's gates move little), the
//! exponential splits, `e^(ga - gb) = e^(ga - r) e^(r - gb)`, and the block is one small
//! product of the two scaled operands (`factored16` / `factored8`: 2nc exponentials).
//! Otherwise the pairwise form below runs, which never forms a factor above 1 for a kept
//! element.
//!
//! Pairwise: vectorised over `c` (8 lanes with AVX2 + FMA, 16 with AVX-512F). The exponent
//! is formed in the gates' dtype (f32, or f64 converted to f32 after the subtraction), the
//! exp and the sum in f32: `exp` is the algorithm of `vmath.rs` lane for lane (same
//! constants, same clamp to [-104, 89], same scaling by `2^n` in one rounding (two steps, the
//! first exact; AVX-512's `vscalefps` in one), so the same results:
//! within 2 ulp, denormal correct, NaN propagates), each term is `fma(a * b, e, sum)` into
//! per-lane partial sums that are added at the end. Only kept `(i, j)` are evaluated, so exponents above the
//! diagonal may be huge without producing inf or NaN. A tail of `c` that is not a whole
//! vector is zero-padded (`a = b = 0`, exponent 0: the term is 0).

use super::Simd;

/// The kernel's C signature: `(n, c, a, a_rs, ga, ga_rs, b, b_rs, gb, gb_rs, out, out_rs,
/// out_cs, strict)`; every operand is `n x c` with column stride 1 (out `n x n`). Integers are
/// elements (of the gates' dtype for `ga_rs`, `gb_rs`); `strict` is 0 or 1. `ga`, `gb` are
/// f32 or f64 as the symbol says.
pub type GatedFn = unsafe extern "C" fn(
    i64,
    i64,
    *const f32,
    i64,
    *const u8,
    i64,
    *const f32,
    i64,
    *const u8,
    i64,
    *mut f32,
    i64,
    i64,
    i64,
);

/// Symbol names the generated code imports (f32 gates, f64 gates).
pub const GATED_SYMBOLS: [&str; 2] = ["chunkc_gated_dot_g32", "chunkc_gated_dot_g64"];

/// The kernels for `simd` (f32 gates, f64 gates), or None (then `GatedDot` stays Cranelift
/// code).
pub fn select(simd: Simd) -> Option<[GatedFn; 2]> {
    #[cfg(target_arch = "x86_64")]
    {
        match simd {
            Simd::Avx512 => return Some([x86::gated_avx512::<false>, x86::gated_avx512::<true>]),
            Simd::Avx2 => return Some([x86::gated_avx2::<false>, x86::gated_avx2::<true>]),
            Simd::Portable => {}
        }
    }
    let _ = simd;
    None
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0;
    const P: [f32; 6] = [0.5, 1.666_666_5e-1, 4.166_579_6e-2, 8.333_452e-3, 1.398_2e-3, 1.987_569_1e-4];

    /// `e^x` on 8 lanes (vmath.rs's algorithm).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let s = _mm256_set1_ps;
        // max/min return their second operand when one is NaN: NaN stays NaN.
        let x = _mm256_min_ps(s(89.0), _mm256_max_ps(s(-104.0), x));
        let t = _mm256_fmadd_ps(x, s(LOG2E), s(SHIFTER));
        let nf = _mm256_sub_ps(t, s(SHIFTER));
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(SHIFTER.to_bits() as i32));
        let r = _mm256_fmadd_ps(nf, s(-LN2_HI), x);
        let r = _mm256_fmadd_ps(nf, s(-LN2_LO), r);
        let mut p = s(P[5]);
        for c in P[..5].iter().rev() {
            p = _mm256_fmadd_ps(p, r, s(*c));
        }
        let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, s(1.0)));
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
        _mm256_mul_ps(_mm256_mul_ps(y, s1), s2)
    }

    /// `e^x` on 16 lanes (vmath.rs's algorithm).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let x = _mm512_min_ps(s(89.0), _mm512_max_ps(s(-104.0), x));
        let t = _mm512_fmadd_ps(x, s(LOG2E), s(SHIFTER));
        let nf = _mm512_sub_ps(t, s(SHIFTER));
        let r = _mm512_fmadd_ps(nf, s(-LN2_HI), x);
        let r = _mm512_fmadd_ps(nf, s(-LN2_LO), r);
        let mut p = s(P[5]);
        for c in P[..5].iter().rev() {
            p = _mm512_fmadd_ps(p, r, s(*c));
        }
        let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, s(1.0)));
        // y 2^n in one rounding, as the two-step scaling rounds (its first step is exact):
        // the same bits, in one instruction instead of eight.
        _mm512_scalef_ps(y, nf)
    }

    /// `1 / x` on 16 lanes for `x` in `[e^-12, e^12]`: the 14-bit estimate and one Newton
    /// step, within 1 ulp.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn recip16(x: __m512) -> __m512 {
        let r = _mm512_rcp14_ps(x);
        _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0)), r)
    }

    /// `1 / x` on 8 lanes for `x` in `[e^-12, e^12]`: the 12-bit estimate and one Newton
    /// step, within 2 ulp.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub fn recip8(x: __m256) -> __m256 {
        let r = _mm256_rcp_ps(x);
        _mm256_fmadd_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(1.0)), r)
    }

    /// Operands of one call, pointers advanced by element.
    struct Args {
        n: usize,
        c: usize,
        a: *const f32,
        a_rs: usize,
        ga: *const u8,
        ga_rs: usize,
        b: *const f32,
        b_rs: usize,
        gb: *const u8,
        gb_rs: usize,
        out: *mut f32,
        out_rs: isize,
        out_cs: isize,
        strict: bool,
    }

    impl Args {
        #[allow(clippy::too_many_arguments)]
        fn new(
            n: i64,
            c: i64,
            a: *const f32,
            a_rs: i64,
            ga: *const u8,
            ga_rs: i64,
            b: *const f32,
            b_rs: i64,
            gb: *const u8,
            gb_rs: i64,
            out: *mut f32,
            out_rs: i64,
            out_cs: i64,
            strict: i64,
        ) -> Args {
            let u = |x: i64| x.max(0) as usize;
            Args {
                n: u(n),
                c: u(c),
                a,
                a_rs: u(a_rs),
                ga,
                ga_rs: u(ga_rs),
                b,
                b_rs: u(b_rs),
                gb,
                gb_rs: u(gb_rs),
                out,
                out_rs: out_rs as isize,
                out_cs: out_cs as isize,
                strict: strict != 0,
            }
        }

        /// Whether both sides read one gate tile (`ga == gb`, as the chunked plan's diagonal
        /// blocks do): then `e^(r - gb)` is the reciprocal of `e^(ga - r)`, which costs a
        /// third of an exponential and is within 2 ulp of it for factors in `[e^-12, e^12]`.
        fn shared_gates(&self) -> bool {
            self.ga == self.gb && self.ga_rs == self.gb_rs
        }

        /// Runs `dot(i, j)` for the kept elements, stores zeros elsewhere.
        ///
        /// # Safety
        /// `out` valid for writes at every `i*out_rs + j*out_cs`, `i, j < n`.
        unsafe fn each(&self, mut dot: impl FnMut(usize, usize) -> f32) {
            for i in 0..self.n {
                let kept = if self.strict { i } else { i + 1 };
                for j in 0..self.n {
                    let v = if j < kept { dot(i, j) } else { 0.0 };
                    // SAFETY: the caller's contract.
                    unsafe { *self.out.offset(i as isize * self.out_rs + j as isize * self.out_cs) = v };
                }
            }
        }
    }

    /// Gate pointer of row `i` (`rs` elements of f64 or f32 per row).
    fn grow<const G64: bool>(g: *const u8, i: usize, rs: usize) -> *const u8 {
        g.wrapping_add(i * rs * if G64 { 8 } else { 4 })
    }

    /// AVX2 + FMA entry point (contract: [`super::GatedFn`]).
    ///
    /// # Safety
    /// Operands valid for the reads and writes the arguments describe; only registered when
    /// the host has AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn gated_avx2<const G64: bool>(
        n: i64,
        c: i64,
        a: *const f32,
        a_rs: i64,
        ga: *const u8,
        ga_rs: i64,
        b: *const f32,
        b_rs: i64,
        gb: *const u8,
        gb_rs: i64,
        out: *mut f32,
        out_rs: i64,
        out_cs: i64,
        strict: i64,
    ) {
        let g = Args::new(n, c, a, a_rs, ga, ga_rs, b, b_rs, gb, gb_rs, out, out_rs, out_cs, strict);
        // SAFETY: the caller's contract; the host has AVX2 and FMA (checked by `select`).
        unsafe {
            if !factored8::<G64>(&g) {
                g.each(|i, j| dot8::<G64>(&g, i, j))
            }
        }
    }

    /// [`factored16`] with 8 lanes: the same factors (to the bit: `exp8` is `exp16`'s
    /// algorithm) and the same test, the 16 x 16 product as four 8 x 8 register blocks.
    ///
    /// # Safety
    /// As [`gated_avx2`]'s operands.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn factored8<const G64: bool>(g: &Args) -> bool {
        let (n, c) = (g.n, g.c);
        if n == 0 || n > 16 || c == 0 {
            return false;
        }
        let (mid, gs) = (n / 2, if G64 { 8 } else { 4 });
        // SAFETY (whole body): reads of rows < n at columns < c of the operands (the tail of
        // c through zero-padded copies), writes to the stack buffers in bounds, and `out` at
        // (i, j) < n (the caller's contract).
        unsafe {
            let mut out = [0f32; 256];
            let mut sa = [0f32; 16 * SPLIT_COLS];
            let mut sb = [0f32; 16 * SPLIT_COLS];
            let mut sbt = [0f32; SPLIT_COLS * 16];
            let rrow = grow::<G64>(g.ga, mid, g.ga_rs);
            let shared = g.shared_gates();
            let range = _mm256_set1_ps(SPLIT_RANGE);
            let abs = |x: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
            let mut q0 = 0;
            while q0 < c {
                let w = (c - q0).min(SPLIT_COLS);
                for i in 0..n {
                    let (ap, gap) = (g.a.add(i * g.a_rs), grow::<G64>(g.ga, i, g.ga_rs));
                    let (bp, gbp) = (g.b.add(i * g.b_rs), grow::<G64>(g.gb, i, g.gb_rs));
                    let mut q = 0;
                    while q < w {
                        let at = q0 + q;
                        let lanes = (w - q).min(8);
                        let (xa, xb, va, vb) = if lanes == 8 {
                            let xa = diff8::<G64>(gap.add(at * gs), rrow.add(at * gs));
                            let xb = if shared { xa } else { diff8::<G64>(rrow.add(at * gs), gbp.add(at * gs)) };
                            (xa, xb, _mm256_loadu_ps(ap.add(at)), _mm256_loadu_ps(bp.add(at)))
                        } else {
                            let (mut ta, mut tb) = ([0f32; 8], [0f32; 8]);
                            let (mut tga, mut tgr, mut tgb) = ([0u8; 64], [0u8; 64], [0u8; 64]);
                            std::ptr::copy_nonoverlapping(ap.add(at), ta.as_mut_ptr(), lanes);
                            std::ptr::copy_nonoverlapping(bp.add(at), tb.as_mut_ptr(), lanes);
                            std::ptr::copy_nonoverlapping(gap.add(at * gs), tga.as_mut_ptr(), lanes * gs);
                            std::ptr::copy_nonoverlapping(rrow.add(at * gs), tgr.as_mut_ptr(), lanes * gs);
                            std::ptr::copy_nonoverlapping(gbp.add(at * gs), tgb.as_mut_ptr(), lanes * gs);
                            let xa = diff8::<G64>(tga.as_ptr(), tgr.as_ptr());
                            let xb = diff8::<G64>(tgr.as_ptr(), tgb.as_ptr());
                            (xa, xb, _mm256_loadu_ps(ta.as_ptr()), _mm256_loadu_ps(tb.as_ptr()))
                        };
                        // |x| <= range, false for NaN; zero-padded lanes are 0 and pass.
                        let ok = _mm256_and_ps(
                            _mm256_cmp_ps::<_CMP_LE_OQ>(abs(xa), range),
                            _mm256_cmp_ps::<_CMP_LE_OQ>(abs(xb), range),
                        );
                        if _mm256_movemask_ps(ok) != 0xff {
                            return false;
                        }
                        let ea = exp8(xa);
                        let eb = if shared { recip8(ea) } else { exp8(xb) };
                        _mm256_storeu_ps(sa.as_mut_ptr().add(i * SPLIT_COLS + q), _mm256_mul_ps(va, ea));
                        _mm256_storeu_ps(sb.as_mut_ptr().add(i * SPLIT_COLS + q), _mm256_mul_ps(vb, eb));
                        q += 8;
                    }
                }
                crate::cpu_support::gemm::x86::pack_t8(&mut sbt, sb.as_ptr(), SPLIT_COLS as isize, w, 16, 16);
                // Four 8 x 8 blocks (rows ih..ih+8, columns jh..jh+8) of the 16 x 16 product.
                for ih in [0, 8] {
                    for jh in [0, 8] {
                        let mut acc = [_mm256_setzero_ps(); 8];
                        for q in 0..w {
                            let bt = _mm256_loadu_ps(sbt.as_ptr().add(q * 16 + jh));
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let x = _mm256_set1_ps(sa[(ih + r) * SPLIT_COLS + q]);
                                *acc = _mm256_fmadd_ps(x, bt, *acc);
                            }
                        }
                        for (r, acc) in acc.iter().enumerate() {
                            let o = out.as_mut_ptr().add((ih + r) * 16 + jh);
                            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *acc));
                        }
                    }
                }
                q0 += w;
            }
            for i in 0..n {
                let kept = if g.strict { i } else { i + 1 };
                for j in 0..n {
                    let v = if j < kept { out[i * 16 + j] } else { 0.0 };
                    *g.out.offset(i as isize * g.out_rs + j as isize * g.out_cs) = v;
                }
            }
        }
        true
    }

    /// The difference of 8 gates at `x`, `y` (f64 differences converted to f32).
    ///
    /// # Safety
    /// 8 gates readable at each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn diff8<const G64: bool>(x: *const u8, y: *const u8) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            if G64 {
                let (x, y) = (x as *const f64, y as *const f64);
                let d0 = _mm256_sub_pd(_mm256_loadu_pd(x), _mm256_loadu_pd(y));
                let d1 = _mm256_sub_pd(_mm256_loadu_pd(x.add(4)), _mm256_loadu_pd(y.add(4)));
                _mm256_set_m128(_mm256_cvtpd_ps(d1), _mm256_cvtpd_ps(d0))
            } else {
                _mm256_sub_ps(_mm256_loadu_ps(x as *const f32), _mm256_loadu_ps(y as *const f32))
            }
        }
    }

    /// `out[i, j]` with 8 lanes.
    ///
    /// # Safety
    /// Rows `i` and `j` of the operands readable over `c`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot8<const G64: bool>(g: &Args, i: usize, j: usize) -> f32 {
        let gs = if G64 { 8 } else { 4 };
        // SAFETY (whole body): reads of rows i and j at columns < c (the tail goes through
        // zero-padded copies).
        unsafe {
            let (ap, bp) = (g.a.add(i * g.a_rs), g.b.add(j * g.b_rs));
            let (gap, gbp) = (grow::<G64>(g.ga, i, g.ga_rs), grow::<G64>(g.gb, j, g.gb_rs));
            let mut s0 = _mm256_setzero_ps();
            let mut s1 = _mm256_setzero_ps();
            let mut q = 0;
            while q + 16 <= g.c {
                let e0 = exp8(diff8::<G64>(gap.add(q * gs), gbp.add(q * gs)));
                let e1 = exp8(diff8::<G64>(gap.add((q + 8) * gs), gbp.add((q + 8) * gs)));
                let x0 = _mm256_mul_ps(_mm256_loadu_ps(ap.add(q)), _mm256_loadu_ps(bp.add(q)));
                let x1 = _mm256_mul_ps(_mm256_loadu_ps(ap.add(q + 8)), _mm256_loadu_ps(bp.add(q + 8)));
                s0 = _mm256_fmadd_ps(x0, e0, s0);
                s1 = _mm256_fmadd_ps(x1, e1, s1);
                q += 16;
            }
            while q < g.c {
                let w = (g.c - q).min(8);
                let (mut ta, mut tb) = ([0f32; 8], [0f32; 8]);
                let (mut tga, mut tgb) = ([0u8; 64], [0u8; 64]);
                std::ptr::copy_nonoverlapping(ap.add(q), ta.as_mut_ptr(), w);
                std::ptr::copy_nonoverlapping(bp.add(q), tb.as_mut_ptr(), w);
                std::ptr::copy_nonoverlapping(gap.add(q * gs), tga.as_mut_ptr(), w * gs);
                std::ptr::copy_nonoverlapping(gbp.add(q * gs), tgb.as_mut_ptr(), w * gs);
                let e = exp8(diff8::<G64>(tga.as_ptr(), tgb.as_ptr()));
                let x = _mm256_mul_ps(_mm256_loadu_ps(ta.as_ptr()), _mm256_loadu_ps(tb.as_ptr()));
                s0 = _mm256_fmadd_ps(x, e, s0);
                q += w;
            }
            let s = _mm256_add_ps(s0, s1);
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            _mm_cvtss_f32(h)
        }
    }

    /// AVX-512F entry point (contract: [`super::GatedFn`]).
    ///
    /// # Safety
    /// Operands valid for the reads and writes the arguments describe; only registered when
    /// the host has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn gated_avx512<const G64: bool>(
        n: i64,
        c: i64,
        a: *const f32,
        a_rs: i64,
        ga: *const u8,
        ga_rs: i64,
        b: *const f32,
        b_rs: i64,
        gb: *const u8,
        gb_rs: i64,
        out: *mut f32,
        out_rs: i64,
        out_cs: i64,
        strict: i64,
    ) {
        let g = Args::new(n, c, a, a_rs, ga, ga_rs, b, b_rs, gb, gb_rs, out, out_rs, out_cs, strict);
        // SAFETY: the caller's contract; the host has AVX-512F (checked by `select`).
        unsafe {
            if !factored16::<G64>(&g) {
                g.each(|i, j| dot16::<G64>(&g, i, j))
            }
        }
    }

    /// Largest `|gate - reference|` for which [`factored16`] splits the exponent: the factors
    /// then lie in `[e^-12, e^12]` (no overflow, no denormals for any `a`, `b` within 1e25 of
    /// 1), and rounding each exponent to f32 costs at most `12 * 2^-24` relative (7e-7) per
    /// factor.
    const SPLIT_RANGE: f32 = 12.0;
    /// Columns of `c` per pass of [`factored16`] (its scaled operands live on the stack).
    const SPLIT_COLS: usize = 64;

    /// `out` as one small matrix product when the exponents allow it (else false, `out` not
    /// written): with `r[c]` the gate of row `n / 2` of `ga`,
    /// `e^(ga[i,c] - gb[j,c]) = e^(ga[i,c] - r[c]) * e^(r[c] - gb[j,c])`, so
    /// `out = (a * e^(ga - r)) (b * e^(r - gb))^T`, masked to the kept `(i, j)`: 2 n c
    /// exponentials instead of about n^2 c / 2. Taken only for `n <= 16` and when every
    /// `|ga - r|` and `|r - gb|` (as the f32 exponents the factors use) is at most
    /// [`SPLIT_RANGE`] (a NaN gate fails the test);
    /// otherwise the pairwise form, which never forms a factor above 1 for the kept elements,
    /// is the one that cannot overflow.
    ///
    /// # Safety
    /// As [`gated_avx512`]'s operands.
    #[target_feature(enable = "avx512f")]
    unsafe fn factored16<const G64: bool>(g: &Args) -> bool {
        let (n, c) = (g.n, g.c);
        if n == 0 || n > 16 || c == 0 {
            return false;
        }
        let mid = n / 2;
        let gs = if G64 { 8 } else { 4 };
        // SAFETY (whole body): reads of rows < n at columns < c of the operands (masked at
        // the tail), writes to the stack buffers in bounds, and `out` at kept and dropped
        // (i, j) < n (the caller's contract).
        unsafe {
            let mut acc = [_mm512_setzero_ps(); 16];
            // a and b scaled, row-major [i][c] (rows past n stay zero); b transposed, [c][j]
            // with 16 lanes of j.
            let mut sa = [0f32; 16 * SPLIT_COLS];
            let mut sb = [0f32; 16 * SPLIT_COLS];
            let mut sbt = [0f32; SPLIT_COLS * 16];
            let rrow = grow::<G64>(g.ga, mid, g.ga_rs);
            let shared = g.shared_gates();
            let range = _mm512_set1_ps(SPLIT_RANGE);
            let mut q0 = 0;
            while q0 < c {
                let w = (c - q0).min(SPLIT_COLS);
                for i in 0..n {
                    let (ap, gap) = (g.a.add(i * g.a_rs), grow::<G64>(g.ga, i, g.ga_rs));
                    let (bp, gbp) = (g.b.add(i * g.b_rs), grow::<G64>(g.gb, i, g.gb_rs));
                    let mut q = 0;
                    while q < w {
                        let m: __mmask16 = if w - q >= 16 { !0 } else { ((1u32 << (w - q)) - 1) as __mmask16 };
                        let at = (q0 + q) * gs;
                        let xa = diff16::<G64>(gap.add(at), rrow.add(at), m);
                        // With one gate for both sides, r - gb is -(ga - r) exactly.
                        let xb = if shared { xa } else { diff16::<G64>(rrow.add(at), gbp.add(at), m) };
                        // |x| <= range, false for NaN; masked-off lanes are 0 and pass.
                        let ok = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(xa), range)
                            & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(xb), range);
                        if ok != !0 {
                            return false;
                        }
                        let ea = exp16(xa);
                        let eb = if shared { recip16(ea) } else { exp16(xb) };
                        let va = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ap.add(q0 + q)), ea);
                        let vb = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, bp.add(q0 + q)), eb);
                        _mm512_storeu_ps(sa.as_mut_ptr().add(i * SPLIT_COLS + q), va);
                        _mm512_storeu_ps(sb.as_mut_ptr().add(i * SPLIT_COLS + q), vb);
                        q += 16;
                    }
                }
                crate::cpu_support::gemm::x86::pack_t8(&mut sbt, sb.as_ptr(), SPLIT_COLS as isize, w, 16, 16);
                // All 16 rows (those past n are zero in `sa`), so the accumulators stay in
                // registers.
                for q in 0..w {
                    let bt = _mm512_loadu_ps(sbt.as_ptr().add(q * 16));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_fmadd_ps(_mm512_set1_ps(sa[i * SPLIT_COLS + q]), bt, *acc);
                    }
                }
                q0 += w;
            }
            let mut row = [0f32; 16];
            for (i, acc) in acc.iter().enumerate().take(n) {
                _mm512_storeu_ps(row.as_mut_ptr(), *acc);
                let kept = if g.strict { i } else { i + 1 };
                for (j, v) in row.iter().enumerate().take(n) {
                    let v = if j < kept { *v } else { 0.0 };
                    *g.out.offset(i as isize * g.out_rs + j as isize * g.out_cs) = v;
                }
            }
        }
        true
    }

    /// Whether [`gated_avx512`] (`wide`) or [`gated_avx2`] takes the factored form for these
    /// operands (f64 gates, contiguous rows of `c`); writes `out` as it would. For tests.
    ///
    /// # Safety
    /// The host has AVX-512F (`wide`) or AVX2 and FMA; the slices hold `n x c` (`out` `n x n`).
    #[cfg(test)]
    pub unsafe fn split_taken(
        wide: bool,
        n: usize,
        c: usize,
        [a, b]: [&[f32]; 2],
        [ga, gb]: [&[f64]; 2],
        out: &mut [f32],
        strict: bool,
    ) -> bool {
        let (ga, gb) = (ga.as_ptr() as *const u8, gb.as_ptr() as *const u8);
        let (n, c) = (n as i64, c as i64);
        let g = Args::new(n, c, a.as_ptr(), c, ga, c, b.as_ptr(), c, gb, c, out.as_mut_ptr(), n, 1, strict as i64);
        // SAFETY: the caller's contract.
        unsafe {
            if wide {
                factored16::<true>(&g)
            } else {
                factored8::<true>(&g)
            }
        }
    }

    /// The difference of the gates at `x`, `y` in the lanes of `m` (others 0).
    ///
    /// # Safety
    /// The masked lanes readable at each.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn diff16<const G64: bool>(x: *const u8, y: *const u8, m: __mmask16) -> __m512 {
        // SAFETY: the caller's contract (masked-off lanes are not read).
        unsafe {
            if G64 {
                let (x, y) = (x as *const f64, y as *const f64);
                let (m0, m1) = (m as __mmask8, (m >> 8) as __mmask8);
                let d0 = _mm512_sub_pd(_mm512_maskz_loadu_pd(m0, x), _mm512_maskz_loadu_pd(m0, y));
                let d1 = _mm512_sub_pd(_mm512_maskz_loadu_pd(m1, x.add(8)), _mm512_maskz_loadu_pd(m1, y.add(8)));
                let lo = _mm512_castps256_ps512(_mm512_cvtpd_ps(d0));
                let hi = _mm256_castps_pd(_mm512_cvtpd_ps(d1));
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(lo), hi))
            } else {
                let (x, y) = (x as *const f32, y as *const f32);
                _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x), _mm512_maskz_loadu_ps(m, y))
            }
        }
    }

    /// `out[i, j]` with 16 lanes.
    ///
    /// # Safety
    /// Rows `i` and `j` of the operands readable over `c`.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot16<const G64: bool>(g: &Args, i: usize, j: usize) -> f32 {
        let gs = if G64 { 8 } else { 4 };
        // SAFETY (whole body): masked reads of rows i and j at columns < c.
        unsafe {
            let (ap, bp) = (g.a.add(i * g.a_rs), g.b.add(j * g.b_rs));
            let (gap, gbp) = (grow::<G64>(g.ga, i, g.ga_rs), grow::<G64>(g.gb, j, g.gb_rs));
            let mut s0 = _mm512_setzero_ps();
            let mut s1 = _mm512_setzero_ps();
            let mut q = 0;
            while q + 32 <= g.c {
                let e0 = exp16(diff16::<G64>(gap.add(q * gs), gbp.add(q * gs), !0));
                let e1 = exp16(diff16::<G64>(gap.add((q + 16) * gs), gbp.add((q + 16) * gs), !0));
                let x0 = _mm512_mul_ps(_mm512_loadu_ps(ap.add(q)), _mm512_loadu_ps(bp.add(q)));
                let x1 = _mm512_mul_ps(_mm512_loadu_ps(ap.add(q + 16)), _mm512_loadu_ps(bp.add(q + 16)));
                s0 = _mm512_fmadd_ps(x0, e0, s0);
                s1 = _mm512_fmadd_ps(x1, e1, s1);
                q += 32;
            }
            while q < g.c {
                let w = (g.c - q).min(16);
                let m: __mmask16 = if w == 16 { !0 } else { ((1u32 << w) - 1) as __mmask16 };
                let e = exp16(diff16::<G64>(gap.add(q * gs), gbp.add(q * gs), m));
                let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ap.add(q)), _mm512_maskz_loadu_ps(m, bp.add(q)));
                s0 = _mm512_fmadd_ps(x, e, s0);
                q += w;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::x86::{exp16, exp8, gated_avx2, gated_avx512, recip16, recip8, split_taken};
    use std::arch::x86_64::*;

    /// Max error in ulps of `exp` over every 61st f32 bit pattern plus edge cases (as
    /// `vector_exp_accuracy_sweep` in tests/cpu_backend.rs does for vmath.rs); special values
    /// must be exact.
    fn sweep(f: &dyn Fn(&[f32], &mut [f32])) -> f64 {
        let mut xs: Vec<f32> = (0..u32::MAX / 61).map(|i| f32::from_bits(i * 61)).collect();
        xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 88.72283, 88.72284, -87.33655]);
        xs.extend([-103.27893, -103.97208, -104.0, -149.0, -149.5, -150.0, -126.0]);
        xs.resize(xs.len().div_ceil(16) * 16, 0.0);
        let mut ys = vec![0.0f32; xs.len()];
        f(&xs, &mut ys);
        let mut worst = 0.0f64;
        for (&x, &got) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            let w32 = want as f32;
            if want.is_nan() {
                assert!(got.is_nan(), "exp({x:e}) = {got:e}");
                continue;
            }
            if w32.is_infinite() {
                assert!(got == w32 || (got as f64 - want).abs() / want.abs() < 2e-7, "exp({x:e}) = {got:e}");
                continue;
            }
            if w32 == 0.0 {
                assert!(got.abs() <= f32::from_bits(1), "exp({x:e}) = {got:e}");
                continue;
            }
            let ulp = if w32.abs() < f32::MIN_POSITIVE {
                f32::from_bits(1) as f64
            } else {
                f32::from_bits(w32.abs().to_bits() & 0x7f80_0000) as f64 * f32::EPSILON as f64
            };
            let err = (got as f64 - want).abs() / ulp;
            assert!(!err.is_nan(), "exp({x:e}) = {got:e}");
            worst = worst.max(err);
        }
        worst
    }

    #[test]
    fn exp8_accuracy_sweep() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let worst = sweep(&|xs, ys| {
            for (x, y) in xs.chunks(8).zip(ys.chunks_mut(8)) {
                // SAFETY: AVX2 and FMA checked above; 8 lanes in each chunk.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) }
            }
        });
        eprintln!("exp8: max error {worst:.3} ulp");
        assert!(worst <= 2.0, "exp8: {worst} ulp");
    }

    /// Max error in ulps of a reciprocal over every 7th f32 in `[e^-12, e^12]`, the factors'
    /// range.
    fn recip_sweep(lanes: usize, f: &dyn Fn(&[f32], &mut [f32])) -> f64 {
        let (lo, hi) = ((-12.0f32).exp().to_bits(), 12.0f32.exp().to_bits());
        let mut xs: Vec<f32> = (lo..=hi).step_by(7).map(f32::from_bits).collect();
        xs.resize(xs.len().div_ceil(lanes) * lanes, 1.0);
        let mut ys = vec![0.0f32; xs.len()];
        f(&xs, &mut ys);
        let mut worst = 0.0f64;
        for (&x, &got) in xs.iter().zip(&ys) {
            let want = 1.0 / x as f64;
            let ulp = f32::from_bits((want as f32).to_bits() & 0x7f80_0000) as f64 * f32::EPSILON as f64;
            worst = worst.max((got as f64 - want).abs() / ulp);
        }
        worst
    }

    #[test]
    fn reciprocal_accuracy_over_the_factor_range() {
        if is_x86_feature_detected!("avx512f") {
            let worst = recip_sweep(16, &|xs, ys| {
                for (x, y) in xs.chunks(16).zip(ys.chunks_mut(16)) {
                    // SAFETY: AVX-512F checked above; 16 lanes in each chunk.
                    unsafe { _mm512_storeu_ps(y.as_mut_ptr(), recip16(_mm512_loadu_ps(x.as_ptr()))) }
                }
            });
            eprintln!("recip16: max error {worst:.3} ulp");
            assert!(worst <= 1.0, "recip16: {worst} ulp");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let worst = recip_sweep(8, &|xs, ys| {
                for (x, y) in xs.chunks(8).zip(ys.chunks_mut(8)) {
                    // SAFETY: AVX2 and FMA checked above; 8 lanes in each chunk.
                    unsafe { _mm256_storeu_ps(y.as_mut_ptr(), recip8(_mm256_loadu_ps(x.as_ptr()))) }
                }
            });
            eprintln!("recip8: max error {worst:.3} ulp");
            assert!(worst <= 2.5, "recip8: {worst} ulp");
        }
    }

    #[test]
    fn exp16_and_exp8_give_the_same_bits() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            return;
        }
        let mut xs: Vec<f32> = (0..u32::MAX / 61).map(|i| f32::from_bits(i * 61)).collect();
        xs.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 88.72284, -103.97208, -149.5, -150.0, -87.5, -126.0]);
        xs.resize(xs.len().div_ceil(16) * 16, 0.0);
        for x in xs.chunks(16) {
            let (mut wide, mut narrow) = ([0f32; 16], [0f32; 16]);
            // SAFETY: the features are checked above; 16 lanes each.
            unsafe {
                _mm512_storeu_ps(wide.as_mut_ptr(), exp16(_mm512_loadu_ps(x.as_ptr())));
                _mm256_storeu_ps(narrow.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr())));
                _mm256_storeu_ps(narrow.as_mut_ptr().add(8), exp8(_mm256_loadu_ps(x.as_ptr().add(8))));
            }
            for l in 0..16 {
                let same = wide[l].to_bits() == narrow[l].to_bits() || (wide[l].is_nan() && narrow[l].is_nan());
                assert!(same, "exp({:e}): exp16 {:e}, exp8 {:e}", x[l], wide[l], narrow[l]);
            }
        }
    }

    #[test]
    fn exp16_accuracy_sweep() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let worst = sweep(&|xs, ys| {
            for (x, y) in xs.chunks(16).zip(ys.chunks_mut(16)) {
                // SAFETY: AVX-512F checked above; 16 lanes in each chunk.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr(), exp16(_mm512_loadu_ps(x.as_ptr()))) }
            }
        });
        eprintln!("exp16: max error {worst:.3} ulp");
        assert!(worst <= 2.0, "exp16: {worst} ulp");
    }

    /// a, ga, b, gb.
    type Operands = (Vec<f32>, Vec<f64>, Vec<f32>, Vec<f64>);

    /// Random operands: gates a cumulative sum of log-gates whose steps are `-step * u`.
    fn operands(n: usize, c: usize, step: f64, seed: u64) -> Operands {
        let mut x = seed | 1;
        let mut u = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let a: Vec<f32> = (0..n * c).map(|_| (2.0 * u() - 1.0) as f32).collect();
        let b: Vec<f32> = (0..n * c).map(|_| (2.0 * u() - 1.0) as f32).collect();
        let mut g = vec![0.0f64; n * c];
        for i in 0..n {
            for q in 0..c {
                let prev = if i == 0 { 0.0 } else { g[(i - 1) * c + q] };
                g[i * c + q] = prev - step * u();
            }
        }
        (a, g.clone(), b, g)
    }

    /// Worst |got - want| / sum |terms| over the kept elements, and whether the others are 0.
    fn check(n: usize, c: usize, (a, ga, b, gb): &Operands, out: &[f32], strict: bool) -> f64 {
        let mut worst = 0.0f64;
        for i in 0..n {
            for j in 0..n {
                let kept = if strict { j < i } else { j <= i };
                let got = out[i * n + j] as f64;
                if !kept {
                    assert_eq!(got, 0.0, "({i}, {j}) is not kept");
                    continue;
                }
                let terms =
                    (0..c).map(|q| a[i * c + q] as f64 * b[j * c + q] as f64 * (ga[i * c + q] - gb[j * c + q]).exp());
                let (want, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                worst = worst.max((got - want).abs() / mag.max(1e-30));
            }
        }
        worst
    }

    /// The SIMD levels this host has: true for AVX-512F, false for AVX2 + FMA.
    fn levels() -> Vec<bool> {
        let mut v = vec![];
        if is_x86_feature_detected!("avx512f") {
            v.push(true);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(false);
        }
        v
    }

    #[test]
    fn the_factored_form_is_taken_when_the_exponents_are_small_and_matches_f64() {
        for wide in levels() {
            for (n, c) in [(1, 1), (5, 17), (16, 64), (16, 130), (12, 128)] {
                for strict in [false, true] {
                    // Steps up to 1.4 keep every exponent within 12 of row n/2's for n <= 16.
                    let ops = operands(n, c, 1.4, (n * 1000 + c) as u64);
                    let (a, ga, b, gb) = &ops;
                    let mut out = vec![f32::NAN; n * n];
                    // SAFETY: the level is the host's; the slices have the sizes passed.
                    assert!(unsafe { split_taken(wide, n, c, [a, b], [ga, gb], &mut out, strict) }, "n {n} c {c}");
                    let worst = check(n, c, &ops, &out, strict);
                    assert!(worst < 2e-6, "wide {wide} n {n} c {c} strict {strict}: {worst:e}");
                    // The entry point gives the same bits.
                    let mut via = vec![f32::NAN; n * n];
                    let (pa, pb) = (ga.as_ptr() as *const u8, gb.as_ptr() as *const u8);
                    let (ni, ci, st) = (n as i64, c as i64, strict as i64);
                    let entry = if wide { gated_avx512::<true> } else { gated_avx2::<true> };
                    let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), via.as_mut_ptr());
                    // SAFETY: as above.
                    unsafe { entry(ni, ci, ap, ci, pa, ci, bp, ci, pb, ci, op, ni, 1, st) };
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&via), bits(&out), "wide {wide} n {n} c {c}");
                }
            }
        }
    }

    #[test]
    fn one_gate_tile_for_both_sides_takes_the_reciprocal_and_matches_f64() {
        for wide in levels() {
            for (n, c) in [(1, 3), (7, 40), (16, 128), (16, 130)] {
                for strict in [false, true] {
                    let (a, ga, b, _) = operands(n, c, 1.4, (n * 77 + c) as u64);
                    let ops = (a, ga.clone(), b, ga);
                    let (a, g, b, _) = &ops;
                    let mut out = vec![f32::NAN; n * n];
                    // SAFETY: the level is the host's; the slices have the sizes passed (one
                    // gate slice for both sides, as the plan's diagonal blocks pass it).
                    assert!(unsafe { split_taken(wide, n, c, [a, b], [g, g], &mut out, strict) }, "n {n} c {c}");
                    let worst = check(n, c, &ops, &out, strict);
                    assert!(worst < 2e-6, "wide {wide} n {n} c {c} strict {strict}: {worst:e}");
                }
            }
            // Out of range on the shared side still refuses.
            let n = 16;
            let (a, g, b, _) = operands(n, 32, 3.0, 5);
            let mut out = vec![f32::NAN; n * n];
            // SAFETY: as above.
            assert!(!unsafe { split_taken(wide, n, 32, [&a, &b], [&g, &g], &mut out, false) });
            assert!(out.iter().all(|x| x.is_nan()));
        }
    }

    #[test]
    fn large_exponents_nan_gates_and_big_blocks_take_the_pairwise_form() {
        for wide in levels() {
            let n = 16;
            let (a, mut ga, b, gb) = operands(n, 32, 3.0, 9);
            let mut out = vec![f32::NAN; n * n];
            // SAFETY (all three): the level is the host's; the slices have the sizes passed.
            let big = unsafe { split_taken(wide, n, 32, [&a, &b], [&ga, &gb], &mut out, false) };
            assert!(!big, "exponents up to 24 from row 8");
            assert!(out.iter().all(|x| x.is_nan()), "a refused split writes nothing");
            ga[3] = f64::NAN;
            let (a1, _, b1, gb1) = operands(n, 32, 0.1, 9);
            assert!(!unsafe { split_taken(wide, n, 32, [&a1, &b1], [&ga, &gb1], &mut out, false) }, "a NaN gate");
            let (a2, ga2, b2, gb2) = operands(17, 8, 0.1, 9);
            let mut out2 = vec![f32::NAN; 17 * 17];
            assert!(!unsafe { split_taken(wide, 17, 8, [&a2, &b2], [&ga2, &gb2], &mut out2, false) }, "n = 17");
        }
    }
}
