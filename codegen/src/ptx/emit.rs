//! The SIMT lowering itself: one strided loop over output elements per op, a barrier after
//! each (see the module doc of `ptx` for the design).
//!
//! Registers are virtual (fresh for every value); ptxas allocates them. `%r` are 32-bit
//! integers (thread and element indices), `%rd` 64-bit integers (index expressions and
//! addresses), `%f` f32, `%fd` f64 and `%p` predicates.

use super::hazards::Pending;
use super::mma::{self, DotPlan, LaneRegs};
use super::*;
use crate::ir::*;
use crate::midend::layout::{self, Plan, Storage, YieldCopy};
use crate::midend::{self, Abilities};
use std::fmt::Write as _;

/// Name of the dynamic shared-memory array.
const SMEM: &str = "chunkc_smem";
/// Name of the static shared array holding the 16-bit operands of tensor-core dots.
const STAGE: &str = "chunkc_stage";
/// log2(e) and ln(2) as f32.
const LOG2E: &str = "0f3FB8AA3B";
const LN2: &str = "0f3F317218";

fn ty(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::F64 => "f64",
    }
}

/// A float immediate of `dt` (PTX hex form, exact for every value including inf and NaN).
fn fimm(v: f64, dt: DType) -> String {
    match dt {
        DType::F32 => format!("0f{:08X}", (v as f32).to_bits()),
        DType::F64 => format!("0d{:016X}", v.to_bits()),
    }
}

/// A PTX identifier made from `s` (letters, digits and `_`; not starting with a digit).
fn ident(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// An address offset as PTX writes it after a register: `+8`, `+-8` (as LLVM's NVPTX
/// backend prints it), or nothing for 0.
fn offset(off: i64) -> String {
    if off == 0 {
        String::new()
    } else {
        format!("+{off}")
    }
}

/// A strided loop over `0..n` (one element per thread per iteration).
pub(super) struct ELoop {
    pub(super) e: String,
    head: String,
    end: String,
    /// Copies of the body per iteration ([`unroll_factor`]): `e` advances by this many blocks.
    copies: usize,
}

pub(super) struct Em<'k> {
    pub(super) k: &'k Kernel,
    plan: Plan,
    pub(super) space: &'static str,
    out: String,
    n: [u32; 6],
    labels: u32,
    pub(super) tid: String,
    tile_base: String,
    /// Bytes from a double-buffered load's even copy to its odd copy, in the current loop
    /// (see `async_copy.rs`).
    pub(super) phase_stride: i64,
    pub(super) sched: PtxSchedule,
    /// Per-lane registers of the tensor-core dots (computed in the prologue when needed).
    pub(super) lanes: Option<LaneRegs>,
    /// Address of the 16-bit staging buffer (a static `.shared` array), when there is one.
    stage_reg: String,
    /// Staging bytes the emitted dots use (at most what the prologue reserved).
    pub(super) stage_used: usize,
    /// Byte ranges of the tile workspace with `cp.async` copies in flight.
    pub(super) pending_async: Vec<(i64, i64)>,
    /// Per tensor parameter, the alignment its loads assume (16 for 16-byte `cp.async`).
    pub(super) param_align: Vec<usize>,
    params: Vec<String>,
    batch: String,
    head: String,
    /// The V-tile of this CTA (`%ctaid.x` under Grid::BatchHeadsVTiles, else 0).
    vtile: String,
    seq_len: String,
    pub(super) iter: String,
    /// The chunk of this CTA in a chunk-parallel kernel (`%ctaid.y`): its loop runs that one
    /// iteration.
    chunk: Option<String>,
    /// `fused[v]`: `v` is computed inside its consumer, element by element, and never written
    /// (`midend::fuse`); `defs` holds every value's defining op.
    fused: Vec<bool>,
    defs: Vec<Option<Op>>,
    /// Per loop (pre-order), the state update written straight into the carried region.
    in_place_dots: Vec<Option<ValueId>>,
    /// The current loop's in-place update and the region it is written to.
    in_place: Option<(ValueId, Storage)>,
    next_loop: usize,
    /// What the ops since the last barrier touched (`hazards.rs`).
    pub(super) pending: Pending,
}

pub(super) const R: usize = 0;
pub(super) const RD: usize = 1;
pub(super) const F: usize = 2;
pub(super) const FD: usize = 3;
pub(super) const P: usize = 4;
/// 16-bit registers (loads of bf16/f16 tensor elements).
pub(super) const H: usize = 5;
const PREFIX: [&str; 6] = ["%r", "%rd", "%f", "%fd", "%p", "%h"];

