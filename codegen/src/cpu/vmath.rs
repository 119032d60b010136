//! Inline f32 math emitted as Cranelift IR: `exp`, `exp2`, `sigmoid`, `silu`, `log` and
//! `softplus` on f32 scalars or f32x4 vectors, so elementwise loops need no call per element.
//!
//! `exp(x)`: range reduction `x = n ln2 + r` with `n = round(x / ln2)` (by the 1.5 * 2^23
//! shifter trick, which also leaves `n` in the low mantissa bits) and Cody-Waite two-constant
//! ln2, then `e^r = 1 + r + r^2 P(r)` on `|r| <= ln2/2` with Cephes' degree-5 minimax `P`,
//! then scaling by `2^n` as two exact powers of two `2^(n>>1) * 2^(n - (n>>1))` built in the
//! exponent bits, so that results that overflow become +inf and results in the subnormal
//! range are rounded once, correctly (denormal-correct, no flush to zero). The argument is
//! clamped to [-104, 89] first (exp is 0 below and +inf above in f32); NaN propagates, -inf
//! gives 0, +inf gives +inf, -0 gives 1. `exp2` is the same with `n = round(x)`, `r = (x -
//! n) ln2`. Max relative error measured over the f32 range: see `codegen/tests/cpu_backend.rs`
//! (`vector_exp_accuracy_sweep`): 1.25 ulp.
//!
//! `sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e)` and `silu(x) = (x >= 0 ? x : x e) / (1 + e)`
//! with `e = exp(-|x|)` (no overflow; subnormal results for very negative x are kept, `x e`
//! is scaled by 2^n last so it is rounded once). Under 3.5 ulp.
//!
//! `log`: Cephes' logf (see [`VMath::log`]), under 1 ulp; `softplus(x) = max(x, 0) +
//! log1p(e^-|x|)` with log1p from log by the `ln(u) t / (u - 1)` correction, under 3.5 ulp
//! against the interpreter's branches (`x` above 20, `e^x` below -20).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln2 split so that `n * LN2_HI` is exact for |n| < 2^9 (the top 16 bits of ln2).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
const SHIFTER: f32 = 12_582_912.0;
/// Cephes expf: `e^r ~ 1 + r + r^2 (P0 + r (P1 + ... r P5))`, |r| <= ln2/2 (its P0,
/// 5.0000001201e-1, is 0.5 in f32).
const P: [f32; 6] = [0.5, 1.666_666_5e-1, 4.166_579_6e-2, 8.333_452e-3, 1.398_2e-3, 1.987_569_1e-4];

/// Emits inline f32 math into a function under construction.
pub(super) struct VMath<'a, 'f> {
    pub b: &'a mut FunctionBuilder<'f>,
    pub fma: bool,
}

impl VMath<'_, '_> {
    fn ity(ty: Type) -> Type {
        if ty.is_vector() {
            types::I32X4
        } else {
            types::I32
        }
    }

    fn f(&mut self, ty: Type, x: f32) -> Value {
        let s = self.b.ins().f32const(x);
        if ty.is_vector() {
            self.b.ins().splat(ty, s)
        } else {
            s
        }
    }

    fn i(&mut self, ty: Type, x: i32) -> Value {
        if ty.is_vector() {
            let s = self.b.ins().iconst(types::I32, x as i64);
            self.b.ins().splat(types::I32X4, s)
        } else {
            self.b.ins().iconst(types::I32, x as i64)
        }
    }

    fn cast(&mut self, to: Type, x: Value) -> Value {
        let flags = MemFlagsData::new().with_endianness(Endianness::Little);
        self.b.ins().bitcast(to, flags, x)
    }

