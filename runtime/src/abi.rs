//! The launch ABI on the host: [`bind_program`] turns a program's description
//! ([`ProgramSpec`]), its phases' emitted kernels ([`LaunchMeta`] and PTX) and the caller's
//! tensors into a device-neutral [`Run`], and [`BoundProgram::outputs`] turns the bytes an
//! executor returns into the output tensors, by name. It is the one place that knows which
//! tensor goes to which `.param`, in what element type, which buffers are outputs, how big
//! each phase's scratch is and what its grid is for a problem size; the chunkc command line
//! and the compiler's simulator tests both launch through it.

use crate::artifact::{ElemType, LaunchMeta, ParamAccess, ParamKind};
use crate::launch::{Arg, DeviceBuffer, KernelLaunch, Launch, ReadBack, Run};
use crate::program::{Access, ProgramSpec, Role, Sizes};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::fmt;

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

/// A program's run with its arguments, and how to read the results back.
#[derive(Debug)]
pub struct BoundProgram<'a> {
    pub run: Run<'a>,
    /// For each read-back buffer, in buffer order: the tensor's name and its shape.
    read_back: Vec<(String, Vec<usize>)>,
}

/// One emitted phase: its PTX text and launch metadata.
pub type PhaseCode<'a, S> = (&'a str, &'a LaunchMeta<S>);

/// The launch ABI: binds the program `spec`, whose phase `i` was emitted as `phases[i]`, to
/// the tensors of a problem of `sizes`.
///
/// - One device buffer per tensor of the program, in declaration order. Inputs come from
///   `input(name)` as f32 values converted to the tensor's element type
///   ([`ElemType::encode`]: bf16 and f16 rounded to nearest even), little endian; an
///   optional input the caller leaves out (`h0`) is zeros. Outputs and intermediates start
///   as NaN, so an element no phase writes shows (in an output) or poisons what reads it (in
///   an intermediate); outputs are read back.
/// - Per phase, its `.param`s in order: a tensor parameter is the buffer of the tensor it
///   names (its element type must be the tensor's); the scratch parameter is a fresh buffer
///   of `scratch_bytes_per_cta` per CTA of that phase's grid, NaN-filled too; the scalars
///   are `batch`, `heads` and `seq_len`, as u64.
/// - Every input must have exactly the elements its shape gives for `sizes`, and the sizes
///   must be those the program was compiled for.
pub fn bind_program<'a, 'i, S>(
    spec: &ProgramSpec,
    phases: &[PhaseCode<'a, S>],
    sizes: &Sizes,
    input: impl Fn(&str) -> Option<&'i [f32]>,
) -> Result<BoundProgram<'a>, BindError> {
    let abi = |m: String| BindError::Abi(format!("program {}: {m}", spec.name));
    spec.check_sizes(sizes).map_err(|e| BindError::Abi(e.to_string()))?;
    if phases.len() != spec.phases.len() {
        return Err(abi(format!("{} kernels for {} phases", phases.len(), spec.phases.len())));
    }
    let too_large = |e: crate::program::SpecError| BindError::TooLarge(e.to_string());
    let mut buffers = Vec::with_capacity(spec.tensors.len());
    let mut read_back = vec![];
    for t in &spec.tensors {
        let shape = spec.shape(t, sizes).map_err(too_large)?;
        let n: usize = shape.iter().product();
        let bytes = match (t.role, input(&t.name)) {
            (Role::Input, Some(data)) if data.len() == n => t.elem.encode(data),
            (Role::Input, Some(data)) => {
                return Err(abi(format!("input `{}` has {} elements, not {n} ({shape:?})", t.name, data.len())))
            }
            (Role::Input, None) if t.optional => t.elem.encode(&vec![0.0; n]),
            (Role::Input, None) => return Err(abi(format!("no tensor for input `{}`", t.name))),
            (role, _) => {
                if role == Role::Output {
                    if t.elem != ElemType::F32 {
                        return Err(abi(format!("output `{}` is {}; outputs are f32", t.name, t.elem.name())));
                    }
                    read_back.push((t.name.clone(), shape));
                }
                t.elem.encode(&vec![f32::NAN; n])
            }
        };
        buffers.push(DeviceBuffer { bytes, read_back: t.role == Role::Output });
    }
    let mut launches = Vec::with_capacity(phases.len());
    for (phase, &(ptx, meta)) in spec.phases.iter().zip(phases) {
        if meta.entry != phase.entry {
            return Err(abi(format!("phase {} was given kernel {}", phase.entry, meta.entry)));
        }
        let grid = meta.grid.dims(sizes.batch, sizes.heads, sizes.seq_len).ok_or_else(|| {
            BindError::TooLarge(format!(
                "B*H = {}*{} (or the chunks of T = {}) is too large for one GPU launch",
                sizes.batch, sizes.heads, sizes.seq_len
            ))
        })?;
        let ctas = grid
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
            .ok_or_else(|| BindError::TooLarge(format!("the grid {grid:?} of kernel {} is too large", meta.entry)))?;
        let mut args = Vec::with_capacity(meta.params.len());
        let mut tensor_params = phase.params.iter();
        for p in &meta.params {
            let arg = match p.kind {
                ParamKind::Tensor => {
                    // The entry's tensor parameters are its phase's, in order.
                    let want = tensor_params.next().filter(|q| q.tensor == p.name).ok_or_else(|| {
                        abi(format!("kernel {} takes `{}` where its phase takes another tensor", meta.entry, p.name))
                    })?;
                    let access_ok = match want.access {
                        Access::Read => p.access == ParamAccess::Read,
                        Access::Write => p.access != ParamAccess::Read,
                    };
                    let at = spec.tensors.iter().position(|t| t.name == p.name).filter(|_| access_ok);
                    let at = at.ok_or_else(|| {
                        abi(format!("kernel {} parameter `{}` does not match its phase", meta.entry, p.name))
                    })?;
                    if spec.tensors[at].elem != p.elem {
                        return Err(abi(format!(
                            "kernel {} reads `{}` as {}, the program holds it as {}",
                            meta.entry,
                            p.name,
                            p.elem.name(),
                            spec.tensors[at].elem.name()
                        )));
                    }
                    Arg::Buffer(at)
                }
                ParamKind::Scratch => {
                    let bytes = meta.scratch_bytes_per_cta.checked_mul(ctas).ok_or_else(|| {
                        BindError::TooLarge(format!(
                            "the scratch of kernel {} for {ctas} CTAs overflows this machine's memory",
                            meta.entry
                        ))
                    })?;
                    buffers.push(DeviceBuffer {
                        bytes: f32::NAN.to_le_bytes().into_iter().cycle().take(bytes).collect(),
                        read_back: false,
                    });
                    Arg::Buffer(buffers.len() - 1)
                }
                ParamKind::Scalar => Arg::U64(match p.name.as_str() {
                    "batch" => sizes.batch as u64,
                    "heads" => sizes.heads as u64,
                    "seq_len" => sizes.seq_len as u64,
                    other => return Err(abi(format!("kernel scalar `{other}` is unknown to the launcher"))),
                }),
            };
            args.push(arg);
        }
        if tensor_params.next().is_some() {
            return Err(abi(format!("kernel {} takes fewer tensors than its phase", meta.entry)));
        }
        let launch = Launch {
            ptx,
            entry: &meta.entry,
            grid,
            block: meta.block,
            dynamic_smem_bytes: meta.dynamic_smem_bytes,
            sm: meta.target.capability(),
        };
        launches.push(KernelLaunch { launch, args });
    }
    Ok(BoundProgram { run: Run { buffers, launches }, read_back })
}

