//! The narrow float formats of the tensor cores (`.f16`, `.bf16`, `.tf32`) as bit patterns,
//! with exact IEEE rounding from f32 and exact widening back to f32 (Rust has no stable
//! `f16`, and the simulator must not depend on the host's conversions anyway).
//!
//! NaN results are the canonical NaNs (`0x7FFF` for f16 and bf16, `0x7FFF_FFFF` for tf32):
//! the PTX ISA leaves the payload of a converted NaN unspecified, so callers should test
//! for NaN-ness, never for NaN bits.

/// Canonical NaN of `.f16` and `.bf16`.
pub const NAN16: u16 = 0x7FFF;
/// Canonical NaN of `.tf32` (in its 32-bit container).
pub const NAN_TF32: u32 = 0x7FFF_FFFF;

/// f32 -> binary16, round to nearest, ties to even; overflow gives infinity, tiny values
/// become subnormals or zero.
pub fn f32_to_f16_rn(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32;
    let man = b & 0x7F_FFFF;
    if exp == 0xFF {
        return if man != 0 { NAN16 } else { sign | 0x7C00 };
    }
    if exp == 0 {
        // f32 subnormals are below 2^-126, far under half of f16's smallest subnormal.
        return sign;
    }
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7C00;
    }
    // Significand with the hidden bit: x = m * 2^(e - 23). The result's quantum is
    // 2^max(e - 10, -24) (normals keep 11 bits, subnormals are multiples of 2^-24), so
    // `s` bits of m are rounded away.
    let m = man | 0x80_0000;
    let s = 13.max(-1 - e) as u32;
    if s >= 25 {
        return sign; // m * 2^-s < 1/2: rounds to zero (never a tie: m < 2^24)
    }
    let mut r = m >> s;
    let rem = m & ((1 << s) - 1);
    let half = 1 << (s - 1);
    if rem > half || (rem == half && r & 1 == 1) {
        r += 1;
    }
    let bits = if s == 13 {
        // Normal: r in [2^10, 2^11]; a carry into 2^11 bumps the exponent by itself.
        (((e + 15) as u32) << 10) + r - 1024
    } else {
        r // subnormal, or exactly the smallest normal when r reached 2^10
    };
    if bits >= 0x7C00 {
        sign | 0x7C00
    } else {
        sign | bits as u16
    }
}

/// binary16 -> f32, exact.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match exp {
        0 => {
            // Subnormal (or zero): man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        0x1F => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 -> bfloat16, round to nearest, ties to even (bf16 has f32's exponent range, so
/// this is a rounding of the low 16 bits; overflow carries into infinity).
pub fn f32_to_bf16_rn(x: f32) -> u16 {
    if x.is_nan() {
        return NAN16;
    }
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    ((b + 0x7FFF + lsb) >> 16) as u16
}

/// bfloat16 -> f32, exact.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 -> tf32 (1 + 8 + 10 bits, kept in the upper 19 bits of a 32-bit container, the low
/// 13 bits zero). `ties_away` selects `.rna` (ties away from zero), else `.rn` (ties even).
pub fn f32_to_tf32(x: f32, ties_away: bool) -> u32 {
    if x.is_nan() {
        return NAN_TF32;
    }
    let b = x.to_bits();
    if x.is_infinite() {
        return b;
    }
    // Sign-magnitude: adding half a unit to the magnitude and truncating rounds halfway
    // cases away from zero; a carry out of the mantissa bumps the exponent (to infinity
    // past the largest finite value).
    let add = if ties_away { 0x1000 } else { 0xFFF + ((b >> 13) & 1) };
    (b + add) & !0x1FFF
}

/// The value an mma reads from a `.tf32` operand register: the upper 19 bits (the hardware
/// ignores the low 13 mantissa bits, so an operand that was not rounded is truncated).
pub fn tf32_operand(bits: u32) -> f32 {
    f32::from_bits(bits & !0x1FFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_of_every_finite_half() {
        for h in 0..=0xFFFFu16 {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert_eq!(f32_to_f16_rn(x), NAN16);
            } else {
                assert_eq!(f32_to_f16_rn(x), h, "{h:#06x} -> {x}");
            }
        }
    }

    #[test]
    fn f16_rounding_matches_f64_reference() {
        // Midpoints between consecutive halves round to the even one; nudged ones go the
        // way of the nudge.
        for h in 0..0x7BFFu16 {
            let (a, b) = (f16_to_f32(h) as f64, f16_to_f32(h + 1) as f64);
            let mid = ((a + b) / 2.0) as f32; // exact: halves have 11 bits
            let even = if h & 1 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16_rn(mid), even, "{h:#06x}");
            assert_eq!(f32_to_f16_rn(f32::from_bits(mid.to_bits() + 1)), h + 1);
            assert_eq!(f32_to_f16_rn(f32::from_bits(mid.to_bits() - 1)), h);
        }
    }
}
