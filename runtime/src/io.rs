//! Reading and writing tensors as safetensors files. Reading converts F32, F64, F16 and BF16
//! to f32 (and I32 / I64 index tensors, such as `cu_seqlens`, where f32 holds them exactly);
//! writing always stores F32, little-endian.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};

use crate::error::RuntimeError;
use crate::tensor::Tensor;

/// Tensors by name.
pub type Tensors = BTreeMap<String, Tensor>;
/// A safetensors file's string-to-string metadata (`__metadata__` in its header).
pub type Metadata = BTreeMap<String, String>;

/// The header key safetensors reserves for the string-to-string metadata.
const METADATA_KEY: &str = "__metadata__";

/// Reads every tensor of a safetensors file, converted to f32, and the file's metadata
/// (empty when it has none).
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<(Tensors, Metadata), RuntimeError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Read { path: shown.clone(), source })?;
    let not_st = |e: SafeTensorError| RuntimeError::NotSafetensors { path: shown.clone(), reason: e.to_string() };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(not_st)?;
    let metadata: Metadata =
        header.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let file = SafeTensors::deserialize(&bytes).map_err(not_st)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.iter() {
        let data = to_f32(name, view.dtype(), view.data())?;
        let tensor = Tensor::new(view.shape().to_vec(), data).map_err(|e| RuntimeError::NotSafetensors {
            path: shown.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        tensors.insert(name.to_string(), tensor);
    }
    Ok((tensors, metadata))
}

/// Writes `tensors` as F32 little-endian safetensors, with `metadata` in the header if given.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<(), RuntimeError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let fail = |reason: String| RuntimeError::Write { path: shown.clone(), reason };
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if name == METADATA_KEY {
            return Err(fail(format!("`{METADATA_KEY}` is reserved and cannot name a tensor")));
        }
        let expected = Tensor::numel_of(&t.shape).map_err(|e| fail(format!("tensor `{name}`: {e}")))?;
        if t.data.len() != expected {
            let e = RuntimeError::DataLength { shape: t.shape.clone(), expected, got: t.data.len() };
            return Err(fail(format!("tensor `{name}`: {e}")));
        }
        views.push((
            name.as_str(),
            F32View { shape: &t.shape, bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect() },
        ));
    }
    let metadata: Option<HashMap<String, String>> = metadata.map(|m| m.into_iter().collect());
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| match e {
        SafeTensorError::IoError(io) => fail(io.to_string()),
        other => fail(other.to_string()),
    })
}

/// Looks up a tensor the caller needs; `path` only names the file in the error.
pub fn get_tensor<'a>(
    tensors: &'a BTreeMap<String, Tensor>,
    name: &str,
    path: impl AsRef<Path>,
) -> Result<&'a Tensor, RuntimeError> {
    tensors.get(name).ok_or_else(|| RuntimeError::MissingTensor {
        name: name.to_string(),
        path: path.as_ref().display().to_string(),
        available: tensors.keys().cloned().collect(),
    })
}

/// IEEE 754 binary16 (F16) to f32; exact for every value, NaN payloads kept.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        // Zero or subnormal: mant * 2^-24, exact in f32.
        0 => {
            let magnitude = mant as f32 * f32::from_bits(0x3380_0000); // 2^-24
            f32::from_bits(sign | magnitude.to_bits())
        }
        // Infinity (mant == 0) or NaN: widen the payload.
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        // Normal: rebias the exponent from 15 to 127.
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// bfloat16 (BF16) to f32: the upper half of an f32, so exact for every value.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, RuntimeError> {
    // safetensors has checked that `bytes` holds exactly shape.product() elements of `dtype`.
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        // Index tensors (`cu_seqlens`): exact in f32 up to 2^24.
        Dtype::I32 => {
            exact_integers(name, bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64))?
        }
        Dtype::I64 => exact_integers(
            name,
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        )?,
        other => return Err(RuntimeError::UnsupportedDtype { name: name.to_string(), dtype: other.to_string() }),
    })
}

/// Integers as f32, refusing any that f32 cannot hold exactly (past 2^24 in magnitude).
fn exact_integers(name: &str, values: impl Iterator<Item = i64>) -> Result<Vec<f32>, RuntimeError> {
    values
        .map(|x| {
            if x.unsigned_abs() <= 1 << 24 {
                Ok(x as f32)
            } else {
                Err(RuntimeError::BadTensor(format!(
                    "integer tensor `{name}` holds {x}, past 2^24, which chunkc's f32 tensors cannot hold exactly"
                )))
            }
        })
        .collect()
}

/// One tensor's F32 little-endian bytes, as safetensors' serializer wants them.
struct F32View<'a> {
    shape: &'a [usize],
    bytes: Vec<u8>,
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
