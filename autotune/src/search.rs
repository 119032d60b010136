//! The staged search: each stage of the [`Space`] races its candidates from the previous
//! winner, and a last race confirms the winner against the default schedule.
//!
//! Nothing is timed that has not been verified: the [`Evaluator`] checks a candidate's
//! outputs against the f64 reference before it hands back a [`Trial`], and a candidate it
//! rejects never wins. A wrong kernel is a bug in chunkc, never a tuning outcome: the report
//! keeps it visible ([`Report::wrong`]) so that the caller can fail loudly.

use crate::race::{self, Timing};
use crate::space::{Space, Stage};
use crate::Schedule;
use std::fmt;
use std::time::Duration;

/// A compiled, verified kernel, ready to time.
pub trait Trial {
    /// One timed run (the evaluator says what the timing includes).
    fn run(&mut self) -> Result<Duration, String>;
}

/// Builds and checks candidates for one rule, problem and thread count.
pub trait Evaluator {
    /// Compiles `config`, runs it once on the tuning inputs and checks the outputs against
    /// the reference: a trial ready to time, or why `config` cannot be one.
    fn prepare(&self, config: &Schedule) -> Result<Box<dyn Trial + '_>, Rejection>;
}

/// Why a candidate is not timed.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    /// The rule or the problem does not admit it (the planner's one line).
    Unsupported(String),
    /// It ran, but its outputs are not within tolerance of the reference: a bug.
    Wrong { error: f64, tolerance: f64 },
    /// Compiling or running it failed: a bug.
    Failed(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Unsupported(why) => write!(f, "unsupported: {why}"),
            Rejection::Wrong { error, tolerance } => {
                write!(f, "WRONG: relative RMS error {error:.3e} > {tolerance:.0e} against the reference")
            }
            Rejection::Failed(why) => write!(f, "FAILED: {why}"),
        }
    }
}

/// What became of one candidate in one stage.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Timed(Timing),
    Rejected(Rejection),
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The stage's name, or `confirm`.
    pub stage: &'static str,
    pub config: Schedule,
    pub outcome: Outcome,
}

/// How long to race.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Rounds of each stage's race.
    pub rounds: usize,
    /// Rounds of the final race of the winner against the default.
    pub confirm_rounds: usize,
    /// How much faster (as a fraction of its best run) a challenger must be to displace the
    /// incumbent of a stage, and the winner to displace the default: best-of-five runs of
    /// one kernel on a shared machine still scatter by a few percent, and a schedule that
    /// wins by less than that was chosen by the noise.
    pub min_gain: f64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { rounds: 5, confirm_rounds: 9, min_gain: 0.02 }
    }
}

/// Whether `challenger` beats `incumbent` by more than `min_gain`.
fn beats(challenger: &Timing, incumbent: &Timing, min_gain: f64) -> bool {
    challenger.best.as_secs_f64() < incumbent.best.as_secs_f64() * (1.0 - min_gain)
}

/// The search's result.
#[derive(Clone, Debug)]
pub struct Report {
    pub rows: Vec<Row>,
    pub winner: Schedule,
    /// The winner's timing in the last race it ran.
    pub winner_timing: Timing,
    pub default: Schedule,
    /// The default's timing in the confirming race (None when the winner is the default or
    /// the default was rejected).
    pub default_timing: Option<Timing>,
}

impl Report {
    /// The default's best run over the winner's, in the same race (1.0 when they are one).
    pub fn speedup(&self) -> Option<f64> {
        if self.winner == self.default {
            return Some(1.0);
        }
        let d = self.default_timing?;
        Some(d.best.as_secs_f64() / self.winner_timing.best.as_secs_f64())
    }

    /// Candidates whose outputs were wrong or whose run failed: bugs to report.
    pub fn wrong(&self) -> Vec<&Row> {
        let bug = |r: &&Row| matches!(r.outcome, Outcome::Rejected(Rejection::Wrong { .. } | Rejection::Failed(_)));
        self.rows.iter().filter(bug).collect()
    }
}

/// Why the search has no result.
#[derive(Clone, Debug, PartialEq)]
pub enum TuneError {
    /// The first stage rejected every candidate; each reason is listed.
    NoCandidate(Vec<String>),
    /// A verified trial failed in a later run.
    Run { config: Schedule, why: String },
}

impl fmt::Display for TuneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TuneError::NoCandidate(why) => write!(f, "no schedule could be tuned: {}", why.join("; ")),
            TuneError::Run { config, why } => write!(f, "{config}: a timed run failed: {why}"),
        }
    }
}

impl std::error::Error for TuneError {}

