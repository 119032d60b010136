//! The library API: `Rule`, `compile`, `Program::forward`, the varlen batch and the decode
//! step, against the command line's engines, the f64 reference and per-sequence runs.

mod common;

use chunkc::backend::{self, Backend, Options};
use chunkc::dsl::reference::Dims;
use chunkc::runtime::artifact::ElemType;
use chunkc::runtime::tensor::Tensor;
use chunkc::verify::{random_inputs, rel_rms};
use chunkc::{compile, Heads, Inputs, Program, Rule, Schedule, Target, TensorRef};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn rule(name: &str) -> Rule {
    Rule::load(common::root().join("rules").join(format!("{name}.toml"))).expect("rule loads")
}

/// Borrowed views of owned tensors.
fn views(tensors: &BTreeMap<String, Tensor>) -> Inputs<'_> {
    let mut inputs = Inputs::new();
    for (name, t) in tensors {
        inputs.insert(name, TensorRef::f32(&t.data, &t.shape).expect("view"));
    }
    inputs
}

fn schedules() -> Vec<Schedule> {
    use chunkc::codegen::schedule::ProgramShape;
    vec![Schedule::recurrent(), Schedule::chunked(16), Schedule::chunked(32).with_program(ProgramShape::Split)]
}

/// Rows `range` of the token axis of a `[1, T, H, D]` tensor, as `[1, len, H, D]`.
fn tokens(t: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    let row: usize = t.shape[2..].iter().product();
    let mut shape = t.shape.clone();
    shape[1] = range.len();
    Tensor { shape, data: t.data[range.start * row..range.end * row].to_vec() }
}

/// Row `n` of the leading axis, as a batch of one.
fn row(t: &Tensor, n: usize) -> Tensor {
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Tensor { shape, data: t.data[n * per..(n + 1) * per].to_vec() }
}

#[test]
fn forward_matches_the_command_lines_engine_and_the_reference() {
    for name in ["gated_delta_rule", "gla", "mlstm"] {
        let r = rule(name);
        let dims = Dims { batch: 2, seq_len: 37, heads: 2, k: 8, v: 6 };
        let tensors = random_inputs(r.ast(), &dims, 7);
        let reference =
            backend::run(r.ast(), &tensors, "random", &Options { backend: Backend::Reference, ..Options::default() })
                .expect("reference");
        for schedule in schedules() {
            let program = compile(&r, Target::Cpu, schedule, Heads::new(2, 8, 6)).expect("compiles");
            let out = program.forward(&views(&tensors)).expect("runs");
            let backend = match schedule.kernel {
                chunkc::codegen::schedule::KernelKind::Recurrent => Backend::Recurrent,
                chunkc::codegen::schedule::KernelKind::Chunked => Backend::Chunked,
            };
            let opts = Options { backend, schedule, threads: 2, ..Options::default() };
            let cli = backend::run(r.ast(), &tensors, "random", &opts).expect("cli run");
            for (t, cli_t) in out.0.values().zip(cli.0.values()) {
                assert_eq!(t.count_non_finite(), 0, "{name}");
                assert_eq!(t.data, cli_t.data, "{name} {schedule:?}: the same kernels give the same bits");
            }
            assert!(rel_rms(&out.o().data, &reference.o().data) < 1e-5, "{name}");
            assert!(out.state_error(r.ast(), &reference).expect("states") < 1e-5, "{name}");
        }
    }
}

