//! Double buffering (`PtxSchedule::stages = 2`) and opt-in shared memory in the PTX simulator:
//! every rule's kernels under the pipelined schedules run against the f64 reference with
//! outputs NaN-poisoned, T not a multiple of the chunk and spanning several chunks. The
//! simulator rejects any access to a `cp.async` destination before its wait covers it, any
//! shared-memory race and any read of unwritten shared memory, so a wrong wait or a buffer
//! reused too early fails here, not only a wrong number.

mod common;

use chunkc_codegen::ir::ElemType;
use chunkc_codegen::plan::{program, Schedule, Shape};
use chunkc_codegen::program::Program;
use chunkc_codegen::ptx::{
    emit_program, emit_scheduled, max_smem_per_block, DotPrecision, EmitOptions, PtxSchedule, Sm, TileSpace,
};
use chunkc_dsl::reference::{self, Dims};
use common::*;
use std::path::PathBuf;

/// Emits, checks the pipeline is there, simulates and compares; returns the failure if any.
fn check(
    target: Sm,
    label: &str,
    program: &Program,
    sched: &PtxSchedule,
    dims: &Dims,
    tensors: &[(String, Vec<f32>)],
    want: &reference::Outputs,
) -> Option<String> {
    let ptx = match emit_program(program, target, EmitOptions::default(), sched) {
        Ok(p) => p,
        Err(e) => return Some(format!("{label}: emit: {e}")),
    };
    let [phase] = &ptx.phases[..] else { return Some(format!("{label}: not a one-phase program")) };
    if phase.meta.tile_space != TileSpace::Shared {
        return Some(format!("{label}: tiles not in shared memory"));
    }
    if !phase.ptx.contains("cp.async.wait_group 1") {
        return Some(format!("{label}: no double-buffered load"));
    }
    if sched.dot.tensor_cores() && label.contains("chunked") && !phase.ptx.contains("mma.sync") {
        return Some(format!("{label}: no dot on tensor cores"));
    }
    let (o, ht) = match try_simulate(&ptx, dims, tensors) {
        Ok(r) => r,
        Err(e) => return Some(format!("{label}: {e}")),
    };
    let (eo, eh) = (rel_rms(&o, &want.o), rel_rms(&ht, &want.ht));
    let tol = sched.dot.tolerance();
    println!(
        "{label}: smem {} B + staging {} B: rel RMS o {eo:.3e}, hT {eh:.3e} (budget {tol:.0e})",
        phase.meta.dynamic_smem_bytes, phase.meta.static_smem_bytes
    );
    (!(eo <= tol && eh <= tol)).then(|| format!("{label}: o {eo:.3e}, hT {eh:.3e} over {tol:.0e}"))
}

/// Every rule: the recurrent kernel under the pipelined f32 schedule (its per-token loads
/// double-buffered), and the chunked c16 kernel (where planned) under the pipelined f32,
/// tf32 and bf16 schedules, at T = 37 (three chunks, the last one partial) and K = V = 16.
#[test]
fn every_rule_double_buffered_matches_the_reference() {
    let dims = Dims { batch: 1, seq_len: 37, heads: 2, k: 16, v: 16 };
    let scale = 1.0 / (dims.k as f64).sqrt();
    let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
    let (mut failures, mut ran) = (vec![], 0);
    for path in rule_paths() {
        let rule = chunkc_dsl::load_rule(&path).expect("rule loads");
        let tensors = inputs(&rule, &dims, 41);
        let get = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
        let h0: Vec<f64> = get("h0").expect("h0");
        let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
        let rec = program::recurrent(&rule, shape, ElemType::F32, None).expect("recurrent plan");
        let mut jobs = vec![("recurrent".to_string(), rec, PtxSchedule::pipelined(DotPrecision::F32Fma))];
        if let Ok(canon) = chunkc_dsl::canon::canonicalize(&rule) {
            let k = program::chunked(&rule, &canon, shape, Schedule::with_chunk(16))
                .unwrap_or_else(|e| panic!("{}: chunked c16 refused: {e}", rule.name));
            for dot in [DotPrecision::F32Fma, DotPrecision::Tf32, DotPrecision::Bf16] {
                jobs.push(("chunked c16".to_string(), k.clone(), PtxSchedule::pipelined(dot)));
            }
        }
        for (what, kernel, sched) in &jobs {
            let label = format!("{} {what} {} stages 2", rule.name, sched.dot.name());
            ran += 1;
            failures.extend(check(Sm::Sm80, &label, kernel, sched, &dims, &tensors, &want));
        }
    }
    assert!(ran > 0);
    assert!(failures.is_empty(), "double-buffered kernels:\n{}", failures.join("\n"));
}

