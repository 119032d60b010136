//! The decode step of a serving engine: one token for each of N = 64 sequences of
//! gated_delta_rule at H=8, K=V=128, f32, states in a pool. `decode_step` is one
//! `Program::decode` call over all of them (the rule's decode schedule, chunk 1, one launch;
//! `decode_step_recurrent` the same through the recurrent kernel);
//! `t1_chunked_per_sequence` is what an engine without it does: the chunked program (the CPU
//! default chunk, 16) called once per sequence with T = 1, its state passed in and read back;
//! `t1_chunked64_per_sequence` the same at FLA's chunk, 64. One thread each, so the ratio is
//! the work saved, not the cores used.
//!
//! `cargo bench --bench serving`

use chunkc::dsl::reference::Dims;
use chunkc::runtime::tensor::Tensor;
use chunkc::verify::random_inputs;
use chunkc::{compile, Heads, Inputs, Rule, Schedule, Target, TensorRef};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::BTreeMap;
use std::time::Duration;

const N: usize = 64;

fn views(tensors: &BTreeMap<String, Tensor>) -> Inputs<'_> {
    let mut inputs = Inputs::new();
    for (name, t) in tensors {
        inputs.insert(name, TensorRef::f32(&t.data, &t.shape).expect("view"));
    }
    inputs
}

fn decode(c: &mut Criterion) {
    let rule = Rule::load(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/gated_delta_rule.toml")).expect("rule");
    let heads = Heads::new(8, 128, 128);
    let decoder = compile(&rule, Target::Cpu, Schedule::recurrent(), heads).expect("compiles").with_threads(1);
    let decoder1 = compile(&rule, Target::Cpu, rule.decode_schedule(), heads).expect("compiles").with_threads(1);
    let chunked = compile(&rule, Target::Cpu, Schedule::chunked(16), heads).expect("compiles").with_threads(1);
    // FLA's chunk (64): a T = 1 call still forms whole-chunk tiles.
    let chunked64 = compile(&rule, Target::Cpu, Schedule::chunked(64), heads).expect("compiles").with_threads(1);
    let mut step = random_inputs(rule.ast(), &Dims { batch: N, seq_len: 1, heads: 8, k: 128, v: 128 }, 3);
    step.remove("h0");
    let mut pool = decoder.state_pool(N);
    let slots: Vec<i64> = (0..N as i64).collect();
    // One sequence's token and state, as the per-sequence engine passes them.
    let one: Vec<BTreeMap<String, Tensor>> = (0..N)
        .map(|n| {
            let mut m: BTreeMap<String, Tensor> = step
                .iter()
                .map(|(k, t)| {
                    let per = t.data.len() / N;
                    let shape = [vec![1], t.shape[1..].to_vec()].concat();
                    (k.clone(), Tensor { shape, data: t.data[n * per..(n + 1) * per].to_vec() })
                })
                .collect();
            m.insert("h0".into(), Tensor::zeros(vec![1, 8, 128, 128]));
            m
        })
        .collect();

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    let inputs = views(&step);
    group.bench_function("decode_step_recurrent", |b| {
        b.iter(|| decoder.decode(&inputs, &mut pool, &slots).expect("decode"));
    });
    group.bench_function("decode_step", |b| {
        b.iter(|| decoder1.decode(&inputs, &mut pool, &slots).expect("decode"));
    });
    let mut states: Vec<Vec<f32>> = vec![vec![0.0; 8 * 128 * 128]; N];
    for (label, program) in [("t1_chunked_per_sequence", &chunked), ("t1_chunked64_per_sequence", &chunked64)] {
        group.bench_function(label, |b| {
            b.iter(|| {
                for (n, tensors) in one.iter().enumerate() {
                    let mut inputs = views(tensors);
                    inputs.insert("h0", TensorRef::f32(&states[n], &[1, 8, 128, 128]).expect("view"));
                    let out = program.forward(&inputs).expect("forward");
                    states[n].copy_from_slice(&out.ht().data);
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