#[test]
fn sixteen_bit_and_strided_views_read_the_values_they_hold() {
    let r = rule("gated_delta_rule");
    let dims = Dims { batch: 1, seq_len: 20, heads: 2, k: 8, v: 8 };
    let mut tensors = random_inputs(r.ast(), &dims, 3);
    tensors.remove("h0");
    for t in tensors.values_mut() {
        t.data.iter_mut().for_each(|x| *x = ElemType::Bf16.widen16(ElemType::Bf16.narrow16(*x)));
    }
    let program = compile(&r, Target::Cpu, Schedule::chunked(16), Heads::new(2, 8, 8)).expect("compiles");
    let f32_out = program.forward(&views(&tensors)).expect("f32");
    let bits: BTreeMap<&String, Vec<u16>> =
        tensors.iter().map(|(n, t)| (n, t.data.iter().map(|&x| ElemType::Bf16.narrow16(x)).collect())).collect();
    let mut bf16 = Inputs::new();
    for (name, t) in &tensors {
        bf16.insert(name, TensorRef::bf16(&bits[name], &t.shape).expect("view"));
    }
    assert_eq!(program.forward(&bf16).expect("bf16").o().data, f32_out.o().data);
    // v as every other column of a [1, T, H, 2V] buffer.
    let v = &tensors["v"];
    let wide: Vec<f32> = v.data.iter().flat_map(|&x| [x, f32::NAN]).collect();
    let strided = TensorRef::f32(&wide, &[1, 20, 2, 16]).unwrap().with_strides(&[1, 20, 2, 8], &[640, 32, 16, 2]);
    let mut mixed = views(&tensors);
    mixed.insert("v", strided.expect("strided view"));
    assert_eq!(program.forward(&mixed).expect("strided").o().data, f32_out.o().data);
}

/// The varlen batch against each sequence run alone (bit for bit: the same kernels on the
/// same rows) and against the f64 reference.
fn check_varlen(name: &str, schedule: Schedule, lens: &[usize], with_h0: bool, seed: u64) {
    let r = rule(name);
    let (heads, k, v) = (2, 8, 4);
    let total: usize = lens.iter().sum();
    let n = lens.len();
    let packed_dims = Dims { batch: 1, seq_len: total, heads, k, v };
    let mut tensors = random_inputs(r.ast(), &packed_dims, seed);
    let states = random_inputs(r.ast(), &Dims { batch: n, seq_len: 1, heads, k, v }, seed + 1);
    for s in r.state_stems() {
        let first = format!("{s}0");
        tensors.remove(&first);
        if with_h0 {
            tensors.insert(first.clone(), states[&first].clone());
        }
    }
    let program = compile(&r, Target::Cpu, schedule, Heads::new(heads, k, v)).expect("compiles").with_threads(3);
    let cu: Vec<i32> = std::iter::once(0)
        .chain(lens.iter().scan(0, |a, &l| {
            *a += l as i32;
            Some(*a)
        }))
        .collect();
    let out = program.forward_varlen(&views(&tensors), cu.as_slice()).expect("varlen runs");
    for t in out.0.values() {
        assert_eq!(t.count_non_finite(), 0, "{name}: every element written");
    }
    let per_token = |t: &Tensor| t.shape.len() >= 3 && t.shape[0] == 1 && t.shape[1] == total;
    for (i, range) in cu.windows(2).map(|w| w[0] as usize..w[1] as usize).enumerate() {
        let mut alone = BTreeMap::new();
        for (tname, t) in &tensors {
            let one = if tname.ends_with('0') && r.ast().input(tname).is_none() {
                row(t, i)
            } else if per_token(t) {
                tokens(t, range.clone())
            } else {
                t.clone()
            };
            alone.insert(tname.clone(), one);
        }
        let single = program.forward(&views(&alone)).expect("one sequence");
        let reference =
            backend::run(r.ast(), &alone, "alone", &Options { backend: Backend::Reference, ..Options::default() })
                .expect("reference");
        assert_eq!(tokens(out.o(), range.clone()).data, single.o().data, "{name} {schedule:?} sequence {i} o");
        for s in r.state_stems() {
            let last = format!("{s}T");
            assert_eq!(row(&out.0[&last], i).data, single.0[&last].data, "{name} sequence {i} {last}");
        }
        let err = rel_rms(&single.o().data, &reference.o().data);
        assert!(err < 2e-5, "{name} {schedule:?} sequence {i}: o error {err:.2e}");
    }
}

