//! The CPU executor's time-block order (`--time-block`, runtime/src/exec.rs): every head's
//! first block of tokens, then every head's next block, with the state handed from call to
//! call through hT. Resuming is exact by construction (codegen/src/resume.rs), so the
//! outputs must be bit-identical to the head-by-head order, for every rule, both kernels,
//! block sizes that do and do not divide T or match the chunk, V-tiles and 1 or 2 threads.
//! The block order must also really be taken: every built-in kernel is resumable, the split
//! program's phases too (its chunk-parallel ones carry no state at all).

mod common;

use chunkc::backend::{build_program, run, shape_of, Backend, Options};
use chunkc::codegen::resume;
use chunkc::codegen::schedule::{KernelKind, ProgramShape};
use chunkc::dsl::reference::Dims;
use chunkc::verify::random_inputs;
use chunkc::Schedule;

/// T = 300 is not a multiple of any chunk below, and longer than every block but the last.
const DIMS: Dims = Dims { batch: 2, seq_len: 300, heads: 3, k: 16, v: 24 };

#[test]
fn every_built_in_kernel_can_run_in_time_blocks() {
    for path in common::rule_paths() {
        let rule = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}")).rule;
        let schedules = [
            Schedule::recurrent(),
            Schedule::chunked(16),
            Schedule::chunked(64),
            Schedule::chunked(16).with_program(ProgramShape::Split),
        ];
        for schedule in schedules {
            let program =
                build_program(&rule, shape_of(&DIMS, None), &schedule).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
            for k in &program.kernels {
                // A chunked kernel carries an extra [K] state as a column beside S's: the
                // carried tile is formed from two loads, which is not a resumable state.
                let columns = schedule.kernel == KernelKind::Chunked && !rule.states.is_empty();
                let Some(r) = resume::analyse(k) else {
                    assert!(columns && !k.chunk_parallel, "{} is not resumable", k.name);
                    continue;
                };
                assert_eq!(r.tokens_per_iteration, schedule.tokens_per_step(), "{}", k.name);
                let names: Vec<(String, String)> =
                    r.state.iter().map(|&(i, o)| (k.params[i].name.clone(), k.params[o].name.clone())).collect();
                let mut want = vec![];
                if !k.chunk_parallel {
                    want.push(("h0".to_string(), "hT".to_string()));
                    want.extend(rule.states.iter().map(|s| (s.initial_name(), s.final_name())));
                }
                assert_eq!(names, want, "{}", k.name);
            }
        }
    }
}

#[test]
fn time_blocks_give_the_same_bits_as_head_by_head() {
    let mut compared = 0;
    for path in common::rule_paths() {
        let rule = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}")).rule;
        let inputs = random_inputs(&rule, &DIMS, 5);
        let runs = [
            (Backend::Recurrent, 64, ProgramShape::Fused),
            (Backend::Chunked, 16, ProgramShape::Fused),
            (Backend::Chunked, 64, ProgramShape::Fused),
            (Backend::Chunked, 16, ProgramShape::Split),
        ];
        for (backend, chunk, program) in runs {
            for bv in [None, Some(DIMS.v / 3)] {
                let kernel = backend.kernel().unwrap_or(KernelKind::Chunked);
                let opts = |time_block, threads| {
                    let schedule = Schedule::chunked(chunk)
                        .with_kernel(kernel, chunk)
                        .with_bv(bv)
                        .with_program(program)
                        .with_time_block(time_block);
                    Options { backend, schedule, threads, ..Default::default() }
                };
                let whole = run(&rule, &inputs, "random", &opts(0, 1)).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
                assert!(whole.o().data.iter().chain(&whole.ht().data).all(|x| x.is_finite()), "{}", rule.name);
                for (time_block, threads) in [(1, 1), (chunk, 2), (3 * chunk, 1), (100, 2), (256, 1), (299, 2)] {
                    let got = run(&rule, &inputs, "random", &opts(time_block, threads))
                        .unwrap_or_else(|e| panic!("{}: {e}", rule.name));
                    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same(&got.o().data, &whole.o().data) && same(&got.ht().data, &whole.ht().data),
                        "{} {} {} chunk {chunk} bv {bv:?}: time block {time_block} on {threads} thread(s) differs",
                        rule.name,
                        backend.name(),
                        program.name()
                    );
                    compared += 1;
                }
            }
        }
    }
    println!("{compared} runs bit-identical to the head-by-head order");
}
