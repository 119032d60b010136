//! An analytic estimate of a PTX program's time on a described GPU (`chunkc model`): an
//! estimate, labelled as one. The tuner may prune GPU schedules with it; it never picks one
//! without measuring when a GPU is present.
//!
//! Per phase of the program:
//! - the grid's CTAs (from the launch metadata at the problem's shape), how many fit on an
//!   SM at once (threads, shared memory, the CTA limit) and so the waves;
//! - one CTA's time as the chain of its ops, each as the PTX backend lowers it
//!   (`chunkc_codegen::ptx`): a loop over the op's elements strided by the block, one
//!   memory access per element and iteration in the tile space (shared memory, or an L2 hit
//!   for global scratch), then a barrier; elementwise ops, loads through registers and
//!   stores unrolled as the backend unrolls them (`ptx::unroll_factor`: one latency per
//!   round of copies); barriers as many as the emitted PTX keeps (in the loop's body and
//!   outside it); a load through registers pays the input's first-touch latency per access
//!   (one element, or 8 of a 16-bit tensor's contiguous rows); `cp.async` loads (f32
//!   tensors into shared memory, 16 bytes per access) cost their issue, and a run of them
//!   one wait and one barrier: the first touch, or a shared-memory latency when the chunk
//!   loop double-buffers them (a chunk-parallel phase has no next chunk to prefetch); a dot
//!   on tensor cores at the SM's rate shared by the CTAs on it, after staging its operands
//!   (16-bit: a pair per access, unrolled); an fma dot a k-loop of tile accesses per
//!   output; the column-serial ops (`Cumsum`, `SolveUnitLower`) a chain down the rows: one
//!   tile access per row as a loop, or, unrolled with the column in registers (up to
//!   `ptx::UNROLLED_ROWS` rows), a latency per batch of loads and then their instructions
//!   at one per cycle per scheduler, shared by the warps on it. Fused elementwise values
//!   cost nothing of their own. A sequential phase's CTA runs every chunk (iteration) of
//!   its sequence in turn; a chunk-parallel one runs one.
//! - the phase's time: the largest of waves x one CTA's chain, its FLOPs at the dot
//!   precision's peak, and its global bytes at HBM bandwidth (a tile that every V-tile of a
//!   grid point reads counts once: those CTAs are adjacent in the grid, so in one wave, and
//!   the others find it in L2), plus a launch; which of the three bounds it is reported.
//!
//! The program's estimate is the sum of its phases. The floor is the shape's roofline:
//! FLA's chunk-form FLOP count at the dot precision's peak, or the inputs, `o` and the states
//! read and written once at HBM bandwidth, whichever is larger. The GPUs' figures and the
//! latencies assumed are data (`gpus.toml`).

