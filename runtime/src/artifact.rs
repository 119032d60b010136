//! The artifact format: the launch metadata that travels with an emitted kernel's PTX text
//! (entry, grid, block, memory, and each `.param` with its element type), serialised as
//! JSON next to the `.ptx` file, one per phase of a program (whose tensors and phases
//! `crate::program` describes). It lives in the runtime, not the compiler, so that a
//! program embedding kernels generated ahead of time can load and launch them
//! ([`crate::abi::bind_program`]) without the compiler.
//!
//! The compiler re-exports these types (`chunkc_codegen::ptx`, `chunkc_codegen::ir::ElemType`)
//! and fixes the schedule type parameter of [`LaunchMeta`] to its own `PtxSchedule`; here the
//! schedule is opaque (raw JSON by default), since no launcher needs it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a tensor in memory (tiles are f32 or f64 whatever the tensor holds).
///
/// A bf16 or f16 tensor's memory is its little-endian 16-bit elements. Where a backend takes
/// tensors as `f32` slices (the interpreter, the CPU backend), the slice is a container for
/// those bytes: element e is the low (e even) or high (e odd) half of slot e / 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElemType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ElemType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::Bf16 | ElemType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::Bf16 => "bf16",
            ElemType::F16 => "f16",
        }
    }

    /// The f32 value of 16-bit element `bits` (exact: every bf16 and f16 value is an f32).
    pub fn widen16(self, bits: u16) -> f32 {
        match self {
            ElemType::Bf16 | ElemType::F32 => crate::io::bf16_to_f32(bits),
            ElemType::F16 => crate::io::f16_to_f32(bits),
        }
    }

    /// Rounds `x` to this type (to nearest even; NaN stays NaN), as 16 bits (F32: the high half).
    pub fn narrow16(self, x: f32) -> u16 {
        match self {
            ElemType::F16 => f32_to_f16(x),
            _ => {
                let b = x.to_bits();
                if x.is_nan() {
                    // Keep the sign and set the quiet bit, so a payload in the low half
                    // cannot round to infinity.
                    return ((b >> 16) | 0x40) as u16;
                }
                let round = 0x7FFF + ((b >> 16) & 1);
                (b.wrapping_add(round) >> 16) as u16
            }
        }
    }

    /// `data` as this type's little-endian bytes: f32 as it is, bf16 and f16 rounded to
    /// nearest even ([`ElemType::narrow16`]; out of range: infinity, as IEEE rounds).
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            ElemType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => data.iter().flat_map(|&v| self.narrow16(v).to_le_bytes()).collect(),
        }
    }
}

/// f32 to IEEE binary16, rounding to nearest even (overflow to inf, underflow to subnormals
/// and zero).
fn f32_to_f16(x: f32) -> u16 {
    let sign = ((x.to_bits() >> 16) & 0x8000) as u16;
    if x.is_nan() {
        return sign | 0x7E00;
    }
    let a = x.abs() as f64;
    // 65520 is halfway between the largest f16 (65504) and the next step: ties go to even,
    // which is infinity.
    if a >= 65520.0 {
        return sign | 0x7C00;
    }
    // Scale to units of the smallest subnormal (2^-24) or of the value's ulp, round to even.
    let e = if a < 2f64.powi(-14) { -24 } else { a.log2().floor() as i32 - 10 };
    let v = (a / 2f64.powi(e)).round_ties_even() * 2f64.powi(e);
    // Re-encode v (exact in f16 by construction; rounding up may have carried to 2^(e+11)).
    if v == 0.0 {
        return sign;
    }
    if v < 2f64.powi(-14) {
        return sign | (v / 2f64.powi(-24)) as u16;
    }
    let ev = v.log2().floor() as i32;
    let man = (v / 2f64.powi(ev) - 1.0) * 1024.0;
    sign | (((ev + 15) as u16) << 10) | man as u16
}

/// The GPU architecture a kernel is emitted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sm {
    /// Ampere (A100): PTX ISA 7.8.
    #[serde(rename = "sm_80")]
    Sm80,
    /// Hopper (H100): PTX ISA 8.0.
    #[serde(rename = "sm_90")]
    Sm90,
}

