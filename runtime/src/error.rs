//! The runtime's error type. Every message is one line that names the file or tensor at
//! fault and says what was expected, so a command-line tool can print it as it is.

use std::fmt;

use crate::tensor::Tensor;

/// Element types `read_safetensors` converts to f32, as the error messages spell them.
pub const READABLE_DTYPES: &str = "F32, F64, F16 and BF16 (and I32, I64 for index tensors)";

/// What went wrong while building, reading or writing tensors.
#[derive(Debug)]
pub enum RuntimeError {
    /// A file could not be read (missing, a directory, no permission...).
    Read { path: String, source: std::io::Error },
    /// A file could not be written.
    Write { path: String, reason: String },
    /// The file was read but is not a valid safetensors file.
    NotSafetensors { path: String, reason: String },
    /// A tensor in a file has an element type chunkc does not convert.
    UnsupportedDtype { name: String, dtype: String },
    /// A tensor the caller needs is not in the file.
    MissingTensor { name: String, path: String, available: Vec<String> },
    /// A tensor's shape is not the expected one. `dims` names the dimensions, e.g. `[B, T, H, K]`.
    ShapeMismatch { name: String, expected: Vec<usize>, got: Vec<usize>, dims: String },
    /// A tensor's data length does not match its shape.
    DataLength { shape: Vec<usize>, expected: usize, got: usize },
    /// A shape whose element count overflows `usize`.
    ShapeOverflow { shape: Vec<usize> },
    /// A tensor view or a call the runtime refuses: its reason, one line.
    BadTensor(String),
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Read { path, source } => write!(f, "cannot read {path}: {source}"),
            RuntimeError::Write { path, reason } => write!(f, "cannot write {path}: {reason}"),
            RuntimeError::NotSafetensors { path, reason } => {
                write!(f, "{path} is not a safetensors file: {reason}")
            }
            RuntimeError::UnsupportedDtype { name, dtype } => {
                write!(f, "tensor `{name}` has dtype {dtype}; chunkc reads {READABLE_DTYPES}")
            }
            RuntimeError::MissingTensor { name, path, available } => {
                if available.is_empty() {
                    write!(f, "tensor `{name}` is missing from {path} (it has no tensors)")
                } else {
                    write!(f, "tensor `{name}` is missing from {path} (it has: {})", available.join(", "))
                }
            }
            RuntimeError::ShapeMismatch { name, expected, got, dims } => {
                write!(f, "tensor `{name}`: expected shape {expected:?}")?;
                if !dims.is_empty() {
                    write!(f, " ({dims})")?;
                }
                write!(f, ", got {got:?}")
            }
            RuntimeError::DataLength { shape, expected, got } => {
                write!(f, "tensor data has {got} elements but shape {shape:?} needs {expected}")
            }
            RuntimeError::ShapeOverflow { shape } => {
                write!(f, "shape {shape:?} has more elements than this machine can address")
            }
            RuntimeError::BadTensor(why) => f.write_str(why),
        }
    }
}

// `source()` stays `None` on purpose: the Display text already includes the cause, and error
// reporters that walk the chain would otherwise print it twice.
impl std::error::Error for RuntimeError {}

/// Checks that `t` has shape `expected`. `dims_label` names the dimensions for the message:
/// `"B, T, H, K"` and `"[B, T, H, K]"` both print as `([B, T, H, K])`; `""` prints nothing.
///
/// ```
/// # use chunkc_runtime::{error::expect_shape, tensor::Tensor};
/// let k = Tensor::zeros(vec![1, 37, 2, 24]);
/// let err = expect_shape("k", &k, &[1, 37, 2, 16], "B, T, H, K").unwrap_err();
/// assert_eq!(err.to_string(), "tensor `k`: expected shape [1, 37, 2, 16] ([B, T, H, K]), got [1, 37, 2, 24]");
/// ```
pub fn expect_shape(name: &str, t: &Tensor, expected: &[usize], dims_label: &str) -> Result<(), RuntimeError> {
    if t.shape == expected {
        return Ok(());
    }
    let label = dims_label.trim();
    let dims = if label.is_empty() || label.starts_with('[') { label.to_string() } else { format!("[{label}]") };
    Err(RuntimeError::ShapeMismatch { name: name.to_string(), expected: expected.to_vec(), got: t.shape.clone(), dims })
}