impl BoundProgram<'_> {
    /// The outputs, by name, from the bytes an executor read back.
    pub fn outputs(&self, back: ReadBack) -> Result<BTreeMap<String, Tensor>, BindError> {
        if back.len() != self.read_back.len() {
            return Err(BindError::Abi(format!(
                "the executor returned {} buffers for {} outputs",
                back.len(),
                self.read_back.len()
            )));
        }
        let mut out = BTreeMap::new();
        for ((name, shape), bytes) in self.read_back.iter().zip(back) {
            let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let t = Tensor::new(shape.clone(), data).map_err(|e| BindError::Abi(format!("output `{name}`: {e}")))?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{Grid, ParamMeta, Sm, TileSpace};
    use crate::program::{Dim, PhaseKind, PhaseParam, PhaseSpec, StaticSizes, TensorSpec};

    fn param(name: &str, access: ParamAccess, kind: ParamKind, elem: ElemType) -> ParamMeta {
        ParamMeta { name: name.into(), access, pointer: kind != ParamKind::Scalar, kind, align: 0, elem }
    }

    fn spec(q: ElemType) -> ProgramSpec {
        use Dim::*;
        let t = |name: &str, dims: &[Dim], elem, role, optional| TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            elem,
            role,
            optional,
        };
        let p = |tensor: &str, access| PhaseParam { tensor: tensor.into(), access };
        ProgramSpec {
            name: "p".into(),
            chunk: 1,
            compiled_for: StaticSizes { heads: 3, k: 1, v: 1 },
            tensors: vec![
                t("q", &[Batch, SeqLen, Heads], q, Role::Input, false),
                t("h0", &[Batch, Heads, K, V], ElemType::F32, Role::Input, true),
                t("o", &[Batch, SeqLen, Heads, V], ElemType::F32, Role::Output, false),
                t("hT", &[Batch, Heads, K, V], ElemType::F32, Role::Output, false),
            ],
            phases: vec![PhaseSpec {
                entry: "k".into(),
                kind: PhaseKind::Sequential,
                vtiles: 1,
                params: vec![
                    p("q", Access::Read),
                    p("h0", Access::Read),
                    p("o", Access::Write),
                    p("hT", Access::Write),
                ],
            }],
        }
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

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Each input goes in its tensor's element type (h0 stays f32; absent, zeros), outputs
    /// and scratch are NaN-filled and sized for the problem, scalars come from the sizes.
    #[test]
    fn inputs_take_the_tensors_element_type() {
        let sizes = Sizes { batch: 2, seq_len: 1, heads: 3, k: 1, v: 1 };
        let q = [1.0f32, 1.0 + 2f32.powi(-11), f32::NAN, 1e6, 0.5, 0.25];
        let h0 = [0.5f32; 6];
        for elem in [ElemType::F32, ElemType::Bf16, ElemType::F16] {
            let (s, m) = (spec(elem), meta(elem));
            for with_h0 in [true, false] {
                let b = bind_program(&s, &[("", &m)], &sizes, |n| match n {
                    "q" => Some(&q[..]),
                    "h0" if with_h0 => Some(&h0[..]),
                    _ => None,
                })
                .expect("binds");
                let [l] = &b.run.launches[..] else { panic!("one launch") };
                assert_eq!(l.launch.grid, [6, 1, 1]);
                assert_eq!(l.launch.sm, 90);
                let bytes = |i: usize| match l.args[i] {
                    Arg::Buffer(at) => b.run.buffers[at].bytes.as_slice(),
                    Arg::U64(_) => panic!("a buffer"),
                };
                assert_eq!(bytes(0), elem.encode(&q).as_slice());
                let want_h0 = if with_h0 { h0 } else { [0.0; 6] };
                assert_eq!(bytes(1), ElemType::F32.encode(&want_h0).as_slice(), "h0 stays f32");
                assert_eq!(bytes(2).len(), 6 * 4);
                assert_eq!(bytes(4).len(), 6 * 8, "scratch for 6 CTAs");
                assert!((2..5).all(|i| f32s(bytes(i)).iter().all(|x| x.is_nan())));
                assert_eq!(l.args[5], Arg::U64(1));
                let out = b.outputs(vec![vec![0; 24], vec![0; 24]]).expect("outputs");
                assert_eq!((out["o"].shape.clone(), out["hT"].shape.clone()), (vec![2, 1, 3, 1], vec![2, 3, 1, 1]));
            }
        }
    }

    #[test]
    fn a_missing_tensor_a_mismatch_and_an_oversized_grid_are_one_line_errors() {
        let (s, m) = (spec(ElemType::F32), meta(ElemType::F32));
        let sizes = Sizes { batch: 1, seq_len: 1, heads: 3, k: 1, v: 1 };
        let e = bind_program(&s, &[("", &m)], &sizes, |_| None).unwrap_err();
        assert_eq!(e.to_string(), "program p: no tensor for input `q`");
        let short = [0.0f32; 2];
        let e = bind_program(&s, &[("", &m)], &sizes, |_| Some(&short[..])).unwrap_err();
        assert!(e.to_string().contains("input `q` has 2 elements, not 3"), "{e}");
        let bf = meta(ElemType::Bf16);
        let q = [0.0f32; 3];
        let e = bind_program(&s, &[("", &bf)], &sizes, |_| Some(&q[..])).unwrap_err();
        assert!(e.to_string().contains("reads `q` as bf16, the program holds it as f32"), "{e}");
        let other = Sizes { k: 2, ..sizes };
        assert!(bind_program(&s, &[("", &m)], &other, |_| Some(&q[..])).is_err(), "not the compiled sizes");
        let huge = Sizes { batch: usize::MAX / 2, seq_len: 0, ..sizes };
        let empty: [f32; 0] = [];
        assert!(matches!(bind_program(&s, &[("", &m)], &huge, |_| Some(&empty[..])), Err(BindError::TooLarge(_))));
    }
}