use chunkc_codegen::ir::*;
use chunkc_codegen::midend::{prepare, Abilities};
use chunkc_codegen::program::Program;
use chunkc_codegen::ptx::{
    row_sum_lanes, unroll_factor, unrolled_rows, vector_width_16bit, PtxProgram, SOLVE_WINDOW, UNROLL_BATCH,
};
use chunkc_codegen::schedule::{DotPrecision, PtxSchedule};
use chunkc_runtime::artifact::TileSpace;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A GPU as the model sees it (one table of `gpus.toml`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Gpu {
    pub name: String,
    pub sms: u32,
    pub clock_ghz: f64,
    pub hbm_gb_s: f64,
    pub bf16_tflops: f64,
    pub tf32_tflops: f64,
    pub fp32_tflops: f64,
    pub smem_per_sm_kib: f64,
    pub max_threads_per_sm: u32,
    pub max_ctas_per_sm: u32,
    pub launch_us: f64,
    pub barrier_cycles: f64,
    pub smem_latency_cycles: f64,
    pub l2_latency_cycles: f64,
    pub hbm_latency_cycles: f64,
    pub fma_latency_cycles: f64,
    pub schedulers_per_sm: f64,
    pub issue_cycles_per_access: f64,
}

/// The GPU tables, compiled in.
const GPUS: &str = include_str!("../gpus.toml");

/// The described GPUs by key (`h100`, `a100`, ...).
pub fn gpus() -> BTreeMap<String, Gpu> {
    toml::from_str(GPUS).expect("gpus.toml is part of the build and parses (tested)")
}

/// The GPU `key` names, or a one-line error listing the known keys.
pub fn gpu(key: &str) -> Result<Gpu, String> {
    let all = gpus();
    let known: Vec<&str> = all.keys().map(String::as_str).collect();
    all.get(&key.to_ascii_lowercase())
        .cloned()
        .ok_or_else(|| format!("no GPU `{key}` in the model's table (known: {})", known.join(", ")))
}

/// The problem the program runs on, and what its roofline counts.
#[derive(Clone, Copy, Debug)]
pub struct Problem {
    pub batch: usize,
    pub seq_len: usize,
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    pub chunk: usize,
    /// Bytes each token and head must read and write at least: its inputs in their element
    /// type and its output row.
    pub bytes_per_token_head: f64,
}

/// One phase's estimate.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseEstimate {
    pub name: String,
    pub grid: [u32; 3],
    pub block: u32,
    /// Shared memory per CTA, dynamic and static.
    pub smem_bytes: usize,
    /// Global scratch per CTA (tiles that did not fit in shared memory).
    pub scratch_bytes: usize,
    pub ctas: u64,
    pub ctas_per_sm: u32,
    pub waves: u64,
    /// Loop iterations one CTA runs (chunks, or tokens of a recurrent kernel).
    pub iterations: u64,
    /// Barriers in one iteration, as the emitted PTX keeps them.
    pub barriers_per_iteration: usize,
    pub gflop: f64,
    pub mbytes: f64,
    /// What bounds the phase: `latency` (the CTAs' op chains), `flops` or `bandwidth`.
    pub bound: &'static str,
    pub est_ms: f64,
    /// One CTA's chain, op by op (`chunkc model --ops`; not in the JSON).
    #[serde(skip)]
    pub ops: Vec<OpCost>,
}

/// One statement of a CTA's chain: what it is and the cycles the model gives it (with one
/// barrier each; the phase's total counts the barriers the PTX keeps instead).
#[derive(Clone, Debug)]
pub struct OpCost {
    /// `%12`, or `store %12`.
    pub what: String,
    /// The op's kind (`load`, `dot`, ...).
    pub kind: &'static str,
    pub rows: usize,
    pub cols: usize,
    /// In the chunk loop (once per iteration) or outside it (once).
    pub in_loop: bool,
    pub cycles: f64,
}

/// A program's estimate.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub gpu: String,
    pub est_ms: f64,
    pub floor_ms: f64,
    pub phases: Vec<PhaseEstimate>,
}

/// What one CTA does in a stretch of statements: cycles of its op chain, barriers, and the
/// FLOPs and global bytes it moves.
#[derive(Clone, Copy, Default)]
struct Tally {
    cycles: f64,
    barriers: usize,
    flops: f64,
    bytes: f64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.cycles += o.cycles;
        self.barriers += o.barriers;
        self.flops += o.flops;
        self.bytes += o.bytes;
    }
}

/// The peak rate of `dot`'s dots, TFLOP/s.
fn peak_tflops(gpu: &Gpu, dot: DotPrecision) -> f64 {
    match dot {
        DotPrecision::F32Fma => gpu.fp32_tflops,
        DotPrecision::Tf32 => gpu.tf32_tflops,
        DotPrecision::Bf16 | DotPrecision::F16 => gpu.bf16_tflops,
    }
}

/// What the cost of an op depends on besides the op.
struct Context<'a> {
    gpu: &'a Gpu,
    schedule: &'a PtxSchedule,
    kernel: &'a Kernel,
    threads: f64,
    /// Latency of one access to a tile (shared memory or an L2 hit on global scratch).
    tile_latency: f64,
    tiles_in_smem: bool,
    /// The chunk loop's f32 loads are double-buffered (issued a chunk ahead).
    pipelined: bool,
    /// CTAs sharing an SM's tensor and fma units.
    active_ctas: f64,
}

