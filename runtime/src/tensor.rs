//! A dense f32 tensor, row-major (the last dimension is contiguous), as safetensors and
//! PyTorch lay them out.

use crate::error::RuntimeError;

/// A dense row-major f32 tensor. `data.len()` equals the product of `shape` (1 for `[]`);
/// the constructors keep that true, and code that edits the fields must too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor over `data`; fails unless `data.len()` is the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, RuntimeError> {
        let expected = Tensor::numel_of(&shape)?;
        if data.len() != expected {
            return Err(RuntimeError::DataLength { shape, expected, got: data.len() });
        }
        Ok(Tensor { shape, data })
    }

    /// The element count of `shape`, or an error if it overflows `usize`. Check shapes that
    /// come from a user with this before calling [`Tensor::zeros`] or [`Tensor::filled`].
    pub fn numel_of(shape: &[usize]) -> Result<usize, RuntimeError> {
        shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| RuntimeError::ShapeOverflow { shape: shape.to_vec() })
    }

    /// A tensor of zeros.
    ///
    /// # Panics
    /// If the element count of `shape` overflows `usize` (see [`Tensor::numel_of`]).
    pub fn zeros(shape: Vec<usize>) -> Tensor {
        Tensor::filled(shape, 0.0)
    }

    /// A tensor with every element `value`; `filled(shape, f32::NAN)` poisons an output so
    /// that elements a kernel failed to write show up in [`Tensor::count_non_finite`].
    ///
    /// # Panics
    /// If the element count of `shape` overflows `usize` (see [`Tensor::numel_of`]).
    pub fn filled(shape: Vec<usize>, value: f32) -> Tensor {
        let n = match Tensor::numel_of(&shape) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        };
        Tensor { shape, data: vec![value; n] }
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// How many elements are NaN or infinite.
    pub fn count_non_finite(&self) -> usize {
        self.data.iter().filter(|x| !x.is_finite()).count()
    }
}