pub(super) fn emit(kernel: &Kernel, target: Sm, opts: EmitOptions, sched: PtxSchedule) -> Result<PtxKernel, PtxError> {
    sched.validate().map_err(PtxError)?;
    let layout_err = |e: layout::LayoutError| PtxError(format!("ptx: {}", e.0));
    // The mid-end for a SIMT target: every single-use elementwise chain fuses into its root
    // (one pass, one barrier), and a state update that may is written in place.
    let mut prepared = midend::prepare(kernel, &Abilities::simt()).map_err(layout_err)?;
    let kernel = &prepared.kernel;
    // The staging buffer of the 16-bit tensor-core dots is always in shared memory (ldmatrix
    // reads only shared memory); the tiles join it there when both fit the limit.
    let stage = mma::staging_need(kernel, sched.dot, sched.min_mma_dim, sched.staging_bytes);
    let limit = schedule::smem_limit(&sched, target, opts.smem_limit);
    let mut shared = prepared.plan.bytes + stage <= limit;
    // A chunk-parallel kernel runs one iteration per CTA: there is no next one to prefetch.
    if sched.stages == 2 && sched.async_copy && !kernel.chunk_parallel {
        // Double buffers for the f32 loads of the chunk loop (the ones cp.async issues), when
        // the larger workspace still fits; else (or when a loaded tile is read after its
        // loop, where no parity applies) the single-stage placement above stands.
        let single = (prepared.plan.clone(), prepared.in_place.clone());
        match prepared.replan(&super::async_copy::pipelinable) {
            Ok(()) if prepared.plan.bytes + stage <= limit => shared = true,
            _ => (prepared.plan, prepared.in_place) = single,
        }
    }
    let kernel = &prepared.kernel;
    let plan = prepared.plan.clone();
    let bytes = plan.bytes;
    let threads = sched.threads();
    let uses_mma = mma::uses_tensor_cores(kernel, &sched);
    let entry = ident(&kernel.name);

    // The .param list.
    let elems = param_elems(kernel)?;
    let mut params = vec![];
    for (p, &elem) in kernel.params.iter().zip(&elems) {
        let access = match p.access {
            Access::Read => ParamAccess::Read,
            Access::Write => ParamAccess::Write,
        };
        let align = elem.size();
        params.push(ParamMeta { name: p.name.clone(), access, pointer: true, kind: ParamKind::Tensor, align, elem });
    }
    if !shared {
        params.push(ParamMeta {
            name: "scratch".into(),
            access: ParamAccess::ReadWrite,
            pointer: true,
            kind: ParamKind::Scratch,
            align: 64,
            elem: ElemType::F32,
        });
    }
    let scalars = ["batch", "heads", "seq_len"];
    for s in scalars {
        params.push(ParamMeta {
            name: s.into(),
            access: ParamAccess::Read,
            pointer: false,
            kind: ParamKind::Scalar,
            align: 0,
            elem: ElemType::F32,
        });
    }
    let pname = |i: usize| format!("{entry}_param_{i}");

    let mut em = Em {
        k: kernel,
        plan,
        space: if shared { "shared" } else { "global" },
        out: String::new(),
        n: [0; 6],
        labels: 0,
        tid: String::new(),
        tile_base: String::new(),
        phase_stride: 0,
        params: vec![],
        batch: String::new(),
        head: String::new(),
        vtile: String::new(),
        seq_len: String::new(),
        iter: String::new(),
        chunk: None,
        fused: prepared.fusion.fused.clone(),
        defs: prepared.fusion.defs.clone(),
        in_place_dots: prepared.in_place.clone(),
        in_place: None,
        next_loop: 0,
        pending: Pending::default(),
        sched,
        lanes: None,
        stage_reg: String::new(),
        stage_used: 0,
        pending_async: vec![],
        param_align: elems.iter().map(|e| e.size()).collect(),
    };

    // Prologue: thread and CTA indices, scalars, pointers, the CTA's tile base.
    em.tid = em.reg(R);
    let tid = em.tid.clone();
    em.ins(format!("mov.u32 {tid}, %tid.x"));
    let cta32 = em.reg(R);
    em.ins(format!("mov.u32 {cta32}, %ctaid.x"));
    let cta = em.reg(RD);
    em.ins(format!("cvt.u64.u32 {cta}, {cta32}"));
    let u64_of = |em: &mut Em, special: &str| {
        let (r32, r) = (em.reg(R), em.reg(RD));
        em.ins(format!("mov.u32 {r32}, {special}"));
        em.ins(format!("cvt.u64.u32 {r}, {r32}"));
        r
    };
    let vtiles = kernel.vtiles.max(1);
    // `vt`: (b*H + h, the V-tile) when they are not `cta` itself; `chunk`: the chunk of a
    // chunk-parallel kernel. `cta` becomes the flat grid point (for the scratch base).
    let mut vt = None;
    let mut chunk_reg = None;
    if kernel.chunk_parallel {
        // Grid::VTilesChunksBatchHeads: %ctaid.x the V-tile, .y the chunk, .z b*H + h;
        // cta = ((b*H + h) * chunks + chunk) * vtiles + vt.
        let (x, v) = (cta.clone(), em.reg(RD));
        em.ins(format!("mov.u64 {v}, {x}"));
        let y = u64_of(&mut em, "%ctaid.y");
        let z = u64_of(&mut em, "%ctaid.z");
        let ny = u64_of(&mut em, "%nctaid.y");
        em.ins(format!("mad.lo.s64 {cta}, {z}, {ny}, {y}"));
        em.ins(format!("mad.lo.s64 {cta}, {cta}, {vtiles}, {v}"));
        vt = Some((z, v));
        chunk_reg = Some(y);
    } else if vtiles > 1 {
        // Grid::BatchHeadsVTiles: %ctaid.x is the V-tile and %ctaid.y is b*H + h;
        // cta = (b*H + h) * vtiles + vt.
        let y = u64_of(&mut em, "%ctaid.y");
        let v = em.reg(RD);
        em.ins(format!("mov.u64 {v}, {cta}"));
        em.ins(format!("mad.lo.s64 {cta}, {y}, {vtiles}, {v}"));
        vt = Some((y, v));
    }
    let np = params.len();
    let (batch, heads, seq_len) = (em.reg(RD), em.reg(RD), em.reg(RD));
    em.ins(format!("ld.param.u64 {batch}, [{}]", pname(np - 3)));
    em.ins(format!("ld.param.u64 {heads}, [{}]", pname(np - 2)));
    em.ins(format!("ld.param.u64 {seq_len}, [{}]", pname(np - 1)));
    let grid = em.reg(RD);
    em.ins(format!("mul.lo.s64 {grid}, {batch}, {heads}"));
    let past = if kernel.chunk_parallel {
        vt.as_ref().map(|(z, _)| z.clone()).unwrap_or_else(|| cta.clone())
    } else {
        if vtiles > 1 {
            em.ins(format!("mul.lo.s64 {grid}, {grid}, {vtiles}"));
        }
        cta.clone()
    };
    let p = em.reg(P);
    em.ins(format!("setp.ge.s64 {p}, {past}, {grid}"));
    em.comment("CTAs past the grid points have no work (uniform per CTA)");
    em.ins(format!("@{p} exit"));
    let (b, h) = (em.reg(RD), em.reg(RD));
    let bh = vt.as_ref().map(|(y, _)| y.clone()).unwrap_or_else(|| cta.clone());
    em.ins(format!("div.s64 {b}, {bh}, {heads}"));
    em.ins(format!("rem.s64 {h}, {bh}, {heads}"));
    // Kernels without V-tiles never read IdxVar::VTile; 0 keeps `idx` total.
    let vtile = match vt {
        Some((_, v)) => v,
        None => {
            let z = em.reg(RD);
            em.ins(format!("mov.s64 {z}, 0"));
            z
        }
    };
    for i in 0..kernel.params.len() {
        let r = em.reg(RD);
        em.ins(format!("ld.param.u64 {r}, [{}]", pname(i)));
        em.ins(format!("cvta.to.global.u64 {r}, {r}"));
        em.params.push(r);
    }
    em.tile_base = em.reg(RD);
    let base = em.tile_base.clone();
    if shared {
        em.ins(format!("mov.u64 {base}, {SMEM}"));
    } else {
        let s = em.reg(RD);
        em.ins(format!("ld.param.u64 {s}, [{}]", pname(kernel.params.len())));
        em.ins(format!("cvta.to.global.u64 {s}, {s}"));
        em.ins(format!("mul.lo.s64 {base}, {cta}, {bytes}"));
        em.ins(format!("add.s64 {base}, {base}, {s}"));
    }
    em.iter = em.reg(RD);
    let iter = em.iter.clone();
    em.ins(format!("mov.s64 {iter}, 0"));
    if stage > 0 {
        em.stage_reg = em.reg(RD);
        let r = em.stage_reg.clone();
        em.ins(format!("mov.u64 {r}, {STAGE}"));
    }
    if uses_mma {
        em.lane_regs();
    }
    (em.batch, em.head, em.seq_len, em.vtile) = (b, h, seq_len, vtile);
    em.chunk = chunk_reg;

    em.block(&kernel.body)?;
    em.flush_async();
    em.ins("ret");
    debug_assert!(em.stage_used <= stage, "staging {} > reserved {stage}", em.stage_used);

    // Assemble the module text.
    let mut s = String::new();
    let space = em.space;
    let _ = writeln!(s, "//");
    let _ = writeln!(s, "// Generated by chunkc: PTX backend (SIMT lowering; dots: {:?}).", sched.dot);
    let cta_is = if kernel.chunk_parallel {
        "one CTA per (V-tile, chunk, b, h): blockIdx = (vt, chunk, b * heads + h)"
    } else if vtiles > 1 {
        "one CTA per (V-tile, b, h): blockIdx = (vt, b * heads + h)"
    } else {
        "one CTA per (b, h): blockIdx.x = b * heads + h"
    };
    let _ = writeln!(s, "// kernel {entry}: {threads} threads per CTA, {cta_is}");
    let _ = writeln!(s, "// tiles: {bytes} bytes per CTA in {space} memory; 16-bit staging: {stage} bytes");
    let _ = writeln!(s, "// schedule: {}", serde_json::to_string(&sched).unwrap_or_default());
    let _ = writeln!(s, "//");
    let _ = writeln!(s, ".version {}", target.isa_version());
    let _ = writeln!(s, ".target {}", target.name());
    let _ = writeln!(s, ".address_size 64");
    let _ = writeln!(s);
    if stage > 0 {
        let _ = writeln!(s, ".shared .align 16 .b8 {STAGE}[{stage}];");
    }
    if shared {
        let _ = writeln!(s, ".extern .shared .align 16 .b8 {SMEM}[];");
    }
    if shared || stage > 0 {
        let _ = writeln!(s);
    }
    let _ = writeln!(s, ".visible .entry {entry}(");
    for (i, p) in params.iter().enumerate() {
        let comma = if i + 1 < params.len() { "," } else { "" };
        let _ = writeln!(s, "\t.param .u64 {}{comma} // {} ({:?})", pname(i), p.name, p.access);
    }
    let _ = writeln!(s, ")");
    let _ = writeln!(s, ".maxntid {threads}, 1, 1");
    let _ = writeln!(s, ".maxnreg {}", sched.max_registers());
    let _ = writeln!(s, "{{");
    let decl = [".b32", ".b64", ".f32", ".f64", ".pred", ".b16"];
    for k in 0..6 {
        if em.n[k] > 0 {
            let _ = writeln!(s, "\t.reg {} {}<{}>;", decl[k], PREFIX[k], em.n[k]);
        }
    }
    let _ = writeln!(s);
    s.push_str(&em.out);
    let _ = writeln!(s, "}}");

    for (p, &w) in em.param_align.iter().enumerate() {
        params[p].align = params[p].align.max(w);
    }
    let grid = match (kernel.chunk_parallel, vtiles > 1) {
        (true, _) => {
            let chunk = loop_tokens(kernel).ok_or_else(|| {
                PtxError(format!("ptx: chunk-parallel kernel {} has no loop over ceil(T / C) chunks", kernel.name))
            })?;
            Grid::VTilesChunksBatchHeads { vtiles: vtiles as u32, chunk: chunk as u32 }
        }
        (false, true) => Grid::BatchHeadsVTiles { vtiles: vtiles as u32 },
        (false, false) => Grid::BatchHeadsX,
    };
    let meta = LaunchMeta {
        entry,
        target,
        grid,
        block: [threads, 1, 1],
        tile_space: if shared { TileSpace::Shared } else { TileSpace::Global },
        dynamic_smem_bytes: if shared { bytes } else { 0 },
        scratch_bytes_per_cta: if shared { 0 } else { bytes },
        static_smem_bytes: stage,
        schedule: sched,
        params,
        scalars: scalars.iter().map(|s| s.to_string()).collect(),
    };
    Ok(PtxKernel { ptx: s, meta })
}

/// Tokens per iteration of a kernel's top-level loop, when it runs over `ceil(T / C)` chunks.
fn loop_tokens(kernel: &Kernel) -> Option<usize> {
    kernel.body.iter().find_map(|s| match s {
        Stmt::Loop { count: Idx::CeilDiv(t, c), .. } if **t == Idx::Var(IdxVar::SeqLen) => usize::try_from(*c).ok(),
        _ => None,
    })
}

