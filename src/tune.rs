//! `chunkc tune`: the autotuner's evaluator for the CPU kernels, and the lookup of a tuned
//! schedule for `--tuned`.
//!
//! Every candidate is compiled, run once into NaN-poisoned outputs on the tuning inputs and
//! held to the f64 reference of those same inputs (the f32 tolerance, 1e-5 relative RMS)
//! before the search may time it; what a timed run includes is what `chunkc bench` times
//! (one run of the program into preallocated outputs, [`CpuRunner::run`]).

use crate::backend::{self, build_program, shape_of, Backend, CpuRunner, Outputs};
use crate::error::Error;
use crate::verify::{random_inputs, rel_rms, F32_TOLERANCE};
use chunkc_autotune::cache::{self, Cache, Entry, Key, Lookup};
use chunkc_autotune::{Evaluator, Rejection, Report, Schedule, Trial};
use chunkc_codegen::schedule::CPU_DEFAULT_CHUNK;
use chunkc_dsl::ast::Rule;
use chunkc_dsl::reference::Dims;
use chunkc_runtime::exec::Order;
use chunkc_runtime::io::Tensors;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The schedule `chunkc run` and `bench` use on a CPU without flags: the chunked kernel at
/// [`CPU_DEFAULT_CHUNK`] (the recurrent kernel for a rule that has no chunked one), the
/// default time block, the whole V, fused. The tuner races its winner against it.
pub fn default_schedule(chunkable: bool) -> Schedule {
    if chunkable {
        Schedule::chunked(CPU_DEFAULT_CHUNK)
    } else {
        Schedule::recurrent()
    }
}

/// Builds and verifies CPU kernels of one rule on one problem.
pub struct CpuEvaluator<'a> {
    rule: &'a Rule,
    dims: Dims,
    threads: usize,
    inputs: Tensors,
    reference: Outputs,
}

impl<'a> CpuEvaluator<'a> {
    /// Draws the tuning inputs (from each input's domain, with `seed`) and runs the f64
    /// reference on them: for T=2048 H=8 K=V=128 a few seconds, once per tuning.
    pub fn new(rule: &'a Rule, dims: Dims, threads: usize, seed: u64) -> Result<CpuEvaluator<'a>, Error> {
        let inputs = random_inputs(rule, &dims, seed);
        let opts = backend::Options { backend: Backend::Reference, ..Default::default() };
        let reference = backend::run(rule, &inputs, "the tuning inputs", &opts)?;
        Ok(CpuEvaluator { rule, dims, threads, inputs, reference })
    }

    /// `checking`: the run whose outputs are held to the reference poisons the scratch;
    /// timed runs do not pay for the fill.
    fn order(&self, config: &Schedule, checking: bool) -> Order {
        Order { threads: self.threads, time_block: config.time_block, poison_scratch: checking }
    }

    fn launch(&self, runner: &mut CpuRunner, config: &Schedule, checking: bool) -> Result<(), Error> {
        runner.run(&self.inputs, self.order(config, checking))
    }
}

struct CpuTrial<'e> {
    eval: &'e CpuEvaluator<'e>,
    config: Schedule,
    runner: CpuRunner,
}

impl Trial for CpuTrial<'_> {
    fn run(&mut self) -> Result<Duration, String> {
        let start = Instant::now();
        self.eval.launch(&mut self.runner, &self.config, false).map_err(|e| e.to_string())?;
        let took = start.elapsed();
        std::hint::black_box(&mut self.runner);
        Ok(took)
    }
}

impl Evaluator for CpuEvaluator<'_> {
    fn prepare(&self, config: &Schedule) -> Result<Box<dyn Trial + '_>, Rejection> {
        let shape = shape_of(&self.dims, None);
        let program = build_program(self.rule, shape, config).map_err(|e| match e {
            Error::Unsupported(why) => Rejection::Unsupported(why),
            other => Rejection::Failed(other.to_string()),
        })?;
        let failed = |e: Error| Rejection::Failed(e.to_string());
        let mut runner = CpuRunner::new(&program, &self.dims).map_err(failed)?;
        runner.poison();
        self.launch(&mut runner, config, true).map_err(failed)?;
        let error = |name: &str| -> Result<f64, Rejection> {
            Ok(rel_rms(runner.tensor(name).map_err(failed)?, &self.reference.get(name).map_err(failed)?.data))
        };
        let error = error("o")?.max(error("hT")?);
        if error.is_nan() || error > F32_TOLERANCE {
            return Err(Rejection::Wrong { error, tolerance: F32_TOLERANCE });
        }
        Ok(Box::new(CpuTrial { eval: self, config: *config, runner }))
    }
}

/// The cache file: `--cache`, else [`cache::default_path`].
pub fn cache_path(given: Option<&Path>) -> Result<PathBuf, Error> {
    given.map(Path::to_path_buf).or_else(cache::default_path).ok_or_else(|| {
        Error::Input("no tuning cache: pass --cache FILE or set CHUNKC_TUNE_CACHE (HOME is not set)".into())
    })
}