impl Sm {
    /// The `.target` name, also ptxas's `-arch`.
    pub fn name(self) -> &'static str {
        match self {
            Sm::Sm80 => "sm_80",
            Sm::Sm90 => "sm_90",
        }
    }

    /// The compute capability as `major * 10 + minor` (a device below it cannot load the PTX).
    pub fn capability(self) -> u32 {
        match self {
            Sm::Sm80 => 80,
            Sm::Sm90 => 90,
        }
    }

    /// The `.version` the emitted PTX declares.
    pub fn isa_version(self) -> &'static str {
        match self {
            Sm::Sm80 => "7.8",
            Sm::Sm90 => "8.0",
        }
    }

    /// Parses `sm_80` / `sm_90` (also `80`, `90`).
    pub fn parse(s: &str) -> Option<Sm> {
        match s.trim().trim_start_matches("sm_") {
            "80" => Some(Sm::Sm80),
            "90" => Some(Sm::Sm90),
            _ => None,
        }
    }
}

impl fmt::Display for Sm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the grid maps to the kernel's (b, h) or (b, h, V-tile) grid points, and the chunks of
/// a chunk-parallel phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grid {
    /// `gridDim = (batch * heads, 1, 1)`; `blockIdx.x = b * heads + h`.
    BatchHeadsX,
    /// V split into `vtiles` tiles of V / vtiles columns (as FLA's grid):
    /// `gridDim = (vtiles, batch * heads, 1)`; `blockIdx.x` = the V-tile,
    /// `blockIdx.y = b * heads + h`.
    BatchHeadsVTiles { vtiles: u32 },
    /// A chunk-parallel phase, one CTA per (V-tile, chunk, b, h), as FLA's `chunk_fwd_o`:
    /// `gridDim = (vtiles, ceil(T / chunk), batch * heads)`; `blockIdx.x` = the V-tile,
    /// `blockIdx.y` = the chunk, `blockIdx.z = b * heads + h`.
    VTilesChunksBatchHeads { vtiles: u32, chunk: u32 },
}

impl Grid {
    /// The launch's grid dimensions for a problem of `batch` x `heads` grid points and
    /// `seq_len` tokens; None when a dimension does not fit the grid's u32.
    pub fn dims(self, batch: usize, heads: usize, seq_len: usize) -> Option<[u32; 3]> {
        let bh = u32::try_from(batch.checked_mul(heads)?).ok()?;
        Some(match self {
            Grid::BatchHeadsX => [bh, 1, 1],
            Grid::BatchHeadsVTiles { vtiles } => [vtiles, bh, 1],
            Grid::VTilesChunksBatchHeads { vtiles, chunk } => {
                [vtiles, u32::try_from(seq_len.div_ceil(chunk.max(1) as usize)).ok()?, bh]
            }
        })
    }

    /// V-tiles per head (1 for [`Grid::BatchHeadsX`]).
    pub fn vtiles(self) -> u32 {
        match self {
            Grid::BatchHeadsX => 1,
            Grid::BatchHeadsVTiles { vtiles } | Grid::VTilesChunksBatchHeads { vtiles, .. } => vtiles,
        }
    }
}

/// Where the tiles of one CTA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TileSpace {
    /// Dynamic shared memory (`dynamic_smem_bytes` per CTA).
    Shared,
    /// A global scratch buffer parameter, `scratch_bytes_per_cta` per CTA.
    Global,
}

/// How a kernel parameter is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamAccess {
    Read,
    Write,
    ReadWrite,
}

/// What a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A pointer to the elements of a tensor, of type [`ParamMeta::elem`] (the kernel's IR
    /// parameters, in order).
    Tensor,
    /// A pointer to the global scratch buffer (`grid size * scratch_bytes_per_cta` bytes).
    Scratch,
    /// A 64-bit integer: `batch`, `heads` or `seq_len`.
    Scalar,
}

/// One `.param` of the entry, in declaration order. Every parameter is 8 bytes (`.u64`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamMeta {
    pub name: String,
    pub access: ParamAccess,
    /// True for pointers (global addresses), false for scalars.
    pub pointer: bool,
    pub kind: ParamKind,
    /// The alignment (bytes) the kernel assumes of this pointer: 16 where 16-byte `cp.async`
    /// copies read the tensor (`cudaMalloc` gives 256), else the element size (0 for scalars).
    #[serde(default)]
    pub align: usize,
    /// Element type of a tensor (f32 for scratch and scalars).
    #[serde(default)]
    pub elem: ElemType,
}

