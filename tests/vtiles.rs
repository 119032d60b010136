//! V-tiles (the Schedule's BV, `--bv`): a head split into V / BV grid points of BV columns.
//!
//! Every rule in rules/ (all are column-separable) runs its chunked and recurrent kernels
//! with BV = V/2 and V/4 on the CPU JIT, the tile-IR interpreter and the PTX simulator, in
//! f32 and with one tensor-core schedule, against the f64 reference; T is not a multiple of
//! the chunk and outputs are NaN-poisoned by `backend::run`. The planner's refusals (BV not
//! dividing V, a reduction over V, a rule not linear in S) are one-line errors; the PTX of
//! a few BV kernels assembles for sm_80 and sm_90 without spills.
//!
//! The chunked backward splits too: every chunkable rule's gradients at BV = V/2 and V/4 (and
//! with the states stored every two chunks) against the reference gradient, on the same three
//! engines.

use chunkc::backend::{build_kernel, build_program, run, shape_of, Backend, Engine, Options};
use chunkc::codegen::ptx::{self, DotPrecision, Grid, PtxSchedule, Sm};
use chunkc::codegen::schedule::ProgramShape;
use chunkc::dsl::reference::Dims;
use chunkc::gpu::Device;
use chunkc::grad::{build_program as build_grad_program, grad, GradOptions};
use chunkc::verify::{precision_of, random_inputs, rel_rms};
use chunkc::verify_grad::{random_grad_inputs, tolerance as grad_tolerance};
use chunkc::Schedule;
mod common;

use common::rule_paths as rules;

/// Small enough for the simulator; T = 37 is 2 x 16 + 5.
const DIMS: Dims = Dims { batch: 2, seq_len: 37, heads: 2, k: 16, v: 16 };
const CHUNK: usize = 16;

const SIM: Engine = Engine::Ptx { device: Device::Sim, target: Sm::Sm90 };

/// The schedule of `backend`'s kernel at [`CHUNK`] with V-tiles of `bv` columns, at the
/// precision of `base`.
fn tiled(base: Schedule, backend: Backend, bv: Option<usize>) -> Schedule {
    let kernel = backend.kernel().expect("a compiled backend");
    base.with_kernel(kernel, CHUNK).with_bv(bv)
}

/// Runs every rule, both kernels, BV = V/2 and V/4 on `engine` at the precision of
/// `precision`; returns the worst error.
fn every_rule_split(engine: Engine, precision: Schedule) -> f64 {
    let precision = precision_of(engine, &precision);
    let tol = precision.tolerance();
    let mut worst = 0.0f64;
    let mut failures = vec![];
    for path in rules() {
        let loaded = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}"));
        let rule = &loaded.rule;
        let inputs = random_inputs(rule, &DIMS, 11);
        let reference = run(rule, &inputs, "random", &Options { backend: Backend::Reference, ..Default::default() })
            .expect("reference");
        for backend in [Backend::Recurrent, Backend::Chunked] {
            for bv in [DIMS.v / 2, DIMS.v / 4] {
                // The kernel really is split (a planner that ignored bv would pass the rest).
                let schedule = tiled(precision, backend, Some(bv));
                let k = build_kernel(rule, shape_of(&DIMS, None), &schedule)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", rule.name, backend.name()));
                assert_eq!(k.vtiles, DIMS.v / bv, "{}", k.name);
                let opts = Options { backend, engine, schedule, threads: 2, scale: None };
                let out = run(rule, &inputs, "random", &opts).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
                let (eo, eh) =
                    (rel_rms(&out.o().data, &reference.o().data), rel_rms(&out.ht().data, &reference.ht().data));
                println!("{:<18} {:<9} bv {bv:>2}: err o {eo:.2e}, err hT {eh:.2e}", rule.name, backend.name());
                worst = worst.max(eo).max(eh);
                if !(eo <= tol && eh <= tol) {
                    failures.push(format!("{} {} bv {bv}: o {eo:.2e} hT {eh:.2e}", rule.name, backend.name()));
                }
            }
        }
    }
    println!("worst rel RMS error {worst:.2e} (tolerance {tol:.0e})");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    worst
}