impl Em<'_> {
    pub(super) fn reg(&mut self, kind: usize) -> String {
        let r = format!("{}{}", PREFIX[kind], self.n[kind]);
        self.n[kind] += 1;
        r
    }

    fn freg(&mut self, dt: DType) -> String {
        self.reg(if dt == DType::F32 { F } else { FD })
    }

    pub(super) fn ins(&mut self, s: impl AsRef<str>) {
        self.out.push('\t');
        self.out.push_str(s.as_ref());
        self.out.push_str(";\n");
    }

    pub(super) fn comment(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.out, "\t// {}", s.as_ref());
    }

    pub(super) fn label(&mut self) -> String {
        self.labels += 1;
        format!("$L_{}", self.labels)
    }

    pub(super) fn place(&mut self, l: &str) {
        let _ = writeln!(self.out, "{l}:");
    }

    pub(super) fn barrier(&mut self) {
        self.ins("bar.sync 0");
        self.pending.clear();
    }

    pub(super) fn is_fused(&self, v: ValueId) -> bool {
        self.fused[v.0 as usize]
    }

    pub(super) fn def(&self, v: ValueId) -> Option<&Op> {
        self.defs[v.0 as usize].as_ref()
    }

    /// Whether a `Dot` runs on 16-bit tensor cores, through the staging buffer.
    pub(super) fn dot_uses_staging(&self, op: &Op) -> bool {
        let Op::Dot { a, b, ta, tb, .. } = op else { return false };
        let (m, n, k) = mma::dot_dims(self.k, *a, *b, *ta, *tb);
        let s = self.sched;
        matches!(mma::plan_dot(s.dot, m, n, k, s.min_mma_dim, s.staging_bytes), DotPlan::Half { .. })
    }

    pub(super) fn storage(&self, v: ValueId) -> Storage {
        if let Some((dot, region)) = self.in_place {
            if dot == v {
                return region;
            }
        }
        // layout::plan checked that every value read is defined, so it has storage.
        self.plan.storage[v.0 as usize].unwrap_or(Storage { off: 0, rs: 0, cs: 0, phase: false })
    }

    /// Storage of operand `v` read with broadcasting (a dimension of 1 repeats).
    fn bstorage(&self, v: ValueId) -> Storage {
        let t = self.k.ty(v);
        let mut s = self.storage(v);
        if t.rows == 1 {
            s.rs = 0;
        }
        if t.cols == 1 {
            s.cs = 0;
        }
        s
    }

    // ---- index expressions (s64, uniform across the CTA) ----

    pub(super) fn idx(&mut self, e: &Idx) -> String {
        match e {
            Idx::Const(c) => {
                let r = self.reg(RD);
                self.ins(format!("mov.s64 {r}, {c}"));
                r
            }
            Idx::Var(v) => match v {
                IdxVar::Batch => self.batch.clone(),
                IdxVar::Head => self.head.clone(),
                IdxVar::SeqLen => self.seq_len.clone(),
                IdxVar::Iter => self.iter.clone(),
                IdxVar::VTile => self.vtile.clone(),
            },
            Idx::Add(a, b) | Idx::Sub(a, b) | Idx::Mul(a, b) | Idx::Min(a, b) => {
                let op = match e {
                    Idx::Add(..) => "add.s64",
                    Idx::Sub(..) => "sub.s64",
                    Idx::Mul(..) => "mul.lo.s64",
                    _ => "min.s64",
                };
                let (x, y) = (self.idx(a), self.idx(b));
                let r = self.reg(RD);
                self.ins(format!("{op} {r}, {x}, {y}"));
                r
            }
            Idx::CeilDiv(a, d) => {
                // floor((x + d - 1) / d) for d > 0; div.s64 truncates, so correct negatives.
                let x = self.idx(a);
                let (n, q, m, p) = (self.reg(RD), self.reg(RD), self.reg(RD), self.reg(P));
                self.ins(format!("add.s64 {n}, {x}, {}", d - 1));
                self.ins(format!("div.s64 {q}, {n}, {d}"));
                self.ins(format!("rem.s64 {m}, {n}, {d}"));
                self.ins(format!("setp.lt.s64 {p}, {m}, 0"));
                self.ins(format!("@{p} sub.s64 {q}, {q}, 1"));
                q
            }
        }
    }

    // ---- loops ----

    /// Starts `for (e = tid; e < n; e += threads)`.
    pub(super) fn eloop(&mut self, n: usize) -> ELoop {
        let (e, head, end, p) = (self.reg(R), self.label(), self.label(), self.reg(P));
        let tid = self.tid.clone();
        self.ins(format!("mov.u32 {e}, {tid}"));
        self.place(&head);
        self.ins(format!("setp.ge.u32 {p}, {e}, {n}"));
        self.ins(format!("@{p} bra {end}"));
        ELoop { e, head, end, copies: 1 }
    }

    /// An element loop over `0..n` whose body is emitted [`unroll_factor`] times per
    /// iteration, for the elements returned (`e`, `e + threads`, ...), all in range: a caller
    /// issues every copy's reads before any copy's writes, so the loads of one iteration are
    /// in flight together (one latency, not one per element).
    pub(super) fn eloop_unrolled(&mut self, n: usize) -> (ELoop, Vec<String>) {
        let threads = self.sched.threads() as usize;
        let copies = unroll_factor(n, threads);
        let mut l = self.eloop(n);
        l.copies = copies;
        let mut es = vec![l.e.clone()];
        for c in 1..copies {
            let e = self.reg(R);
            self.ins(format!("add.u32 {e}, {}, {}", l.e, c * threads));
            es.push(e);
        }
        (l, es)
    }

    /// Closes an element loop and synchronises the CTA.
    pub(super) fn eloop_end(&mut self, l: ELoop) {
        self.eloop_end_no_barrier(l);
        self.barrier();
    }

    /// Closes an element loop without synchronising (the caller does, after more loops).
    pub(super) fn eloop_end_no_barrier(&mut self, l: ELoop) {
        let step = self.sched.threads() as usize * l.copies;
        self.ins(format!("add.u32 {}, {}, {step}", l.e, l.e));
        self.ins(format!("bra {}", l.head));
        self.place(&l.end);
    }

    /// The register holding the global address of tensor parameter `param`.
    pub(super) fn param_ptr(&self, param: usize) -> String {
        self.params[param].clone()
    }

    /// The register holding the staging buffer's shared address.
    pub(super) fn stage_base(&self) -> String {
        self.stage_reg.clone()
    }

    /// Row and column of element `e` of a tile with `cols` columns.
    pub(super) fn split(&mut self, e: &str, cols: usize) -> (String, String) {
        let (i, j) = (self.reg(R), self.reg(R));
        if cols == 1 {
            self.ins(format!("mov.u32 {i}, {e}"));
            self.ins(format!("mov.u32 {j}, 0"));
        } else {
            self.ins(format!("div.u32 {i}, {e}, {cols}"));
            self.ins(format!("rem.u32 {j}, {e}, {cols}"));
        }
        (i, j)
    }

    /// Starts a per-thread counted loop `for c in 0..n` (n static, n >= 1); returns (c, head).
    fn cloop(&mut self) -> (String, String) {
        let (c, head) = (self.reg(R), self.label());
        self.ins(format!("mov.u32 {c}, 0"));
        self.place(&head);
        (c, head)
    }

    /// Closes a counted loop started by [`Em::cloop`]: `c += 1; if c < n goto head`.
    fn cloop_end(&mut self, c: &str, head: &str, n: &str) {
        let p = self.reg(P);
        self.ins(format!("add.u32 {c}, {c}, 1"));
        self.ins(format!("setp.lt.u32 {p}, {c}, {n}"));
        self.ins(format!("@{p} bra {head}"));
    }

    // ---- tile addresses ----

    /// Address register of element (i, j) of a tile stored at `st` (i, j: u32 registers, or
    /// None for 0), including the region offset.
    pub(super) fn taddr(&mut self, st: Storage, dt: DType, i: Option<&str>, j: Option<&str>) -> String {
        let t = self.reg(R);
        self.ins(format!("mov.u32 {t}, 0"));
        for (x, s) in [(i, st.rs), (j, st.cs)] {
            if let (Some(x), true) = (x, s != 0) {
                self.ins(format!("mad.lo.s32 {t}, {x}, {s}, {t}"));
            }
        }
        let a = self.reg(RD);
        self.ins(format!("mul.wide.s32 {a}, {t}, {}", dt.size()));
        let base = self.tile_base.clone();
        self.ins(format!("add.s64 {a}, {a}, {base}"));
        if st.phase {
            // The odd iterations' copy: recomputed from the counter at each access rather
            // than held in a register across the loop (one fewer long-lived 64-bit value).
            let (t, iter) = (self.reg(RD), self.iter.clone());
            self.ins(format!("and.b64 {t}, {iter}, 1"));
            self.ins(format!("mul.lo.s64 {t}, {t}, {}", self.phase_stride));
            self.ins(format!("add.s64 {a}, {a}, {t}"));
        }
        if st.off != 0 {
            self.ins(format!("add.s64 {a}, {a}, {}", st.off));
        }
        a
    }

    fn ld(&mut self, dt: DType, addr: &str) -> String {
        let r = self.freg(dt);
        self.ins(format!("ld.{}.{} {r}, [{addr}]", self.space, ty(dt)));
        r
    }

    fn st(&mut self, dt: DType, addr: &str, r: &str) {
        self.ins(format!("st.{}.{} [{addr}], {r}", self.space, ty(dt)));
    }

    /// `ld` at `addr + off` bytes (the offset folded into the instruction).
    fn ld_at(&mut self, dt: DType, addr: &str, off: i64) -> String {
        let r = self.freg(dt);
        self.ins(format!("ld.{}.{} {r}, [{addr}{}]", self.space, ty(dt), offset(off)));
        r
    }

    /// `st` at `addr + off` bytes.
    fn st_at(&mut self, dt: DType, addr: &str, off: i64, r: &str) {
        self.ins(format!("st.{}.{} [{addr}{}], {r}", self.space, ty(dt), offset(off)));
    }

    /// Reads element (i, j) of `v` (broadcasting).
    fn read(&mut self, v: ValueId, i: &str, j: &str) -> String {
        if self.fused[v.0 as usize] {
            return self.eval(v, i, j);
        }
        let dt = self.k.ty(v).dtype;
        let st = self.bstorage(v);
        let a = self.taddr(st, dt, Some(i), Some(j));
        self.ld(dt, &a)
    }

    /// Element (i, j) of the elementwise value `v` in a register, computed from its operands
    /// (read, or evaluated the same way when fused).
    fn eval(&mut self, v: ValueId, i: &str, j: &str) -> String {
        let dt = self.k.ty(v).dtype;
        let op = self.defs[v.0 as usize].clone().expect("an elementwise value is defined");
        match op {
            Op::Const { value, .. } => {
                let x = self.freg(dt);
                self.ins(format!("mov.{} {x}, {}", ty(dt), fimm(value, dt)));
                x
            }
            Op::Unary { op, x } => {
                let a = self.read(x, i, j);
                self.unary(op, dt, &a)
            }
            Op::Binary { op, a, b } => {
                let x = self.read(a, i, j);
                let y = self.read(b, i, j);
                self.binary(op, dt, &x, &y)
            }
            Op::Cast { x, dtype } => {
                let from = self.k.ty(x).dtype;
                let a = self.read(x, i, j);
                let y = self.freg(dtype);
                match (from, dtype) {
                    (DType::F32, DType::F64) => self.ins(format!("cvt.f64.f32 {y}, {a}")),
                    (DType::F64, DType::F32) => self.ins(format!("cvt.rn.f32.f64 {y}, {a}")),
                    _ => self.ins(format!("mov.{} {y}, {a}", ty(dt))),
                }
                y
            }
            Op::Mask { x, mask, fill } => {
                let p = match &mask {
                    MaskKind::RowsBefore(e) => {
                        let lim = self.idx(e);
                        self.row_valid(i, &lim)
                    }
                    MaskKind::Tril { strict } => {
                        let p = self.reg(P);
                        let cmp = if *strict { "lt" } else { "le" };
                        self.ins(format!("setp.{cmp}.u32 {p}, {j}, {i}"));
                        p
                    }
                };
                let a = self.read(x, i, j);
                let (f, y) = (self.freg(dt), self.freg(dt));
                self.ins(format!("mov.{} {f}, {}", ty(dt), fimm(fill, dt)));
                self.ins(format!("selp.{} {y}, {a}, {f}, {p}", ty(dt)));
                y
            }
            other => unreachable!("{v} = {} is not elementwise", other.name()),
        }
    }

    /// Writes element (i, j) of `v`.
    fn write(&mut self, v: ValueId, i: &str, j: &str, r: &str) {
        let dt = self.k.ty(v).dtype;
        let st = self.storage(v);
        let a = self.taddr(st, dt, Some(i), Some(j));
        self.st(dt, &a, r);
    }

    /// Global address of element (i, j) of tensor `param` at `base + i*rs + j*cs` (f32).
    pub(super) fn gaddr(&mut self, param: usize, base: &str, rs: i64, cs: i64, i: &str, j: &str) -> String {
        self.gaddr_sized(param, base, rs, cs, (i, j), 4)
    }

    /// [`Em::gaddr`] for elements of `size` bytes (2 or 4).
    fn gaddr_sized(&mut self, param: usize, base: &str, rs: i64, cs: i64, (i, j): (&str, &str), size: usize) -> String {
        let (i64r, j64r, t) = (self.reg(RD), self.reg(RD), self.reg(RD));
        self.ins(format!("cvt.u64.u32 {i64r}, {i}"));
        self.ins(format!("cvt.u64.u32 {j64r}, {j}"));
        self.ins(format!("mov.s64 {t}, {base}"));
        self.ins(format!("mad.lo.s64 {t}, {i64r}, {rs}, {t}"));
        self.ins(format!("mad.lo.s64 {t}, {j64r}, {cs}, {t}"));
        let a = self.reg(RD);
        let ptr = self.params[param].clone();
        self.ins(format!("shl.b64 {t}, {t}, {}", size.trailing_zeros()));
        self.ins(format!("add.s64 {a}, {ptr}, {t}"));
        a
    }

    /// Predicate `i < valid` for a u32 row `i` and an s64 bound.
    pub(super) fn row_valid(&mut self, i: &str, valid: &str) -> String {
        let (i64r, p) = (self.reg(RD), self.reg(P));
        self.ins(format!("cvt.u64.u32 {i64r}, {i}"));
        self.ins(format!("setp.lt.s64 {p}, {i64r}, {valid}"));
        p
    }

    /// Copies a tile from `src` to `dst` (any strides), then synchronises.
    fn copy(&mut self, t: TileTy, src: Storage, dst: Storage) {
        let (l, es) = self.eloop_unrolled(t.len());
        let mut xs = vec![];
        for e in &es {
            let (i, j) = self.split(e, t.cols);
            let a = self.taddr(src, t.dtype, Some(&i), Some(&j));
            xs.push((i, j, self.ld(t.dtype, &a)));
        }
        for (i, j, x) in xs {
            let a = self.taddr(dst, t.dtype, Some(&i), Some(&j));
            self.st(t.dtype, &a, &x);
        }
        self.eloop_end(l);
    }

    // ---- math ----

    /// `e^d` in f32 for an exponent `d` of the gates' dtype `gd` (an f64 one rounded first).
    fn gate_exp(&mut self, d: String, gd: DType) -> String {
        let d = if gd == DType::F64 {
            let f = self.reg(F);
            self.ins(format!("cvt.rn.f32.f64 {f}, {d}"));
            f
        } else {
            d
        };
        self.exp_f32(&d)
    }

    fn exp_f32(&mut self, x: &str) -> String {
        let (t, y) = (self.reg(F), self.reg(F));
        self.ins(format!("mul.rn.f32 {t}, {x}, {LOG2E}"));
        self.ins(format!("ex2.approx.ftz.f32 {y}, {t}"));
        y
    }

    fn log_f32(&mut self, x: &str) -> String {
        let (t, y) = (self.reg(F), self.reg(F));
        self.ins(format!("lg2.approx.ftz.f32 {t}, {x}"));
        self.ins(format!("mul.rn.f32 {y}, {t}, {LN2}"));
        y
    }

    fn sigmoid_f32(&mut self, x: &str) -> String {
        // e = exp(-|x|); x >= 0: 1 / (1 + e); else e / (1 + e). Never overflows.
        let a = self.reg(F);
        self.ins(format!("abs.f32 {a}, {x}"));
        self.ins(format!("neg.f32 {a}, {a}"));
        let e = self.exp_f32(&a);
        let (d, r, n, y, p) = (self.reg(F), self.reg(F), self.reg(F), self.reg(F), self.reg(P));
        self.ins(format!("add.rn.f32 {d}, {e}, 0f3F800000"));
        self.ins(format!("rcp.rn.f32 {r}, {d}"));
        self.ins(format!("div.rn.f32 {n}, {e}, {d}"));
        self.ins(format!("setp.ge.f32 {p}, {x}, 0f00000000"));
        self.ins(format!("selp.f32 {y}, {r}, {n}, {p}"));
        y
    }

    fn tanh_f32(&mut self, x: &str) -> String {
        // |x| < 0.3: the odd Taylor series to x^11 (truncation below 2e-9 relative); else
        // (1 - e) / (1 + e) with e = exp(-2|x|) >= 0.55 away from 1, so no cancellation,
        // and the sign of x copied back. Never overflows.
        let a = self.reg(F);
        self.ins(format!("abs.f32 {a}, {x}"));
        let (x2, poly) = (self.reg(F), self.reg(F));
        self.ins(format!("mul.rn.f32 {x2}, {x}, {x}"));
        let coefs = [-1382.0 / 155925.0, 62.0 / 2835.0, -17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0];
        self.ins(format!("mov.f32 {poly}, {}", fimm(coefs[0], DType::F32)));
        for c in &coefs[1..] {
            self.ins(format!("fma.rn.f32 {poly}, {poly}, {x2}, {}", fimm(*c, DType::F32)));
        }
        let series = self.reg(F);
        self.ins(format!("mul.rn.f32 {poly}, {poly}, {x2}"));
        self.ins(format!("fma.rn.f32 {series}, {poly}, {x}, {x}"));
        let m2a = self.reg(F);
        self.ins(format!("mul.rn.f32 {m2a}, {a}, 0fC0000000"));
        let e = self.exp_f32(&m2a);
        let (num, den, r, nr, y) = (self.reg(F), self.reg(F), self.reg(F), self.reg(F), self.reg(F));
        let (negative, small) = (self.reg(P), self.reg(P));
        self.ins(format!("sub.rn.f32 {num}, 0f3F800000, {e}"));
        self.ins(format!("add.rn.f32 {den}, 0f3F800000, {e}"));
        self.ins(format!("div.rn.f32 {r}, {num}, {den}"));
        self.ins(format!("neg.f32 {nr}, {r}"));
        self.ins(format!("setp.lt.f32 {negative}, {x}, 0f00000000"));
        self.ins(format!("selp.f32 {r}, {nr}, {r}, {negative}"));
        self.ins(format!("setp.lt.f32 {small}, {a}, {}", fimm(0.3, DType::F32)));
        self.ins(format!("selp.f32 {y}, {series}, {r}, {small}"));
        y
    }

    fn unary_f32(&mut self, op: UnOp, x: &str) -> String {
        let simple = |ins: &str| Some(ins.to_string());
        let one = match op {
            UnOp::Neg => simple("neg.f32"),
            UnOp::Abs => simple("abs.f32"),
            UnOp::Exp2 => simple("ex2.approx.ftz.f32"),
            UnOp::Sqrt => simple("sqrt.rn.f32"),
            UnOp::Recip => simple("rcp.rn.f32"),
            _ => None,
        };
        if let Some(ins) = one {
            let y = self.reg(F);
            self.ins(format!("{ins} {y}, {x}"));
            return y;
        }
        match op {
            UnOp::Exp => self.exp_f32(x),
            UnOp::Log => self.log_f32(x),
            UnOp::Sigmoid => self.sigmoid_f32(x),
            UnOp::Silu => {
                let s = self.sigmoid_f32(x);
                let y = self.reg(F);
                self.ins(format!("mul.rn.f32 {y}, {x}, {s}"));
                y
            }
            UnOp::Softplus => {
                // As the DSL: x > 20: x; x < -20: exp(x); else log(1 + exp(x)).
                let e = self.exp_f32(x);
                let d = self.reg(F);
                self.ins(format!("add.rn.f32 {d}, {e}, 0f3F800000"));
                let l = self.log_f32(&d);
                let (y, hi, lo) = (self.reg(F), self.reg(P), self.reg(P));
                self.ins(format!("setp.gt.f32 {hi}, {x}, 0f41A00000"));
                self.ins(format!("setp.lt.f32 {lo}, {x}, 0fC1A00000"));
                self.ins(format!("selp.f32 {y}, {e}, {l}, {lo}"));
                self.ins(format!("selp.f32 {y}, {x}, {y}, {hi}"));
                y
            }
            UnOp::Tanh => self.tanh_f32(x),
            UnOp::Neg | UnOp::Abs | UnOp::Exp2 | UnOp::Sqrt | UnOp::Recip => unreachable!("handled above"),
        }
    }

    fn unary(&mut self, op: UnOp, dt: DType, x: &str) -> String {
        match (dt, op) {
            (DType::F32, _) => self.unary_f32(op, x),
            (DType::F64, UnOp::Neg | UnOp::Sqrt | UnOp::Recip | UnOp::Abs) => {
                let ins = match op {
                    UnOp::Neg => "neg.f64",
                    UnOp::Abs => "abs.f64",
                    UnOp::Sqrt => "sqrt.rn.f64",
                    _ => "rcp.rn.f64",
                };
                let y = self.reg(FD);
                self.ins(format!("{ins} {y}, {x}"));
                y
            }
            (DType::F64, _) => {
                // Transcendentals of f64 tiles go through f32 (see the module doc).
                let xf = self.reg(F);
                self.ins(format!("cvt.rn.f32.f64 {xf}, {x}"));
                let yf = self.unary_f32(op, &xf);
                let y = self.reg(FD);
                self.ins(format!("cvt.f64.f32 {y}, {yf}"));
                y
            }
        }
    }

    fn binary(&mut self, op: BinOp, dt: DType, a: &str, b: &str) -> String {
        let t = ty(dt);
        let y = self.freg(dt);
        match op {
            BinOp::Add => self.ins(format!("add.rn.{t} {y}, {a}, {b}")),
            BinOp::Sub => self.ins(format!("sub.rn.{t} {y}, {a}, {b}")),
            BinOp::Mul => self.ins(format!("mul.rn.{t} {y}, {a}, {b}")),
            BinOp::Div => self.ins(format!("div.rn.{t} {y}, {a}, {b}")),
            BinOp::Max | BinOp::Min => {
                let name = if op == BinOp::Max { "max" } else { "min" };
                if dt == DType::F32 {
                    self.ins(format!("{name}.NaN.f32 {y}, {a}, {b}"));
                } else {
                    // NaN if either operand is NaN, as the interpreter.
                    let p = self.reg(P);
                    self.ins(format!("{name}.f64 {y}, {a}, {b}"));
                    self.ins(format!("setp.nan.f64 {p}, {a}, {b}"));
                    self.ins(format!("selp.f64 {y}, {}, {y}, {p}", fimm(f64::NAN, DType::F64)));
                }
            }
            BinOp::Lt | BinOp::Le | BinOp::Equal => {
                // Ordered comparisons: false when either side is NaN, as the interpreter.
                let cmp = match op {
                    BinOp::Lt => "lt",
                    BinOp::Le => "le",
                    _ => "eq",
                };
                let p = self.reg(P);
                self.ins(format!("setp.{cmp}.{t} {p}, {a}, {b}"));
                self.ins(format!("selp.{t} {y}, {}, {}, {p}", fimm(1.0, dt), fimm(0.0, dt)));
            }
            BinOp::Keep => {
                // `neu`: a NaN condition counts as nonzero (Rust's `!=`), as the interpreter.
                let p = self.reg(P);
                self.ins(format!("setp.neu.{t} {p}, {a}, {}", fimm(0.0, dt)));
                self.ins(format!("selp.{t} {y}, {b}, {}, {p}", fimm(0.0, dt)));
            }
            BinOp::Pow => {
                // a^b = 2^(b * log2 a) in f32 (approximate; NaN for a < 0, and 0^0 is NaN).
                let (af, bf) = if dt == DType::F64 {
                    let (af, bf) = (self.reg(F), self.reg(F));
                    self.ins(format!("cvt.rn.f32.f64 {af}, {a}"));
                    self.ins(format!("cvt.rn.f32.f64 {bf}, {b}"));
                    (af, bf)
                } else {
                    (a.to_string(), b.to_string())
                };
                let (l, m, r) = (self.reg(F), self.reg(F), self.reg(F));
                self.ins(format!("lg2.approx.ftz.f32 {l}, {af}"));
                self.ins(format!("mul.rn.f32 {m}, {bf}, {l}"));
                self.ins(format!("ex2.approx.ftz.f32 {r}, {m}"));
                if dt == DType::F64 {
                    self.ins(format!("cvt.f64.f32 {y}, {r}"));
                } else {
                    self.ins(format!("mov.f32 {y}, {r}"));
                }
            }
        }
        y
    }

    // ---- statements ----

    fn block(&mut self, stmts: &[Stmt]) -> Result<(), PtxError> {
        for s in stmts {
            if let Stmt::Let { id, .. } = s {
                if self.fused[id.0 as usize] {
                    self.comment(format!("{id}: fused into its consumer"));
                    continue;
                }
            }
            if let Stmt::Let {
                id,
                op: Op::Load { elem: ElemType::F32, param, base, row_stride, col_stride, cols, valid_rows, .. },
            } = s
            {
                if self.storage(*id).phase {
                    // Double-buffered: issued one iteration ahead, complete at the loop's top.
                    self.comment(format!("{id} = load (prefetched by the previous iteration)"));
                    continue;
                }
                if self.async_loads() {
                    let (reads, writes) = self.accesses(s);
                    if self.pending.conflicts(&reads, &writes) {
                        self.barrier();
                    }
                    self.pending.add(reads, writes);
                    self.async_load(*id, *param, base, *row_stride, *col_stride, *cols, valid_rows);
                    continue;
                }
            }
            self.flush_async();
            if matches!(s, Stmt::Loop { .. }) {
                self.settle();
            } else {
                self.ordered_statement(s)?;
                continue;
            }
            match s {
                Stmt::Let { id, op } => self.op(*id, op)?,
                Stmt::Store { .. } => self.store(s),
                Stmt::Loop { count, carried, body, yields, results: _ } => {
                    let lp = self.plan.loops[self.next_loop].clone();
                    let in_place = self.in_place_dots.get(self.next_loop).copied().flatten();
                    self.in_place = in_place.map(|y| (y, lp.carried[0]));
                    self.next_loop += 1;
                    self.comment(format!("loop carrying {}", carried.len()));
                    let n = self.idx(count);
                    for (k, (c, init)) in carried.iter().enumerate() {
                        let t = self.k.ty(*c);
                        let src = self.storage(*init);
                        self.copy(t, src, lp.carried[k]);
                    }
                    if let Some(pipe) = &lp.pipeline {
                        self.prefetch_first(body, pipe, &n);
                    }
                    let (cnt, head, end, p) = (self.reg(RD), self.label(), self.label(), self.reg(P));
                    let n = match self.chunk.clone() {
                        // A chunk-parallel loop runs its CTA's chunk alone: [chunk, min(chunk + 1, n)).
                        Some(chunk) => {
                            let (one_past, hi) = (self.reg(RD), self.reg(RD));
                            self.ins(format!("add.s64 {one_past}, {chunk}, 1"));
                            self.ins(format!("min.s64 {hi}, {n}, {one_past}"));
                            self.ins(format!("mov.s64 {cnt}, {chunk}"));
                            hi
                        }
                        None => {
                            self.ins(format!("mov.s64 {cnt}, 0"));
                            n
                        }
                    };
                    self.place(&head);
                    self.ins(format!("setp.ge.s64 {p}, {cnt}, {n}"));
                    self.ins(format!("@{p} bra.uni {end}"));
                    let iter = self.iter.clone();
                    self.ins(format!("mov.s64 {iter}, {cnt}"));
                    if let Some(pipe) = &lp.pipeline {
                        self.prefetch_next(body, pipe, &cnt, &n);
                    }
                    self.block(body)?;
                    self.settle();
                    // Yields that read a carried region go through temporaries first.
                    for (k, y) in yields.iter().enumerate() {
                        if let YieldCopy::ViaTemp(tmp) = lp.yields[k] {
                            let t = self.k.ty(*y);
                            let src = self.storage(*y);
                            self.copy(t, src, tmp);
                        }
                    }
                    for (k, y) in yields.iter().enumerate() {
                        if in_place == Some(*y) {
                            continue; // computed in the carried region already
                        }
                        let t = self.k.ty(*y);
                        let src = match lp.yields[k] {
                            YieldCopy::Skip => continue,
                            YieldCopy::Direct => self.storage(*y),
                            YieldCopy::ViaTemp(tmp) => tmp,
                        };
                        self.copy(t, src, lp.carried[k]);
                    }
                    self.ins(format!("add.s64 {cnt}, {cnt}, 1"));
                    self.ins(format!("bra.uni {head}"));
                    self.place(&end);
                    if lp.pipeline.is_some() {
                        self.pipeline_drain();
                    }
                    self.in_place = None;
                    // The results alias the carried regions (see `midend::layout`).
                }
            }
        }
        self.flush_async();
        Ok(())
    }

    /// A `Store` of a tile to a global tensor: one element per thread and copy, masked to the
    /// valid rows.
    fn store(&mut self, s: &Stmt) {
        let Stmt::Store { value, param, base, row_stride, col_stride, valid_rows } = s else { return };
        self.comment(format!("store {value} -> {}", self.k.params[*param].name));
        let t = self.k.ty(*value);
        let base = self.idx(base);
        let valid = self.idx(valid_rows);
        let (l, es) = self.eloop_unrolled(t.len());
        let mut xs = vec![];
        for e in &es {
            let (i, j) = self.split(e, t.cols);
            let x = self.read(*value, &i, &j);
            let x = if t.dtype == DType::F64 {
                let y = self.reg(F);
                self.ins(format!("cvt.rn.f32.f64 {y}, {x}"));
                y
            } else {
                x
            };
            xs.push((i, j, x));
        }
        for (i, j, x) in xs {
            let p = self.row_valid(&i, &valid);
            let a = self.gaddr(*param, &base, *row_stride, *col_stride, &i, &j);
            self.ins(format!("@{p} st.global.f32 [{a}], {x}"));
        }
        self.eloop_end(l);
    }

    /// Emits a `Let` or `Store` after a barrier only if it conflicts with the pending ops, and
    /// holds back the barrier its emission ends with (`hazards.rs`).
    fn ordered_statement(&mut self, s: &Stmt) -> Result<(), PtxError> {
        const BARRIER: &str = "\tbar.sync 0;\n";
        let (reads, writes) = self.accesses(s);
        if self.pending.conflicts(&reads, &writes) {
            self.barrier();
        }
        let before = self.pending.clone();
        let mark = self.out.len();
        match s {
            Stmt::Let { id, op } => self.op(*id, op)?,
            Stmt::Store { .. } => self.store(s),
            Stmt::Loop { .. } => unreachable!("loops are emitted by block"),
        }
        if self.out.len() >= mark + BARRIER.len() && self.out.ends_with(BARRIER) {
            self.out.truncate(self.out.len() - BARRIER.len());
        }
        // A barrier inside the op settled what was pending before it; else that stays pending.
        self.pending = if self.out[mark..].contains(BARRIER) { Pending::default() } else { before };
        self.pending.add(reads, writes);
        Ok(())
    }

    fn op(&mut self, id: ValueId, op: &Op) -> Result<(), PtxError> {
        if op.is_view() {
            return Ok(());
        }
        let t = self.k.ty(id);
        let dt = t.dtype;
        self.comment(format!("{id} = {}", op.name()));
        match op {
            Op::Load { elem, param, base, row_stride, col_stride, rows: _, cols, valid_rows }
                if *elem != ElemType::F32
                    && super::async_copy::vector_width_16bit(base, *row_stride, *col_stride, *cols) == 8 =>
            {
                self.load_16bit_vectors(id, *elem, *param, (base, *row_stride), *cols, valid_rows);
            }
            Op::Load { elem, param, base, row_stride, col_stride, rows: _, cols, valid_rows } => {
                let base = self.idx(base);
                let valid = self.idx(valid_rows);
                let (l, es) = self.eloop_unrolled(t.len());
                let mut xs = vec![];
                for e in &es {
                    let (i, j) = self.split(e, *cols);
                    let p = self.row_valid(&i, &valid);
                    let a = self.gaddr_sized(*param, &base, *row_stride, *col_stride, (&i, &j), elem.size());
                    let x = self.reg(F);
                    self.ins(format!("mov.f32 {x}, 0f00000000"));
                    match elem {
                        ElemType::F32 => self.ins(format!("@{p} ld.global.f32 {x}, [{a}]")),
                        ElemType::Bf16 => {
                            // A bf16 is the high half of the f32 with the same bits: exact.
                            let r = self.reg(R);
                            self.ins(format!("mov.u32 {r}, 0"));
                            self.ins(format!("@{p} ld.global.u16 {r}, [{a}]"));
                            self.ins(format!("shl.b32 {r}, {r}, 16"));
                            self.ins(format!("mov.b32 {x}, {r}"));
                        }
                        ElemType::F16 => {
                            // cvt.f32.f16 is exact (subnormals, inf and NaN included).
                            let h = self.reg(H);
                            self.ins(format!("mov.b16 {h}, 0"));
                            self.ins(format!("@{p} ld.global.b16 {h}, [{a}]"));
                            self.ins(format!("cvt.f32.f16 {x}, {h}"));
                        }
                    }
                    xs.push((i, j, x));
                }
                for (i, j, x) in xs {
                    self.write(id, &i, &j, &x);
                }
                self.eloop_end(l);
            }
            Op::Const { .. } | Op::Unary { .. } | Op::Binary { .. } | Op::Cast { .. } | Op::Mask { .. } => {
                // One element per thread and copy: the op, and every fused operand below it, in
                // registers; every copy's result before any is written.
                let (l, es) = self.eloop_unrolled(t.len());
                let mut ys = vec![];
                for e in &es {
                    let (i, j) = self.split(e, t.cols);
                    let y = self.eval(id, &i, &j);
                    ys.push((i, j, y));
                }
                for (i, j, y) in ys {
                    self.write(id, &i, &j, &y);
                }
                self.eloop_end(l);
            }
            Op::IdxValue(e) => {
                let v = self.idx(e);
                let l = self.eloop(t.len());
                let (i, j) = self.split(&l.e.clone(), t.cols);
                let x = self.freg(dt);
                self.ins(format!("cvt.rn.{}.s64 {x}, {v}", ty(dt)));
                self.write(id, &i, &j, &x);
                self.eloop_end(l);
            }
            Op::Dot { a, b, ta, tb, acc } => {
                let (m, n, k) = mma::dot_dims(self.k, *a, *b, *ta, *tb);
                let s = self.sched;
                match mma::plan_dot(s.dot, m, n, k, s.min_mma_dim, s.staging_bytes) {
                    DotPlan::Fma => self.dot(id, *a, *b, *ta, *tb, *acc),
                    plan => self.mma_dot(id, *a, *b, *ta, *tb, *acc, plan),
                }
            }
            Op::Cumsum { x, exclusive } => {
                // One thread per column, down the rows.
                let (sx, so) = (self.storage(*x), self.storage(id));
                let l = self.eloop(t.cols);
                let j = l.e.clone();
                let pa = self.taddr(sx, dt, None, Some(&j));
                let po = self.taddr(so, dt, None, Some(&j));
                let s = self.freg(dt);
                self.ins(format!("mov.{} {s}, {}", ty(dt), fimm(0.0, dt)));
                if unrolled_rows(t.rows) {
                    self.cumsum_unrolled(dt, (&pa, sx.rs), (&po, so.rs), t.rows, *exclusive, &s);
                } else if t.rows > 0 {
                    let (c, head) = self.cloop();
                    let v = self.ld(dt, &pa);
                    if *exclusive {
                        self.st(dt, &po, &s);
                        self.ins(format!("add.rn.{} {s}, {s}, {v}", ty(dt)));
                    } else {
                        self.ins(format!("add.rn.{} {s}, {s}, {v}", ty(dt)));
                        self.st(dt, &po, &s);
                    }
                    let sz = dt.size() as i64;
                    self.ins(format!("add.s64 {pa}, {pa}, {}", sx.rs * sz));
                    self.ins(format!("add.s64 {po}, {po}, {}", so.rs * sz));
                    self.cloop_end(&c, &head, &t.rows.to_string());
                }
                self.eloop_end(l);
            }
            Op::RowSum { x } => self.row_sum(id, *x),
            Op::Rows { .. } | Op::Transpose { .. } => {}
            Op::Concat { parts } => {
                // One element of one part per thread; the parts' rows are disjoint, so one
                // barrier after the last covers them all.
                let mut at = 0;
                for (n, p) in parts.iter().enumerate() {
                    let tp = self.k.ty(*p);
                    let l = self.eloop(tp.len());
                    let (i, j) = self.split(&l.e.clone(), tp.cols);
                    let x = self.read(*p, &i, &j);
                    let row = self.reg(R);
                    self.ins(format!("add.u32 {row}, {i}, {at}"));
                    self.write(id, &row, &j, &x);
                    if n + 1 == parts.len() {
                        self.eloop_end(l);
                    } else {
                        self.eloop_end_no_barrier(l);
                    }
                    at += tp.rows;
                }
            }
            Op::GatedDot { a, ga, b, gb, strict } => self.gated_dot(id, [*a, *ga, *b, *gb], *strict),
            Op::GatedMatMul { m, x, gx, gy, transposed, strict } => {
                self.gated_matmul(id, [*m, *x, *gx, *gy], *transposed, *strict)
            }
            Op::SolveUnitLower { l, b } => self.solve(id, *l, *b),
        }
        Ok(())
    }

    /// A 16-bit tensor's rows, 8 elements (16 bytes) per thread and access: one
    /// `ld.global.v4.u32`, widened to f32 in registers (exactly, as the scalar path) and
    /// stored to the tile. Rows past `valid_rows` load nothing and store zeros.
    fn load_16bit_vectors(
        &mut self,
        id: ValueId,
        elem: ElemType,
        param: usize,
        (base, rs): (&Idx, i64),
        cols: usize,
        valid_rows: &Idx,
    ) {
        let t = self.k.ty(id);
        let st = self.storage(id);
        let base = self.idx(base);
        let valid = self.idx(valid_rows);
        let (l, es) = self.eloop_unrolled(t.len() / 8);
        self.param_align[param] = self.param_align[param].max(16);
        // Every copy's 16 bytes requested before any is widened and stored.
        let mut loaded = vec![];
        for e in &es {
            let (i, j8) = self.split(e, cols / 8);
            let j = self.reg(R);
            self.ins(format!("shl.b32 {j}, {j8}, 3"));
            let p = self.row_valid(&i, &valid);
            let a = self.gaddr_sized(param, &base, rs, 1, (&i, &j), 2);
            let words: Vec<String> = (0..4).map(|_| self.reg(R)).collect();
            for w in &words {
                self.ins(format!("mov.u32 {w}, 0"));
            }
            self.ins(format!("@{p} ld.global.v4.u32 {{{}}}, [{a}]", words.join(", ")));
            loaded.push((i, j, words));
        }
        for (i, j, words) in loaded {
            let dst = self.taddr(st, DType::F32, Some(&i), Some(&j));
            for (n, w) in words.iter().enumerate() {
                // Little-endian: element 2n is the word's low half, 2n + 1 its high half.
                let halves: [String; 2] = match elem {
                    ElemType::Bf16 => {
                        // A bf16 is the high half of the f32 with the same bits: exact.
                        let (lo, hi) = (self.reg(R), self.reg(R));
                        self.ins(format!("shl.b32 {lo}, {w}, 16"));
                        self.ins(format!("and.b32 {hi}, {w}, -65536"));
                        let (x, y) = (self.reg(F), self.reg(F));
                        self.ins(format!("mov.b32 {x}, {lo}"));
                        self.ins(format!("mov.b32 {y}, {hi}"));
                        [x, y]
                    }
                    _ => {
                        // cvt.f32.f16 is exact (subnormals, inf and NaN included).
                        let (lo, hi) = (self.reg(H), self.reg(H));
                        self.ins(format!("mov.b32 {{{lo}, {hi}}}, {w}"));
                        let (x, y) = (self.reg(F), self.reg(F));
                        self.ins(format!("cvt.f32.f16 {x}, {lo}"));
                        self.ins(format!("cvt.f32.f16 {y}, {hi}"));
                        [x, y]
                    }
                };
                for (h, x) in halves.iter().enumerate() {
                    let k = (2 * n + h) as i64;
                    self.st_at(DType::F32, &dst, k * st.cs * 4, x);
                }
            }
        }
        self.eloop_end(l);
    }

    /// `op(a) @ op(b) (+ acc)`: one output element per thread iteration, a k-loop of fmas.
    fn dot(&mut self, id: ValueId, a: ValueId, b: ValueId, ta: bool, tb: bool, acc: Option<ValueId>) {
        let t = self.k.ty(id);
        let xa = self.k.ty(a);
        let k = if ta { xa.rows } else { xa.cols };
        let (sa, sb) = (self.storage(a), self.storage(b));
        let l = self.eloop(t.len());
        let (i, j) = self.split(&l.e.clone(), t.cols);
        // A(i, p): row i of a, or column i when transposed; B(p, j) likewise.
        let (pa, step_a) = if ta {
            (self.taddr(sa, DType::F32, None, Some(&i)), sa.rs)
        } else {
            (self.taddr(sa, DType::F32, Some(&i), None), sa.cs)
        };
        let (pb, step_b) = if tb {
            (self.taddr(sb, DType::F32, Some(&j), None), sb.cs)
        } else {
            (self.taddr(sb, DType::F32, None, Some(&j)), sb.rs)
        };
        let s = self.reg(F);
        self.ins(format!("mov.f32 {s}, 0f00000000"));
        if k > 0 {
            let (c, head) = self.cloop();
            let x = self.ld(DType::F32, &pa);
            let y = self.ld(DType::F32, &pb);
            self.ins(format!("fma.rn.f32 {s}, {x}, {y}, {s}"));
            self.ins(format!("add.s64 {pa}, {pa}, {}", step_a * 4));
            self.ins(format!("add.s64 {pb}, {pb}, {}", step_b * 4));
            self.cloop_end(&c, &head, &k.to_string());
        }
        if let Some(c) = acc {
            let v = self.read(c, &i, &j);
            self.ins(format!("add.rn.f32 {s}, {s}, {v}"));
        }
        self.write(id, &i, &j, &s);
        self.eloop_end(l);
    }

    /// `out[i, j] = sum_c a[i,c] b[j,c] exp(ga[i,c] - gb[j,c])` on the kept triangle: one
    /// (i, j) pair per thread iteration.
    fn gated_dot(&mut self, id: ValueId, ops: [ValueId; 4], strict: bool) {
        let [a, ga, b, gb] = ops;
        let t = self.k.ty(id);
        let width = self.k.ty(a).cols;
        let gd = self.k.ty(ga).dtype;
        let l = self.eloop(t.len());
        let (i, j) = self.split(&l.e.clone(), t.cols);
        let s = self.reg(F);
        self.ins(format!("mov.f32 {s}, 0f00000000"));
        let (keep, skip) = (self.reg(P), self.label());
        let cmp = if strict { "lt" } else { "le" };
        self.ins(format!("setp.{cmp}.u32 {keep}, {j}, {i}"));
        self.ins(format!("@!{keep} bra {skip}"));
        if width > 0 {
            let mut ptrs = vec![];
            for (v, row, dt) in [(a, &i, DType::F32), (ga, &i, gd), (b, &j, DType::F32), (gb, &j, gd)] {
                let st = self.storage(v);
                let p = self.taddr(st, dt, Some(row), None);
                ptrs.push((p, st.cs * dt.size() as i64, dt));
            }
            let (c, head) = self.cloop();
            let x = self.ld(DType::F32, &ptrs[0].0);
            let g1 = self.ld(gd, &ptrs[1].0);
            let y = self.ld(DType::F32, &ptrs[2].0);
            let g2 = self.ld(gd, &ptrs[3].0);
            let d = self.freg(gd);
            self.ins(format!("sub.rn.{} {d}, {g1}, {g2}", ty(gd)));
            let e = self.gate_exp(d, gd);
            let m = self.reg(F);
            self.ins(format!("mul.rn.f32 {m}, {x}, {y}"));
            self.ins(format!("fma.rn.f32 {s}, {m}, {e}, {s}"));
            for (p, step, _) in &ptrs {
                self.ins(format!("add.s64 {p}, {p}, {step}"));
            }
            self.cloop_end(&c, &head, &width.to_string());
        }
        self.place(&skip);
        self.write(id, &i, &j, &s);
        self.eloop_end(l);
    }

    /// [`Op::GatedMatMul`]: one thread per output element (r, c), a loop over the n pairs
    /// whose predicated fma keeps those of the triangle (the others' exponents may overflow
    /// to infinity, and are never added).
    fn gated_matmul(&mut self, id: ValueId, ops: [ValueId; 4], transposed: bool, strict: bool) {
        let [m, x, gx, gy] = ops;
        let t = self.k.ty(id);
        let n = t.rows;
        let gd = self.k.ty(gx).dtype;
        let l = self.eloop(t.len());
        let (r, c) = self.split(&l.e.clone(), t.cols);
        let s = self.reg(F);
        self.ins(format!("mov.f32 {s}, 0f00000000"));
        if n > 0 {
            let (sm, sx, sgx, sgy) = (self.storage(m), self.storage(x), self.storage(gx), self.storage(gy));
            // m along row r (m[r, p]) or down column r (m[p, r]); x and gx down column c.
            let (pm, m_step) = if transposed {
                (self.taddr(sm, DType::F32, None, Some(&r)), sm.rs * 4)
            } else {
                (self.taddr(sm, DType::F32, Some(&r), None), sm.cs * 4)
            };
            let px = self.taddr(sx, DType::F32, None, Some(&c));
            let pgx = self.taddr(sgx, gd, None, Some(&c));
            let pgy = self.taddr(sgy, gd, Some(&r), Some(&c));
            let gyv = self.ld(gd, &pgy);
            let (p, head) = self.cloop();
            let keep = self.reg(P);
            let cmp = match (transposed, strict) {
                (false, false) => "le",
                (false, true) => "lt",
                (true, false) => "ge",
                (true, true) => "gt",
            };
            self.ins(format!("setp.{cmp}.u32 {keep}, {p}, {r}"));
            let mv = self.ld(DType::F32, &pm);
            let xv = self.ld(DType::F32, &px);
            let gxv = self.ld(gd, &pgx);
            let d = self.freg(gd);
            if transposed {
                self.ins(format!("sub.rn.{} {d}, {gxv}, {gyv}", ty(gd)));
            } else {
                self.ins(format!("sub.rn.{} {d}, {gyv}, {gxv}", ty(gd)));
            }
            let e = self.gate_exp(d, gd);
            let mx = self.reg(F);
            self.ins(format!("mul.rn.f32 {mx}, {mv}, {xv}"));
            self.ins(format!("@{keep} fma.rn.f32 {s}, {mx}, {e}, {s}"));
            self.ins(format!("add.s64 {pm}, {pm}, {m_step}"));
            self.ins(format!("add.s64 {px}, {px}, {}", sx.rs * 4));
            self.ins(format!("add.s64 {pgx}, {pgx}, {}", sgx.rs * gd.size() as i64));
            self.cloop_end(&p, &head, &n.to_string());
        }
        self.write(id, &r, &c, &s);
        self.eloop_end(l);
    }

    /// Forward substitution `(I + strict_lower(l)) X = b`: one thread per column of X; the
    /// column in registers, unrolled, up to [`UNROLLED_ROWS`] rows.
    fn solve(&mut self, id: ValueId, lv: ValueId, b: ValueId) {
        let t = self.k.ty(id);
        let (sl, sb, so) = (self.storage(lv), self.storage(b), self.storage(id));
        let l = self.eloop(t.cols);
        let j = l.e.clone();
        if unrolled_rows(t.rows) {
            self.solve_unrolled(t.rows, (sl, sb, so), &j);
        } else if t.rows > 0 {
            let pb = self.taddr(sb, DType::F32, None, Some(&j));
            let px0 = self.taddr(so, DType::F32, None, Some(&j));
            let pxi = self.reg(RD);
            self.ins(format!("mov.u64 {pxi}, {px0}"));
            let pl_row = self.taddr(sl, DType::F32, None, None);
            let (ri, head_i) = self.cloop();
            let s = self.ld(DType::F32, &pb);
            // s -= sum_{p < i} l[i, p] x[p, j]
            let (q, pl, px, inner, done, p) =
                (self.reg(R), self.reg(RD), self.reg(RD), self.label(), self.label(), self.reg(P));
            self.ins(format!("mov.u32 {q}, 0"));
            self.ins(format!("mov.u64 {pl}, {pl_row}"));
            self.ins(format!("mov.u64 {px}, {px0}"));
            self.place(&inner);
            self.ins(format!("setp.ge.u32 {p}, {q}, {ri}"));
            self.ins(format!("@{p} bra {done}"));
            let lv_ = self.ld(DType::F32, &pl);
            let xv = self.ld(DType::F32, &px);
            self.ins(format!("neg.f32 {lv_}, {lv_}"));
            self.ins(format!("fma.rn.f32 {s}, {lv_}, {xv}, {s}"));
            self.ins(format!("add.s64 {pl}, {pl}, {}", sl.cs * 4));
            self.ins(format!("add.s64 {px}, {px}, {}", so.rs * 4));
            self.ins(format!("add.u32 {q}, {q}, 1"));
            self.ins(format!("bra {inner}"));
            self.place(&done);
            self.st(DType::F32, &pxi, &s);
            self.ins(format!("add.s64 {pb}, {pb}, {}", sb.rs * 4));
            self.ins(format!("add.s64 {pxi}, {pxi}, {}", so.rs * 4));
            self.ins(format!("add.s64 {pl_row}, {pl_row}, {}", sl.rs * 4));
            self.cloop_end(&ri, &head_i, &t.rows.to_string());
        }
        self.eloop_end(l);
    }

    /// Column `j` of the solve, unrolled, a window of [`SOLVE_WINDOW`] rows at a time in
    /// registers (earlier rows read back from the output, where this thread stored them):
    /// every access at a constant offset, issued ahead rather than one memory latency per
    /// step; the same fma order as the loop (so the same bits); `l` read by the whole warp at
    /// one address (a broadcast).
    fn solve_unrolled(&mut self, n: usize, (sl, sb, so): (Storage, Storage, Storage), j: &str) {
        let pb = self.taddr(sb, DType::F32, None, Some(j));
        let px = self.taddr(so, DType::F32, None, Some(j));
        let pl = self.taddr(sl, DType::F32, None, None);
        for start in (0..n).step_by(SOLVE_WINDOW) {
            let rows = start..n.min(start + SOLVE_WINDOW);
            let x: Vec<String> = rows.clone().map(|i| self.ld_at(DType::F32, &pb, i as i64 * sb.rs * 4)).collect();
            for i in rows.clone() {
                for p in 0..i {
                    let lv = self.ld_at(DType::F32, &pl, (i as i64 * sl.rs + p as i64 * sl.cs) * 4);
                    let xp = if p >= start {
                        x[p - start].clone()
                    } else {
                        self.ld_at(DType::F32, &px, p as i64 * so.rs * 4)
                    };
                    let xi = &x[i - start];
                    self.ins(format!("neg.f32 {lv}, {lv}"));
                    self.ins(format!("fma.rn.f32 {xi}, {lv}, {xp}, {xi}"));
                }
            }
            for (i, xi) in rows.zip(&x) {
                self.st_at(DType::F32, &px, i as i64 * so.rs * 4, xi);
            }
        }
    }

    /// Each row's sum by a group of [`row_sum_lanes`] adjacent lanes of one warp: every lane
    /// sums a strided share of the row's columns (unrolled, its loads issued ahead, when the
    /// share is at most [`UNROLL_BATCH`]), then the group adds its lanes' sums by butterfly
    /// shuffles and its first lane writes the row. One lane per row where the rows fill the
    /// block (the sum then runs down the row in order).
    fn row_sum(&mut self, id: ValueId, x: ValueId) {
        let t = self.k.ty(id);
        let dt = t.dtype;
        let (tx, sx) = (self.k.ty(x), self.storage(x));
        let lanes = row_sum_lanes(t.rows, tx.cols, self.sched.threads() as usize);
        let l = self.eloop(t.rows * lanes);
        let (row, part) = (self.reg(R), self.reg(R));
        self.ins(format!("shr.u32 {row}, {}, {}", l.e, lanes.trailing_zeros()));
        self.ins(format!("and.b32 {part}, {}, {}", l.e, lanes - 1));
        let pa = self.taddr(sx, dt, Some(&row), Some(&part));
        let s = self.freg(dt);
        self.ins(format!("mov.{} {s}, {}", ty(dt), fimm(0.0, dt)));
        let share = tx.cols / lanes;
        let step = lanes as i64 * sx.cs * dt.size() as i64;
        if share <= UNROLL_BATCH {
            let v: Vec<String> = (0..share).map(|c| self.ld_at(dt, &pa, c as i64 * step)).collect();
            for vc in &v {
                self.ins(format!("add.rn.{} {s}, {s}, {vc}", ty(dt)));
            }
        } else {
            let (c, head) = self.cloop();
            let v = self.ld(dt, &pa);
            self.ins(format!("add.rn.{} {s}, {s}, {v}", ty(dt)));
            self.ins(format!("add.s64 {pa}, {pa}, {step}"));
            self.cloop_end(&c, &head, &share.to_string());
        }
        if lanes > 1 {
            // The group's lanes within the warp (the block is whole warps, a group a power of
            // two that divides 32 and the loop bound, so a group enters and leaves together).
            let (lane, members) = (self.reg(R), self.reg(R));
            self.ins(format!("and.b32 {lane}, {}, {}", self.tid, 31 & !(lanes - 1)));
            let group = if lanes == 32 { u32::MAX } else { (1u32 << lanes) - 1 };
            self.ins(format!("mov.u32 {members}, {group}"));
            self.ins(format!("shl.b32 {members}, {members}, {lane}"));
            let mut off = lanes / 2;
            while off > 0 {
                let other = self.shfl_bfly(dt, &s, off, &members);
                self.ins(format!("add.rn.{} {s}, {s}, {other}", ty(dt)));
                off /= 2;
            }
        }
        let (skip, not_first, zero) = (self.label(), self.reg(P), self.reg(R));
        self.ins(format!("setp.ne.u32 {not_first}, {part}, 0"));
        self.ins(format!("@{not_first} bra {skip}"));
        self.ins(format!("mov.u32 {zero}, 0"));
        self.write(id, &row, &zero, &s);
        self.place(&skip);
        self.eloop_end(l);
    }

    /// `x` of the lane `off` lanes away (xor) among `members`; f64 in two 32-bit halves.
    fn shfl_bfly(&mut self, dt: DType, x: &str, off: usize, members: &str) -> String {
        let out = self.freg(dt);
        match dt {
            DType::F32 => {
                self.ins(format!("shfl.sync.bfly.b32 {out}, {x}, {off}, 31, {members}"));
            }
            DType::F64 => {
                let (lo, hi) = (self.reg(R), self.reg(R));
                self.ins(format!("mov.b64 {{{lo}, {hi}}}, {x}"));
                self.ins(format!("shfl.sync.bfly.b32 {lo}, {lo}, {off}, 31, {members}"));
                self.ins(format!("shfl.sync.bfly.b32 {hi}, {hi}, {off}, 31, {members}"));
                self.ins(format!("mov.b64 {out}, {{{lo}, {hi}}}"));
            }
        }
        out
    }

    /// An unrolled column cumsum into `s`: loads in batches of [`UNROLL_BATCH`] ahead of their
    /// adds (a store may alias a later load's address, so none is moved past one).
    fn cumsum_unrolled(
        &mut self,
        dt: DType,
        (pa, rs_a): (&str, i64),
        (po, rs_o): (&str, i64),
        n: usize,
        exclusive: bool,
        s: &str,
    ) {
        let sz = dt.size() as i64;
        for start in (0..n).step_by(UNROLL_BATCH) {
            let rows = start..n.min(start + UNROLL_BATCH);
            let v: Vec<String> = rows.clone().map(|i| self.ld_at(dt, pa, i as i64 * rs_a * sz)).collect();
            for (i, vi) in rows.zip(&v) {
                let at = i as i64 * rs_o * sz;
                if exclusive {
                    self.st_at(dt, po, at, s);
                    self.ins(format!("add.rn.{} {s}, {s}, {vi}", ty(dt)));
                } else {
                    self.ins(format!("add.rn.{} {s}, {s}, {vi}", ty(dt)));
                    self.st_at(dt, po, at, s);
                }
            }
        }
    }
}