/// Everything a launcher needs besides the PTX text. `S` is the schedule the kernel was
/// emitted with (the compiler's `PtxSchedule`; raw JSON for a launcher that does not care).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchMeta<S = serde_json::Value> {
    /// The `.entry` name.
    pub entry: String,
    pub target: Sm,
    pub grid: Grid,
    /// Threads per CTA (`blockDim`).
    pub block: [u32; 3],
    pub tile_space: TileSpace,
    /// Dynamic shared memory per CTA (0 when the tiles are in global scratch).
    pub dynamic_smem_bytes: usize,
    /// Global scratch per CTA (0 when the tiles are in shared memory).
    pub scratch_bytes_per_cta: usize,
    /// Static shared memory per CTA (the 16-bit staging buffer of tensor-core dots; 0 without).
    /// A launch needs `dynamic_smem_bytes + static_smem_bytes` of shared memory per CTA.
    #[serde(default)]
    pub static_smem_bytes: usize,
    /// The schedule the kernel was emitted with.
    #[serde(default)]
    pub schedule: S,
    /// All `.param`s in order: the tensors, `scratch` (global placement only), then the scalars.
    pub params: Vec<ParamMeta>,
    /// Names of the scalar parameters, in order (`batch`, `heads`, `seq_len`).
    pub scalars: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_and_inf() {
        let e = ElemType::Bf16;
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(e.narrow16(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3 * 2^-8 is halfway up from an odd mantissa: rounds up.
        assert_eq!(e.narrow16(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(e.narrow16(f32::MAX), 0x7F80, "overflow rounds to +inf");
        assert_eq!(e.narrow16(f32::NEG_INFINITY), 0xFF80);
        assert!(e.widen16(e.narrow16(f32::NAN)).is_nan());
        // A NaN whose payload lies only in the low half stays NaN.
        assert!(e.widen16(e.narrow16(f32::from_bits(0x7F80_0001))).is_nan());
    }

    #[test]
    fn f16_rounds_to_nearest_even_overflows_to_inf_and_keeps_subnormals() {
        let e = ElemType::F16;
        assert_eq!(e.narrow16(1.0), 0x3C00);
        assert_eq!(e.narrow16(65504.0), 0x7BFF);
        assert_eq!(e.narrow16(65519.0), 0x7BFF, "below the halfway point: the largest finite");
        assert_eq!(e.narrow16(65520.0), 0x7C00, "the halfway point ties to even: infinity");
        assert_eq!(e.narrow16(-1e9), 0xFC00);
        assert_eq!(e.narrow16(2f32.powi(-24)), 0x0001, "smallest subnormal");
        assert_eq!(e.narrow16(2f32.powi(-26)), 0x0000, "a quarter of it rounds to zero");
        assert!(e.widen16(e.narrow16(f32::NAN)).is_nan());
        // Round trip of every finite f16.
        for bits in (0u16..=0xFFFF).filter(|b| (b >> 10) & 0x1F != 0x1F) {
            assert_eq!(e.narrow16(e.widen16(bits)), bits, "{bits:#06x}");
        }
    }

    #[test]
    fn encode_packs_little_endian() {
        assert_eq!(ElemType::Bf16.encode(&[1.0, -2.0]), vec![0x80, 0x3F, 0x00, 0xC0]);
        assert_eq!(ElemType::F16.encode(&[1.0]), vec![0x00, 0x3C]);
        assert_eq!(ElemType::F32.encode(&[1.0]), 1f32.to_le_bytes().to_vec());
    }

    /// Metadata written before the element type and static shared memory existed still loads.
    #[test]
    fn older_json_loads_with_defaults() {
        let json = r#"{"entry":"k","target":"sm_80","grid":"batch_heads_x","block":[256,1,1],
            "tile_space":"shared","dynamic_smem_bytes":1024,"scratch_bytes_per_cta":0,
            "params":[{"name":"q","access":"read","pointer":true,"kind":"tensor"}],
            "scalars":["batch","heads","seq_len"]}"#;
        let meta: LaunchMeta = serde_json::from_str(json).expect("loads");
        assert_eq!(meta.params[0].elem, ElemType::F32);
        assert_eq!(meta.static_smem_bytes, 0);
        assert_eq!(meta.target.capability(), 80);
    }
}
