//! The library API: load a [`Rule`], [`compile`] it for a [`Target`] and a [`Schedule`],
//! and run the [`Program`] on the caller's tensors: a dense batch ([`Program::forward`]), a
//! varlen batch packed along T ([`Program::forward_varlen`], FLA's `cu_seqlens`), or the
//! decode step of a serving engine over a [`StatePool`] ([`Program::decode`]); and its
//! gradient for training ([`Program::backward`]).
//!
//! ```
//! use chunkc::{compile, Heads, Inputs, Rule, Schedule, Target, TensorRef};
//!
//! let rule = Rule::parse(r#"
//!     name = "decayed"
//!     step = """
//!     S = exp(g) * S + outer(k, v)
//!     o = scale * S^T @ q
//!     """
//!     [inputs]
//!     q = "[K]"
//!     k = "[K]"
//!     v = "[V]"
//!     g = { shape = "scalar", domain = "log_gate" }
//! "#)?;
//! let program = compile(&rule, Target::Cpu, Schedule::chunked(16), Heads::new(2, 8, 4))?;
//!
//! let (b, t, h, k, v) = (1, 37, 2, 8, 4);
//! let q = vec![0.1f32; b * t * h * k];
//! let g = vec![-0.05f32; b * t * h];
//! let vv = vec![1.0f32; b * t * h * v];
//! let inputs = Inputs::new()
//!     .with("q", TensorRef::f32(&q, &[b, t, h, k])?)
//!     .with("k", TensorRef::f32(&q, &[b, t, h, k])?)
//!     .with("v", TensorRef::f32(&vv, &[b, t, h, v])?)
//!     .with("g", TensorRef::f32(&g, &[b, t, h])?);
//! let out = program.forward(&inputs)?;
//! assert_eq!(out.o().shape, vec![b, t, h, v]);
//! assert_eq!(out.ht().shape, vec![b, h, k, v]);
//! assert_eq!(out.o().count_non_finite(), 0);
//! # Ok::<(), chunkc::Error>(())
//! ```

use crate::backend::{build_program, Outputs};
use crate::error::Error;
use crate::gpu::Device;
use crate::grad::GradOptions;
use crate::heads::Groups;
use crate::problem::{dims_label, expect_shape, infer_dims_of_shapes};
use crate::Loaded;
use chunkc_codegen::cpu::CpuProgram;
use chunkc_codegen::plan::Shape;
use chunkc_codegen::program::{ProgramSpec, Sizes};
use chunkc_codegen::ptx::Sm;
use chunkc_codegen::schedule::{KernelKind, Schedule};
use chunkc_dsl::ast::Ty;
use chunkc_dsl::reference::Dims;
use chunkc_runtime::artifact::ElemType;
use chunkc_runtime::exec::{self, Order, ProgramMemory};
use chunkc_runtime::packed::{self, Bound, Pools};
use chunkc_runtime::tensor::Tensor;
use chunkc_runtime::view::TensorRef;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

/// A checked rule: its statements, inputs, states and (when it is linear in its state) its
/// canonical form.
pub struct Rule {
    loaded: Loaded,
}

impl Rule {
    /// Reads and checks a rule file; errors point at file:line:col.
    pub fn load(path: impl AsRef<Path>) -> Result<Rule, Error> {
        Ok(Rule { loaded: crate::load_rule(path.as_ref())? })
    }

    /// Checks a rule given as text (errors point at `<rule>`:line:col).
    pub fn parse(text: &str) -> Result<Rule, Error> {
        Rule::parse_named("<rule>", text)
    }

    /// [`Rule::parse`], naming the text `source` in errors.
    pub fn parse_named(source: &str, text: &str) -> Result<Rule, Error> {
        Ok(Rule { loaded: crate::checked(chunkc_dsl::parse_rule(source, text)?)? })
    }

    pub fn name(&self) -> &str {
        &self.loaded.rule.name
    }

    /// The recurrence class (`decayed (scalar gate)`, `delta`, ...), or why the rule has no
    /// chunked kernel.
    pub fn class(&self) -> Result<String, String> {
        match &self.loaded.canonical {
            Ok(c) => Ok(c.class.describe()),
            Err(why) => Err(why.reason.clone()),
        }
    }