#[test]
fn varlen_sequences_restart_chunks_and_states() {
    // Lengths around the chunk: 1, C - 1, C + 1, several chunks.
    for schedule in schedules() {
        check_varlen("gated_delta_rule", schedule, &[1, 15, 33, 50], true, 11);
        check_varlen("mlstm", schedule, &[17, 2, 40], false, 12);
    }
    check_varlen("rwkv6", Schedule::chunked(16), &[31, 16, 5], true, 13);
}

/// Random varlen batches (1-4 sequences of 1-69 tokens) of four rules and programs against
/// each sequence run alone.
#[test]
fn varlen_matches_per_sequence_runs() {
    let strategy = (proptest::collection::vec(1usize..70, 1..5), 0usize..4, any::<bool>(), 0u64..1000);
    common::property("varlen_matches_per_sequence_runs", 12, strategy, |(lens, which, with_h0, seed)| {
        let (name, schedule) = [
            ("simple_gla", Schedule::chunked(16)),
            ("kda", Schedule::chunked(32)),
            ("delta_rule", Schedule::recurrent()),
            ("gla", Schedule::chunked(16).with_program(chunkc::codegen::schedule::ProgramShape::Split)),
        ][which];
        check_varlen(name, schedule, &lens, with_h0, seed);
        Ok(())
    });
}

fn decode_program(name: &str) -> (Rule, Program) {
    let r = rule(name);
    let p = compile(&r, Target::Cpu, Schedule::recurrent(), Heads::new(2, 8, 4)).expect("compiles").with_threads(2);
    (r, p)
}

#[test]
fn decode_updates_the_pool_in_place_as_t1_runs_do() {
    for name in ["gated_delta_rule", "mlstm"] {
        let (r, program) = decode_program(name);
        let mut pool = program.state_pool(5);
        // Give the slots states to start from.
        let start = random_inputs(r.ast(), &Dims { batch: 5, seq_len: 1, heads: 2, k: 8, v: 4 }, 5);
        for stem in r.state_stems() {
            for slot in 0..5 {
                let src = row(&start[&format!("{stem}0")], slot);
                pool.state_mut(&stem, slot).expect("slot").copy_from_slice(&src.data);
            }
        }
        let before = pool.clone();
        let slots = [3i64, -1, 0, 4];
        for step in 0..3u64 {
            let tokens = random_inputs(r.ast(), &Dims { batch: 4, seq_len: 1, heads: 2, k: 8, v: 4 }, 100 + step);
            let mut inputs = tokens.clone();
            inputs.retain(|n, _| r.ast().input(n).is_some());
            let start_of_step = pool.clone();
            let o = program.decode(&views(&inputs), &mut pool, &slots).expect("decode");
            assert_eq!(o.shape, vec![4, 1, 2, 4]);
            assert_eq!(o.count_non_finite(), 0);
            for (n, &slot) in slots.iter().enumerate() {
                let mut alone: BTreeMap<String, Tensor> = inputs
                    .iter()
                    .map(|(k, t)| (k.clone(), if t.shape.len() >= 3 { row(t, n) } else { t.clone() }))
                    .collect();
                if slot >= 0 {
                    for stem in r.state_stems() {
                        let data = start_of_step.state(&stem, slot as usize).expect("slot").to_vec();
                        let shape = [vec![1], start[&format!("{stem}0")].shape[1..].to_vec()].concat();
                        alone.insert(format!("{stem}0"), Tensor::new(shape, data).expect("state"));
                    }
                }
                let single = program.forward(&views(&alone)).expect("T = 1 run");
                assert_eq!(row(&o, n).data, single.o().data, "{name} step {step} sequence {n}");
                if slot >= 0 {
                    for stem in r.state_stems() {
                        let now = pool.state(&stem, slot as usize).expect("slot");
                        assert_eq!(now, &single.0[&format!("{stem}T")].data[..], "{name} {stem} slot {slot}");
                    }
                }
            }
        }
        for stem in r.state_stems() {
            assert_eq!(pool.state(&stem, 1).unwrap(), before.state(&stem, 1).unwrap(), "slot 1 is nobody's");
            assert_eq!(pool.state(&stem, 2).unwrap(), before.state(&stem, 2).unwrap(), "slot 2 is nobody's");
        }
    }
}

