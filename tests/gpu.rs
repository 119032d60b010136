//! Rung 6 of the verification ladder: with a CUDA device, every golden case through
//! `chunkc run --backend cuda` (recurrent, chunked at 16/32/64/128) and a property-style
//! sweep (every rule in rules/, random shapes with T not a multiple of the chunk, recurrent
//! and chunked kernels, fused and split) through the CUDA engine against the f64 reference, within 1e-5 relative
//! RMS; the goldens also with tf32 dots (1e-3) and bf16 inputs and dots (1e-2). Without a
//! driver or a device it prints `skipped: no CUDA device` and passes: CI has no GPU, so this
//! file only means something on a machine that has one. With `CHUNKC_REQUIRE_GPU=1` (as
//! `scripts/gpu_check.sh` runs it) a missing driver or device, or one older than sm_80, fails
//! the test instead: on a GPU machine it must not pass silently.

mod common;

use chunkc::backend::{run, Backend, Engine, Options};
use chunkc::codegen::ptx::Sm;
use chunkc::codegen::schedule::ProgramShape;
use chunkc::dsl::reference::Dims;
use chunkc::gpu::Device;
use chunkc::runtime::cuda;
use chunkc::verify::{random_inputs, rel_rms, Rng, F32_TOLERANCE};
use chunkc::{Schedule, SIXTEEN_BIT_TOLERANCE};
use common::{check_every_golden, goldens_dir};

#[test]
fn cuda_backend_matches_the_goldens_and_the_reference() {
    // No driver, no device, or a driver that cannot count its devices: nothing to test here.
    let required = std::env::var("CHUNKC_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if let Err(e) = cuda::device_count() {
        assert!(!required, "CHUNKC_REQUIRE_GPU=1 but there is no usable CUDA device: {e}");
        println!("skipped: no CUDA device");
        return;
    }
    let dev = cuda::device_info().unwrap_or_else(|e| panic!("the driver reports a device, but it is unusable: {e}"));
    let (target, name) = match dev.sm {
        90.. => (Sm::Sm90, "sm_90"),
        80.. => (Sm::Sm80, "sm_80"),
        _ => {
            let why = format!("CUDA device 0 ({}) is sm_{}; the PTX targets need sm_80 or newer", dev.name, dev.sm);
            assert!(!required, "CHUNKC_REQUIRE_GPU=1: {why}");
            println!("skipped: {why}");
            return;
        }
    };
    println!("CUDA device 0: {} (sm_{}), PTX for {name}", dev.name, dev.sm);
    if let Some(dir) = goldens_dir() {
        let cuda = |extra: &[&'static str]| [&["--backend", "cuda", "--target", name][..], extra].concat();
        let mut configs = vec![cuda(&["--kernel", "recurrent"])];
        for c in ["16", "32", "64", "128"] {
            configs.push(cuda(&["--kernel", "chunked", "--chunk", c]));
        }
        configs.push(cuda(&["--chunk", "64", "--program", "split"]));
        check_every_golden(&dir, "cuda", &configs, F32_TOLERANCE);
        // The tensor-core schedules at their own budgets, as tests/goldens.rs runs them in
        // the simulator.
        let tf32 = [cuda(&["--chunk", "64", "--dot", "tf32"])];
        check_every_golden(&dir, "cuda-tf32", &tf32, chunkc::codegen::ptx::DotPrecision::Tf32.tolerance());
        let bf16 = [
            cuda(&["--chunk", "64", "--dtype", "bf16", "--dot", "bf16"]),
            cuda(&["--kernel", "recurrent", "--dtype", "bf16", "--dot", "bf16"]),
        ];
        check_every_golden(&dir, "cuda-bf16", &bf16, SIXTEEN_BIT_TOLERANCE);
    }
    random_shapes_agree_with_the_reference(target);
}

/// Four random shapes per rule; each runs the recurrent kernel and the chunked one at a
/// random chunk on the device.
fn random_shapes_agree_with_the_reference(target: Sm) {
    let paths = common::rule_paths();
    let mut rng = Rng::new(0x6b75_6461);
    let mut pick = |lo: usize, hi: usize| lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize;
    let engine = Engine::Ptx { device: Device::Cuda, target };
    let mut failures = vec![];
    let mut runs = 0;
    for path in paths {
        let loaded = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}"));
        let rule = &loaded.rule;
        for _ in 0..4 {
            let chunk = [16, 32, 64, 128][pick(0, 3)];
            let mut seq_len = pick(1, 600);
            if seq_len % chunk == 0 {
                seq_len += pick(1, chunk - 1);
            }
            let dims = Dims { batch: pick(1, 2), seq_len, heads: pick(1, 4), k: pick(1, 128), v: pick(1, 128) };
            let seed = pick(0, 1 << 30) as u64;
            let inputs = random_inputs(rule, &dims, seed);
            let reference =
                run(rule, &inputs, "random inputs", &Options { backend: Backend::Reference, ..Default::default() })
                    .expect("reference runs");
            let mut kernels = vec![(Backend::Recurrent, Schedule::recurrent())];
            if loaded.canonical.is_ok() {
                kernels.push((Backend::Chunked, Schedule::chunked(chunk)));
                kernels.push((Backend::Chunked, Schedule::chunked(chunk).with_program(ProgramShape::Split)));
            }
            for (backend, schedule) in kernels {
                let opts = Options { backend, engine, schedule, ..Default::default() };
                let what = format!("{} {schedule} {dims:?} seed {seed}", rule.name);
                runs += 1;
                match run(rule, &inputs, "random inputs", &opts) {
                    Ok(out) => {
                        let (eo, eh) = (
                            rel_rms(&out.o().data, &reference.o().data),
                            rel_rms(&out.ht().data, &reference.ht().data),
                        );
                        println!("{what}: o {eo:.2e}, hT {eh:.2e}");
                        if !(eo <= F32_TOLERANCE && eh <= F32_TOLERANCE) {
                            failures.push(format!("{what}: o {eo:.2e}, hT {eh:.2e}"));
                        }
                    }
                    Err(e) => failures.push(format!("{what}: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {runs} CUDA runs failed:\n{}", failures.len(), failures.join("\n"));
}