/// Searches `space` from `default`, calling `on_row` as each row is decided.
pub fn tune(
    eval: &dyn Evaluator,
    space: &Space,
    default: Schedule,
    settings: Settings,
    on_row: &mut dyn FnMut(&Row),
) -> Result<Report, TuneError> {
    let mut rows = vec![];
    let mut record = |row: Row, rows: &mut Vec<Row>| {
        on_row(&row);
        rows.push(row);
    };
    let mut incumbent: Option<(Schedule, Timing)> = None;
    for stage in Stage::ALL {
        let from = incumbent.map(|(c, _)| c).unwrap_or(default);
        let candidates = space.candidates(stage, from);
        let mut trials = vec![];
        let mut rejected = vec![];
        for config in candidates {
            match eval.prepare(&config) {
                Ok(trial) => trials.push((config, trial)),
                Err(why) => rejected.push((config, why)),
            }
        }
        if trials.is_empty() && incumbent.is_none() {
            return Err(TuneError::NoCandidate(rejected.iter().map(|(c, why)| format!("{c}: {why}")).collect()));
        }
        let timings = race_trials(&mut trials, settings.rounds)?;
        for (config, why) in rejected {
            record(Row { stage: stage.name(), config, outcome: Outcome::Rejected(why) }, &mut rows);
        }
        for ((config, _), timing) in trials.iter().zip(&timings) {
            record(Row { stage: stage.name(), config: *config, outcome: Outcome::Timed(*timing) }, &mut rows);
        }
        // The stage's incumbent is its first candidate; it is timed unless it was rejected.
        let holder = (!trials.is_empty() && trials[0].0 == from).then_some(0);
        let pick = match (race::fastest(&timings), holder) {
            (Some(i), Some(h)) if !beats(&timings[i], &timings[h], settings.min_gain) => Some(h),
            (best, _) => best,
        };
        if let Some(i) = pick {
            incumbent = Some((trials[i].0, timings[i]));
        }
    }
    let (mut winner, mut winner_timing) = incumbent.ok_or_else(|| TuneError::NoCandidate(vec![]))?;
    let mut default_timing = None;
    if winner != default {
        if let Ok(default_trial) = eval.prepare(&default) {
            let winner_trial =
                eval.prepare(&winner).map_err(|why| TuneError::Run { config: winner, why: why.to_string() })?;
            let mut pair = vec![(winner, winner_trial), (default, default_trial)];
            let timings = race_trials(&mut pair, settings.confirm_rounds)?;
            for ((config, _), timing) in pair.iter().zip(&timings) {
                record(Row { stage: "confirm", config: *config, outcome: Outcome::Timed(*timing) }, &mut rows);
            }
            // The default stays unless the winner beats it in this race too: a schedule
            // that only won a noisier stage race is not worth a cache entry.
            if !beats(&timings[0], &timings[1], settings.min_gain) {
                winner = default;
                winner_timing = timings[1];
            } else {
                winner_timing = timings[0];
                default_timing = Some(timings[1]);
            }
        }
    }
    Ok(Report { rows, winner, winner_timing, default, default_timing })
}