#[test]
fn bad_calls_are_one_clear_error() {
    let r = rule("gated_delta_rule");
    let program = compile(&r, Target::Cpu, Schedule::chunked(16), Heads::new(2, 8, 4)).expect("compiles");
    let tensors = random_inputs(r.ast(), &Dims { batch: 1, seq_len: 10, heads: 2, k: 8, v: 4 }, 1);
    let err = |inputs: &Inputs<'_>, cu: &[i64]| program.forward_varlen(inputs, cu).expect_err("refused").to_string();
    let inputs = views(&tensors);
    assert_eq!(err(&inputs, &[0, 4, 9]), "cu_seqlens ends at 9, but the inputs have T = 10 tokens");
    assert_eq!(err(&inputs, &[0, 4, 4, 10]), "cu_seqlens must increase strictly: cu_seqlens[1] = 4, cu_seqlens[2] = 4");
    assert_eq!(err(&inputs, &[1, 10]), "cu_seqlens starts at 1, not 0");
    assert_eq!(
        err(&inputs, &[0, 4, 10]),
        "tensor `h0`: expected shape [2, 2, 8, 4] ([N, H, K, V]), got [1, 2, 8, 4]",
        "h0 is per sequence"
    );
    let mut wrong = tensors.clone();
    wrong.insert("q".into(), Tensor::zeros(vec![1, 10, 2, 7]));
    let e = program.forward(&views(&wrong)).expect_err("wrong K").to_string();
    assert!(e.contains("tensor `k`") || e.contains("tensor `q`"), "{e}");
    let mut extra = tensors.clone();
    extra.insert("initial_state".into(), Tensor::zeros(vec![1]));
    let e = program.forward(&views(&extra)).expect_err("unknown").to_string();
    assert!(
        e.starts_with(
            "tensor `initial_state` is not one rule `gated_delta_rule` takes here (it takes: q, k, v, g, beta, h0)"
        ),
        "{e}"
    );
    let other = compile(&r, Target::Cpu, Schedule::chunked(16), Heads::new(2, 8, 8)).expect("compiles");
    let e = other.forward(&inputs).expect_err("other V").to_string();
    assert_eq!(e, "the program was compiled for H=2 K=8 V=8; the tensors have H=2 K=8 V=4");

    let (r, decoder) = decode_program("gated_delta_rule");
    let mut pool = decoder.state_pool(3);
    let step = random_inputs(r.ast(), &Dims { batch: 2, seq_len: 1, heads: 2, k: 8, v: 4 }, 2);
    let mut no_h0 = step.clone();
    no_h0.remove("h0");
    let e = |slots: &[i64], pool: &mut chunkc::StatePool| {
        decoder.decode(&views(&no_h0), pool, slots).expect_err("refused").to_string()
    };
    assert_eq!(e(&[1, 1], &mut pool), "state_indices[0] and state_indices[1] are both slot 1");
    assert_eq!(e(&[0, 3], &mut pool), "state_indices[1] = 3: the pool has slots 0..3 (or -1)");
    assert_eq!(e(&[0], &mut pool), "state_indices has 1 entries for 2 sequences");
    let got = decoder.decode(&views(&step), &mut pool, &[0, 1]).expect_err("h0 given").to_string();
    assert!(got.contains("the decode step reads the states from its pool"), "{got}");
    let mut other_pool = other.state_pool(3);
    assert_eq!(e(&[0, 1], &mut other_pool), "the state pool was made by a program of another rule or size");
    let long = random_inputs(r.ast(), &Dims { batch: 2, seq_len: 3, heads: 2, k: 8, v: 4 }, 2);
    let mut long_in = long.clone();
    long_in.remove("h0");
    let got = decoder.decode(&views(&long_in), &mut pool, &[0, 1]).expect_err("T = 3").to_string();
    assert!(got.contains("one token per sequence"), "{got}");
    let bad_rule = Rule::parse("name = \"x\"\nstep = \"o = S^T @ q\"\n[inputs]\nq = \"[J]\"\n").expect_err("bad shape");
    assert!(bad_rule.to_string().contains("<rule>:"), "{bad_rule}");
}