impl Context<'_> {
    /// Per-thread iterations of a loop over `elements`, `per_access` elements at a time.
    fn steps(&self, elements: usize, per_access: usize) -> f64 {
        (elements as f64 / (self.threads * per_access.max(1) as f64)).ceil()
    }

    /// The CTAs that read the tile a load at `base` reads, from HBM once and from L2 for the
    /// others: the V-tiles of one grid point, adjacent in the grid (x) and so in the same
    /// wave, when the address does not depend on the V-tile.
    fn readers_sharing(&self, base: &Idx) -> usize {
        if base.uses(IdxVar::VTile) {
            1
        } else {
            self.kernel.vtiles.max(1)
        }
    }

    /// Warps of the CTAs on an SM that share one scheduler while an op keeps `lanes` threads
    /// of each CTA busy (at least 1).
    fn warps_per_scheduler(&self, lanes: usize) -> f64 {
        let warps = (lanes as f64).min(self.threads) / 32.0;
        (warps.ceil() * self.active_ctas / self.gpu.schedulers_per_sm).max(1.0)
    }

    /// Waited-for rounds of an element loop over `elements`, `per_access` at a time, with
    /// its body unrolled as the backend does (`ptx::unroll_factor`: the copies' loads in flight
    /// together).
    fn rounds(&self, elements: usize, per_access: usize) -> f64 {
        let accesses = elements / per_access.max(1);
        self.steps(elements, per_access) / unroll_factor(accesses, self.threads as usize) as f64
    }

    /// One SM's FLOPs per cycle at `tflops`, shared by the CTAs on it.
    fn flops_per_cycle(&self, tflops: f64) -> f64 {
        tflops * 1e12 / (self.gpu.sms as f64 * self.gpu.clock_ghz * 1e9) / self.active_ctas
    }

    /// The cost of `op` (value of type `out`); `batch` says whether a batch of `cp.async`
    /// loads is open (its wait and barrier already counted), and is updated.
    fn op(&self, op: &Op, out: TileTy, in_loop: bool, batch: &mut bool) -> Tally {
        let lat = self.tile_latency;
        let elements = out.rows * out.cols;
        let mut t = Tally { barriers: 1, cycles: self.gpu.barrier_cycles, ..Tally::default() };
        let opens_batch = !*batch;
        *batch = false;
        match op {
            Op::Load { elem, rows, cols, base, row_stride, col_stride, .. } => {
                let size = elem.size();
                t.bytes += (rows * cols * size) as f64 / self.readers_sharing(base) as f64;
                if *elem == ElemType::F32 && self.schedule.async_copy && self.tiles_in_smem {
                    // cp.async: issued without waiting; a run of them waits once, at its end
                    // (or, double-buffered, at the loop's top for copies issued a chunk ahead).
                    *batch = true;
                    let hidden = in_loop && self.pipelined;
                    let wait = if hidden { self.gpu.smem_latency_cycles } else { self.gpu.hbm_latency_cycles };
                    let issue = self.steps(rows * cols, 16 / size) * self.gpu.issue_cycles_per_access;
                    if !opens_batch {
                        t = Tally { bytes: t.bytes, ..Tally::default() };
                    } else {
                        t.cycles += wait;
                    }
                    t.cycles += issue;
                } else {
                    // Through registers, each access waited for: one element, or eight of a
                    // 16-bit tensor's contiguous rows (one 16-byte load).
                    let per_access = if *elem == ElemType::F32 {
                        1
                    } else {
                        vector_width_16bit(base, *row_stride, *col_stride, *cols)
                    };
                    t.cycles += self.rounds(rows * cols, per_access) * self.gpu.hbm_latency_cycles;
                }
            }
            Op::Dot { a, b, ta, tb, .. } => {
                let (ta_, tb_) = (self.kernel.ty(*a), self.kernel.ty(*b));
                let (m, k) = if *ta { (ta_.cols, ta_.rows) } else { (ta_.rows, ta_.cols) };
                let n = if *tb { tb_.rows } else { tb_.cols };
                let flops = 2.0 * (m * n * k) as f64;
                t.flops += flops;
                let min = self.schedule.min_mma_dim;
                if self.schedule.dot.tensor_cores() && m >= min && n >= min && k >= min {
                    let rate = self.flops_per_cycle(peak_tflops(self.gpu, self.schedule.dot));
                    // The operands' tile reads: 16-bit dots stage them a pair per access,
                    // unrolled as the backend does; tf32 loads its fragments one at a time.
                    let operands = match self.schedule.dot {
                        DotPrecision::Bf16 | DotPrecision::F16 => self.rounds(m * k, 2) + self.rounds(k * n, 2),
                        _ => self.steps(m * k + k * n, 1),
                    };
                    t.cycles += flops / rate + operands * lat;
                } else {
                    let rate = self.flops_per_cycle(self.gpu.fp32_tflops);
                    t.cycles += (self.steps(m * n, 1) * k as f64 * lat).max(flops / rate);
                }
            }
            Op::GatedDot { a, .. } | Op::GatedMatMul { x: a, .. } => {
                let inner = self.kernel.ty(*a).cols;
                t.flops += 3.0 * (elements * inner) as f64;
                t.cycles += self.steps(elements, 1) * inner as f64 * lat;
            }
            Op::Cumsum { .. } if unrolled_rows(out.rows) => {
                // Loads a batch ahead, then a chain of dependent adds (3 instructions a row).
                let n = out.rows as f64;
                let batches = out.rows.div_ceil(UNROLL_BATCH) as f64;
                let per_row = self.gpu.fma_latency_cycles.max(3.0 * self.warps_per_scheduler(out.cols));
                t.cycles += self.steps(out.cols, 1) * (batches * lat + n * per_row);
            }
            Op::Cumsum { .. } => t.cycles += self.steps(out.cols, 1) * out.rows as f64 * lat,
            Op::RowSum { x } => {
                // A group of lanes per row (the backend's `row_sum_lanes`): each lane's share of
                // the columns (unrolled up to a batch: its loads issued ahead; else one load
                // and add after another), then a butterfly of shuffles and adds.
                let cols = self.kernel.ty(*x).cols;
                let lanes = row_sum_lanes(out.rows, cols, self.threads as usize);
                let (share, add) = ((cols / lanes) as f64, self.gpu.fma_latency_cycles);
                let lane = if cols / lanes <= UNROLL_BATCH { lat + share * add } else { share * (lat + add) };
                let butterfly = lanes.trailing_zeros() as f64 * (self.gpu.smem_latency_cycles + add);
                t.cycles += self.steps(out.rows * lanes, 1) * (lane + butterfly);
            }
            Op::SolveUnitLower { .. } if unrolled_rows(out.rows) => {
                // Register windows: their loads issued ahead (one latency each), then
                // n (n - 1) / 2 steps of a broadcast load of l, a negation and an fma, plus a
                // reload of each earlier window's row: issue-bound, the warps taking turns.
                let n = out.rows as f64;
                t.flops += n * n * out.cols as f64;
                let windows = out.rows.div_ceil(SOLVE_WINDOW);
                let reloads: usize = (0..out.rows).map(|i| i - i % SOLVE_WINDOW).sum();
                let instructions = 1.5 * n * (n - 1.0) + reloads as f64 + 2.0 * n;
                let issue = instructions * self.warps_per_scheduler(out.cols);
                t.cycles += self.steps(out.cols, 1) * (windows as f64 * lat + issue);
            }
            Op::SolveUnitLower { .. } => {
                let n = out.rows as f64;
                t.flops += n * n * out.cols as f64;
                t.cycles += self.steps(out.cols, 1) * n * (n + 1.0) / 2.0 * lat;
            }
            Op::Rows { .. } | Op::Transpose { .. } => return Tally::default(),
            _ => {
                t.flops += elements as f64;
                t.cycles += self.rounds(elements, 1) * lat;
            }
        }
        t
    }

    /// A store: read from its tile, written to global memory (fire and forget).
    fn store(&self, value: ValueId) -> Tally {
        let ty = self.kernel.ty(value);
        let elements = ty.rows * ty.cols;
        Tally {
            cycles: self.rounds(elements, 1) * self.tile_latency + self.gpu.barrier_cycles,
            barriers: 1,
            flops: 0.0,
            bytes: (elements * 4) as f64,
        }
    }
}

