//! One core's f32 FMA peak (register-resident FMA chains, `chunkc_codegen::cpu::peak`), the
//! yardstick for the kernels' percent-of-peak. Reported as elements/s = FLOP/s, once per SIMD
//! level the host has.
//!
//! `cargo bench -p chunkc-codegen --bench peak`

use chunkc_codegen::cpu::peak;
use chunkc_codegen::cpu::Simd;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const ITERS: u64 = 1 << 16;

fn fma_peak(c: &mut Criterion) {
    let mut group = c.benchmark_group("fma_peak");
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for simd in [Simd::Avx512, Simd::Avx2] {
        if peak::lanes(simd) == 0 {
            continue;
        }
        group.throughput(Throughput::Elements(peak::flops(simd, ITERS)));
        group.bench_function(format!("{simd:?}"), |b| b.iter(|| peak::fma_loop(simd, black_box(ITERS))));
    }
    group.finish();
}

criterion_group!(benches, fma_peak);
criterion_main!(benches);