#[test]
fn the_ptx_simulator_runs_varlen_and_decode_as_the_cpu_does() {
    use chunkc::Sm;
    let r = rule("gated_delta_rule");
    let heads = Heads::new(2, 8, 4);
    let cu: [i64; 4] = [0, 5, 22, 25];
    let mut tensors = random_inputs(r.ast(), &Dims { batch: 1, seq_len: 25, heads: 2, k: 8, v: 4 }, 21);
    tensors.insert(
        "h0".into(),
        random_inputs(r.ast(), &Dims { batch: 3, seq_len: 1, heads: 2, k: 8, v: 4 }, 22)["h0"].clone(),
    );
    for schedule in [Schedule::chunked(16), Schedule::recurrent()] {
        let cpu = compile(&r, Target::Cpu, schedule, heads).expect("cpu");
        let sim = compile(&r, Target::PtxSim(Sm::Sm80), schedule, heads).expect("sim");
        let want = cpu.forward_varlen(&views(&tensors), &cu[..]).expect("cpu varlen");
        let got = sim.forward_varlen(&views(&tensors), &cu[..]).expect("sim varlen");
        for (name, t) in &want.0 {
            assert_eq!(got.0[name].count_non_finite(), 0, "{name}");
            let err = rel_rms(&got.0[name].data, &t.data);
            assert!(err < 1e-6, "{schedule:?} {name}: {err:.2e}");
        }
        let mut step = random_inputs(r.ast(), &Dims { batch: 3, seq_len: 1, heads: 2, k: 8, v: 4 }, 23);
        step.remove("h0");
        let (mut cpu_pool, mut sim_pool) = (cpu.state_pool(4), sim.state_pool(4));
        for slot in 0..4 {
            let row: Vec<f32> = (0..64).map(|i| ((i * 7 + slot * 3) % 11) as f32 / 10.0 - 0.5).collect();
            cpu_pool.state_mut("h", slot).unwrap().copy_from_slice(&row);
            sim_pool.state_mut("h", slot).unwrap().copy_from_slice(&row);
        }
        let slots = [2i64, -1, 0];
        let want = cpu.decode(&views(&step), &mut cpu_pool, &slots).expect("cpu decode");
        let got = sim.decode(&views(&step), &mut sim_pool, &slots).expect("sim decode");
        assert!(rel_rms(&got.data, &want.data) < 1e-6, "{schedule:?} decode o");
        for slot in 0..4 {
            let err = rel_rms(sim_pool.state("h", slot).unwrap(), cpu_pool.state("h", slot).unwrap());
            assert!(err < 1e-6, "{schedule:?} slot {slot}: {err:.2e}");
        }
    }
}