    /// The per-token and per-head input tensors, with their dimensions (`[B, T, H, K]`...).
    pub fn inputs(&self) -> Vec<(String, &'static str)> {
        self.loaded.rule.inputs.iter().map(|i| (i.name.clone(), dims_label(i.per_head, i.ty))).collect()
    }

    /// The states' stems: `h` (the matrix state, `h0` / `hT`), then each extra state's name.
    pub fn state_stems(&self) -> Vec<String> {
        std::iter::once("h".to_string()).chain(self.loaded.rule.states.iter().map(|s| s.name.clone())).collect()
    }

    /// The schedule for a program that runs [`Program::decode`]: the chunked kernel at
    /// chunk 1 where the rule has one, else the recurrent kernel. At one token the chunked
    /// form reads the state twice (the query's and the keys' reads) and updates it once, in
    /// place; the recurrent kernel follows the rule's statements, a pass over the state for
    /// each. A rule with extra states keeps the recurrent kernel: its chunked kernel widens
    /// the state by their columns every chunk, which costs more than it saves at one token
    /// (measured in docs/performance.md, round 14).
    pub fn decode_schedule(&self) -> Schedule {
        if self.loaded.canonical.is_ok() && self.loaded.rule.states.is_empty() {
            Schedule::chunked(1)
        } else {
            Schedule::recurrent()
        }
    }

    /// The checked rule of the front end.
    pub fn ast(&self) -> &chunkc_dsl::ast::Rule {
        &self.loaded.rule
    }
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule").field("name", &self.name()).field("class", &self.class()).finish()
    }
}

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// This machine's CPU: native code from Cranelift, on worker threads.
    Cpu,
    /// The PTX for `Sm`, run in chunkc's PTX simulator (slow; for checking).
    PtxSim(Sm),
    /// The PTX for `Sm`, run on a CUDA device.
    Cuda(Sm),
}

/// The sizes a program's kernels are compiled for: heads, K, V, and `scale` (None:
/// 1/sqrt(K)). B and T stay free.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heads {
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    pub scale: Option<f64>,
}

impl Heads {
    pub fn new(heads: usize, k: usize, v: usize) -> Heads {
        Heads { heads, k, v, scale: None }
    }

    pub fn with_scale(self, scale: f64) -> Heads {
        Heads { scale: Some(scale), ..self }
    }
}

/// The caller's input tensors by name: the rule's inputs, and optionally the initial states
/// (`h0`, each extra state's `<name>0`).
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    tensors: BTreeMap<String, TensorRef<'a>>,
}

impl<'a> Inputs<'a> {
    pub fn new() -> Inputs<'a> {
        Inputs::default()
    }

    /// These inputs and `name`.
    pub fn with(mut self, name: &str, tensor: TensorRef<'a>) -> Inputs<'a> {
        self.insert(name, tensor);
        self
    }

    pub fn insert(&mut self, name: &str, tensor: TensorRef<'a>) {
        self.tensors.insert(name.to_string(), tensor);
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect()
    }
}

/// The inputs as dense row-major f32 (borrowed where they already are), grouped inputs
/// repeated to the value heads (`crate::heads`).
struct Dense<'i> {
    tensors: BTreeMap<String, (Vec<usize>, Cow<'i, [f32]>)>,
    groups: Groups,
}

impl<'i> Dense<'i> {
    fn of(rule: &chunkc_dsl::ast::Rule, inputs: &Inputs<'i>) -> Result<Dense<'i>, Error> {
        let groups = Groups::of(rule, &inputs.shapes())?;
        let mut tensors = BTreeMap::new();
        for (name, t) in &inputs.tensors {
            let data = t.to_f32();
            let entry = match groups.expand(name, t.shape(), &data) {
                Some((shape, expanded)) => (shape, Cow::Owned(expanded)),
                None => (t.shape().to_vec(), data),
            };
            tensors.insert(name.clone(), entry);
        }
        Ok(Dense { tensors, groups })
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect()
    }

    fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|(_, d)| &**d)
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }

    /// Owned tensors, for the engines that take them (PTX).
    fn to_tensors(&self) -> Result<BTreeMap<String, Tensor>, Error> {
        let mut out = BTreeMap::new();
        for (name, (shape, data)) in &self.tensors {
            out.insert(name.clone(), Tensor::new(shape.clone(), data.to_vec())?);
        }
        Ok(out)
    }
}

