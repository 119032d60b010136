//! The launch ABI on the host: [`bind`] turns an emitted kernel's [`LaunchMeta`] and the
//! problem's tensors into a device-neutral [`Launch`] and its [`Arg`]s, and
//! [`Bound::outputs`] turns the bytes an executor returns into `o` and `hT`. It is the one
//! place that knows which tensor goes to which `.param`, in what element type, which
//! buffers are outputs, how big the scratch is and what the grid is for a problem size; the
//! chunkc command line and the compiler's simulator tests both launch through it.

use crate::artifact::{ElemType, LaunchMeta, ParamAccess, ParamKind};
use crate::launch::{Arg, Launch, ReadBack};
use crate::tensor::Tensor;
use std::fmt;

/// The sizes of one launch: `o` is `[B, T, H, V]`, the states `[B, H, K, V]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub batch: usize,
    pub heads: usize,
    pub seq_len: usize,
    pub k: usize,
    pub v: usize,
}

impl Problem {
    fn output_shape(&self) -> Vec<usize> {
        vec![self.batch, self.seq_len, self.heads, self.v]
    }
    fn state_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.k, self.v]
    }
}

/// Why a launch could not be bound; one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindError {
    /// The problem is too large for one launch (a user can pick a smaller one).
    TooLarge(String),
    /// The metadata and the tensors do not fit together (a bug in whoever produced them).
    Abi(String),
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindError::TooLarge(s) | BindError::Abi(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for BindError {}

/// A launch with its arguments, and how to read the results back.
#[derive(Debug)]
pub struct Bound<'a> {
    pub launch: Launch<'a>,
    pub args: Vec<Arg>,
    /// For each read-back buffer, in argument order: the parameter's name and its shape.
    read_back: Vec<(String, Vec<usize>)>,
}

/// The launch ABI: turns `meta` (for the PTX text `ptx`) and the tensors into a launch and
/// its `.param` arguments, in declaration order.
///
/// - Tensor parameters are named as the IR names them. Read ones come from `input(name)`
///   (the rule's inputs and `h0`), as f32 values converted to the parameter's
///   [`ParamMeta::elem`](crate::artifact::ParamMeta::elem) ([`ElemType::encode`]: bf16 and
///   f16 rounded to nearest even), little endian. Written ones are `o` and `hT`, f32, and
///   start as NaN, so an element the kernel fails to write shows.
/// - The scratch parameter is `scratch_bytes_per_cta` per CTA, NaN-filled too, so that
///   reading scratch before writing it poisons the outputs instead of reading zeros.
/// - Scalars are `batch`, `heads` and `seq_len`, as u64.
///
/// The caller checks the input tensors' shapes against `problem` first.
pub fn bind<'a, 'i, S>(
    ptx: &'a str,
    meta: &'a LaunchMeta<S>,
    problem: &Problem,
    input: impl Fn(&str) -> Option<&'i [f32]>,
) -> Result<Bound<'a>, BindError> {
    // One CTA per (b, h): B*H must fit the grid's u32 (checked here, so that the grid
    // arithmetic below cannot overflow).
    let too_big =
        || BindError::TooLarge(format!("B*H = {}*{} is too large for one GPU launch", problem.batch, problem.heads));
    problem.batch.checked_mul(problem.heads).and_then(|n| u32::try_from(n).ok()).ok_or_else(too_big)?;
    let grid = meta.grid.dims(problem.batch as u32, problem.heads as u32);
    let ctas = grid.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize)).ok_or_else(too_big)?;
    let mut args = Vec::with_capacity(meta.params.len());
    let mut read_back = vec![];
    for p in &meta.params {
        let arg = match p.kind {
            ParamKind::Tensor if p.access == ParamAccess::Read => {
                let data = input(&p.name).ok_or_else(|| {
                    BindError::Abi(format!("kernel {}: no tensor for parameter `{}`", meta.entry, p.name))
                })?;
                Arg::Buffer { bytes: p.elem.encode(data), read_back: false }
            }
            ParamKind::Tensor => {
                let shape = match p.name.as_str() {
                    "o" => problem.output_shape(),
                    "hT" => problem.state_shape(),
                    other => {
                        return Err(BindError::Abi(format!(
                            "kernel {} writes `{other}`, which is not o or hT",
                            meta.entry
                        )))
                    }
                };
                if p.elem != ElemType::F32 {
                    return Err(BindError::Abi(format!(
                        "kernel {} writes `{}` as {}; outputs are f32",
                        meta.entry,
                        p.name,
                        p.elem.name()
                    )));
                }
                // The kernels only write their outputs, but a read-write one must not start
                // from anything a kernel could mistake for data either.
                let n = Tensor::numel_of(&shape).map_err(|e| BindError::TooLarge(e.to_string()))?;
                read_back.push((p.name.clone(), shape));
                Arg::Buffer { bytes: ElemType::F32.encode(&vec![f32::NAN; n]), read_back: true }
            }
            ParamKind::Scratch => {
                let bytes = meta.scratch_bytes_per_cta.checked_mul(ctas).ok_or_else(|| {
                    BindError::TooLarge(format!("the kernel's scratch for {ctas} CTAs overflows this machine's memory"))
                })?;
                Arg::Buffer {
                    bytes: f32::NAN.to_le_bytes().into_iter().cycle().take(bytes).collect(),
                    read_back: false,
                }
            }
            ParamKind::Scalar => Arg::U64(match p.name.as_str() {
                "batch" => problem.batch as u64,
                "heads" => problem.heads as u64,
                "seq_len" => problem.seq_len as u64,
                other => return Err(BindError::Abi(format!("kernel scalar `{other}` is unknown to the launcher"))),
            }),
        };
        args.push(arg);
    }
    let launch = Launch {
        ptx,
        entry: &meta.entry,
        grid,
        block: meta.block,
        dynamic_smem_bytes: meta.dynamic_smem_bytes,
        sm: meta.target.capability(),
    };
    Ok(Bound { launch, args, read_back })
}

