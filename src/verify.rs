//! Verification against the f64 reference: random inputs drawn from each input's domain,
//! relative RMS errors, and the `verify` table.

use crate::backend::{self, Backend, Engine, Options};
use crate::error::Error;
use crate::gpu::{self, Device};
use chunkc_codegen::ir::ElemType;
use chunkc_codegen::schedule::{KernelKind, ProgramShape, PtxSchedule, Schedule};
use chunkc_dsl::ast::{Domain, Rule};
use chunkc_dsl::reference::Dims;
use chunkc_runtime::io::Tensors;
use chunkc_runtime::tensor::Tensor;

/// Relative RMS error `||out - ref|| / ||ref||` (absolute when the reference is all zero).
/// Any NaN or infinity in `out` gives infinity: it never passes.
pub fn rel_rms(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        num += (o as f64 - r as f64).powi(2);
        den += (r as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A small deterministic generator (xorshift64* with Box-Muller normals).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// One random value of a domain.
fn draw(rng: &mut Rng, domain: Domain) -> f64 {
    let n = rng.normal();
    match domain {
        Domain::Any | Domain::UnitNorm => n,
        // logsigmoid(n + 2): mostly mild decays, sometimes strong ones.
        Domain::LogGate => -chunkc_dsl::ast::softplus(-(n + 2.0)),
        Domain::Unit => chunkc_dsl::ast::sigmoid(n),
        Domain::Positive => (0.5 * n).exp(),
        Domain::Negative => -(0.5 * n).exp(),
    }
}

/// Random inputs for every input of the rule, and a random `h0` (and `<name>0` for each
/// extra state), in FLA's layouts.
pub fn random_inputs(rule: &Rule, dims: &Dims, seed: u64) -> Tensors {
    let mut rng = Rng::new(seed);
    let mut t = Tensors::new();
    for inp in &rule.inputs {
        let shape = dims.input_shape(inp);
        let n: usize = shape.iter().product();
        let mut data: Vec<f32> = (0..n).map(|_| draw(&mut rng, inp.domain) as f32).collect();
        if inp.domain == Domain::UnitNorm {
            let w = inp.width(dims.k, dims.v);
            for row in data.chunks_mut(w) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        t.insert(inp.name.clone(), Tensor { shape, data });
    }
    let n = dims.batch * dims.heads * dims.k * dims.v;
    t.insert(
        "h0".into(),
        Tensor { shape: dims.state_shape(), data: (0..n).map(|_| (0.1 * rng.normal()) as f32).collect() },
    );
    for s in &rule.states {
        let shape = vec![dims.batch, dims.heads, s.width(dims.k, dims.v)];
        let n = shape.iter().product();
        t.insert(s.initial_name(), Tensor { shape, data: (0..n).map(|_| (0.1 * rng.normal()) as f32).collect() });
    }
    t
}

/// One row of a verification table.
#[derive(Clone, Debug)]
pub struct Row {
    pub backend: Backend,
    pub engine: Engine,
    /// None for the recurrent kernel.
    pub chunk: Option<usize>,
    pub seq_len: usize,
    pub err_o: f64,
    /// The worst final state's error: `hT` and each extra state's `<name>T`.
    pub err_ht: f64,
    /// The precision as the table shows it: `f32 in, f32 dots` for the CPU engines, else the
    /// schedule's inputs and dots (`bf16 in, bf16 dots`).
    pub precision: String,
    /// The budget this row is held to (its precision's).
    pub tolerance: f64,
    pub pass: bool,
}

impl Row {
    /// The backend as the table shows it: `recurrent`, `chunked`, `ptx-sim` or `cuda` (for the
    /// PTX engines the chunk column tells the kernel: `-` is the recurrent one).
    pub fn label(&self) -> &'static str {
        self.engine.label(self.backend)
    }
}

/// The schedule a run on `engine` computes at: `schedule` for the PTX engines, which read
/// inputs and compute dots at its precision; f32 inputs and dots for the CPU engines.
pub fn precision_of(engine: Engine, schedule: &Schedule) -> Schedule {
    match engine {
        Engine::Ptx { .. } => *schedule,
        _ => schedule.with_input(ElemType::F32).with_ptx(PtxSchedule::default()),
    }
}

/// The budget of a run on `engine` under `schedule` (DESIGN.md): its precision's.
pub fn tolerance(engine: Engine, schedule: &Schedule) -> f64 {
    precision_of(engine, schedule).tolerance()
}

pub use chunkc_codegen::schedule::F32_TOLERANCE;

/// The long sequence of the default sweep on the CPU engines.
pub const LONG_T: usize = 1000;

/// The long sequence of the default sweep in the PTX simulator: several chunks at every
/// default chunk size, with a tail (200 = 12 x 16 + 8 = 3 x 64 + 8 = 128 + 72), short
/// enough for the simulator (see [`crate::gpu::SIM_MAX_ELEMENTS`]).
pub const SIM_LONG_T: usize = 200;

/// What to verify.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Each kernel (`Recurrent` or `Chunked`) with the engine that runs it; a chunked kernel
    /// runs once per chunk size.
    pub runs: Vec<(Backend, Engine)>,
    pub chunks: Vec<usize>,
    /// Sequence lengths; None means {1, C-1, C+1, [`LONG_T`]} for each chunk C
    /// ([`SIM_LONG_T`] instead of `LONG_T` for runs in the PTX simulator).
    pub seq_lens: Option<Vec<usize>>,
    pub batch: usize,
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    pub threads: usize,
    pub seed: u64,
    /// Everything else about how the kernels are built and run (time block, V-tile, the
    /// chunked program, and for the PTX engines the input type and PTX knobs); the chunk comes
    /// from `chunks`, the kernel from each run.
    pub schedule: Schedule,
}

impl Plan {
    /// Fails, before anything runs, when a PTX device cannot take the plan: no CUDA device,
    /// or a shape too large for the simulator.
    pub fn check_ready(&self) -> Result<(), Error> {
        for &(_, engine) in &self.runs {
            if let (Engine::Ptx { device, .. }, Some(&t)) = (engine, self.lens_for(engine).iter().max()) {
                gpu::check_ready(
                    device,
                    &Dims { batch: self.batch, seq_len: t, heads: self.heads, k: self.k, v: self.v },
                )?;
            }
        }
        Ok(())
    }

    /// The sequence lengths `engine` runs at.
    pub(crate) fn lens_for(&self, engine: Engine) -> Vec<usize> {
        let long = match engine {
            Engine::Ptx { device: Device::Sim, .. } => SIM_LONG_T,
            _ => LONG_T,
        };
        let mut lens: Vec<usize> = match &self.seq_lens {
            Some(l) => l.clone(),
            None => self.chunks.iter().flat_map(|&c| [1, c.saturating_sub(1).max(1), c + 1, long]).collect(),
        };
        lens.sort_unstable();
        lens.dedup();
        lens
    }
}

/// Runs every kernel, engine and chunk size on random inputs against the reference. The
/// reference always runs on the f32 inputs as drawn, also for kernels that read them as
/// bf16 or f16 (as FLA checks its bf16 kernels against an f32 reference): the rounding of
/// the inputs is part of the error a user sees, and of what the tolerance must absorb.
pub fn verify(rule: &Rule, plan: &Plan, mut progress: impl FnMut(&Row)) -> Result<Vec<Row>, Error> {
    let mut rows = vec![];
    let per_run: Vec<Vec<usize>> = plan.runs.iter().map(|&(_, e)| plan.lens_for(e)).collect();
    let mut lens: Vec<usize> = per_run.iter().flatten().copied().collect();
    lens.sort_unstable();
    lens.dedup();
    plan.check_ready()?;
    for &t in &lens {
        let dims = Dims { batch: plan.batch, seq_len: t, heads: plan.heads, k: plan.k, v: plan.v };
        let inputs = random_inputs(rule, &dims, plan.seed ^ t as u64);
        let reference = backend::run(
            rule,
            &inputs,
            "random inputs",
            &Options { backend: Backend::Reference, ..Default::default() },
        )?;
        for (&(be, engine), run_lens) in plan.runs.iter().zip(&per_run) {
            if !run_lens.contains(&t) {
                continue;
            }
            let chunks: Vec<Option<usize>> = match be {
                Backend::Chunked => plan.chunks.iter().map(|&c| Some(c)).collect(),
                _ => vec![None],
            };
            for chunk in chunks {
                let schedule = precision_of(engine, &plan.schedule);
                let schedule = match be {
                    Backend::Chunked => schedule.with_kernel(KernelKind::Chunked, chunk.unwrap_or(64)),
                    _ => schedule.with_kernel(KernelKind::Recurrent, 0).with_program(ProgramShape::Fused),
                };
                let opts = Options { backend: be, engine, schedule, threads: plan.threads, scale: None };
                let out = backend::run(rule, &inputs, "random inputs", &opts)?;
                let err_o = rel_rms(&out.o().data, &reference.o().data);
                let err_ht = out.state_error(rule, &reference)?;
                let tolerance = schedule.tolerance();
                let row = Row {
                    backend: be,
                    engine,
                    chunk,
                    seq_len: t,
                    err_o,
                    err_ht,
                    precision: schedule.precision(),
                    tolerance,
                    pass: err_o <= tolerance && err_ht <= tolerance,
                };
                progress(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}