#[test]
fn every_rule_split_into_v_tiles_on_the_cpu_jit() {
    every_rule_split(Engine::Jit, Schedule::default());
}

#[test]
fn every_rule_split_into_v_tiles_in_the_interpreter() {
    every_rule_split(Engine::Interp, Schedule::default());
}

#[test]
fn every_rule_split_into_v_tiles_in_the_ptx_simulator() {
    every_rule_split(SIM, Schedule::default());
}

#[test]
fn every_rule_split_into_v_tiles_in_the_ptx_simulator_with_tf32_dots() {
    every_rule_split(SIM, Schedule::default().with_ptx(PtxSchedule::with_dot(DotPrecision::Tf32)));
}

/// Every chunkable rule's chunked backward split into V-tiles of V/2 and V/4 columns (and,
/// fused, V/4 storing the state every two chunks) on `engine`, as the `program` (fused or
/// split) against the reference gradient: every gradient within its budget (those the
/// columns share summed over the tiles), the program's phases really split. Returns the
/// worst error.
fn every_rule_backward_split(engine: Engine, program: ProgramShape) -> f64 {
    let (mut worst, mut failures, mut compared) = (0.0f64, vec![], 0);
    for path in rules() {
        let loaded = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}"));
        let rule = &loaded.rule;
        if loaded.canonical.is_err() {
            continue;
        }
        let inputs = random_grad_inputs(rule, &DIMS, 5);
        let reference = grad(rule, &inputs, "random", &GradOptions::default(), false).expect("reference gradient");
        let mut runs = vec![(DIMS.v / 2, None), (DIMS.v / 4, None)];
        if program == ProgramShape::Fused {
            runs.push((DIMS.v / 4, Some(2 * CHUNK)));
        }
        for (bv, checkpoint) in runs {
            let opts = GradOptions {
                backend: Backend::Chunked,
                engine,
                threads: 2,
                chunk: CHUNK,
                checkpoint,
                bv: Some(bv),
                program,
                ..GradOptions::default()
            };
            let built = build_grad_program(rule, &DIMS, &opts).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
            // The factors of a delta rule cover the whole V (they do not depend on the state).
            let split_phases = built.spec.phases.iter().filter(|p| !p.entry.ends_with("_factors"));
            assert!(split_phases.clone().all(|p| p.vtiles == DIMS.v / bv), "{}", built.spec.name);
            assert_eq!(split_phases.count() > 2, program == ProgramShape::Split, "{}", built.spec.name);
            let got = grad(rule, &inputs, "random", &opts, false).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
            let mut line = format!("{:<18} bv {bv:>2} {checkpoint:?}:", rule.name);
            for (name, want) in &reference {
                let err = got.get(name).map_or(f64::INFINITY, |g| rel_rms(&g.data, &want.data));
                let budget = grad_tolerance(rule, name);
                line += &format!(" {name} {err:.1e}");
                worst = worst.max(err);
                compared += 1;
                if err.is_nan() || err > budget {
                    failures.push(format!("{} bv {bv} {checkpoint:?} {name}: {err:.2e} over {budget:.0e}", rule.name));
                }
            }
            println!("{line}");
        }
    }
    println!("worst rel RMS error {worst:.2e} over {compared} tensors");
    assert!(compared >= 200, "compared only {compared} tensors");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    worst
}

#[test]
fn every_rule_backward_split_into_v_tiles_on_the_cpu_jit() {
    every_rule_backward_split(Engine::Jit, ProgramShape::Fused);
    every_rule_backward_split(Engine::Jit, ProgramShape::Split);
}

#[test]
fn every_rule_backward_split_into_v_tiles_in_the_interpreter() {
    every_rule_backward_split(Engine::Interp, ProgramShape::Fused);
    every_rule_backward_split(Engine::Interp, ProgramShape::Split);
}

#[test]
fn every_rule_backward_split_into_v_tiles_in_the_ptx_simulator() {
    every_rule_backward_split(SIM, ProgramShape::Fused);
}

