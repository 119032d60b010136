//! The warp-collective instructions, executed once for all participating lanes: `shfl.sync`,
//! `mma.sync` and `ldmatrix`. Fragment layouts follow the PTX ISA sections "Matrix
//! Fragments for mma.m16n8k16 with floating point type", "Matrix Fragments for
//! mma.m16n8k8" and "ldmatrix" (groupID = laneid >> 2, threadID_in_group = laneid % 4).

use super::half::{bf16_to_f32, f16_to_f32, tf32_operand};
use super::parse::{Mma, MmaKind, ShflMode};
use super::shared::Shared;

/// The registers of the 32 lanes of one warp (`regs` of the CTA, the warp's lane 0 at
/// thread `lo`).
pub struct Lanes<'a> {
    pub regs: &'a mut [u64],
    pub lo: usize,
    pub nregs: usize,
}

impl Lanes<'_> {
    pub fn get(&self, lane: usize, r: u32) -> u64 {
        self.regs[(self.lo + lane) * self.nregs + r as usize]
    }
    pub fn set(&mut self, lane: usize, r: u32, v: u64) {
        self.regs[(self.lo + lane) * self.nregs + r as usize] = v;
    }
}

/// One lane's `shfl.sync` inputs: the value `a`, the lane operand `b`, the packed clamp and
/// segment mask `c`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShflIn {
    pub a: u32,
    pub b: u32,
    pub c: u32,
}

/// `shfl.sync` for the lanes in `mask` (`input[l]` for every lane `l` of it). Returns each
/// participating lane's `(d, p)`. Per the ISA: `c` holds the clamp value in bits 0-4 and
/// the segment mask in bits 8-12; `maxLane = (lane & segmask) | (cval & ~segmask)`,
/// `minLane = lane & segmask`; the source lane `j` is `lane - b` (up, valid when
/// `j >= maxLane`), `lane + b` (down, valid when `j <= maxLane`), `lane ^ b` (bfly, same) or
/// `minLane | (b & ~segmask)` (idx, same); an invalid `j` reads the lane's own `a`.
pub fn shfl(mode: ShflMode, mask: u32, input: &[ShflIn; 32]) -> Result<[(u32, bool); 32], String> {
    let mut out = [(0u32, false); 32];
    for lane in 0..32i32 {
        if mask & (1 << lane) == 0 {
            continue;
        }
        let ShflIn { b, c, .. } = input[lane as usize];
        let bval = (b & 0x1F) as i32;
        let cval = (c & 0x1F) as i32;
        let seg = ((c >> 8) & 0x1F) as i32;
        let max_lane = (lane & seg) | (cval & !seg);
        let min_lane = lane & seg;
        let (j, ok) = match mode {
            ShflMode::Up => (lane - bval, lane - bval >= max_lane),
            ShflMode::Down => (lane + bval, lane + bval <= max_lane),
            ShflMode::Bfly => (lane ^ bval, (lane ^ bval) <= max_lane),
            ShflMode::Idx => {
                let j = min_lane | (bval & !seg);
                (j, j <= max_lane)
            }
        };
        let j = if ok { j } else { lane };
        if !(0..32).contains(&j) || mask & (1 << j) == 0 {
            return Err(format!("shfl.sync: lane {lane} reads lane {j}, which is not in the membermask {mask:#010x}"));
        }
        out[lane as usize] = (input[j as usize].a, ok);
    }
    Ok(out)
}