#[test]
fn backward_is_the_command_lines_gradient() {
    use chunkc::grad::{grad, GradOptions, PtxPrecision};
    for (name, schedule) in [
        ("gated_delta_rule", Schedule::chunked(16)),
        ("mamba2", Schedule::chunked(32)),
        ("mlstm", Schedule::recurrent()),
        // The schedule's V-tiles split the backward too.
        ("mlstm", Schedule::chunked(16).with_bv(Some(2))),
        // And its program shape: the split backward.
        ("gated_delta_rule", Schedule::chunked(16).with_program(chunkc::codegen::schedule::ProgramShape::Split)),
    ] {
        let r = rule(name);
        let dims = Dims { batch: 2, seq_len: 37, heads: 2, k: 8, v: 4 };
        let mut tensors = random_inputs(r.ast(), &dims, 31);
        let cot = random_inputs(r.ast(), &dims, 32);
        let d_o = (0..2 * 37 * 2 * 4).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
        tensors.insert("do".into(), Tensor { shape: vec![2, 37, 2, 4], data: d_o });
        tensors.insert("dhT".into(), Tensor { shape: vec![2, 2, 8, 4], data: cot["h0"].data.clone() });
        let program = compile(&r, Target::Cpu, schedule, Heads::new(2, 8, 4)).expect("compiles").with_threads(2);
        let got = program.backward(&views(&tensors)).expect("backward");
        let backend = if schedule.chunk > 0 { Backend::Chunked } else { Backend::Recurrent };
        let opts = GradOptions {
            backend,
            engine: chunkc::Engine::Jit,
            threads: 2,
            scale: None,
            // As the library asks: recurrent checkpoints every 16 tokens, every chunk's state
            // stored by the chunked backward.
            checkpoint: (backend == Backend::Recurrent).then_some(16),
            chunk: schedule.chunk,
            bv: schedule.bv,
            program: schedule.program,
            ptx: PtxPrecision::default(),
        };
        let cli = grad(r.ast(), &tensors, "random", &opts, false).expect("grad");
        let reference = grad(r.ast(), &tensors, "random", &GradOptions { backend: Backend::Reference, ..opts }, false)
            .expect("reference");
        assert_eq!(got.0.keys().collect::<Vec<_>>(), cli.keys().collect::<Vec<_>>(), "{name}");
        for (t, want) in &cli {
            assert_eq!(got.0[t].count_non_finite(), 0, "{name} {t}");
            assert_eq!(got.0[t].data, want.data, "{name} {t}: the same program gives the same bits");
            let err = rel_rms(&got.0[t].data, &reference[t].data);
            assert!(err < 1e-4, "{name} {t}: {err:.2e} against the reference gradient");
        }
        assert!(got.0.contains_key("dh0"), "h0 was given");
    }
    let r = rule("gated_delta_rule");
    let program = compile(&r, Target::Cpu, Schedule::chunked(16), Heads::new(2, 8, 4)).expect("compiles");
    let tensors = random_inputs(r.ast(), &Dims { batch: 1, seq_len: 5, heads: 2, k: 8, v: 4 }, 1);
    let e = program.backward(&views(&tensors)).expect_err("no do").to_string();
    assert_eq!(e, "the backward needs the cotangent `do` [B, T, H, V] among the inputs");
}

/// `[B, T, H, D]` with each head repeated `g` times (FLA's `repeat_interleave` of q and k).
fn repeat_heads(t: &Tensor, g: usize) -> Tensor {
    let row: usize = t.shape[3..].iter().product();
    let heads = t.shape[2];
    let mut data = vec![];
    for token in t.data.chunks(heads * row) {
        for h in 0..heads * g {
            data.extend_from_slice(&token[(h / g) * row..(h / g + 1) * row]);
        }
    }
    let mut shape = t.shape.clone();
    shape[2] = heads * g;
    Tensor { shape, data }
}