/// The split backward program's phases in the simulator, with V-tiles: the per-tile
/// columns of the adjoints (an extra `[K]` state's) and the per-chunk parts of the per-head
/// parameters' gradients cross phases here.
#[test]
fn every_rule_split_backward_in_v_tiles_in_the_ptx_simulator() {
    every_rule_backward_split(SIM, ProgramShape::Split);
}

/// The gradients the columns share come per V-tile out of the program, and one tile's part
/// alone is not the gradient: a caller that forgot to sum would be caught.
#[test]
fn the_shared_gradients_are_written_per_v_tile_and_summed() {
    let loaded = chunkc::load_rule(&common::root().join("rules/mlstm.toml")).expect("rule");
    let rule = &loaded.rule;
    let opts = GradOptions { backend: Backend::Chunked, chunk: CHUNK, bv: Some(DIMS.v / 4), ..GradOptions::default() };
    let program = build_grad_program(rule, &DIMS, &opts).expect("program");
    let dims_of = |name: &str| program.spec.tensor(name).map(|t| t.dims_label());
    assert_eq!(dims_of("dk.by_vtile").as_deref(), Some("[B, T, H, NV, K]"));
    assert_eq!(dims_of("dv").as_deref(), Some("[B, T, H, V]"), "a value's gradient is the tile's own");
    assert_eq!(dims_of("dn0.by_vtile").as_deref(), Some("[B, H, NV, K]"), "the extra column's, per tile");
    assert_eq!(dims_of("dk"), None);
    let inputs = random_grad_inputs(rule, &DIMS, 9);
    let reference = grad(rule, &inputs, "random", &GradOptions::default(), false).expect("reference");
    let got = grad(rule, &inputs, "random", &opts, false).expect("split");
    for name in ["dk", "dq", "dn0", "dv", "dh0"] {
        let err = rel_rms(&got[name].data, &reference[name].data);
        assert!(err <= 1e-5, "{name}: {err:.2e}");
    }
}

