//! Forward-pass timings of the CPU programs: recurrent, chunked fused and split, for simple_gla, gla,
//! mamba2, gated_delta_rule and kda at B=1, T=2048, H=8, K=V=128, f32, one thread (the shape of the ggml peer
//! numbers in docs/performance.md). Throughput is in token-heads per second.
//!
//! `cargo bench --bench forward` (filter with a family name, e.g. `-- gla/`). Set
//! CHUNKC_BENCH_T to change T.

use chunkc::backend::{build_program, shape_of, CpuRunner};
use chunkc::codegen::schedule::ProgramShape;
use chunkc::dsl::reference::Dims;
use chunkc::runtime::exec::Order;
use chunkc::verify::random_inputs;
use chunkc::Schedule;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::Path;
use std::time::Duration;

fn forward(c: &mut Criterion) {
    let seq_len = std::env::var("CHUNKC_BENCH_T").ok().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let dims = Dims { batch: 1, seq_len, heads: 8, k: 128, v: 128 };
    for family in ["simple_gla", "gla", "mamba2", "gated_delta_rule", "kda"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules").join(format!("{family}.toml"));
        let rule = chunkc::load_rule(&path).expect("built-in rule").rule;
        let inputs = random_inputs(&rule, &dims, 7);
        let mut group = c.benchmark_group(family);
        group.throughput(Throughput::Elements((dims.batch * dims.seq_len * dims.heads) as u64));
        group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
        let schedules = [
            ("recurrent", Schedule::recurrent()),
            ("chunked64", Schedule::chunked(64)),
            ("chunked64_split", Schedule::chunked(64).with_program(ProgramShape::Split)),
        ];
        for (label, schedule) in schedules {
            let program = build_program(&rule, shape_of(&dims, None), &schedule).expect("program");
            let mut runner = CpuRunner::new(&program, &dims).expect("compiles");
            let order = Order { threads: 1, time_block: schedule.time_block, poison_scratch: false };
            group.bench_function(label, |b| b.iter(|| runner.run(&inputs, order).expect("runs")));
        }
        group.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