/// The offsets of a varlen batch's sequences along T (`[N + 1]`, from 0 to T), as FLA's
/// `cu_seqlens`, in either integer type.
#[derive(Clone, Copy, Debug)]
pub enum CuSeqlens<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl<'a> From<&'a [i32]> for CuSeqlens<'a> {
    fn from(x: &'a [i32]) -> Self {
        CuSeqlens::I32(x)
    }
}

impl<'a> From<&'a [i64]> for CuSeqlens<'a> {
    fn from(x: &'a [i64]) -> Self {
        CuSeqlens::I64(x)
    }
}

impl CuSeqlens<'_> {
    /// The sequences' lengths, after checking the offsets start at 0, increase strictly
    /// and end at `total`.
    fn lengths(&self, total: usize) -> Result<Vec<usize>, Error> {
        let cu: Vec<i64> = match self {
            CuSeqlens::I32(x) => x.iter().map(|&v| v as i64).collect(),
            CuSeqlens::I64(x) => x.to_vec(),
        };
        let bad = |m: String| Err(Error::Input(format!("cu_seqlens {m}")));
        if cu.len() < 2 {
            return bad(format!("has {} entries; it needs N + 1 >= 2", cu.len()));
        }
        if cu[0] != 0 {
            return bad(format!("starts at {}, not 0", cu[0]));
        }
        if let Some(n) = (1..cu.len()).find(|&n| cu[n] <= cu[n - 1]) {
            return bad(format!(
                "must increase strictly: cu_seqlens[{}] = {}, cu_seqlens[{n}] = {}",
                n - 1,
                cu[n - 1],
                cu[n]
            ));
        }
        let last = cu[cu.len() - 1];
        if last != total as i64 {
            return bad(format!("ends at {last}, but the inputs have T = {total} tokens"));
        }
        Ok(cu.windows(2).map(|w| (w[1] - w[0]) as usize).collect())
    }
}

/// The states of a serving engine's sequences, one slot per sequence: `[slots, H, K, V]`
/// for `h` and `[slots, H, D]` for each extra state, all zeros at first. [`Program::decode`]
/// reads and updates them in place.
#[derive(Clone, Debug)]
pub struct StatePool {
    slots: usize,
    /// (stem, elements per slot, data).
    states: Vec<(String, usize, Vec<f32>)>,
}

impl StatePool {
    pub fn slots(&self) -> usize {
        self.slots
    }

    fn find(&self, stem: &str) -> Result<usize, Error> {
        self.states.iter().position(|(s, _, _)| s == stem).ok_or_else(|| {
            let have: Vec<&str> = self.states.iter().map(|(s, _, _)| s.as_str()).collect();
            Error::Input(format!("the pool has no state `{stem}` (it has: {})", have.join(", ")))
        })
    }

    fn slot_range(&self, at: usize, slot: usize) -> Result<std::ops::Range<usize>, Error> {
        if slot >= self.slots {
            return Err(Error::Input(format!("slot {slot} is past the pool's {} slots", self.slots)));
        }
        let row = self.states[at].1;
        Ok(slot * row..(slot + 1) * row)
    }

    /// State `stem` (`h`, or an extra state's name) of `slot`: `[H, K, V]` or `[H, D]`.
    pub fn state(&self, stem: &str, slot: usize) -> Result<&[f32], Error> {
        let at = self.find(stem)?;
        let range = self.slot_range(at, slot)?;
        Ok(&self.states[at].2[range])
    }

    /// [`StatePool::state`], to write (to resume a sequence from a prefill's final state).
    pub fn state_mut(&mut self, stem: &str, slot: usize) -> Result<&mut [f32], Error> {
        let at = self.find(stem)?;
        let range = self.slot_range(at, slot)?;
        Ok(&mut self.states[at].2[range])
    }

    /// Zeros every state of `slot` (a sequence leaves, another will join there).
    pub fn clear(&mut self, slot: usize) -> Result<(), Error> {
        for at in 0..self.states.len() {
            let range = self.slot_range(at, slot)?;
            self.states[at].2[range].fill(0.0);
        }
        Ok(())
    }
}