#[test]
fn the_recurrent_backward_takes_no_v_tiles() {
    let loaded = chunkc::load_rule(&rules()[0]).expect("rule");
    let opts = GradOptions { backend: Backend::Recurrent, bv: Some(8), ..GradOptions::default() };
    let e = build_grad_program(&loaded.rule, &DIMS, &opts).map(|_| ()).expect_err("refused").to_string();
    assert!(e.contains("--bv 8") && e.contains("only the chunked backward"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

/// A rule from text, through a temporary file (rules are loaded from paths).
fn rule_from(name: &str, text: &str) -> chunkc::Loaded {
    let path = std::env::temp_dir().join(format!("chunkc-vtiles-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write rule");
    let loaded = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&path);
    loaded
}

fn refusal(loaded: &chunkc::Loaded, backend: Backend, bv: usize) -> String {
    let shape = shape_of(&DIMS, None);
    match build_kernel(&loaded.rule, shape, &tiled(Schedule::default(), backend, Some(bv))) {
        Ok(k) => panic!("{}: planned with bv {bv}", k.name),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_reduction_over_v_is_refused_for_both_kernels() {
    // Linear in S (chunkable), but the write's value is normalised over V's columns.
    let loaded = rule_from(
        "vsum",
        r#"
name = "vsum"
step = """
S = S + outer(k, v / (1 + sum(v * v)))
o = S^T @ q
"""
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
    );
    assert!(loaded.canonical.is_ok(), "the rule is chunkable without V-tiles");
    build_kernel(&loaded.rule, shape_of(&DIMS, None), &tiled(Schedule::default(), Backend::Chunked, None))
        .expect("whole V is fine");
    for backend in [Backend::Recurrent, Backend::Chunked] {
        let e = refusal(&loaded, backend, 8);
        assert!(e.contains("mixes the columns of V") && e.contains("sum"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
    // Its chunked backward too: a V-tile's part of dk would miss the other tiles' columns.
    let opts = GradOptions { backend: Backend::Chunked, chunk: CHUNK, bv: Some(8), ..GradOptions::default() };
    let e = build_grad_program(&loaded.rule, &DIMS, &opts).map(|_| ()).expect_err("refused").to_string();
    assert!(e.contains("mixes the columns of V"), "{e}");
}

#[test]
fn a_rule_not_linear_in_the_state_is_refused_recurrent() {
    // No reduction over V anywhere, but S enters nonlinearly.
    let loaded = rule_from(
        "nonlin",
        r#"
name = "nonlin"
step = """
S = sigmoid(S) + outer(k, v)
o = S^T @ q
"""
[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#,
    );
    assert!(loaded.canonical.is_err());
    let e = refusal(&loaded, Backend::Recurrent, 8);
    assert!(e.contains("not linear in S"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn bv_must_divide_v() {
    let loaded = chunkc::load_rule(&rules()[0]).expect("rule");
    for backend in [Backend::Recurrent, Backend::Chunked] {
        let e = refusal(&loaded, backend, 5);
        assert!(e.contains("BV (5) must be a positive divisor of V (16)"), "{e}");
    }
}

#[test]
fn a_few_v_tile_kernels_assemble_without_spills() {
    if ptx::find_ptxas().is_none() {
        assert!(std::env::var_os("CI").is_none(), "{}", ptx::PTXAS_MISSING);
        println!("skipped: {}", ptx::PTXAS_MISSING);
        return;
    }
    let dims = Dims { batch: 1, seq_len: 1, heads: 2, k: 64, v: 64 };
    let schedules = [PtxSchedule::default(), PtxSchedule::with_dot(DotPrecision::Bf16)];
    for name in ["gated_delta_rule", "gla", "kda"] {
        let path = common::root().join(format!("rules/{name}.toml"));
        let loaded = chunkc::load_rule(&path).expect("rule");
        let programs = [
            (Backend::Recurrent, ProgramShape::Fused),
            (Backend::Chunked, ProgramShape::Fused),
            (Backend::Chunked, ProgramShape::Split),
        ];
        for (backend, shape) in programs {
            let kernel = backend.kernel().expect("compiled");
            let schedule = Schedule::chunked(64).with_kernel(kernel, 64).with_bv(Some(32)).with_program(shape);
            let program = build_program(&loaded.rule, shape_of(&dims, None), &schedule).expect("program");
            for sched in &schedules {
                for sm in [Sm::Sm80, Sm::Sm90] {
                    let emitted = chunkc::gpu::emit(&program, sm, sched).expect("emit");
                    for phase in &emitted.phases {
                        let name = &phase.meta.entry;
                        if name.ends_with("_factors") {
                            // The UT factors do not depend on V's split: one CTA per chunk.
                            assert_eq!(phase.meta.grid, Grid::VTilesChunksBatchHeads { vtiles: 1, chunk: 64 });
                            assert_eq!(phase.meta.grid.dims(3, 2, 130), Some([1, 3, 6]));
                        } else if name.ends_with("_outputs") {
                            assert_eq!(phase.meta.grid, Grid::VTilesChunksBatchHeads { vtiles: 2, chunk: 64 });
                            assert_eq!(phase.meta.grid.dims(3, 2, 130), Some([2, 3, 6]));
                        } else {
                            assert_eq!(phase.meta.grid, Grid::BatchHeadsVTiles { vtiles: 2 });
                            assert_eq!(phase.meta.grid.dims(3, 2, 130), Some([2, 6, 1]));
                        }
                        let r = ptx::assemble(&phase.ptx, sm).unwrap_or_else(|e| panic!("{name}: {e}"));
                        println!("{name} {:?}: {r}", sched.dot);
                        assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{name}: {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_v_tile_grid_keeps_its_serde_names() {
    let old: Grid = serde_json::from_str("\"batch_heads_x\"").expect("old name");
    assert_eq!(old, Grid::BatchHeadsX);
    let g = Grid::BatchHeadsVTiles { vtiles: 4 };
    let text = serde_json::to_string(&g).expect("json");
    assert_eq!(text, r#"{"batch_heads_v_tiles":{"vtiles":4}}"#);
    assert_eq!(serde_json::from_str::<Grid>(&text).expect("back"), g);
    assert_eq!((g.vtiles(), Grid::BatchHeadsX.vtiles()), (4, 1));
}
