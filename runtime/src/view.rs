//! Borrowed tensors: the library's view of the caller's memory (a slice, its shape, its
//! strides, its element type), so that a program reads f32 inputs where they are.
//!
//! The compiled kernels read dense row-major f32 rows. A contiguous f32 view is handed to
//! them as it is; a strided view or a bf16 / f16 one is packed into an f32 copy once per call
//! (the state and the accumulation are f32 either way).

use crate::artifact::ElemType;
use crate::error::RuntimeError as Error;
use std::borrow::Cow;

/// The elements a [`TensorRef`] borrows. The 16-bit types are given as their bits (as
/// `half::bf16::to_bits` and PyTorch's storage hold them).
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl Elems<'_> {
    fn len(&self) -> usize {
        match self {
            Elems::F32(x) => x.len(),
            Elems::Bf16(x) | Elems::F16(x) => x.len(),
        }
    }

    fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(x) => x[i],
            Elems::Bf16(x) => ElemType::Bf16.widen16(x[i]),
            Elems::F16(x) => ElemType::F16.widen16(x[i]),
        }
    }

    /// The element type's name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Elems::F32(_) => "f32",
            Elems::Bf16(_) => "bf16",
            Elems::F16(_) => "f16",
        }
    }
}

/// A tensor in the caller's memory: `shape`, and `strides` in elements (row-major unless
/// [`TensorRef::with_strides`] says otherwise).
///
/// ```
/// use chunkc_runtime::view::TensorRef;
/// let data = vec![0.0f32; 2 * 3];
/// let t = TensorRef::f32(&data, &[2, 3]).unwrap();
/// assert_eq!(t.shape(), &[2, 3]);
/// // Every other column of a [2, 6] buffer, as a [2, 3] tensor:
/// let wide = vec![0.0f32; 12];
/// let cols = TensorRef::f32(&wide, &[2, 6]).unwrap().with_strides(&[2, 3], &[6, 2]).unwrap();
/// assert!(!cols.is_contiguous());
/// // Too few elements for the shape is an error, not a panic:
/// assert!(TensorRef::f32(&data, &[4, 4]).is_err());
/// ```
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    elems: Elems<'a>,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl<'a> TensorRef<'a> {
    /// A contiguous row-major tensor over `elems`, which must hold exactly the shape's
    /// elements.
    pub fn new(elems: Elems<'a>, shape: &[usize]) -> Result<TensorRef<'a>, Error> {
        let numel = numel(shape)?;
        if elems.len() != numel {
            return Err(Error::BadTensor(format!(
                "a tensor of shape {shape:?} needs {numel} elements, the slice has {}",
                elems.len()
            )));
        }
        Ok(TensorRef { elems, shape: shape.to_vec(), strides: row_major(shape) })
    }

    /// A contiguous f32 tensor.
    pub fn f32(data: &'a [f32], shape: &[usize]) -> Result<TensorRef<'a>, Error> {
        TensorRef::new(Elems::F32(data), shape)
    }

    /// A contiguous bf16 tensor (the elements' bits).
    pub fn bf16(bits: &'a [u16], shape: &[usize]) -> Result<TensorRef<'a>, Error> {
        TensorRef::new(Elems::Bf16(bits), shape)
    }

    /// A contiguous f16 tensor (the elements' bits).
    pub fn f16(bits: &'a [u16], shape: &[usize]) -> Result<TensorRef<'a>, Error> {
        TensorRef::new(Elems::F16(bits), shape)
    }

    /// The same memory seen as `shape` with element `strides` (a slice of a larger tensor, a
    /// transposed one); every element the view can reach must lie inside the slice.
    pub fn with_strides(self, shape: &[usize], strides: &[usize]) -> Result<TensorRef<'a>, Error> {
        if shape.len() != strides.len() {
            return Err(Error::BadTensor(format!("shape {shape:?} and strides {strides:?} differ in rank")));
        }
        if numel(shape)? > 0 {
            let last = shape
                .iter()
                .zip(strides)
                .try_fold(0usize, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
            match last {
                Some(l) if l < self.elems.len() => {}
                _ => {
                    return Err(Error::BadTensor(format!(
                        "shape {shape:?} with strides {strides:?} reaches past the slice's {} elements",
                        self.elems.len()
                    )))
                }
            }
        }
        Ok(TensorRef { elems: self.elems, shape: shape.to_vec(), strides: strides.to_vec() })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn elems(&self) -> Elems<'a> {
        self.elems
    }

    /// Whether the view is dense and row-major over its whole slice.
    pub fn is_contiguous(&self) -> bool {
        self.strides == row_major(&self.shape) && numel(&self.shape).ok() == Some(self.elems.len())
    }

    /// The elements as dense row-major f32: borrowed for a contiguous f32 view, else packed.
    pub fn to_f32(&self) -> Cow<'a, [f32]> {
        if let (Elems::F32(x), true) = (self.elems, self.is_contiguous()) {
            return Cow::Borrowed(x);
        }
        let n = self.shape.iter().product::<usize>();
        let mut out = Vec::with_capacity(n);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..n {
            let at: usize = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
            out.push(self.elems.get(at));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Cow::Owned(out)
    }
}

fn numel(shape: &[usize]) -> Result<usize, Error> {
    crate::tensor::Tensor::numel_of(shape)
}

fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_and_16_bit_views_pack_to_the_same_f32() {
        let wide: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let cols = TensorRef::f32(&wide, &[2, 6]).unwrap().with_strides(&[2, 3], &[6, 2]).unwrap();
        assert_eq!(&*cols.to_f32(), &[0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let transposed = TensorRef::f32(&wide[..6], &[2, 3]).unwrap().with_strides(&[3, 2], &[1, 3]).unwrap();
        assert_eq!(&*transposed.to_f32(), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let bits: Vec<u16> = wide.iter().map(|&x| ElemType::Bf16.narrow16(x)).collect();
        assert_eq!(&*TensorRef::bf16(&bits, &[12]).unwrap().to_f32(), wide.as_slice());
        let half: Vec<u16> = wide.iter().map(|&x| ElemType::F16.narrow16(x)).collect();
        assert_eq!(&*TensorRef::f16(&half, &[3, 4]).unwrap().to_f32(), wide.as_slice());
        assert!(matches!(TensorRef::f32(&wide, &[3, 4]).unwrap().to_f32(), Cow::Borrowed(_)));
    }

    #[test]
    fn views_past_the_slice_are_refused() {
        let data = [0.0f32; 6];
        let e = TensorRef::f32(&data, &[2, 3]).unwrap().with_strides(&[2, 3], &[4, 1]).unwrap_err();
        assert_eq!(e.to_string(), "shape [2, 3] with strides [4, 1] reaches past the slice's 6 elements");
        assert!(TensorRef::f32(&data, &[2, 3]).unwrap().with_strides(&[2], &[1, 1]).is_err());
        assert!(
            TensorRef::f32(&data, &[2, 3]).unwrap().with_strides(&[0, 3], &[99, 1]).is_ok(),
            "an empty view reaches nothing"
        );
    }
}
