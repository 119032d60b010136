//! The program ABI: what a compiled rule's kernels exchange, described once.
//!
//! A compiled rule is a program of phases run in order. Its tensors (name, symbolic shape,
//! element type, role) and its phases (entry name, kind, V-tiles, the tensors each one reads
//! and writes, in its parameter order) are a [`ProgramSpec`]: the compiler writes it, it
//! travels as JSON beside the kernels, and every executor (the CPU threads, the PTX
//! simulator, CUDA) and the command line bind tensors through it, by name. Nothing else
//! knows that `o` is `[B, T, H, V]` or that `h0` may be left out.
//!
//! Grid: every phase runs over (batch, head, V-tile) points. A sequential phase walks its
//! loop (chunks, or tokens) in order on each point, carrying the state; a chunk-parallel one
//! has the chunk on its grid too: its loop's iterations are independent and may run in any
//! order, on any worker or CTA.

use crate::artifact::ElemType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The sizes of one problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub k: usize,
    pub v: usize,
}

/// The sizes a program's kernels are specialised for (T and B stay dynamic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticSizes {
    pub heads: usize,
    pub k: usize,
    pub v: usize,
}

/// A dimension of a program tensor, resolved against [`Sizes`] and the program's chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    Batch,
    SeqLen,
    Heads,
    K,
    V,
    /// Chunks of the sequence: `ceil(T / chunk)`.
    Chunks,
    /// The V-tiles of a phase that writes one partial sum per V-tile (a gradient of the
    /// backward split over V): a count fixed at compile time.
    VTiles(usize),
}

impl Dim {
    fn size(self, s: &Sizes, chunk: usize) -> usize {
        match self {
            Dim::Batch => s.batch,
            Dim::SeqLen => s.seq_len,
            Dim::Heads => s.heads,
            Dim::K => s.k,
            Dim::V => s.v,
            Dim::Chunks => s.seq_len.div_ceil(chunk.max(1)),
            Dim::VTiles(n) => n,
        }
    }

    fn letter(self) -> &'static str {
        match self {
            Dim::Batch => "B",
            Dim::SeqLen => "T",
            Dim::Heads => "H",
            Dim::K => "K",
            Dim::V => "V",
            Dim::Chunks => "NT",
            Dim::VTiles(_) => "NV",
        }
    }
}

/// What a tensor is to the program's caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Given by the caller, read by the phases.
    Input,
    /// Written by the phases, returned to the caller.
    Output,
    /// Written by one phase and read by a later one (chunk-boundary states, per-chunk
    /// factors); allocated by the executor, never seen by the caller.
    Intermediate,
}

/// One tensor of a program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<Dim>,
    pub elem: ElemType,
    pub role: Role,
    /// An input the caller may leave out: the executor passes zeros (`h0`).
    #[serde(default)]
    pub optional: bool,
}

impl TensorSpec {
    /// The dimensions as letters, for messages: `[B, T, H, K]`.
    pub fn dims_label(&self) -> String {
        let names: Vec<&str> = self.dims.iter().map(|d| d.letter()).collect();
        format!("[{}]", names.join(", "))
    }
}

/// How a phase walks its loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseKind {
    /// A loop over chunks (or tokens) in order, carrying the state.
    Sequential,
    /// Independent chunks: the chunk is a grid axis.
    ChunkParallel,
}

impl PhaseKind {
    pub fn name(self) -> &'static str {
        match self {
            PhaseKind::Sequential => "sequential",
            PhaseKind::ChunkParallel => "chunk-parallel",
        }
    }
}

/// Whether a phase reads or writes a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
}

/// A tensor a phase takes, in its parameter order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseParam {
    pub tensor: String,
    pub access: Access,
}

/// One phase: a kernel over the (batch, head, V-tile) grid, and the chunks for a
/// chunk-parallel one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseSpec {
    /// The kernel's name (the PTX entry, the CPU function).
    pub entry: String,
    pub kind: PhaseKind,
    /// V-tiles per head (1: the whole V).
    pub vtiles: usize,
    /// The tensors the kernel takes, in its parameter order.
    pub params: Vec<PhaseParam>,
}

/// A whole program: its tensors and its phases, run in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramSpec {
    pub name: String,
    /// Tokens per chunk (per loop iteration; 1 for a token-by-token program): what
    /// [`Dim::Chunks`] divides T by.
    pub chunk: usize,
    /// H, K and V the kernels were compiled for: a launch with other sizes would read and
    /// write out of bounds, so every executor refuses it ([`ProgramSpec::check_sizes`]).
    pub compiled_for: StaticSizes,
    pub tensors: Vec<TensorSpec>,
    pub phases: Vec<PhaseSpec>,
}

