//! The timing protocol: the candidates of a stage run in turn, round after round, and each is
//! scored by its fastest run.
//!
//! On a shared or throttling machine the speed of the whole machine drifts by tens of percent
//! over seconds. Timing candidate A for a second and then B for a second compares two
//! moments of the machine as much as two kernels; interleaving their runs exposes both to the
//! same moments, and the fastest run of each is the one least disturbed. Each round starts
//! one candidate later than the last, so no candidate always runs first after another's
//! cache footprint.

use std::time::Duration;

/// What one candidate's runs measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub best: Duration,
    pub median: Duration,
    pub runs: usize,
}

impl Timing {
    /// From one candidate's run times (at least one).
    pub fn of(times: &mut [Duration]) -> Timing {
        times.sort();
        Timing { best: times[0], median: times[times.len() / 2], runs: times.len() }
    }
}

/// Runs `run(i)` for every candidate `i < n` in `rounds` rotated rounds; returns each one's
/// timing, or the first error.
pub fn race<E>(n: usize, rounds: usize, mut run: impl FnMut(usize) -> Result<Duration, E>) -> Result<Vec<Timing>, E> {
    let rounds = rounds.max(1);
    let mut times = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for i in 0..n {
            let j = (i + round) % n;
            times[j].push(run(j)?);
        }
    }
    Ok(times.iter_mut().map(|t| Timing::of(t)).collect())
}

/// The index of the fastest timing (by best run; the first of equals).
pub fn fastest(timings: &[Timing]) -> Option<usize> {
    (0..timings.len()).min_by_key(|&i| timings[i].best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate_and_every_candidate_runs_every_round() {
        let mut order = vec![];
        let t = race::<()>(3, 3, |i| {
            order.push(i);
            Ok(Duration::from_millis(10 + i as u64))
        })
        .unwrap();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert!(t.iter().all(|t| t.runs == 3));
        assert_eq!(fastest(&t), Some(0));
    }

    #[test]
    fn the_score_is_the_best_run_and_the_median_is_reported() {
        let script = [[30u64, 10, 20], [12, 12, 12]];
        let mut calls = [0usize; 2];
        let t = race::<()>(2, 3, |i| {
            let ms = script[i][calls[i]];
            calls[i] += 1;
            Ok(Duration::from_millis(ms))
        })
        .unwrap();
        assert_eq!(t[0].best, Duration::from_millis(10));
        assert_eq!(t[0].median, Duration::from_millis(20));
        assert_eq!(fastest(&t), Some(0));
    }

    #[test]
    fn an_error_stops_the_race() {
        let r = race(2, 4, |i| if i == 1 { Err("broken") } else { Ok(Duration::from_millis(1)) });
        assert_eq!(r, Err("broken"));
    }
}