fn race_trials(trials: &mut [(Schedule, Box<dyn Trial + '_>)], rounds: usize) -> Result<Vec<Timing>, TuneError> {
    let mut failed = None;
    race::race(trials.len(), rounds, |i| trials[i].1.run().inspect_err(|_| failed = Some(trials[i].0)))
        .map_err(|why| TuneError::Run { config: failed.unwrap_or(trials[0].0), why })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::Problem;
    use crate::KernelKind;
    use std::cell::RefCell;

    /// The chunked kernel at `chunk` with time block `tb` and V-tile `bv`.
    fn chunked(chunk: usize, tb: usize, bv: Option<usize>) -> Schedule {
        Schedule::chunked(chunk).with_time_block(tb).with_bv(bv)
    }

    /// A scripted machine: a configuration's run time is a function of it, plus a drift that
    /// makes every run 10 us slower than the one before (a machine warming up), and some
    /// configurations are unsupported or wrong. The first trial of `lucky` has one outlier
    /// run of 1 ms, as a quiet moment of a shared machine gives.
    struct Scripted {
        cost: fn(&Schedule) -> Result<f64, Rejection>,
        clock: RefCell<u64>,
        lucky: RefCell<Option<Schedule>>,
    }

    struct ScriptedTrial<'a> {
        ms: f64,
        outlier: bool,
        clock: &'a RefCell<u64>,
    }

    impl Trial for ScriptedTrial<'_> {
        fn run(&mut self) -> Result<Duration, String> {
            let mut c = self.clock.borrow_mut();
            *c += 1;
            let ms = if std::mem::take(&mut self.outlier) { 1.0 } else { self.ms + 0.01 * *c as f64 };
            Ok(Duration::from_secs_f64(ms / 1e3))
        }
    }

    impl Evaluator for Scripted {
        fn prepare(&self, config: &Schedule) -> Result<Box<dyn Trial + '_>, Rejection> {
            let ms = (self.cost)(config)?;
            let mut lucky = self.lucky.borrow_mut();
            let outlier = *lucky == Some(*config);
            if outlier {
                *lucky = None;
            }
            Ok(Box::new(ScriptedTrial { ms, outlier, clock: &self.clock }))
        }
    }

    fn scripted(cost: fn(&Schedule) -> Result<f64, Rejection>) -> Scripted {
        Scripted { cost, clock: RefCell::new(0), lucky: RefCell::new(None) }
    }

    fn space() -> Space {
        Space::new(Problem { seq_len: 2048, v: 128, chunkable: true })
    }

    fn run(eval: &Scripted) -> Result<Report, TuneError> {
        tune(eval, &space(), chunked(64, 256, None), Settings::default(), &mut |_| {})
    }

    #[test]
    fn each_stage_moves_to_its_fastest_candidate() {
        // Fastest: chunk 32, time block 512, V-tiles of 64, each a separate effect.
        let eval = scripted(|c| {
            let mut ms = 30.0;
            ms += match (c.kernel, c.chunk) {
                (KernelKind::Recurrent, _) => 40.0,
                (_, 32) => 0.0,
                (_, 64) => 3.0,
                _ => 6.0,
            };
            ms += if c.time_block == 512 { 0.0 } else { 2.0 };
            ms += if c.bv == Some(64) { 0.0 } else { 1.0 };
            Ok(ms)
        });
        let report = run(&eval).unwrap();
        assert_eq!(report.winner, chunked(32, 512, Some(64)));
        let speedup = report.speedup().unwrap();
        assert!((speedup - 36.0 / 30.0).abs() < 0.02, "{speedup}");
        assert!(report.wrong().is_empty());
        let confirm: Vec<&Row> = report.rows.iter().filter(|r| r.stage == "confirm").collect();
        assert_eq!(confirm.len(), 2);
    }

    #[test]
    fn a_wrong_or_unsupported_candidate_never_wins_and_wrong_ones_are_reported() {
        // Chunk 16 would be fastest but is wrong; V-tiles are unsupported (a rule that
        // reduces over V).
        let eval = scripted(|c| {
            if c.chunk == 16 {
                return Err(Rejection::Wrong { error: 3e-3, tolerance: 1e-5 });
            }
            if c.bv.is_some() {
                return Err(Rejection::Unsupported("reduces over V".into()));
            }
            Ok(if c.chunk == 32 { 20.0 } else { 25.0 })
        });
        let report = run(&eval).unwrap();
        assert_eq!(report.winner.chunk, 32);
        assert_eq!(report.winner.bv, None);
        let wrong = report.wrong();
        assert_eq!(wrong.len(), 1);
        assert_eq!(wrong[0].config.chunk, 16);
    }

    #[test]
    fn the_default_stays_unless_the_winner_beats_it_in_the_confirming_race() {
        // Chunk 32 is 1 ms slower than the default, but one outlier run wins it the first
        // stage; the confirming race, with fresh trials, must hand the win back.
        let eval = scripted(|c| Ok(if c.chunk == 32 { 21.0 } else { 20.0 }));
        *eval.lucky.borrow_mut() = Some(chunked(32, 256, None));
        let report = run(&eval).unwrap();
        let kernel_stage: Vec<&Row> = report.rows.iter().filter(|r| r.stage == "kernel").collect();
        assert!(matches!(&kernel_stage[..], [_, _, _, _, _]));
        assert!(report.rows.iter().any(|r| r.stage == "confirm" && r.config.chunk == 32));
        assert_eq!(report.winner, chunked(64, 256, None));
        assert_eq!(report.speedup(), Some(1.0));
        assert_eq!(report.default_timing, None);
    }

    #[test]
    fn a_challenger_within_the_minimum_gain_does_not_displace_the_incumbent() {
        // Chunk 32 is 1% faster (30 ms against 30.3): within the 2% margin, so the default
        // stays; chunk 16 is 5% faster in the second search and wins.
        let eval = scripted(|c| Ok(if c.chunk == 32 { 30.0 } else { 30.3 }));
        assert_eq!(run(&eval).unwrap().winner, chunked(64, 256, None));
        let eval = scripted(|c| Ok(if c.chunk == 16 { 28.7 } else { 30.3 }));
        assert_eq!(run(&eval).unwrap().winner, chunked(16, 256, None));
    }

    #[test]
    fn equal_schedules_keep_the_default_without_a_confirming_race() {
        let eval = scripted(|_| Ok(20.0));
        let report = run(&eval).unwrap();
        assert_eq!(report.winner, chunked(64, 256, None));
        assert!(report.rows.iter().all(|r| r.stage != "confirm"));
    }

    #[test]
    fn no_candidate_at_all_is_an_error_listing_each_reason() {
        let eval = scripted(|_| Err(Rejection::Unsupported("no".into())));
        match run(&eval) {
            Err(TuneError::NoCandidate(why)) => assert_eq!(why.len(), 5),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_trial_failing_mid_race_names_its_config() {
        struct Failing;
        impl Trial for Failing {
            fn run(&mut self) -> Result<Duration, String> {
                Err("segfault-free failure".into())
            }
        }
        struct E;
        impl Evaluator for E {
            fn prepare(&self, c: &Schedule) -> Result<Box<dyn Trial + '_>, Rejection> {
                if c.chunk == 32 {
                    Ok(Box::new(Failing))
                } else {
                    Err(Rejection::Unsupported("x".into()))
                }
            }
        }
        match tune(&E, &space(), chunked(64, 256, None), Settings::default(), &mut |_| {}) {
            Err(TuneError::Run { config, .. }) => assert_eq!(config.chunk, 32),
            other => panic!("{other:?}"),
        }
    }
}