    /// `a * b + c`, fused where the host has FMA.
    fn madd(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// `min(max(x, lo), hi)` (NaN stays NaN).
    fn clamp(&mut self, ty: Type, x: Value, lo: f32, hi: f32) -> Value {
        let (l, h) = (self.f(ty, lo), self.f(ty, hi));
        let x = self.b.ins().fmax(x, l);
        self.b.ins().fmin(x, h)
    }

    /// `e^r` for |r| <= ln2/2 (a little more is fine).
    fn exp_reduced(&mut self, ty: Type, r: Value) -> Value {
        let mut p = self.f(ty, P[5]);
        for c in P[..5].iter().rev() {
            let c = self.f(ty, *c);
            p = self.madd(p, r, c);
        }
        let r2 = self.b.ins().fmul(r, r);
        let one = self.f(ty, 1.0);
        let r1 = self.b.ins().fadd(r, one);
        self.madd(p, r2, r1)
    }

    /// `p * 2^n` for `n` (integers, `ity`) in [-150, 128], rounded once.
    fn scale(&mut self, ty: Type, p: Value, n: Value) -> Value {
        let n1 = self.b.ins().sshr_imm_u(n, 1);
        let n2 = self.b.ins().isub(n, n1);
        let bias = self.i(ty, 127);
        let pow = |s: &mut Self, k: Value| {
            let e = s.b.ins().iadd(k, bias);
            let e = s.b.ins().ishl_imm_u(e, 23);
            s.cast(ty, e)
        };
        let (s1, s2) = (pow(self, n1), pow(self, n2));
        let y = self.b.ins().fmul(p, s1);
        self.b.ins().fmul(y, s2)
    }

    /// Splits `t = x * mul + SHIFTER` into the rounded float `n` and its integer.
    fn round_shift(&mut self, ty: Type, x: Value, mul: f32) -> (Value, Value) {
        let (m, sh) = (self.f(ty, mul), self.f(ty, SHIFTER));
        let t = self.madd(x, m, sh);
        let nf = self.b.ins().fsub(t, sh);
        let it = Self::ity(ty);
        let ti = self.cast(it, t);
        let shi = self.i(ty, SHIFTER.to_bits() as i32);
        let ni = self.b.ins().isub(ti, shi);
        (nf, ni)
    }

    /// `e^x = p * 2^n`: returns `p` (about 0.7 to 1.4) and the integer `n`.
    /// Arguments are clamped to [lo, 89]; `lo` in [-174, -104].
    fn exp_parts(&mut self, ty: Type, x: Value, lo: f32) -> (Value, Value) {
        let x = self.clamp(ty, x, lo, 89.0);
        let (nf, ni) = self.round_shift(ty, x, LOG2E);
        let (hi, lo) = (self.f(ty, -LN2_HI), self.f(ty, -LN2_LO));
        let r = self.madd(nf, hi, x);
        let r = self.madd(nf, lo, r);
        (self.exp_reduced(ty, r), ni)
    }

    /// `e^x` (f32 or f32x4).
    pub fn exp(&mut self, ty: Type, x: Value) -> Value {
        let (p, n) = self.exp_parts(ty, x, -104.0);
        self.scale(ty, p, n)
    }

    /// `2^x` (f32 or f32x4).
    pub fn exp2(&mut self, ty: Type, x: Value) -> Value {
        let x = self.clamp(ty, x, -152.0, 129.0);
        let (nf, ni) = self.round_shift(ty, x, 1.0);
        let f = self.b.ins().fsub(x, nf);
        let ln2 = self.f(ty, std::f32::consts::LN_2);
        let r = self.b.ins().fmul(f, ln2);
        let p = self.exp_reduced(ty, r);
        self.scale(ty, p, ni)
    }

    /// `c ? a : b` lane by lane (`c` from an fcmp of `ty`).
    fn sel(&mut self, ty: Type, c: Value, a: Value, b: Value) -> Value {
        if ty.is_vector() {
            // The vector fcmp gives an all-ones / all-zeros i32x4 lane mask.
            let (a, b) = (self.cast(types::I32X4, a), self.cast(types::I32X4, b));
            let r = self.b.ins().bitselect(c, a, b);
            self.cast(ty, r)
        } else {
            self.b.ins().select(c, a, b)
        }
    }

    /// `(x >= 0 ? f : f e) / (1 + e)` with `e = exp(-|x|)`: sigmoid for `f = 1`, silu for
    /// `f = x`. `f e` is scaled by 2^n last, so it is rounded once even when `e` alone would be
    /// subnormal; for silu (`f` up to 2^128) it is 0 below x = -112, where |x| e^x < 2^-150.
    fn sigmoid_times(&mut self, ty: Type, x: Value, f: Value, silu: bool) -> Value {
        let ax = self.b.ins().fabs(x);
        let nx = self.b.ins().fneg(ax);
        let lo = if silu { -112.0 } else { -104.0 };
        let (p, n) = self.exp_parts(ty, nx, lo);
        let e = self.scale(ty, p, n);
        let fp = self.b.ins().fmul(f, p);
        let mut fe = self.scale(ty, fp, n);
        if silu {
            // x * 0 below the clamp: -0, or NaN for x = -inf (as x * sigmoid(x) gives).
            let (zero, lim) = (self.f(ty, 0.0), self.f(ty, lo));
            let inside = self.b.ins().fcmp(FloatCC::GreaterThanOrEqual, nx, lim);
            let z = self.b.ins().fmul(f, zero);
            fe = self.sel(ty, inside, fe, z);
        }
        let one = self.f(ty, 1.0);
        let den = self.b.ins().fadd(one, e);
        let zero = self.f(ty, 0.0);
        // x >= 0 (false for NaN, which then gives NaN through e).
        let pos = self.b.ins().fcmp(FloatCC::GreaterThanOrEqual, x, zero);
        let num = self.sel(ty, pos, f, fe);
        self.b.ins().fdiv(num, den)
    }

    /// `c ? a : b` lane by lane for integers (`ity(ty)`; `c` from an fcmp of `ty`).
    fn isel(&mut self, ty: Type, c: Value, a: Value, b: Value) -> Value {
        if ty.is_vector() {
            self.b.ins().bitselect(c, a, b)
        } else {
            self.b.ins().select(c, a, b)
        }
    }

    /// `ln x` (f32 or f32x4): Cephes' logf. `x = m 2^e` with `m` in [sqrt(1/2), sqrt(2))
    /// (subnormal `x` scaled by 2^23 first), `ln m = f - f^2/2 + f^3 P(f)` with `f = m - 1`,
    /// plus `e ln2` in two parts. `ln 0 = -inf`, `ln x = NaN` for `x < 0` and NaN, `ln inf =
    /// inf`.
    pub fn log(&mut self, ty: Type, x: Value) -> Value {
        const Q: [f32; 9] = [
            3.333_333e-1,
            -2.499_999_4e-1,
            2.000_071_4e-1,
            -1.666_805_8e-1,
            1.424_932_3e-1,
            -1.242_014_1e-1,
            1.167_699_9e-1,
            -1.151_461e-1,
            7.037_683_6e-2,
        ];
        let it = Self::ity(ty);
        let tiny = self.f(ty, f32::MIN_POSITIVE);
        let small = self.b.ins().fcmp(FloatCC::LessThan, x, tiny);
        let big = self.f(ty, 8_388_608.0);
        let xs = self.b.ins().fmul(x, big);
        let x1 = self.sel(ty, small, xs, x);
        let (adj, zero_i) = (self.i(ty, -23 - 127), self.i(ty, -127));
        let bias = self.isel(ty, small, adj, zero_i);
        let bits = self.cast(it, x1);
        let e = self.b.ins().ushr_imm_u(bits, 23);
        let e = self.b.ins().iadd(e, bias);
        let (mmask, one_bits) = (self.i(ty, 0x007f_ffff), self.i(ty, 0x3f80_0000));
        let mb = self.b.ins().band(bits, mmask);
        let mb = self.b.ins().bor(mb, one_bits);
        let m = self.cast(ty, mb);
        let sqrt2 = self.f(ty, std::f32::consts::SQRT_2);
        let hi = self.b.ins().fcmp(FloatCC::GreaterThan, m, sqrt2);
        let half = self.f(ty, 0.5);
        let mh = self.b.ins().fmul(m, half);
        let m = self.sel(ty, hi, mh, m);
        let (one_i, zi) = (self.i(ty, 1), self.i(ty, 0));
        let inc = self.isel(ty, hi, one_i, zi);
        let e = self.b.ins().iadd(e, inc);
        let ef = self.b.ins().fcvt_from_sint(ty, e);
        let one = self.f(ty, 1.0);
        let f = self.b.ins().fsub(m, one);
        let z = self.b.ins().fmul(f, f);
        let mut p = self.f(ty, Q[8]);
        for c in Q[..8].iter().rev() {
            let c = self.f(ty, *c);
            p = self.madd(p, f, c);
        }
        let fz = self.b.ins().fmul(f, z);
        let (c2, c1) = (self.f(ty, -2.121_944_4e-4), self.f(ty, -0.5));
        let y = self.b.ins().fmul(fz, p);
        let y = self.madd(ef, c2, y);
        let y = self.madd(z, c1, y);
        let r = self.b.ins().fadd(f, y);
        let ln2 = self.f(ty, 0.693_359_4);
        let r = self.madd(ef, ln2, r);
        // Special inputs.
        let zero = self.f(ty, 0.0);
        let (ninf, inf, nan) = (self.f(ty, f32::NEG_INFINITY), self.f(ty, f32::INFINITY), self.f(ty, f32::NAN));
        let is_inf = self.b.ins().fcmp(FloatCC::Equal, x, inf);
        let r = self.sel(ty, is_inf, inf, r);
        let is_zero = self.b.ins().fcmp(FloatCC::Equal, x, zero);
        let r = self.sel(ty, is_zero, ninf, r);
        let bad = self.b.ins().fcmp(FloatCC::UnorderedOrLessThan, x, zero);
        self.sel(ty, bad, nan, r)
    }

    /// `ln(1 + e^x)` (f32 or f32x4) as `max(x, 0) + log1p(exp(-|x|))`, with `log1p(t) = ln(u)
    /// t / (u - 1)` for `u = 1 + t` (`t` where `u` rounds to 1).
    pub fn softplus(&mut self, ty: Type, x: Value) -> Value {
        let ax = self.b.ins().fabs(x);
        let nx = self.b.ins().fneg(ax);
        let t = self.exp(ty, nx);
        let one = self.f(ty, 1.0);
        let u = self.b.ins().fadd(one, t);
        let lu = self.log(ty, u);
        let um1 = self.b.ins().fsub(u, one);
        let q = self.b.ins().fdiv(t, um1);
        let l = self.b.ins().fmul(lu, q);
        let is_one = self.b.ins().fcmp(FloatCC::Equal, u, one);
        let l = self.sel(ty, is_one, t, l);
        let zero = self.f(ty, 0.0);
        let m = self.b.ins().fmax(x, zero);
        self.b.ins().fadd(m, l)
    }

    /// `1 / (1 + e^-x)` (f32 or f32x4).
    pub fn sigmoid(&mut self, ty: Type, x: Value) -> Value {
        let one = self.f(ty, 1.0);
        self.sigmoid_times(ty, x, one, false)
    }

    /// `x / (1 + e^-x)` (f32 or f32x4).
    pub fn silu(&mut self, ty: Type, x: Value) -> Value {
        self.sigmoid_times(ty, x, x, true)
    }
}