enum Executable {
    Cpu(CpuProgram),
    Ptx { program: chunkc_codegen::program::Program, device: Device, sm: Sm },
}

/// A rule compiled for one target, schedule and [`Heads`]: run it on any batch and length.
pub struct Program {
    rule: chunkc_dsl::ast::Rule,
    heads: Heads,
    schedule: Schedule,
    threads: usize,
    exe: Executable,
    /// The backward program, compiled on the first [`Program::backward`] (CPU target).
    backward: OnceLock<Result<CpuProgram, String>>,
}

/// Compiles `rule`'s forward program: the kernel `schedule` names (recurrent, or chunked at
/// its chunk, fused or split) for `target`, specialised for `heads`.
pub fn compile(rule: &Rule, target: Target, schedule: Schedule, heads: Heads) -> Result<Program, Error> {
    if heads.heads == 0 || heads.k == 0 || heads.v == 0 {
        return Err(Error::Input(format!(
            "heads, K and V must be at least 1 (got H={} K={} V={})",
            heads.heads, heads.k, heads.v
        )));
    }
    if schedule.kernel == KernelKind::Chunked && schedule.chunk == 0 {
        return Err(Error::Input("the chunked kernel needs a chunk of at least 1".into()));
    }
    let rule = &rule.loaded.rule;
    let scale = heads.scale.unwrap_or(1.0 / (heads.k as f64).sqrt());
    let shape = Shape { heads: heads.heads, k: heads.k, v: heads.v, scale };
    let exe = match target {
        Target::Cpu => {
            if schedule.input != ElemType::F32 {
                return Err(Error::Input(format!(
                    "the CPU kernels read f32 (schedule input {}): pass 16-bit tensors as TensorRef::bf16 / f16 instead",
                    schedule.input.name()
                )));
            }
            let program = build_program(rule, shape, &schedule)?;
            Executable::Cpu(chunkc_codegen::cpu::compile_program(&program).map_err(|e| Error::Internal(e.to_string()))?)
        }
        Target::PtxSim(sm) | Target::Cuda(sm) => {
            let device = if matches!(target, Target::Cuda(_)) { Device::Cuda } else { Device::Sim };
            Executable::Ptx { program: build_program(rule, shape, &schedule)?, device, sm }
        }
    };
    Ok(Program {
        rule: rule.clone(),
        heads: Heads { scale: Some(scale), ..heads },
        schedule,
        threads: 0,
        exe,
        backward: OnceLock::new(),
    })
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("rule", &self.rule.name)
            .field("heads", &self.heads)
            .field("schedule", &self.schedule)
            .finish()
    }
}

impl Program {
    /// Worker threads on the CPU (0, the default: all cores).
    pub fn with_threads(mut self, threads: usize) -> Program {
        self.threads = threads;
        self
    }