/// The most rows a column-serial op (`SolveUnitLower`, `Cumsum`) is unrolled over, its column
/// in registers (64 f32 values; the chunk sizes up to 64). Past it, a loop.
pub const UNROLLED_ROWS: usize = 64;
/// Rows of an unrolled solve's column held in registers at once (more made ptxas spill).
pub const SOLVE_WINDOW: usize = 16;
/// Loads an unrolled cumsum issues before their adds.
pub const UNROLL_BATCH: usize = 16;

/// Copies of an element loop's body per iteration over `n` elements with `threads` threads:
/// 4 or 2 when that many whole rounds of the block divide `n` (so no copy needs a bound
/// check), else 1.
pub fn unroll_factor(n: usize, threads: usize) -> usize {
    [4, 2].into_iter().find(|&u| n >= threads * u && n.is_multiple_of(threads * u)).unwrap_or(1)
}

/// Lanes summing one row of a `RowSum` over `cols` columns with `threads` threads: the most
/// (a power of two, at most a warp) that still leaves every row a group of its own in one
/// round of the block and divides the columns evenly; 1 when the rows alone fill the block.
pub fn row_sum_lanes(rows: usize, cols: usize, threads: usize) -> usize {
    let mut lanes = 1;
    while lanes < 32 && rows * lanes * 2 <= threads.max(1) && cols.is_multiple_of(lanes * 2) {
        lanes *= 2;
    }
    lanes
}