/// More value heads than key heads: q and k at H = 2 shared by groups of 2 of the HV = 4
/// value heads, on the dense, varlen and backward paths, the CLI's engine and the PTX
/// simulator; each against the same run with q and k repeated by hand, and the gradients of
/// q and k against the by-hand ones summed over each group.
#[test]
fn grouped_value_heads_share_their_key_heads() {
    use chunkc::grad::{grad, GradOptions};
    let r = rule("gated_delta_rule");
    let dims = Dims { batch: 1, seq_len: 29, heads: 4, k: 8, v: 4 };
    let mut grouped = random_inputs(r.ast(), &dims, 41);
    for name in ["q", "k"] {
        let t = &grouped[name];
        // Keep the even heads: a [1, T, 2, K] tensor.
        let kept = Tensor {
            shape: vec![1, 29, 2, 8],
            data: t.data.chunks(8).enumerate().filter(|(i, _)| i % 4 < 2).flat_map(|(_, c)| c.to_vec()).collect(),
        };
        grouped.insert(name.into(), kept);
    }
    let mut by_hand = grouped.clone();
    for name in ["q", "k"] {
        by_hand.insert(name.into(), repeat_heads(&grouped[name], 2));
    }
    let program = compile(&r, Target::Cpu, Schedule::chunked(16), Heads::new(4, 8, 4)).expect("compiles");
    let got = program.forward(&views(&grouped)).expect("grouped");
    let want = program.forward(&views(&by_hand)).expect("by hand");
    assert_eq!(got.o().shape, vec![1, 29, 4, 4]);
    assert_eq!(got.o().data, want.o().data);
    assert_eq!(got.ht().data, want.ht().data);
    let cli = backend::run(r.ast(), &grouped, "grouped", &Options { threads: 1, ..Options::default() }).expect("cli");
    assert!(rel_rms(&cli.o().data, &want.o().data) < 1e-6);
    let sim = compile(&r, Target::PtxSim(chunkc::Sm::Sm90), Schedule::chunked(16), Heads::new(4, 8, 4)).expect("sim");
    assert!(rel_rms(&sim.forward(&views(&grouped)).expect("sim").o().data, &want.o().data) < 1e-6);

    let cu: [i64; 3] = [0, 11, 29];
    let mut packed = grouped.clone();
    let mut packed_by_hand = by_hand.clone();
    let h0 = random_inputs(r.ast(), &Dims { batch: 2, seq_len: 1, heads: 4, k: 8, v: 4 }, 42)["h0"].clone();
    packed.insert("h0".into(), h0.clone());
    packed_by_hand.insert("h0".into(), h0);
    let got = program.forward_varlen(&views(&packed), &cu[..]).expect("varlen grouped");
    let want = program.forward_varlen(&views(&packed_by_hand), &cu[..]).expect("varlen by hand");
    assert_eq!(got.o().data, want.o().data);

    let d_o: Vec<f32> = (0..29 * 16).map(|i| ((i * 13 % 29) as f32) / 14.0 - 1.0).collect();
    for t in [&mut grouped, &mut by_hand] {
        t.insert("do".into(), Tensor { shape: vec![1, 29, 4, 4], data: d_o.clone() });
    }
    let got = program.backward(&views(&grouped)).expect("grouped backward");
    let want = program.backward(&views(&by_hand)).expect("by-hand backward");
    let reference = grad(
        r.ast(),
        &grouped,
        "grouped",
        &GradOptions { backend: Backend::Reference, ..GradOptions::default() },
        false,
    )
    .expect("reference");
    for name in ["dq", "dk"] {
        assert_eq!(got.0[name].shape, vec![1, 29, 2, 8], "{name} per key head");
        // Summed over each group of two value heads, by hand.
        let w = &want.0[name].data;
        let summed: Vec<f32> = w
            .chunks(8)
            .collect::<Vec<_>>()
            .chunks(2)
            .flat_map(|pair| pair[0].iter().zip(pair[1]).map(|(a, b)| a + b))
            .collect();
        assert!(rel_rms(&got.0[name].data, &summed) < 1e-6, "{name}");
        let err = rel_rms(&got.0[name].data, &reference[name].data);
        assert!(err < 1e-5, "{name} against the reference gradient: {err:.2e}");
    }
    for name in ["dv", "dg", "dbeta", "dh0"] {
        assert_eq!(got.0[name].data, want.0[name].data, "{name}");
    }
    let mut bad = grouped.clone();
    bad.remove("do");
    bad.insert("q".into(), Tensor::zeros(vec![1, 29, 3, 8]));
    let e = program.forward(&views(&bad)).expect_err("3 heads").to_string();
    assert_eq!(e, "tensor `q` has 3 heads; the value heads (4, the most any input has) must be a multiple of them");
}