/// Estimates `program` (emitted as `emitted` under `schedule`) on `gpu` for `problem`.
pub fn estimate(
    program: &Program,
    emitted: &PtxProgram,
    schedule: &PtxSchedule,
    gpu: &Gpu,
    problem: &Problem,
) -> Result<Estimate, String> {
    let mut phases = vec![];
    for (kernel, phase) in program.kernels.iter().zip(&emitted.phases) {
        let meta = &phase.meta;
        let grid = meta
            .grid
            .dims(problem.batch, problem.heads, problem.seq_len)
            .ok_or_else(|| format!("the grid of {} does not fit this shape", meta.entry))?;
        let ctas: u64 = grid.iter().map(|&d| d as u64).product();
        let threads = meta.block.iter().product::<u32>().max(1);
        let smem_bytes = meta.dynamic_smem_bytes + meta.static_smem_bytes;
        let by_smem =
            if smem_bytes > 0 { (gpu.smem_per_sm_kib * 1024.0 / smem_bytes as f64).floor() as u32 } else { u32::MAX };
        let ctas_per_sm = gpu.max_ctas_per_sm.min(gpu.max_threads_per_sm / threads).min(by_smem).max(1);
        let per_wave = gpu.sms as u64 * ctas_per_sm as u64;
        let waves = ctas.div_ceil(per_wave).max(1);
        let active = (ctas.div_ceil(gpu.sms as u64)).clamp(1, ctas_per_sm as u64) as f64;
        let prepared = prepare(kernel, &Abilities::simt()).map_err(|e| e.0)?;
        let tiles_in_smem = meta.tile_space == TileSpace::Shared;
        let cx = Context {
            gpu,
            schedule,
            kernel: &prepared.kernel,
            threads: threads as f64,
            tile_latency: if tiles_in_smem { gpu.smem_latency_cycles } else { gpu.l2_latency_cycles },
            tiles_in_smem,
            pipelined: phase.ptx.contains("cp.async.wait_group 1"),
            active_ctas: active,
        };
        let (mut outside, mut body, mut count) = (Tally::default(), Tally::default(), None);
        let mut ops = vec![];
        // One statement's cost, added to `into` and recorded.
        let mut cost = |s: &Stmt, in_loop: bool, batch: &mut bool, into: &mut Tally| {
            let (what, kind, ty, t) = match s {
                Stmt::Let { id, op } if !prepared.fusion.fused[id.0 as usize] && !op.is_view() => {
                    let ty = prepared.kernel.ty(*id);
                    (id.to_string(), op.name(), ty, cx.op(op, ty, in_loop, batch))
                }
                Stmt::Store { value, .. } => {
                    *batch = false;
                    (format!("store {value}"), "store", prepared.kernel.ty(*value), cx.store(*value))
                }
                _ => return,
            };
            *into += t;
            ops.push(OpCost { what, kind, rows: ty.rows, cols: ty.cols, in_loop, cycles: t.cycles });
        };
        let mut batch = false;
        for s in &prepared.kernel.body {
            match s {
                Stmt::Loop { count: n, body: stmts, .. } => {
                    count = Some(n.clone());
                    batch = false;
                    for s in stmts {
                        cost(s, true, &mut batch, &mut body);
                    }
                    batch = false;
                }
                s => cost(s, false, &mut batch, &mut outside),
            }
        }
        let iterations = match (&count, prepared.kernel.chunk_parallel) {
            (None, _) => 0,
            (Some(_), true) => 1,
            (Some(n), false) => n.eval(&|v| if v == IdxVar::SeqLen { problem.seq_len as i64 } else { 0 }).max(0) as u64,
        };
        // The barriers the backend kept (it emits one only where an op touches what a pending
        // op wrote or read): counted in the emitted text, in place of one per op.
        let (in_loop, total) = emitted_barriers(&phase.ptx);
        for (t, kept) in [(&mut body, in_loop), (&mut outside, total - in_loop)] {
            t.cycles += (kept as f64 - t.barriers as f64) * gpu.barrier_cycles;
            t.barriers = kept;
        }
        let cta = Tally {
            cycles: outside.cycles + iterations as f64 * body.cycles,
            barriers: body.barriers,
            flops: outside.flops + iterations as f64 * body.flops,
            bytes: outside.bytes + iterations as f64 * body.bytes,
        };
        let (flops, bytes) = (cta.flops * ctas as f64, cta.bytes * ctas as f64);
        let candidates = [
            ("latency", waves as f64 * cta.cycles / (gpu.clock_ghz * 1e6)),
            ("flops", flops / (peak_tflops(gpu, schedule.dot) * 1e9)),
            ("bandwidth", bytes / (gpu.hbm_gb_s * 1e6)),
        ];
        let (bound, ms) = candidates.into_iter().fold(("latency", 0.0f64), |a, b| if b.1 > a.1 { b } else { a });
        phases.push(PhaseEstimate {
            name: meta.entry.clone(),
            grid,
            block: threads,
            smem_bytes,
            scratch_bytes: meta.scratch_bytes_per_cta,
            ctas,
            ctas_per_sm,
            waves,
            iterations,
            barriers_per_iteration: cta.barriers,
            gflop: flops / 1e9,
            mbytes: bytes / 1e6,
            bound,
            est_ms: ms + gpu.launch_us / 1e3,
            ops,
        });
    }
    let est_ms = phases.iter().map(|p| p.est_ms).sum();
    Ok(Estimate { gpu: gpu.name.clone(), est_ms, floor_ms: floor_ms(gpu, schedule.dot, problem), phases })
}

