//! `chunkc bench`: the median time of a kernel on random inputs, as throughput and GFLOP/s.
//!
//! FLOPs are counted as FLA's torch reference benchmark counts the chunked form, per token and
//! head: intra-chunk scores 2 C K and their product with the values 2 C V, the state update
//! 2 K V and the inter-chunk read 2 K V. The recurrent kernel is counted at 4 K V per token
//! and head (the decay and the write on the K x V state; the read-out is 2 K V more but is
//! left out so that the two kernels' rates compare on one count). Delta rules do more work
//! than either count (the UT solve): their GFLOP/s understate the machine's work.
//!
//! What is timed: one run of the program ([`CpuRunner::run`]): each phase's launch over its
//! grid, with the executor's per-worker scratch allocation, thread start-up when more than
//! one thread, and the kernel calls. The inputs, the outputs and the intermediates are
//! allocated once before the timing; the outputs are NaN-poisoned once, before the warm-up
//! run (which poisons the scratch too), and that run must have written every element. Poisoning before every run is what `run` and `verify` do (correctness);
//! here it would time an 8 MB fill and fresh page faults that are not the kernel's.

use crate::backend::{build_program, shape_of, CpuRunner};
use crate::error::Error;
use crate::verify::random_inputs;
use chunkc_codegen::program::{Program, Role};
use chunkc_codegen::schedule::{KernelKind, Schedule, DEFAULT_TIME_BLOCK};
use chunkc_dsl::ast::Rule;
use chunkc_dsl::reference::Dims;
use chunkc_runtime::exec::Order;
use chunkc_runtime::io::Tensors;
use std::time::{Duration, Instant};

/// One benchmark result.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub median: Duration,
    /// The fastest run: on a shared machine the least disturbed one, so A/B comparisons of
    /// two kernels read it alongside the median.
    pub best: Duration,
    pub runs: usize,
    pub flops_per_call: f64,
    pub token_heads: usize,
}

impl Measurement {
    pub fn token_heads_per_s(&self) -> f64 {
        self.token_heads as f64 / self.median.as_secs_f64()
    }
    pub fn gflops(&self) -> f64 {
        self.flops_per_call / self.median.as_secs_f64() / 1e9
    }
}

/// FLOPs of one call by the counting rule in the module doc.
pub fn flops(dims: &Dims, schedule: &Schedule) -> f64 {
    let (t, k, v) = (dims.seq_len as f64, dims.k as f64, dims.v as f64);
    let per_token = match schedule.kernel {
        KernelKind::Chunked => 2.0 * schedule.chunk as f64 * (k + v) + 4.0 * k * v,
        KernelKind::Recurrent => 4.0 * k * v,
    };
    (dims.batch * dims.heads) as f64 * t * per_token
}

/// Runs the program `schedule` asks for once to warm up, then at least `min_runs` times and
/// for at least `min_time`, on `threads` workers (0: all cores); returns the median.
pub fn bench(
    rule: &Rule,
    dims: Dims,
    schedule: &Schedule,
    threads: usize,
    min_runs: usize,
    min_time: Duration,
) -> Result<Measurement, Error> {
    let inputs = random_inputs(rule, &dims, 7);
    let program = build_program(rule, shape_of(&dims, None), schedule)?;
    let order = Order { threads, time_block: schedule.time_block, poison_scratch: false };
    let (median, best, runs) = time_program(&program, &dims, &inputs, order, min_runs, min_time)?;
    Ok(Measurement {
        median,
        best,
        runs,
        flops_per_call: flops(&dims, schedule),
        token_heads: dims.batch * dims.seq_len * dims.heads,
    })
}

/// [`bench`] for the backward: the backward program `opts` asks for (recurrent or chunked;
/// its forward phases included: forward + backward, as a training step runs them), on random
/// inputs and cotangents. Its FLOPs are counted as three times the forward's of the same
/// kernel (a backward does about twice a forward's work).
pub fn bench_grad(
    rule: &Rule,
    dims: Dims,
    opts: &crate::grad::GradOptions,
    threads: usize,
    min_runs: usize,
    min_time: Duration,
) -> Result<Measurement, Error> {
    let inputs = crate::verify_grad::random_grad_inputs(rule, &dims, 7);
    let program = crate::grad::build_program(rule, &dims, opts)?;
    let forward = match opts.backend {
        crate::backend::Backend::Chunked => Schedule::chunked(opts.chunk),
        _ => Schedule::recurrent(),
    };
    let order = Order { threads, time_block: DEFAULT_TIME_BLOCK, poison_scratch: false };
    let (median, best, runs) = time_program(&program, &dims, &inputs, order, min_runs, min_time)?;
    Ok(Measurement {
        median,
        best,
        runs,
        flops_per_call: 3.0 * flops(&dims, &forward),
        token_heads: dims.batch * dims.seq_len * dims.heads,
    })
}

/// Compiles `program`, runs it once poisoned (every output must come back finite), then
/// times it: (median, best, runs).
fn time_program(
    program: &Program,
    dims: &Dims,
    inputs: &Tensors,
    order: Order,
    min_runs: usize,
    min_time: Duration,
) -> Result<(Duration, Duration, usize), Error> {
    let mut runner = CpuRunner::new(program, dims)?;
    runner.poison();
    runner.run(inputs, Order { poison_scratch: true, ..order })?;
    // The only poisoned run: an element it left unwritten (NaN) or overflowed would make
    // the timings below those of a broken kernel.
    for t in program.spec.with_role(Role::Output) {
        if runner.tensor(&t.name)?.iter().any(|x| !x.is_finite()) {
            return Err(Error::Internal(format!("bench: the warm-up run left a NaN or Inf in `{}`", t.name)));
        }
    }
    let mut times = vec![];
    let start = Instant::now();
    while times.len() < min_runs.max(1) || start.elapsed() < min_time {
        let t = Instant::now();
        runner.run(inputs, order)?;
        times.push(t.elapsed());
        std::hint::black_box(&mut runner);
    }
    times.sort();
    Ok((times[times.len() / 2], times[0], times.len()))
}