/// Random decode batches over random pools (slots in any order, padding rows), random
/// rules, against T = 1 runs of each sequence alone, bit for bit; and grouped key heads in a
/// varlen batch against the same batch with q and k repeated by hand.
#[test]
fn decode_and_grouped_heads_match_their_definitions() {
    let strategy =
        (0usize..4, proptest::collection::vec(-1i64..6, 1..5), proptest::collection::vec(1usize..40, 1..4), 0u64..1000);
    common::property("decode_and_grouped_heads", 10, strategy, |(which, slots_wanted, lens, seed)| {
        let name = ["gated_delta_rule", "gla", "mlstm", "rwkv6"][which];
        let r = rule(name);
        let (program_r, program) = (r, {
            let r = rule(name);
            compile(&r, Target::Cpu, Schedule::recurrent(), Heads::new(2, 8, 4)).expect("compiles").with_threads(2)
        });
        // Distinct slots (padding may repeat).
        let mut slots = vec![];
        for s in slots_wanted {
            if s < 0 || !slots.contains(&s) {
                slots.push(s);
            }
        }
        let n = slots.len();
        let mut pool = program.state_pool(6);
        let start = random_inputs(program_r.ast(), &Dims { batch: 6, seq_len: 1, heads: 2, k: 8, v: 4 }, seed);
        for stem in program_r.state_stems() {
            for slot in 0..6 {
                pool.state_mut(&stem, slot).unwrap().copy_from_slice(&row(&start[&format!("{stem}0")], slot).data);
            }
        }
        let before = pool.clone();
        let mut step = random_inputs(program_r.ast(), &Dims { batch: n, seq_len: 1, heads: 2, k: 8, v: 4 }, seed + 7);
        step.retain(|k, _| program_r.ast().input(k).is_some());
        let o = program.decode(&views(&step), &mut pool, &slots).expect("decode");
        for (i, &slot) in slots.iter().enumerate() {
            let mut alone: BTreeMap<String, Tensor> =
                step.iter().map(|(k, t)| (k.clone(), if t.shape.len() >= 3 { row(t, i) } else { t.clone() })).collect();
            if slot >= 0 {
                for stem in program_r.state_stems() {
                    let data = before.state(&stem, slot as usize).unwrap().to_vec();
                    let shape = [vec![1], start[&format!("{stem}0")].shape[1..].to_vec()].concat();
                    alone.insert(format!("{stem}0"), Tensor::new(shape, data).unwrap());
                }
            }
            let single = program.forward(&views(&alone)).expect("T = 1");
            prop_assert_eq!(&row(&o, i).data, &single.o().data);
            if slot >= 0 {
                prop_assert_eq!(pool.state("h", slot as usize).unwrap(), &single.ht().data[..]);
            }
        }
        for slot in 0..6i64 {
            if !slots.contains(&slot) {
                prop_assert_eq!(pool.state("h", slot as usize).unwrap(), before.state("h", slot as usize).unwrap());
            }
        }

        // Grouped key heads (H = 1 shared by HV = 2) in a varlen batch.
        let total: usize = lens.iter().sum();
        let chunked = compile(&program_r, Target::Cpu, Schedule::chunked(16), Heads::new(2, 8, 4)).expect("compiles");
        let mut grouped =
            random_inputs(program_r.ast(), &Dims { batch: 1, seq_len: total, heads: 2, k: 8, v: 4 }, seed + 9);
        grouped.remove("h0");
        for s in &program_r.ast().states {
            grouped.remove(&s.initial_name());
        }
        let mut by_hand = grouped.clone();
        for key in ["q", "k"] {
            let t = &grouped[key];
            let kept = Tensor {
                shape: vec![1, total, 1, 8],
                data: t.data.chunks(8).step_by(2).flat_map(|c| c.to_vec()).collect(),
            };
            by_hand.insert(key.into(), repeat_heads(&kept, 2));
            grouped.insert(key.into(), kept);
        }
        let cu: Vec<i64> = std::iter::once(0)
            .chain(lens.iter().scan(0i64, |a, &l| {
                *a += l as i64;
                Some(*a)
            }))
            .collect();
        let got = chunked.forward_varlen(&views(&grouped), cu.as_slice()).expect("grouped varlen");
        let want = chunked.forward_varlen(&views(&by_hand), cu.as_slice()).expect("by hand");
        prop_assert_eq!(&got.o().data, &want.o().data);
        prop_assert_eq!(&got.ht().data, &want.ht().data);
        Ok(())
    });
}