/// The shape's roofline: FLA's chunk-form FLOPs per token and head (`2 C K + 2 C V + 4 K V`)
/// at the dot precision's peak, or every input and output byte once (the states read and
/// written) at HBM bandwidth, whichever takes longer.
pub fn floor_ms(gpu: &Gpu, dot: DotPrecision, p: &Problem) -> f64 {
    let token_heads = (p.batch * p.seq_len * p.heads) as f64;
    let (c, k, v) = (p.chunk as f64, p.k as f64, p.v as f64);
    let flops = token_heads * (2.0 * c * k + 2.0 * c * v + 4.0 * k * v);
    let bytes = token_heads * p.bytes_per_token_head + (p.batch * p.heads) as f64 * k * v * 4.0 * 2.0;
    (flops / (peak_tflops(gpu, dot) * 1e9)).max(bytes / (gpu.hbm_gb_s * 1e6))
}

/// The `bar.sync`s of an emitted kernel: (in its loop's body, in all). The loop runs from
/// its head, the first label after the `// loop carrying` comment that a later branch jumps
/// back to, to that branch.
fn emitted_barriers(ptx: &str) -> (usize, usize) {
    let lines: Vec<&str> = ptx.lines().map(str::trim).collect();
    let is_barrier = |l: &&&str| **l == "bar.sync 0;";
    let total = lines.iter().filter(is_barrier).count();
    let in_loop = (|| {
        let start = lines.iter().position(|l| l.starts_with("// loop carrying"))?;
        // The head: the first label after it that a later `bra.uni` jumps back to (labels of
        // the prefetch before the loop are only jumped forward to).
        (start..lines.len()).find_map(|at| {
            let head = lines[at].strip_suffix(':').filter(|l| l.starts_with("$L_"))?;
            let back = format!("bra.uni {head};");
            let end = lines[at..].iter().position(|l| *l == back)? + at;
            Some(lines[at..end].iter().filter(is_barrier).count())
        })
    })();
    (in_loop.unwrap_or(0), total)
}