/// This machine as the tuning cache knows it: the CPU model and the SIMD level the generated
/// code calls.
pub fn device() -> String {
    chunkc_autotune::device::cpu(chunkc_codegen::cpu::Simd::best().name())
}

/// The key a rule's schedule for `dims` and `threads` is kept under on this machine.
pub fn key(rule: &Rule, dims: &Dims, threads: usize) -> Key {
    Key {
        device: device(),
        rule: rule.name.clone(),
        rule_hash: cache::rule_hash(&rule.source),
        shape: [dims.batch, dims.seq_len, dims.heads, dims.k, dims.v],
        threads,
    }
}

/// The cache entry for a finished search.
pub fn entry(key: Key, report: &Report) -> Entry {
    let tuned_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Microseconds are all the timings resolve; more digits would only clutter the file.
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    Entry {
        device: key.device,
        rule: key.rule,
        rule_hash: key.rule_hash,
        shape: key.shape,
        threads: key.threads,
        kernel: report.winner.kernel,
        chunk: report.winner.chunk,
        time_block: report.winner.time_block,
        bv: report.winner.bv,
        program: report.winner.program,
        best_ms: ms(report.winner_timing.best),
        default_best_ms: report.default_timing.map(|t| ms(t.best)),
        tuned_unix,
    }
}

/// A tuned schedule from the cache and the shape ([B, T, H, K, V]) it was tuned at: the
/// problem's own, or the nearest in its bucket (`chunkc_autotune::cache::same_bucket`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuned {
    pub schedule: Schedule,
    pub tuned_at: [usize; 5],
}

/// The tuned schedule of `rule` for `dims` and `threads` on this machine, from the cache at
/// `path` (an entry for this shape, else the nearest in its bucket); one clear line when
/// there is none or it is stale.
pub fn tuned_schedule(rule: &Rule, dims: &Dims, threads: usize, path: &Path) -> Result<Tuned, Error> {
    let cache = Cache::open(path).map_err(|e| Error::Input(e.to_string()))?;
    let key = key(rule, dims, threads);
    let [b, t, h, k, v] = key.shape;
    let retune = format!("run `chunkc tune {} --shape {b},{t},{h},{k},{v} --threads {threads}`", rule.path);
    match cache.lookup(&key) {
        Lookup::Found(e) | Lookup::Near(e) => Ok(Tuned { schedule: e.schedule(), tuned_at: e.shape }),
        Lookup::Stale(_) => Err(Error::Input(format!(
            "--tuned: {} holds a schedule for rule `{}` at B={b} T={t} H={h} K={k} V={v}, {threads} thread(s), \
             but the rule file has changed since; {retune}",
            path.display(),
            rule.name
        ))),
        Lookup::Missing => Err(Error::Input(format!(
            "--tuned: {} has no schedule for rule `{}` at B={b} T={t} H={h} K={k} V={v}, {threads} thread(s) on this \
             CPU ({}); {retune}",
            path.display(),
            rule.name,
            key.device
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple_gla() -> Rule {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/simple_gla.toml");
        crate::load_rule(&path).expect("the built-in rule loads").rule
    }

    const DIMS: Dims = Dims { batch: 1, seq_len: 70, heads: 2, k: 16, v: 32 };

    fn chunked(chunk: usize, tb: usize, bv: Option<usize>) -> Schedule {
        Schedule::chunked(chunk).with_time_block(tb).with_bv(bv)
    }

    #[test]
    fn candidates_are_verified_against_the_reference_before_they_are_timed() {
        let rule = simple_gla();
        let mut eval = CpuEvaluator::new(&rule, DIMS, 1, 3).expect("reference");
        for config in [chunked(16, 32, Some(16)), chunked(64, 0, None), Schedule::recurrent()] {
            let mut trial = eval.prepare(&config).unwrap_or_else(|why| panic!("{config}: {why}"));
            assert!(trial.run().expect("a timed run") > Duration::ZERO);
        }
        // A reference one element off: every kernel now disagrees with it, and none may be timed.
        if let Some(o) = eval.reference.0.get_mut("o") {
            o.data[5] += 1.0;
        }
        match eval.prepare(&chunked(32, 256, None)) {
            Err(Rejection::Wrong { error, tolerance }) => assert!(error > tolerance, "{error}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a kernel that disagrees with the reference was accepted"),
        };
    }

    #[test]
    fn a_schedule_the_planner_refuses_is_unsupported_not_a_failure() {
        let rule = simple_gla();
        let eval = CpuEvaluator::new(&rule, DIMS, 1, 3).expect("reference");
        match eval.prepare(&chunked(16, 0, Some(5))) {
            Err(Rejection::Unsupported(why)) => assert!(why.contains("divisor of V"), "{why}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("bv 5 of V 32 was accepted"),
        };
    }
}