/// The pipeline's edges, on two rules: T = 1 (one iteration, which prefetches nothing),
/// T = 16 (exactly one full chunk) and T = 33 (two full chunks and one row), c16.
#[test]
fn double_buffering_edges_of_the_sequence() {
    let mut failures = vec![];
    for name in ["gated_delta_rule", "gla"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../rules/{name}.toml"));
        let rule = chunkc_dsl::load_rule(&path).expect("rule loads");
        let canon = chunkc_dsl::canon::canonicalize(&rule).expect("canonical");
        for t in [1usize, 16, 33] {
            let dims = Dims { batch: 2, seq_len: t, heads: 1, k: 16, v: 16 };
            let scale = 1.0 / (dims.k as f64).sqrt();
            let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
            let tensors = inputs(&rule, &dims, 5 + t as u64);
            let get =
                |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
            let h0: Vec<f64> = get("h0").expect("h0");
            let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
            let k = program::chunked(&rule, &canon, shape, Schedule::with_chunk(16)).expect("plan");
            let sched = PtxSchedule::pipelined(DotPrecision::Tf32);
            failures.extend(check(
                Sm::Sm80,
                &format!("{name} chunked c16 T={t} tf32 stages 2"),
                &k,
                &sched,
                &dims,
                &tensors,
                &want,
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Opt-in shared memory: simple_gla c64 at K = V = 36 has a 135 KiB workspace, so it stays in
/// global scratch under the plain schedule (48 KiB) and moves to shared memory under the
/// tensor-core schedules. Double-buffered it needs 171.6 KiB: over sm_80's 163 KiB, where the
/// pipelined schedule falls back to one stage in shared memory, and under sm_90's 227 KiB,
/// where it runs double-buffered in the simulator against the reference (T = 70: two chunks
/// of 64, the second with 6 rows).
#[test]
fn large_shared_memory_kernels_run_in_the_simulator() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules/simple_gla.toml");
    let rule = chunkc_dsl::load_rule(&path).expect("rule loads");
    let canon = chunkc_dsl::canon::canonicalize(&rule).expect("canonical");
    let dims = Dims { batch: 1, seq_len: 70, heads: 1, k: 36, v: 36 };
    let scale = 1.0 / (dims.k as f64).sqrt();
    let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
    let program = program::chunked(&rule, &canon, shape, Schedule::with_chunk(64)).expect("plan");
    let kernel = program.only_kernel().expect("one phase");
    let opts = EmitOptions::default();
    let plain = emit_scheduled(kernel, Sm::Sm80, opts, &PtxSchedule::default()).expect("emit");
    assert_eq!(plain.meta.tile_space, TileSpace::Global, "the plain schedule keeps the 48 KiB limit");
    let sched = PtxSchedule::pipelined(DotPrecision::Tf32);
    let single = emit_scheduled(kernel, Sm::Sm80, opts, &PtxSchedule::with_dot(DotPrecision::Tf32)).expect("emit");
    let fallback = emit_scheduled(kernel, Sm::Sm80, opts, &sched).expect("emit");
    let piped = emit_scheduled(kernel, Sm::Sm90, opts, &sched).expect("emit");
    for (target, k) in [(Sm::Sm80, &single), (Sm::Sm80, &fallback), (Sm::Sm90, &piped)] {
        assert_eq!(k.meta.tile_space, TileSpace::Shared);
        assert!(k.meta.dynamic_smem_bytes > 48 * 1024, "{} B", k.meta.dynamic_smem_bytes);
        assert!(k.meta.dynamic_smem_bytes + k.meta.static_smem_bytes <= max_smem_per_block(target));
    }
    assert!(!fallback.ptx.contains("cp.async.wait_group 1"), "sm_80: too large to double-buffer");
    assert_eq!(fallback.meta.dynamic_smem_bytes, single.meta.dynamic_smem_bytes);
    assert!(piped.meta.dynamic_smem_bytes > max_smem_per_block(Sm::Sm80), "sm_90 holds more than sm_80 can");
    println!(
        "simple_gla c64 K=V=36: plain: scratch {} B/CTA; tf32 sm_80: smem {} B; tf32 stages 2 sm_90: smem {} B",
        plain.meta.scratch_bytes_per_cta, single.meta.dynamic_smem_bytes, piped.meta.dynamic_smem_bytes
    );
    let tensors = inputs(&rule, &dims, 3);
    let get = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
    let h0: Vec<f64> = get("h0").expect("h0");
    let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
    let label = "simple_gla chunked c64 K=V=36 T=70 tf32 stages 2 sm_90";
    let failure = check(Sm::Sm90, label, &program, &sched, &dims, &tensors, &want);
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
}