/// `mma.sync.aligned` for a full warp: D = A B + C with A 16xK (row), B Kx8 (col), C and D
/// 16x8 f32. Every product of two bf16/f16/tf32 values is exact in f64, and the K products
/// plus C are summed in f64 (in k order, C last) and rounded once to f32.
pub fn mma(m: &Mma, lanes: &mut Lanes, c_vals: &[[u32; 4]; 32]) {
    let k = if m.kind == MmaKind::Tf32 { 8 } else { 16 };
    let mut a = [[0f64; 16]; 16]; // [row][k]
    let mut b = [[0f64; 8]; 16]; // [k][col]
    let mut c = [[0f64; 8]; 16];
    let half = |bits: u64, kind: MmaKind| -> f64 {
        let h = bits as u16;
        if kind == MmaKind::Bf16 {
            bf16_to_f32(h) as f64
        } else {
            f16_to_f32(h) as f64
        }
    };
    for (lane, lane_c) in c_vals.iter().enumerate() {
        let g = lane >> 2;
        let tig = lane % 4;
        match m.kind {
            MmaKind::Bf16 | MmaKind::F16 => {
                // A: four .b32 registers holding a0..a7, two per register, low half first.
                for i in 0..8 {
                    let bits = lanes.get(lane, m.a[i / 2]) >> (16 * (i % 2));
                    let row = if i < 2 || (4..6).contains(&i) { g } else { g + 8 };
                    let col = tig * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
                    a[row][col] = half(bits, m.kind);
                }
                // B: two .b32 registers holding b0..b3.
                for i in 0..4 {
                    let bits = lanes.get(lane, m.b[i / 2]) >> (16 * (i % 2));
                    let row = tig * 2 + (i & 1) + if i >= 2 { 8 } else { 0 };
                    b[row][g] = half(bits, m.kind);
                }
            }
            MmaKind::Tf32 => {
                for i in 0..4 {
                    let bits = lanes.get(lane, m.a[i]) as u32;
                    let row = if i % 2 == 0 { g } else { g + 8 };
                    let col = if i < 2 { tig } else { tig + 4 };
                    a[row][col] = tf32_operand(bits) as f64;
                }
                for i in 0..2 {
                    let bits = lanes.get(lane, m.b[i]) as u32;
                    let row = if i == 0 { tig } else { tig + 4 };
                    b[row][g] = tf32_operand(bits) as f64;
                }
            }
        }
        for (i, v) in lane_c.iter().enumerate() {
            let row = if i < 2 { g } else { g + 8 };
            c[row][tig * 2 + (i & 1)] = f32::from_bits(*v) as f64;
        }
    }
    for lane in 0..32 {
        let g = lane >> 2;
        let tig = lane % 4;
        for i in 0..4 {
            let row = if i < 2 { g } else { g + 8 };
            let col = tig * 2 + (i & 1);
            let mut s = 0f64;
            for kk in 0..k {
                s += a[row][kk] * b[kk][col];
            }
            let d = (s + c[row][col]) as f32;
            lanes.set(lane, m.d[i], d.to_bits() as u64);
        }
    }
}

/// `ldmatrix.sync.aligned.m8n8.xN{.trans}.b16`: lane `8 m + r` gives the shared address of
/// row `r` of matrix `m` (16 bytes, 8 elements); lane `l` receives in register `m`
/// the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix m, or with `.trans` the
/// elements (rows 2(l%4), 2(l%4)+1, col l/4), the lower-numbered one in the low half.
/// `addr[l]` is lane l's shared address, `thread[l]` its thread (for the checks).
pub fn ldmatrix(
    num: usize,
    trans: bool,
    addrs: &[u64; 32],
    lo: u32,
    sh: &mut Shared,
) -> Result<[[u32; 4]; 32], String> {
    let mut rows = [[[0u16; 8]; 8]; 4];
    for (m, mat) in rows.iter_mut().enumerate().take(num) {
        for (r, row) in mat.iter_mut().enumerate() {
            let lane = 8 * m + r;
            let t = lo + lane as u32;
            let o = sh.range(t, addrs[lane], 16, "ldmatrix read")?;
            let mut bytes = [0u8; 16];
            sh.read(t, o, &mut bytes)?;
            for (c, e) in row.iter_mut().enumerate() {
                *e = u16::from_le_bytes([bytes[2 * c], bytes[2 * c + 1]]);
            }
        }
    }
    let mut out = [[0u32; 4]; 32];
    for (lane, regs) in out.iter_mut().enumerate() {
        let (g, tig) = (lane / 4, lane % 4);
        for (m, reg) in regs.iter_mut().enumerate().take(num) {
            let (lo, hi) = if trans {
                (rows[m][2 * tig][g], rows[m][2 * tig + 1][g])
            } else {
                (rows[m][g][2 * tig], rows[m][g][2 * tig + 1])
            };
            *reg = lo as u32 | (hi as u32) << 16;
        }
    }
    Ok(out)
}