impl Bound<'_> {
    /// `o` and `hT`, in that order, from the bytes an executor read back.
    pub fn outputs(&self, back: ReadBack) -> Result<(Tensor, Tensor), BindError> {
        if back.len() != self.read_back.len() {
            return Err(BindError::Abi(format!(
                "the executor returned {} buffers for {} outputs",
                back.len(),
                self.read_back.len()
            )));
        }
        let (mut o, mut ht) = (None, None);
        for ((name, shape), bytes) in self.read_back.iter().zip(back) {
            let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let t = Tensor::new(shape.clone(), data).map_err(|e| BindError::Abi(format!("output `{name}`: {e}")))?;
            match name.as_str() {
                "o" => o = Some(t),
                _ => ht = Some(t),
            }
        }
        match (o, ht) {
            (Some(o), Some(ht)) => Ok((o, ht)),
            _ => Err(BindError::Abi(format!("kernel {} does not write both o and hT", self.launch.entry))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{Grid, ParamMeta, Sm, TileSpace};

    fn param(name: &str, access: ParamAccess, kind: ParamKind, elem: ElemType) -> ParamMeta {
        ParamMeta { name: name.into(), access, pointer: kind != ParamKind::Scalar, kind, align: 0, elem }
    }

    fn meta(q: ElemType) -> LaunchMeta {
        LaunchMeta {
            entry: "k".into(),
            target: Sm::Sm90,
            grid: Grid::BatchHeadsX,
            block: [64, 1, 1],
            tile_space: TileSpace::Global,
            dynamic_smem_bytes: 0,
            scratch_bytes_per_cta: 8,
            static_smem_bytes: 0,
            schedule: serde_json::Value::Null,
            params: vec![
                param("q", ParamAccess::Read, ParamKind::Tensor, q),
                param("h0", ParamAccess::Read, ParamKind::Tensor, ElemType::F32),
                param("o", ParamAccess::Write, ParamKind::Tensor, ElemType::F32),
                param("hT", ParamAccess::Write, ParamKind::Tensor, ElemType::F32),
                param("scratch", ParamAccess::ReadWrite, ParamKind::Scratch, ElemType::F32),
                param("seq_len", ParamAccess::Read, ParamKind::Scalar, ElemType::F32),
            ],
            scalars: vec!["seq_len".into()],
        }
    }

    /// Each input goes in its parameter's element type (h0 stays f32), outputs and scratch
    /// are NaN-filled and sized for the problem, scalars come from the problem.
    #[test]
    fn inputs_take_the_parameters_element_type() {
        let p = Problem { batch: 2, heads: 3, seq_len: 1, k: 1, v: 1 };
        let q = [1.0f32, 1.0 + 2f32.powi(-11), f32::NAN, 1e6];
        let h0 = [0.5f32; 6];
        for elem in [ElemType::F32, ElemType::Bf16, ElemType::F16] {
            let m = meta(elem);
            let b = bind("", &m, &p, |n| match n {
                "q" => Some(&q[..]),
                "h0" => Some(&h0[..]),
                _ => None,
            })
            .expect("binds");
            assert_eq!(b.launch.grid, [6, 1, 1]);
            assert_eq!(b.launch.sm, 90);
            let bytes: Vec<&[u8]> = b
                .args
                .iter()
                .filter_map(|a| match a {
                    Arg::Buffer { bytes, .. } => Some(bytes.as_slice()),
                    Arg::U64(_) => None,
                })
                .collect();
            assert_eq!(bytes[0], elem.encode(&q).as_slice());
            assert_eq!(bytes[0].len(), q.len() * elem.size());
            assert_eq!(bytes[1], ElemType::F32.encode(&h0).as_slice(), "h0 stays f32");
            assert_eq!(bytes[2].len(), 6 * 4);
            assert_eq!(bytes[3].len(), 6 * 4);
            assert_eq!(bytes[4].len(), 6 * 8);
            assert!(bytes[2..]
                .iter()
                .all(|b| b.chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_nan())));
            assert_eq!(b.args[5], Arg::U64(1));
            let (o, ht) = b.outputs(vec![vec![0; 24], vec![0; 24]]).expect("outputs");
            assert_eq!((o.shape, ht.shape), (vec![2, 1, 3, 1], vec![2, 3, 1, 1]));
        }
        if let Arg::Buffer { bytes, .. } = &bind("", &meta(ElemType::F16), &p, |n| match n {
            "q" => Some(&q[..]),
            _ => Some(&h0[..]),
        })
        .expect("binds")
        .args[0]
        {
            let halves: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            assert_eq!(halves[1], 0x3C00, "1 + 2^-11 (a tie) rounds to even, 1, in f16");
            assert!(ElemType::F16.widen16(halves[2]).is_nan(), "NaN stays NaN");
            assert_eq!(halves[3], 0x7C00, "1e6 overflows to inf");
        }
    }

    #[test]
    fn a_missing_tensor_and_an_oversized_grid_are_one_line_errors() {
        let m = meta(ElemType::F32);
        let e = bind("", &m, &Problem { batch: 1, heads: 1, seq_len: 1, k: 1, v: 1 }, |_| None).unwrap_err();
        assert_eq!(e.to_string(), "kernel k: no tensor for parameter `q`");
        let huge = Problem { batch: usize::MAX, heads: 2, seq_len: 1, k: 1, v: 1 };
        assert!(matches!(bind("", &m, &huge, |_| None), Err(BindError::TooLarge(_))));
    }
}