/// Whether a column-serial op over `rows` rows is emitted unrolled.
pub fn unrolled_rows(rows: usize) -> bool {
    rows > 0 && rows <= UNROLLED_ROWS
}

/// The element type of every tensor parameter, from the loads that read it (f32 for tensors
/// that are only written). Two loads reading one tensor as different types are an error.
fn param_elems(kernel: &Kernel) -> Result<Vec<ElemType>, PtxError> {
    fn walk(stmts: &[Stmt], seen: &mut [Option<ElemType>], names: &[Param]) -> Result<(), PtxError> {
        for s in stmts {
            match s {
                Stmt::Let { op: Op::Load { elem, param, .. }, .. } => match seen.get_mut(*param) {
                    Some(Some(e)) if e != elem => {
                        return Err(PtxError(format!(
                            "ptx: tensor `{}` is loaded as both {} and {}",
                            names[*param].name,
                            e.name(),
                            elem.name()
                        )))
                    }
                    Some(slot) => *slot = Some(*elem),
                    None => return Err(PtxError(format!("ptx: load of parameter {param}, which does not exist"))),
                },
                Stmt::Loop { body, .. } => walk(body, seen, names)?,
                _ => {}
            }
        }
        Ok(())
    }
    let mut seen = vec![None; kernel.params.len()];
    walk(&kernel.body, &mut seen, &kernel.params)?;
    Ok(seen.into_iter().map(|e| e.unwrap_or_default()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_loops_unroll_only_by_whole_rounds_of_the_block() {
        assert_eq!(unroll_factor(4096, 256), 4);
        assert_eq!(unroll_factor(512, 256), 2);
        assert_eq!(unroll_factor(1536, 256), 2, "6 rounds: 2 copies, not 4");
        assert_eq!(unroll_factor(256, 256), 1);
        assert_eq!(unroll_factor(300, 256), 1, "a partial round: no copy may run past n");
        assert_eq!(unroll_factor(0, 256), 1);
        assert!(unrolled_rows(64) && !unrolled_rows(65) && !unrolled_rows(0));
    }
}