/// The assumptions behind every estimate, to print next to it.
pub fn assumptions(gpu: &Gpu) -> Vec<String> {
    vec![
        format!(
            "{}: {} SMs at {} GHz, {} GB/s HBM, {} / {} / {} TFLOP/s bf16 / tf32 / fp32 (published figures)",
            gpu.name, gpu.sms, gpu.clock_ghz, gpu.hbm_gb_s, gpu.bf16_tflops, gpu.tf32_tflops, gpu.fp32_tflops
        ),
        format!(
            "latencies assumed: barrier {} cycles, shared memory {}, L2 hit (global scratch) {}, first touch of an input {}, dependent add or fma {}, launch {} us; {} warp schedulers per SM",
            gpu.barrier_cycles,
            gpu.smem_latency_cycles,
            gpu.l2_latency_cycles,
            gpu.hbm_latency_cycles,
            gpu.fma_latency_cycles,
            gpu.launch_us,
            gpu.schedulers_per_sm
        ),
        format!("loads: through registers a first touch per access (8 elements of 16-bit rows, else 1); cp.async {} cycles of issue per 16-byte access, a run of them one wait (a first touch, or a shared-memory latency when double-buffered) and one barrier", gpu.issue_cycles_per_access),
        "each op: a loop over its elements strided by the block, one tile access per element and iteration (elementwise ops, loads through registers and stores unrolled up to 4 copies, their accesses in flight together), then a barrier where the backend keeps one (counted in the emitted PTX); the column-serial ops up to 64 rows unrolled (loads issued ahead, instructions at one per cycle per scheduler); fused values cost nothing".into(),
        "phase time: the largest of waves x one CTA's op chain, FLOPs at peak, bytes at HBM bandwidth; phases add up".into(),
        "HBM bytes: every load and store once, except a tile the V-tiles of one grid point all read (adjacent CTAs, one wave): from HBM once, from L2 for the others".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gpu_parses_with_its_published_figures() {
        let all = gpus();
        assert_eq!(all.keys().cloned().collect::<Vec<_>>(), ["a100", "h100", "h200"]);
        let h100 = gpu("H100").expect("case-insensitive key");
        assert_eq!((h100.sms, h100.hbm_gb_s), (132, 3350.0));
        let err = gpu("v100").expect_err("unknown");
        assert_eq!(err, "no GPU `v100` in the model's table (known: a100, h100, h200)");
    }

    /// Loads cost what the PTX backend emits for them: a run of `cp.async` copies one wait
    /// and one barrier (a first touch, or a shared-memory latency when double-buffered), a
    /// 16-bit tensor's rows 8 elements per waited access, and a V-tile-shared tile its bytes
    /// once per grid point.
    #[test]
    fn loads_cost_what_the_backend_emits() {
        use chunkc_codegen::builder::Builder;
        let h100 = gpu("h100").expect("h100");
        let mut b = Builder::new("loads");
        b.set_vtiles(4);
        let kernel = b.finish();
        let load = |elem, base| Op::Load {
            elem,
            param: 0,
            base,
            row_stride: 128,
            col_stride: 1,
            rows: 32,
            cols: 128,
            valid_rows: Idx::c(32),
        };
        let (opa, opb, opc) = (
            load(ElemType::F32, Idx::c(0)),
            load(ElemType::F32, Idx::var(IdxVar::VTile)),
            load(ElemType::Bf16, Idx::c(0)),
        );
        let schedule = PtxSchedule::pipelined(DotPrecision::Bf16);
        let cx = |pipelined| Context {
            gpu: &h100,
            schedule: &schedule,
            kernel: &kernel,
            threads: 256.0,
            tile_latency: h100.smem_latency_cycles,
            tiles_in_smem: true,
            pipelined,
            active_ctas: 1.0,
        };
        let ty = TileTy::f32(32, 128);
        let issue = 4.0 * h100.issue_cycles_per_access; // 4096 floats, 4 per access, 256 threads
        for (pipelined, wait) in [(false, h100.hbm_latency_cycles), (true, h100.smem_latency_cycles)] {
            let cx = cx(pipelined);
            let mut batch = false;
            let first = cx.op(&opa, ty, true, &mut batch);
            assert_eq!((first.cycles, first.barriers), (h100.barrier_cycles + wait + issue, 1));
            let second = cx.op(&opb, ty, true, &mut batch);
            assert_eq!((second.cycles, second.barriers), (issue, 0), "the batch waits once");
            assert_eq!(
                (first.bytes, second.bytes),
                (32.0 * 128.0 * 4.0 / 4.0, 32.0 * 128.0 * 4.0),
                "shared by 4 V-tiles, or not"
            );
            let third = cx.op(&opc, ty, true, &mut batch);
            // 4096 bf16 = 512 accesses of 8: two per thread, unrolled, so in flight together.
            assert_eq!(third.cycles, h100.barrier_cycles + h100.hbm_latency_cycles, "16-bit: 2 accesses of 8 at once");
            assert!(!batch, "a load through registers closes the batch");
        }
    }

    /// A row sum costs what the backend emits: a group of lanes per row, each lane's share
    /// of the columns, then a butterfly; one lane running down a row when the rows fill the
    /// block.
    #[test]
    fn row_sums_cost_their_groups_of_lanes() {
        use chunkc_codegen::builder::Builder;
        let h100 = gpu("h100").expect("h100");
        let mut b = Builder::new("sums");
        let pa = b.param("a", Access::Read);
        let wide = b.load(pa, Idx::c(0), 128, 1, 32, 128, Idx::c(32));
        let tall = b.load(pa, Idx::c(0), 4, 1, 512, 4, Idx::c(512));
        let kernel = b.finish();
        let schedule = PtxSchedule::default();
        let lat = h100.smem_latency_cycles;
        let cx = Context {
            gpu: &h100,
            schedule: &schedule,
            kernel: &kernel,
            threads: 256.0,
            tile_latency: lat,
            tiles_in_smem: true,
            pipelined: false,
            active_ctas: 1.0,
        };
        let add = h100.fma_latency_cycles;
        let mut batch = false;
        // 32 rows of 128: 8 lanes a row, 16 columns each (unrolled), 3 shuffles.
        let got = cx.op(&Op::RowSum { x: wide }, TileTy::f32(32, 1), false, &mut batch).cycles;
        assert_eq!(got, h100.barrier_cycles + (lat + 16.0 * add) + 3.0 * (lat + add));
        // 512 rows of 4: a lane a row, two rounds of the block.
        let got = cx.op(&Op::RowSum { x: tall }, TileTy::f32(512, 1), false, &mut batch).cycles;
        assert_eq!(got, h100.barrier_cycles + 2.0 * (lat + 4.0 * add));
    }

    #[test]
    fn barriers_are_counted_in_the_loop_and_in_all() {
        let ptx = "\tbar.sync 0;\n\t// loop carrying 1\n\t@%p1 bra $L_9;\n$L_9:\n$L_3:\n\tbar.sync 0;\n\tadd.s64 %rd1, %rd1, 1;\n$L_4:\n\tbar.sync 0;\n\tbra.uni $L_3;\n$L_5:\n\tbar.sync 0;\n";
        assert_eq!(emitted_barriers(ptx), (2, 4));
        assert_eq!(emitted_barriers("\tbar.sync 0;\n"), (0, 1), "no loop");
    }

    #[test]
    fn the_floor_is_the_larger_of_compute_and_memory() {
        let h100 = gpu("h100").expect("h100");
        let p = Problem { batch: 2, seq_len: 8192, heads: 16, k: 128, v: 128, chunk: 64, bytes_per_token_head: 1.0 };
        // 262144 token-heads x (2*64*128*2 + 4*128*128) = 262144 x 98304 flops at 989 TFLOP/s.
        let compute: f64 = 262144.0 * 98304.0 / (989.0 * 1e9);
        // States: 32 heads x 64 KB x 2, at 3350 GB/s; 1 byte per token-head.
        let memory = (262144.0 + 32.0 * 65536.0 * 2.0) / (3350.0 * 1e6);
        let got = floor_ms(&h100, DotPrecision::Bf16, &p);
        assert!((got - compute.max(memory)).abs() < 1e-12, "{got} vs {compute} / {memory}");
        let heavy = Problem { bytes_per_token_head: 1e4, ..p };
        let memory = (262144.0 * 1e4 + 32.0 * 65536.0 * 2.0) / (3350.0 * 1e6);
        assert!((floor_ms(&h100, DotPrecision::Bf16, &heavy) - memory).abs() < 1e-12);
    }
}