    /// The program's tensors and phases (the ABI every executor binds through).
    pub fn spec(&self) -> &ProgramSpec {
        match &self.exe {
            Executable::Cpu(p) => &p.spec,
            Executable::Ptx { program, .. } => &program.spec,
        }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn heads(&self) -> Heads {
        self.heads
    }

    fn order(&self) -> Order {
        let threads = if self.threads == 0 { exec::default_threads() } else { self.threads };
        Order { threads, time_block: self.schedule.time_block, poison_scratch: false }
    }

    /// Refuses a tensor the rule does not take (`allowed_states`: whether initial states may
    /// be given) and checks the sizes against those the program was compiled for.
    fn check_names(&self, inputs: &Inputs<'_>, allowed_states: bool) -> Result<(), Error> {
        let states: Vec<String> =
            std::iter::once("h0".to_string()).chain(self.rule.states.iter().map(|s| s.initial_name())).collect();
        for name in inputs.tensors.keys() {
            let is_state = states.contains(name);
            if self.rule.input(name).is_none() && !(is_state && allowed_states) {
                let mut takes: Vec<String> = self.rule.inputs.iter().map(|i| i.name.clone()).collect();
                if allowed_states {
                    takes.extend(states.iter().cloned());
                }
                let why = if is_state { " (the decode step reads the states from its pool)" } else { "" };
                return Err(Error::Input(format!(
                    "tensor `{name}` is not one rule `{}` takes here{why} (it takes: {})",
                    self.rule.name,
                    takes.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn check_compiled_for(&self, dims: &Dims) -> Result<(), Error> {
        let h = self.heads;
        if (dims.heads, dims.k, dims.v) != (h.heads, h.k, h.v) {
            return Err(Error::Input(format!(
                "the program was compiled for H={} K={} V={}; the tensors have H={} K={} V={}",
                h.heads, h.k, h.v, dims.heads, dims.k, dims.v
            )));
        }
        Ok(())
    }

    /// Runs the forward on a dense batch: per-token inputs `[B, T, H, D]`, per-head ones
    /// `[H]` / `[H, D]`, optional `h0` `[B, H, K, V]` (and `<name>0` per extra state).
    /// Returns `o` `[B, T, H, V]`, `hT` and each extra state's `<name>T`.
    pub fn forward(&self, inputs: &Inputs<'_>) -> Result<Outputs, Error> {
        self.check_names(inputs, true)?;
        let dense = Dense::of(&self.rule, inputs)?;
        let dims = infer_dims_of_shapes(&self.rule, &dense.shapes(), "the inputs")?;
        self.check_compiled_for(&dims)?;
        match &self.exe {
            Executable::Cpu(compiled) => {
                let sizes = Sizes { batch: dims.batch, seq_len: dims.seq_len, heads: dims.heads, k: dims.k, v: dims.v };
                let mut memory = ProgramMemory::new(&compiled.spec, sizes).map_err(spec_error)?;
                let get = |name: &str| dense.get(name);
                exec::run_program(&compiled.spec, &compiled.kernels(), &get, &mut memory, self.order())
                    .map_err(spec_error)?;
                Ok(Outputs(memory.into_outputs(&compiled.spec).map_err(spec_error)?))
            }
            Executable::Ptx { program, device, sm } => {
                crate::gpu::execute(program, &dense.to_tensors()?, dims, *device, *sm, &self.schedule.ptx)
            }
        }
    }

    /// Runs the forward on a varlen batch: N sequences packed along T of a batch of one
    /// (per-token inputs `[1, T, H, D]`), sequence n being tokens `cu_seqlens[n]..
    /// cu_seqlens[n+1]`; optional `h0` `[N, H, K, V]` (and `<name>0` `[N, H, D]`). Chunks
    /// restart at every sequence. Returns `o` `[1, T, H, V]` and the final states, one row
    /// per sequence.
    pub fn forward_varlen<'c>(
        &self,
        inputs: &Inputs<'_>,
        cu_seqlens: impl Into<CuSeqlens<'c>>,
    ) -> Result<Outputs, Error> {
        self.check_names(inputs, true)?;
        let dense = Dense::of(&self.rule, inputs)?;
        let states = self.state_tensors();
        let per_token: BTreeMap<String, Vec<usize>> =
            dense.shapes().into_iter().filter(|(n, _)| !states.iter().any(|(s, _)| s == n)).collect();
        let dims = infer_dims_of_shapes(&self.rule, &per_token, "the inputs")?;
        self.check_compiled_for(&dims)?;
        if dims.batch != 1 {
            return Err(Error::Input(format!(
                "a varlen batch packs its sequences along T of a batch of one; the inputs have B = {}",
                dims.batch
            )));
        }
        let lens = cu_seqlens.into().lengths(dims.seq_len)?;
        let n = lens.len();
        for (name, width) in &states {
            if let Some(shape) = dense.shape(name) {
                let label = if width.len() == 2 { "[N, H, K, V]" } else { "[N, H, D]" };
                let want: Vec<usize> = [n, dims.heads].into_iter().chain(width.iter().copied()).collect();
                expect_shape(name, shape, &want, label)?;
            }
        }
        let shapes = self.output_shapes(&[1, dims.seq_len, dims.heads, dims.v], n);
        self.run_packed(&dense, &lens, shapes, None)
    }

    /// One decode step of a serving engine: sequence n (per-token inputs `[N, 1, H, D]`)
    /// reads its states from slot `state_indices[n]` of `pool` and writes them back there
    /// (−1: start from zeros and keep nothing). Returns `o` `[N, 1, H, V]`.
    pub fn decode(&self, inputs: &Inputs<'_>, pool: &mut StatePool, state_indices: &[i64]) -> Result<Tensor, Error> {
        self.check_names(inputs, false)?;
        let dense = Dense::of(&self.rule, inputs)?;
        let dims = infer_dims_of_shapes(&self.rule, &dense.shapes(), "the inputs")?;
        self.check_compiled_for(&dims)?;
        if dims.seq_len != 1 {
            return Err(Error::Input(format!(
                "the decode step takes one token per sequence (inputs [N, 1, H, D]); the inputs have T = {}",
                dims.seq_len
            )));
        }
        if state_indices.len() != dims.batch {
            return Err(Error::Input(format!(
                "state_indices has {} entries for {} sequences",
                state_indices.len(),
                dims.batch
            )));
        }
        let expected = self.state_pool(pool.slots);
        let same = pool.states.len() == expected.states.len()
            && pool.states.iter().zip(&expected.states).all(|(a, b)| a.0 == b.0 && a.1 == b.1);
        if !same {
            return Err(Error::Input("the state pool was made by a program of another rule or size".into()));
        }
        let lens = vec![1; dims.batch];
        let shapes = vec![("o".to_string(), vec![dims.batch, 1, dims.heads, dims.v])];
        let pools = Pools {
            slots: state_indices,
            pools: pool.states.iter_mut().map(|(stem, _, data)| (stem.clone(), data.as_mut_slice())).collect(),
        };
        let mut out = self.run_packed(&dense, &lens, shapes, Some(pools))?;
        out.0.remove("o").ok_or_else(|| Error::Internal("the decode step wrote no `o`".into()))
    }

    /// The gradient of `L = sum(o * do) + sum(hT * dhT)` (and `sum(<name>T * d<name>T)` per
    /// extra state) for a dense batch: `inputs` as for [`Program::forward`] plus the
    /// cotangent `do` `[B, T, H, V]` and optionally `dhT` (and `d<name>T`). Returns `o`,
    /// the final states, `d<input>` for every input (a per-head parameter's summed over batch
    /// and time) and `dh0` (`d<name>0`) when `h0` (`<name>0`) was given. The backward is the
    /// one `chunkc grad` runs: chunked at the program's chunk for a chunked program,
    /// recurrent with a checkpoint every 16 tokens for a recurrent one; on the CPU it is
    /// compiled on the first call.
    pub fn backward(&self, inputs: &Inputs<'_>) -> Result<Outputs, Error> {
        let cotangents: Vec<String> = std::iter::once("do".to_string())
            .chain(self.state_tensors().iter().map(|(n, _)| format!("d{}T", n.trim_end_matches('0'))))
            .collect();
        let primal = Inputs {
            tensors: inputs
                .tensors
                .iter()
                .filter(|(n, _)| !cotangents.contains(n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
        };
        self.check_names(&primal, true)?;
        let dense = Dense::of(&self.rule, inputs)?;
        let dims = infer_dims_of_shapes(&self.rule, &dense.shapes(), "the inputs")?;
        self.check_compiled_for(&dims)?;
        let d_o = dense.shape("do").ok_or_else(|| {
            Error::Input("the backward needs the cotangent `do` [B, T, H, V] among the inputs".into())
        })?;
        expect_shape("do", d_o, &dims.output_shape(), "[B, T, H, V]")?;
        if let Some(d) = dense.shape("dhT") {
            expect_shape("dhT", d, &dims.state_shape(), "[B, H, K, V]")?;
        }
        let opts = crate::grad::GradOptions {
            backend: match self.schedule.kernel {
                KernelKind::Chunked => crate::Backend::Chunked,
                KernelKind::Recurrent => crate::Backend::Recurrent,
            },
            engine: crate::Engine::Jit,
            threads: self.order().threads,
            scale: self.heads.scale,
            // The recurrent backward's checkpoints every 16 tokens; the chunked one stores
            // every chunk's state.
            checkpoint: (self.schedule.kernel == KernelKind::Recurrent).then_some(16),
            chunk: self.schedule.chunk,
            bv: (self.schedule.kernel == KernelKind::Chunked).then_some(self.schedule.bv).flatten(),
            program: match self.schedule.kernel {
                KernelKind::Chunked => self.schedule.program,
                KernelKind::Recurrent => Default::default(),
            },
            ptx: crate::grad::PtxPrecision::of(&self.schedule),
        };
        if let Executable::Ptx { device, sm, .. } = &self.exe {
            let opts = crate::grad::GradOptions { engine: crate::Engine::Ptx { device: *device, target: *sm }, ..opts };
            let mut out = crate::grad::grad(&self.rule, &dense.to_tensors()?, "the inputs", &opts, false)?;
            crate::heads::reduce_gradients(&dense.groups, &mut out)?;
            return Ok(Outputs(out));
        }
        let compiled = self
            .backward
            .get_or_init(|| {
                let probe = Dims { batch: 1, seq_len: 1, ..dims };
                let program =
                    crate::grad::build_program(&self.rule, &probe, &GradOptions { ptx: Default::default(), ..opts })
                        .map_err(|e| e.to_string())?;
                chunkc_codegen::cpu::compile_program(&program).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))?;
        let sizes = Sizes { batch: dims.batch, seq_len: dims.seq_len, heads: dims.heads, k: dims.k, v: dims.v };
        let mut memory = ProgramMemory::new(&compiled.spec, sizes).map_err(spec_error)?;
        let get = |name: &str| dense.get(name);
        exec::run_program(&compiled.spec, &compiled.kernels(), &get, &mut memory, self.order()).map_err(spec_error)?;
        let mut out = memory.into_outputs(&compiled.spec).map_err(spec_error)?;
        crate::grad::sum_partial_gradients(&self.rule, &dims, compiled.spec.vtiles(), &mut out)?;
        crate::grad::drop_initial_gradients(&self.rule, &|n| inputs.tensors.contains_key(n), &mut out);
        crate::heads::reduce_gradients(&dense.groups, &mut out)?;
        Ok(Outputs(out))
    }

    /// A pool of `slots` zero states for [`Program::decode`].
    pub fn state_pool(&self, slots: usize) -> StatePool {
        let h = self.heads;
        let states = self
            .state_tensors()
            .into_iter()
            .map(|(name, width)| {
                let row = h.heads * width.iter().product::<usize>();
                (name.trim_end_matches('0').to_string(), row, vec![0.0; row * slots])
            })
            .collect();
        StatePool { slots, states }
    }

    /// The initial-state tensors (`h0`, `<name>0`) with their per-head widths.
    fn state_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.heads;
        let mut out = vec![("h0".to_string(), vec![h.k, h.v])];
        for s in &self.rule.states {
            out.push((s.initial_name(), vec![if s.ty == Ty::VecK { h.k } else { h.v }]));
        }
        out
    }

    /// `o` of `o_shape` and every final state, `n` rows each.
    fn output_shapes(&self, o_shape: &[usize], n: usize) -> Vec<(String, Vec<usize>)> {
        let mut shapes = vec![("o".to_string(), o_shape.to_vec())];
        for (name, width) in self.state_tensors() {
            let last = format!("{}T", name.trim_end_matches('0'));
            shapes.push((last, [n, self.heads.heads].into_iter().chain(width).collect()));
        }
        shapes
    }

    fn run_packed(
        &self,
        dense: &Dense<'_>,
        lens: &[usize],
        shapes: Vec<(String, Vec<usize>)>,
        pools: Option<Pools<'_>>,
    ) -> Result<Outputs, Error> {
        let Executable::Cpu(compiled) = &self.exe else {
            return self.run_each_sequence(dense, lens, shapes, pools);
        };
        let mut outputs = poisoned(shapes)?;
        let mut bound: BTreeMap<String, Bound<'_>> = BTreeMap::new();
        for (name, (_, data)) in &dense.tensors {
            bound.insert(name.clone(), Bound::In(data));
        }
        for (name, t) in outputs.iter_mut() {
            bound.insert(name.clone(), Bound::Out(&mut t.data));
        }
        packed::run_packed(&compiled.spec, &compiled.kernels(), lens, &mut bound, pools, self.order())
            .map_err(spec_error)?;
        drop(bound);
        Ok(Outputs(outputs))
    }
}

impl Program {
    /// Varlen and decode on the PTX targets: one dense launch per sequence (B = 1, its
    /// tokens, its state rows or pool slot), the results placed where the packed run would
    /// have written them. Exact on every target; on a GPU it costs a launch per sequence.
    fn run_each_sequence(
        &self,
        dense: &Dense<'_>,
        lens: &[usize],
        shapes: Vec<(String, Vec<usize>)>,
        pools: Option<Pools<'_>>,
    ) -> Result<Outputs, Error> {
        let states = self.state_tensors();
        let is_state = |name: &str| states.iter().any(|(s, _)| s == name);
        let mut outputs = poisoned(shapes)?;
        let mut pools = pools;
        let slots = match &pools {
            Some(p) => Some(
                packed::slot_rows(p.slots, p.pools.first().map_or(0, |(_, d)| d.len()) / self.state_row(&states[0].1))
                    .map_err(spec_error)?,
            ),
            None => None,
        };
        let mut start = 0;
        for (n, &len) in lens.iter().enumerate() {
            // This sequence's tensors: its token rows, its state rows (or pool slot).
            let mut owned: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
            for (name, (shape, data)) in &dense.tensors {
                if is_state(name) {
                    let row = data.len() / shape[0];
                    owned.insert(
                        name.to_string(),
                        ([&[1], &shape[1..]].concat(), data[n * row..(n + 1) * row].to_vec()),
                    );
                } else if self.rule.input(name).is_some_and(|i| !i.per_head) {
                    let row: usize = shape[2..].iter().product();
                    let tokens = (start * row)..((start + len) * row);
                    owned.insert(name.to_string(), ([&[1, len], &shape[2..]].concat(), data[tokens].to_vec()));
                }
            }
            if let (Some(p), Some(slots)) = (&pools, &slots) {
                for ((name, width), (_, pool)) in states.iter().zip(&p.pools) {
                    if let Some(slot) = slots[n] {
                        let row = self.state_row(width);
                        let shape = [vec![1, self.heads.heads], width.clone()].concat();
                        owned.insert(name.clone(), (shape, pool[slot * row..(slot + 1) * row].to_vec()));
                    }
                }
            }
            let mut one = Inputs::new();
            for (name, (shape, data)) in &dense.tensors {
                if self.rule.input(name).is_some_and(|i| i.per_head) {
                    one.insert(name, TensorRef::f32(data, shape)?);
                }
            }
            for (name, (shape, data)) in &owned {
                one.insert(name, TensorRef::f32(data, shape)?);
            }
            let out = self.forward(&one)?;
            for (name, t) in out.0 {
                let Some(target) = outputs.get_mut(&name) else {
                    // A final state the pool takes.
                    if let (Some(p), Some(slots)) = (pools.as_mut(), &slots) {
                        let stem = name.trim_end_matches('T');
                        if let (Some((_, pool)), Some(slot)) = (p.pools.iter_mut().find(|(s, _)| s == stem), slots[n]) {
                            pool[slot * t.data.len()..(slot + 1) * t.data.len()].copy_from_slice(&t.data);
                        }
                    }
                    continue;
                };
                let at = if name == "o" { start * t.data.len() / len } else { n * t.data.len() };
                target.data[at..at + t.data.len()].copy_from_slice(&t.data);
            }
            start += len;
        }
        Ok(Outputs(outputs))
    }

    /// Elements of one sequence's state of per-head `width` (`[K, V]`, `[K]`).
    fn state_row(&self, width: &[usize]) -> usize {
        self.heads.heads * width.iter().product::<usize>()
    }
}

/// NaN-filled outputs of these shapes: an element a run leaves unwritten shows.
fn poisoned(shapes: Vec<(String, Vec<usize>)>) -> Result<BTreeMap<String, Tensor>, Error> {
    let mut out = BTreeMap::new();
    for (name, shape) in shapes {
        let n = Tensor::numel_of(&shape)?;
        out.insert(name, Tensor::new(shape, vec![f32::NAN; n])?);
    }
    Ok(out)
}

fn spec_error(e: chunkc_codegen::program::SpecError) -> Error {
    Error::Input(e.to_string())
}