/// A program description that breaks the ABI's rules (a compiler bug), or sizes it cannot
/// take; one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError(pub String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

impl ProgramSpec {
    /// The most V-tiles any phase splits a head into (1: none does).
    pub fn vtiles(&self) -> usize {
        self.phases.iter().map(|p| p.vtiles).max().unwrap_or(1).max(1)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensors of one role, in declaration order.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(move |t| t.role == role)
    }

    /// Refuses sizes other than those the kernels were compiled for.
    pub fn check_sizes(&self, sizes: &Sizes) -> Result<(), SpecError> {
        let c = self.compiled_for;
        if (sizes.heads, sizes.k, sizes.v) != (c.heads, c.k, c.v) {
            return Err(SpecError(format!(
                "program {} was compiled for H={} K={} V={}, not H={} K={} V={}",
                self.name, c.heads, c.k, c.v, sizes.heads, sizes.k, sizes.v
            )));
        }
        Ok(())
    }

    /// The shape of `t` for `sizes`; an element count past `usize` is an error.
    pub fn shape(&self, t: &TensorSpec, sizes: &Sizes) -> Result<Vec<usize>, SpecError> {
        let shape: Vec<usize> = t.dims.iter().map(|d| d.size(sizes, self.chunk)).collect();
        shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| {
            SpecError(format!("tensor `{}` {shape:?} has more elements than this machine can address", t.name))
        })?;
        Ok(shape)
    }

    /// Elements of `t` for `sizes`.
    pub fn numel(&self, t: &TensorSpec, sizes: &Sizes) -> Result<usize, SpecError> {
        Ok(self.shape(t, sizes)?.iter().product())
    }

    /// Checks the ABI's rules: unique names; a positive chunk; every phase parameter names a
    /// tensor; no phase writes an input or reads an output; every intermediate is written by
    /// an earlier phase than any that reads it (or by the same one); every output is written.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |m: String| Err(SpecError(format!("program {}: {m}", self.name)));
        if self.chunk == 0 {
            return err("the chunk is 0".into());
        }
        for (i, t) in self.tensors.iter().enumerate() {
            if self.tensors[..i].iter().any(|u| u.name == t.name) {
                return err(format!("tensor `{}` is declared twice", t.name));
            }
            if t.optional && t.role != Role::Input {
                return err(format!("tensor `{}` is optional but not an input", t.name));
            }
        }
        if self.phases.is_empty() {
            return err("no phases".into());
        }
        let mut written: Vec<&str> = vec![];
        for p in &self.phases {
            if p.vtiles == 0 {
                return err(format!("phase {} has 0 V-tiles", p.entry));
            }
            for (i, param) in p.params.iter().enumerate() {
                let Some(t) = self.tensor(&param.tensor) else {
                    return err(format!(
                        "phase {} takes `{}`, which is not a tensor of the program",
                        p.entry, param.tensor
                    ));
                };
                if p.params[..i].iter().any(|q| q.tensor == param.tensor) {
                    return err(format!("phase {} takes `{}` twice", p.entry, param.tensor));
                }
                match (t.role, param.access) {
                    (Role::Input, Access::Write) => return err(format!("phase {} writes input `{}`", p.entry, t.name)),
                    (Role::Output, Access::Read) => return err(format!("phase {} reads output `{}`", p.entry, t.name)),
                    _ => {}
                }
            }
            // A phase's own writes count for its reads (a state pass stores the state it
            // carries); phases before it are done.
            written.extend(p.params.iter().filter(|q| q.access == Access::Write).map(|q| q.tensor.as_str()));
            for param in p.params.iter().filter(|q| q.access == Access::Read) {
                let inter = self.tensor(&param.tensor).is_some_and(|t| t.role == Role::Intermediate);
                if inter && !written.contains(&param.tensor.as_str()) {
                    return err(format!("phase {} reads `{}` before any phase writes it", p.entry, param.tensor));
                }
            }
        }
        for t in self.tensors.iter().filter(|t| t.role != Role::Input) {
            if !written.contains(&t.name.as_str()) {
                return err(format!("no phase writes {} `{}`", role_name(t.role), t.name));
            }
        }
        Ok(())
    }

    /// The program as text: its tensors with their roles, then each phase (`chunkc compile`).
    pub fn describe(&self) -> String {
        let mut s = format!("program {} (chunk {}): {} phase(s)\n", self.name, self.chunk, self.phases.len());
        for t in &self.tensors {
            let opt = if t.optional { ", optional (zeros)" } else { "" };
            s += &format!("  {:<13} {:<8} {:<20} {}{opt}\n", role_name(t.role), t.name, t.dims_label(), t.elem.name());
        }
        for (i, p) in self.phases.iter().enumerate() {
            let io =
                |a: Access| p.params.iter().filter(|q| q.access == a).map(|q| q.tensor.as_str()).collect::<Vec<_>>();
            let grid = if p.kind == PhaseKind::ChunkParallel { "B x H x V-tiles x chunks" } else { "B x H x V-tiles" };
            s += &format!(
                "  phase {i}: {} ({}, grid {grid}, {} V-tile(s)): reads {}; writes {}\n",
                p.entry,
                p.kind.name(),
                p.vtiles,
                io(Access::Read).join(", "),
                io(Access::Write).join(", ")
            );
        }
        s
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Input => "input",
        Role::Output => "output",
        Role::Intermediate => "intermediate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dims: &[Dim], role: Role) -> TensorSpec {
        TensorSpec { name: name.into(), dims: dims.to_vec(), elem: ElemType::F32, role, optional: false }
    }

    fn p(tensor: &str, access: Access) -> PhaseParam {
        PhaseParam { tensor: tensor.into(), access }
    }

    fn split() -> ProgramSpec {
        use Dim::*;
        ProgramSpec {
            name: "split".into(),
            chunk: 16,
            compiled_for: StaticSizes { heads: 3, k: 4, v: 5 },
            tensors: vec![
                t("q", &[Batch, SeqLen, Heads, K], Role::Input),
                TensorSpec { optional: true, ..t("h0", &[Batch, Heads, K, V], Role::Input) },
                t("o", &[Batch, SeqLen, Heads, V], Role::Output),
                t("hT", &[Batch, Heads, K, V], Role::Output),
                t("h", &[Batch, Chunks, Heads, K, V], Role::Intermediate),
            ],
            phases: vec![
                PhaseSpec {
                    entry: "state".into(),
                    kind: PhaseKind::Sequential,
                    vtiles: 1,
                    params: vec![p("h0", Access::Read), p("h", Access::Write), p("hT", Access::Write)],
                },
                PhaseSpec {
                    entry: "output".into(),
                    kind: PhaseKind::ChunkParallel,
                    vtiles: 1,
                    params: vec![p("q", Access::Read), p("h", Access::Read), p("o", Access::Write)],
                },
            ],
        }
    }

    #[test]
    fn shapes_resolve_against_sizes_and_the_chunk() {
        let s = split();
        let sizes = Sizes { batch: 2, seq_len: 33, heads: 3, k: 4, v: 5 };
        let h = s.tensor("h").expect("h");
        assert_eq!(s.shape(h, &sizes).expect("shape"), vec![2, 3, 3, 4, 5], "ceil(33 / 16) = 3 chunks");
        assert_eq!(h.dims_label(), "[B, NT, H, K, V]");
        s.check_sizes(&sizes).expect("compiled for these");
        let e = s.check_sizes(&Sizes { k: 8, ..sizes }).expect_err("other K");
        assert_eq!(e.to_string(), "program split was compiled for H=3 K=4 V=5, not H=3 K=8 V=5");
        let huge = Sizes { batch: usize::MAX, ..sizes };
        assert!(s.shape(h, &huge).is_err());
        s.validate().expect("valid");
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<ProgramSpec>(&json).expect("parse"), s);
        assert!(s.describe().contains("phase 1: output (chunk-parallel"), "{}", s.describe());
    }

    #[test]
    fn broken_programs_are_refused_with_the_reason() {
        type Breakage = Box<dyn Fn(&mut ProgramSpec)>;
        let cases: Vec<(Breakage, &str)> = vec![
            (Box::new(|s| s.phases.swap(0, 1)), "reads `h` before any phase writes it"),
            (Box::new(|s| s.phases[1].params[0].access = Access::Write), "writes input `q`"),
            (Box::new(|s| s.phases[0].params[2].access = Access::Read), "reads output `hT`"),
            (Box::new(|s| s.phases[1].params.pop().map(|_| ()).unwrap_or(())), "no phase writes output `o`"),
            (Box::new(|s| s.phases[1].params[0].tensor = "x".into()), "takes `x`, which is not a tensor"),
            (Box::new(|s| s.tensors.push(t("q", &[], Role::Input))), "`q` is declared twice"),
            (Box::new(|s| s.chunk = 0), "the chunk is 0"),
        ];
        for (break_it, want) in cases {
            let mut s = split();
            break_it(&mut s);
            let e = s.validate().expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
