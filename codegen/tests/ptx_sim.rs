//! Rung 5 of the verification ladder, end to end: the PTX emitted for simple_gla and
//! gated_delta_rule (recurrent and chunked c16) runs in the PTX simulator
//! (`chunkc_runtime::ptxsim`) and matches the f64 reference (`chunkc_dsl::reference::run`)
//! within the f32 budget, 1e-5 relative RMS, on o and hT. The simulator also checks every
//! access (bounds, uninitialised shared reads, races, partial barriers, uniform branches).

mod common;

use chunkc_codegen::ir::ElemType;
use chunkc_codegen::plan::{program, ProgramShape, Schedule, Shape};
use chunkc_codegen::ptx::{emit_program, EmitOptions, PtxSchedule, Sm, TileSpace};
use chunkc_dsl::reference::{self, Dims};
use chunkc_runtime::ptxsim::{launch, GlobalMemory, SimParam};
use common::*;
use std::path::PathBuf;

const TOLERANCE: f64 = 1e-5;

#[test]
fn emitted_ptx_matches_the_reference_in_the_simulator() {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let dims = Dims { batch: 1, seq_len: 37, heads: 2, k: 8, v: 8 };
    let scale = 1.0 / (dims.k as f64).sqrt();
    let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
    let mut failures = vec![];
    for name in ["simple_gla", "gated_delta_rule"] {
        let rule = chunkc_dsl::load_rule(&rules.join(format!("{name}.toml"))).expect("rule loads");
        let canon = chunkc_dsl::canon::canonicalize(&rule).expect("canonical form");
        let tensors = inputs(&rule, &dims, 7);
        let get = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
        let h0: Vec<f64> = get("h0").expect("h0");
        let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
        let rec = program::recurrent(&rule, shape, ElemType::F32, None).expect("recurrent plan");
        let chunk = program::chunked(&rule, &canon, shape, Schedule::with_chunk(16)).expect("chunked plan");
        let split = Schedule::with_chunk(16).with_program(ProgramShape::Split);
        let split = program::chunked(&rule, &canon, shape, split).expect("split plan");
        let plain = PtxSchedule::default();
        let emit = |p, opts| emit_program(p, Sm::Sm80, opts, &plain).expect("emit");
        let scratch = emit(&chunk, EmitOptions { smem_limit: 0 });
        assert_eq!(scratch.phases[0].meta.tile_space, TileSpace::Global);
        let split_scratch = emit(&split, EmitOptions { smem_limit: 0 });
        let kernels = [
            ("recurrent", emit(&rec, EmitOptions::default())),
            ("chunked c16", emit(&chunk, EmitOptions::default())),
            ("chunked c16, tiles in global scratch", scratch),
            ("chunked c16 split", emit(&split, EmitOptions::default())),
            ("chunked c16 split, tiles in global scratch", split_scratch),
        ];
        for (label, ptx) in kernels {
            let (o, ht) = simulate(&ptx, &dims, &tensors);
            let (eo, eh) = (rel_rms(&o, &want.o), rel_rms(&ht, &want.ht));
            println!("{name} {label}: rel RMS o {eo:.3e}, hT {eh:.3e} (budget {TOLERANCE:.0e})");
            if !(eo <= TOLERANCE && eh <= TOLERANCE) {
                failures.push(format!("{name} {label}: o {eo:.3e}, hT {eh:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "over the f32 budget:\n{}", failures.join("\n"));
}

/// Every rule in rules/ (recurrent, and chunked c16 fused and split): the simulator runs the
/// emitted PTX without reporting anything, and the errors against the reference are printed.
/// Every one is held to the same f32 budget.
#[test]
fn every_rule_runs_cleanly_in_the_simulator() {
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&rules)
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let dims = Dims { batch: 1, seq_len: 19, heads: 2, k: 8, v: 8 };
    let scale = 1.0 / (dims.k as f64).sqrt();
    let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
    let mut failures = vec![];
    for path in paths {
        let rule = chunkc_dsl::load_rule(&path).expect("rule loads");
        let tensors = inputs(&rule, &dims, 11);
        let get = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
        let h0: Vec<f64> = get("h0").expect("h0");
        let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
        let mut programs =
            vec![("recurrent", program::recurrent(&rule, shape, ElemType::F32, None).expect("recurrent plan"))];
        if let Ok(canon) = chunkc_dsl::canon::canonicalize(&rule) {
            // `check` promises a chunked kernel for every canonical rule: a refusal fails.
            for (label, shape_of_program) in [("chunked c16", ProgramShape::Fused), ("split c16", ProgramShape::Split)]
            {
                let sched = Schedule::with_chunk(16).with_program(shape_of_program);
                let p = program::chunked(&rule, &canon, shape, sched)
                    .unwrap_or_else(|e| panic!("{}: {label} refused: {e}", rule.name));
                programs.push((label, p));
            }
        }
        for (label, p) in programs {
            let ptx = emit_program(&p, Sm::Sm90, EmitOptions::default(), &PtxSchedule::default()).expect("emit");
            let (o, ht) = simulate(&ptx, &dims, &tensors);
            let (eo, eh) = (rel_rms(&o, &want.o), rel_rms(&ht, &want.ht));
            println!("{} {label}: rel RMS o {eo:.3e}, hT {eh:.3e}", rule.name);
            if !(eo <= TOLERANCE && eh <= TOLERANCE) {
                failures.push(format!("{} {label}: o {eo:.3e}, hT {eh:.3e}", rule.name));
            }
        }
    }
    assert!(failures.is_empty(), "over the f32 budget:\n{}", failures.join("\n"));
}

/// The tensor-core rung: every rule's chunked kernel (c16; GLA-style rules in sub-chunks of
/// 16) under each tensor-core schedule, and the f32 schedule with `cp.async` loads, runs in
/// the simulator against the f64 reference at T = 37 (not a multiple of the chunk), K = V =
/// 16 and 24 (24: m, n and k padded to the instruction shapes), with outputs NaN-poisoned.
/// Each is held to its precision's budget (f32 1e-5, tf32 1e-3, bf16/f16 1e-2), and a
/// tensor-core schedule must have put at least one dot on tensor cores.
#[test]
fn tensor_core_kernels_match_the_reference_in_the_simulator() {
    use chunkc_codegen::ptx::DotPrecision;
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&rules)
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let schedules = [
        PtxSchedule { async_copy: true, ..PtxSchedule::default() },
        PtxSchedule::with_dot(DotPrecision::Tf32),
        PtxSchedule::with_dot(DotPrecision::Bf16),
        PtxSchedule::with_dot(DotPrecision::F16),
    ];
    let mut failures = vec![];
    let mut ran = 0;
    for kv in [16usize, 24] {
        let dims = Dims { batch: 1, seq_len: 37, heads: 2, k: kv, v: kv };
        let scale = 1.0 / (dims.k as f64).sqrt();
        let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
        for path in &paths {
            let rule = chunkc_dsl::load_rule(path).expect("rule loads");
            let Ok(canon) = chunkc_dsl::canon::canonicalize(&rule) else { continue };
            // `check` promises a chunked kernel for every canonical rule: a refusal is a failure.
            let programs = [ProgramShape::Fused, ProgramShape::Split].map(|form| {
                let sched = Schedule::with_chunk(16).with_program(form);
                program::chunked(&rule, &canon, shape, sched)
                    .unwrap_or_else(|e| panic!("{}: chunked c16 {} refused: {e}", rule.name, form.name()))
            });
            let tensors = inputs(&rule, &dims, 23);
            let get =
                |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
            let h0: Vec<f64> = get("h0").expect("h0");
            let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
            for (sched, p) in schedules.iter().flat_map(|s| programs.iter().map(move |p| (s, p))) {
                let ptx = emit_program(p, Sm::Sm80, EmitOptions::default(), sched).expect("emit");
                let label = format!(
                    "{} c16 K=V={kv} {} {}{}",
                    rule.name,
                    if p.kernels.len() > 1 { "split" } else { "fused" },
                    sched.dot.name(),
                    if sched.async_copy { " cp.async" } else { "" }
                );
                let text: String = ptx.phases.iter().map(|k| k.ptx.as_str()).collect();
                if sched.dot.tensor_cores() && !text.contains("mma.sync") {
                    failures.push(format!("{label}: no dot on tensor cores"));
                    continue;
                }
                if sched.async_copy && !text.contains("cp.async") {
                    failures.push(format!("{label}: no cp.async"));
                    continue;
                }
                let (o, ht) = simulate(&ptx, &dims, &tensors);
                let (eo, eh) = (rel_rms(&o, &want.o), rel_rms(&ht, &want.ht));
                let tol = sched.dot.tolerance();
                println!("{label}: rel RMS o {eo:.3e}, hT {eh:.3e} (budget {tol:.0e})");
                ran += 1;
                if !(eo <= tol && eh <= tol) {
                    failures.push(format!("{label}: o {eo:.3e}, hT {eh:.3e} over {tol:.0e}"));
                }
            }
        }
    }
    assert!(ran > 0, "no kernel ran");
    assert!(failures.is_empty(), "tensor-core kernels:\n{}", failures.join("\n"));
}

/// One tensor-core dot with every awkward case at once: m, n, k (37, 45, 29) padded in every
/// dimension, the four transpose combinations, an accumulator, 2 warps (15 warp tiles: two
/// passes) and, for bf16/f16, a staging buffer so small that k is staged in 16-wide slices.
/// The kernel stores `op(a) @ op(b) + c`; the result is compared with the f64 product.
#[test]
fn tensor_core_dot_edge_cases_in_the_simulator() {
    use chunkc_codegen::builder::Builder;
    use chunkc_codegen::ir::{Access, Idx};
    use chunkc_codegen::ptx::{emit_scheduled, mma, DotPrecision, PtxSchedule};
    let (m, n, k) = (37usize, 45usize, 29usize);
    let mut rng = Rng(99);
    let mut failures = vec![];
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let a: Vec<f32> = (0..ar * ac).map(|_| rng.normal() as f32).collect();
        let bm: Vec<f32> = (0..br * bc).map(|_| rng.normal() as f32).collect();
        let c: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
        let mut bld = Builder::new("dot_edge");
        let (pa, pb, pc, po) = (
            bld.param("a", Access::Read),
            bld.param("b", Access::Read),
            bld.param("c", Access::Read),
            bld.param("o", Access::Write),
        );
        let va = bld.load(pa, Idx::c(0), ac as i64, 1, ar, ac, Idx::c(ar as i64));
        let vb = bld.load(pb, Idx::c(0), bc as i64, 1, br, bc, Idx::c(br as i64));
        let vc = bld.load(pc, Idx::c(0), n as i64, 1, m, n, Idx::c(m as i64));
        let d = bld.dot(va, vb, ta, tb, Some(vc));
        bld.store(d, po, Idx::c(0), n as i64, 1, Idx::c(m as i64));
        let kernel = bld.finish();
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let s: f64 = (0..k)
                    .map(|p| {
                        let x = if ta { a[p * ac + i] } else { a[i * ac + p] };
                        let y = if tb { bm[j * bc + p] } else { bm[p * bc + j] };
                        x as f64 * y as f64
                    })
                    .sum();
                s + c[e] as f64
            })
            .collect();
        for dot in [DotPrecision::Tf32, DotPrecision::Bf16, DotPrecision::F16] {
            let sched =
                PtxSchedule { warps: 2, staging_bytes: mma::stage_bytes(m, n, 16), ..PtxSchedule::with_dot(dot) };
            let ptx = emit_scheduled(&kernel, Sm::Sm90, EmitOptions::default(), &sched).expect("emit");
            assert!(ptx.ptx.contains("mma.sync"), "{dot:?}: the dot runs on tensor cores");
            let mut mem = GlobalMemory::new();
            let bufs =
                [mem.alloc_f32(&a), mem.alloc_f32(&bm), mem.alloc_f32(&c), mem.alloc_f32(&vec![f32::NAN; m * n])];
            let mut params: Vec<SimParam> = bufs.iter().map(|&x| SimParam::U64(x)).collect();
            params.extend([SimParam::U64(1), SimParam::U64(1), SimParam::U64(1)]);
            let meta = &ptx.meta;
            launch(&ptx.ptx, &meta.entry, [1, 1, 1], meta.block, meta.dynamic_smem_bytes, &params, &mut mem)
                .unwrap_or_else(|e| panic!("{dot:?} ta={ta} tb={tb}: {e}"));
            let out = mem.read_f32(bufs[3], m * n).expect("o");
            let err = rel_rms(&out, &want);
            let tol = dot.tolerance();
            println!("dot {m}x{n}x{k} ta={ta} tb={tb} {}: rel RMS {err:.3e} (budget {tol:.0e})", dot.name());
            if err.is_nan() || err > tol {
                failures.push(format!("{dot:?} ta={ta} tb={tb}: {err:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs a one-CTA kernel (no grid: batch = heads = seq_len = 1) in the simulator on `inputs`,
/// its outputs NaN-poisoned first (lengths `outputs`, after the inputs in parameter order)
/// and a zeroed scratch buffer when its tiles are in global memory; returns the outputs.
fn run_one_cta(
    ptx: &chunkc_codegen::ptx::PtxKernel,
    inputs: &[&[f32]],
    outputs: &[usize],
) -> Result<Vec<Vec<f32>>, String> {
    let meta = &ptx.meta;
    let mut mem = GlobalMemory::new();
    let ins: Vec<u64> = inputs.iter().map(|x| mem.alloc_f32(x)).collect();
    let outs: Vec<u64> = outputs.iter().map(|&n| mem.alloc_f32(&vec![f32::NAN; n])).collect();
    let mut params: Vec<SimParam> = ins.iter().chain(&outs).map(|&x| SimParam::U64(x)).collect();
    if meta.tile_space == TileSpace::Global {
        params.push(SimParam::U64(mem.alloc_f32(&vec![0f32; meta.scratch_bytes_per_cta / 4 + 1])));
    }
    params.extend([SimParam::U64(1), SimParam::U64(1), SimParam::U64(1)]);
    launch(&ptx.ptx, &meta.entry, [1, 1, 1], meta.block, meta.dynamic_smem_bytes, &params, &mut mem)
        .map_err(|e| e.to_string())?;
    outs.iter().zip(outputs).map(|(&o, &n)| mem.read_f32(o, n).map_err(|e| e.to_string())).collect()
}

/// A bf16/f16 tensor's bytes (`ElemType::encode`) in the f32 containers the interpreter
/// takes: element e in the low half of slot e / 2 for even e (see `ir::ElemType`).
fn pack16(elem: chunkc_codegen::ir::ElemType, values: &[f32]) -> Vec<f32> {
    let mut bytes = elem.encode(values);
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// bf16 and f16 input tensors (q, k, v, gates, betas in the input dtype; per-head
/// parameters and the states h0, hT in f32): the interpreter and the emitted PTX (fma dots,
/// and bf16 tensor-core dots) match the f64 reference run on the exactly widened inputs, at
/// the f32 budget for the f32 paths (widening is exact) and 1e-2 for bf16 dots.
#[test]
fn sixteen_bit_inputs_match_the_reference() {
    use chunkc_codegen::interp;
    use chunkc_codegen::ptx::DotPrecision;
    let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let dims = Dims { batch: 2, seq_len: 37, heads: 2, k: 16, v: 16 };
    let scale = 1.0 / (dims.k as f64).sqrt();
    let shape = Shape { heads: dims.heads, k: dims.k, v: dims.v, scale };
    let mut failures = vec![];
    for name in ["simple_gla", "gated_delta_rule", "gla", "kda"] {
        let rule = chunkc_dsl::load_rule(&rules.join(format!("{name}.toml"))).expect("rule loads");
        let canon = chunkc_dsl::canon::canonicalize(&rule).expect("canonical form");
        for elem in [ElemType::Bf16, ElemType::F16] {
            // Round the per-token inputs to the type; the reference sees the rounded values.
            let mut values = inputs(&rule, &dims, 31);
            let mut containers = values.clone();
            for ((n, v), (_, c)) in values.iter_mut().zip(containers.iter_mut()) {
                if rule.inputs.iter().any(|i| &i.name == n && !i.per_head) {
                    *v = v.iter().map(|&x| elem.widen16(elem.narrow16(x))).collect();
                    *c = pack16(elem, v);
                }
            }
            let get = |n: &str| values.iter().find(|(k, _)| k == n).map(|(_, d)| d.iter().map(|&x| x as f64).collect());
            let h0: Vec<f64> = get("h0").expect("h0");
            let want = reference::run(&rule, dims, scale, &get, Some(&h0)).expect("reference");
            let rec = program::recurrent(&rule, shape, elem, None).expect("recurrent plan");
            let chunked = program::chunked(&rule, &canon, shape, Schedule::with_chunk(16).with_input(elem))
                .expect("chunked plan");
            let chunk = chunked.only_kernel().expect("one phase").clone();
            assert!(format!("{chunk}").contains(&format!("load.{}", elem.name())), "the printer shows the type");
            // The Cranelift backend does not read 16-bit tensors yet: a one-line error.
            let e = match chunkc_codegen::cpu::compile(&chunk) {
                Ok(_) => panic!("the cpu backend compiled a kernel with {} loads", elem.name()),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(elem.name()) && !e.contains('\n'), "{e}");
            // The interpreter, grid point by grid point, on the packed containers.
            let (n_o, n_ht) =
                (dims.batch * dims.seq_len * dims.heads * dims.v, dims.batch * dims.heads * dims.k * dims.v);
            let mut bufs: Vec<Vec<f32>> = chunk
                .params
                .iter()
                .map(|p| match p.name.as_str() {
                    "o" => vec![f32::NAN; n_o],
                    "hT" => vec![f32::NAN; n_ht],
                    n => containers.iter().find(|(k, _)| k == n).map(|(_, d)| d.clone()).expect("input"),
                })
                .collect();
            for b in 0..dims.batch as i64 {
                for h in 0..dims.heads as i64 {
                    let mut slices: Vec<&mut [f32]> = bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
                    interp::run(&chunk, &mut slices, b, h, dims.seq_len as i64).expect("interpreter");
                }
            }
            let at = |n: &str| chunk.params.iter().position(|p| p.name == n).expect("param");
            let mut results =
                vec![("interpreter chunked c16".to_string(), bufs[at("o")].clone(), bufs[at("hT")].clone(), 1e-5)];
            let kernels = [
                ("recurrent", &rec, PtxSchedule::default()),
                ("chunked c16", &chunked, PtxSchedule::default()),
                ("chunked c16 bf16 dots", &chunked, PtxSchedule::with_dot(DotPrecision::Bf16)),
            ];
            for (label, p, sched) in kernels {
                let ptx = emit_program(p, Sm::Sm80, EmitOptions::default(), &sched).expect("emit");
                let q = ptx.phases[0].meta.params.iter().find(|p| p.name == "q").expect("q");
                assert_eq!(q.elem, elem, "launch metadata records the element type");
                assert!(elem != ElemType::F16 || ptx.phases[0].ptx.contains("cvt.f32.f16"));
                assert!(ptx.phases[0].ptx.contains("ld.global.v4.u32"), "{label}: rows of 8 read 16 bytes at a time");
                // The launch ABI rounds the (already rounded, so unchanged) values itself.
                let (o, ht) = simulate(&ptx, &dims, &values);
                results.push((format!("ptx {label}"), o, ht, sched.dot.tolerance()));
            }
            for (label, o, ht, tol) in results {
                let (eo, eh) = (rel_rms(&o, &want.o), rel_rms(&ht, &want.ht));
                println!("{name} {} inputs, {label}: rel RMS o {eo:.3e}, hT {eh:.3e} (budget {tol:.0e})", elem.name());
                if eo.is_nan() || eh.is_nan() || eo > tol || eh > tol {
                    failures.push(format!("{name} {} {label}: o {eo:.3e}, hT {eh:.3e}", elem.name()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The column-serial ops (`SolveUnitLower`, `Cumsum`), unrolled with their columns in
/// registers up to `ptx::UNROLLED_ROWS` rows and a loop past it, give the bits of the same
/// sums in the same order: row counts across the solve's register windows (1, 16, 17, 40,
/// 64) and past the unrolled limit (65, 90), tiles in shared memory and in global scratch.
#[test]
fn column_serial_ops_give_the_loops_bits_unrolled_or_not() {
    use chunkc_codegen::builder::Builder;
    use chunkc_codegen::ir::{Access, DType, Idx};
    use chunkc_codegen::ptx::{emit_with, unrolled_rows};
    let m = 37usize;
    let mut rng = Rng(7);
    for n in [1usize, 16, 17, 40, 64, 65, 90] {
        let l: Vec<f32> = (0..n * n).map(|_| 0.3 * rng.normal() as f32).collect();
        let b: Vec<f32> = (0..n * m).map(|_| rng.normal() as f32).collect();
        let mut bld = Builder::new("column_serial");
        let (pl, pb, px, pc, pe) = (
            bld.param("l", Access::Read),
            bld.param("b", Access::Read),
            bld.param("x", Access::Write),
            bld.param("c", Access::Write),
            bld.param("e", Access::Write),
        );
        let vl = bld.load(pl, Idx::c(0), n as i64, 1, n, n, Idx::c(n as i64));
        let vb = bld.load(pb, Idx::c(0), m as i64, 1, n, m, Idx::c(n as i64));
        let x = bld.solve_unit_lower(vl, vb);
        bld.store(x, px, Idx::c(0), m as i64, 1, Idx::c(n as i64));
        let wide = bld.cast(vb, DType::F64);
        let c = bld.cumsum(wide, false);
        let c = bld.cast(c, DType::F32);
        bld.store(c, pc, Idx::c(0), m as i64, 1, Idx::c(n as i64));
        let e = bld.cumsum(vb, true);
        bld.store(e, pe, Idx::c(0), m as i64, 1, Idx::c(n as i64));
        let kernel = bld.finish();

        // The loops' order: x[i] = b[i], then x[i] = fma(-l[i][p], x[p], x[i]) for p < i.
        let mut want_x = b.clone();
        let (mut want_c, mut want_e) = (vec![0f32; n * m], vec![0f32; n * m]);
        for j in 0..m {
            for i in 0..n {
                for p in 0..i {
                    want_x[i * m + j] = (-l[i * n + p]).mul_add(want_x[p * m + j], want_x[i * m + j]);
                }
            }
            let (mut s64, mut s32) = (0f64, 0f32);
            for i in 0..n {
                s64 += b[i * m + j] as f64;
                want_c[i * m + j] = s64 as f32;
                want_e[i * m + j] = s32;
                s32 += b[i * m + j];
            }
        }
        for (place, limit) in [("shared", 1 << 20), ("global scratch", 0)] {
            let ptx = emit_with(&kernel, Sm::Sm90, EmitOptions { smem_limit: limit }).expect("emit");
            let got = run_one_cta(&ptx, &[&l, &b], &[n * m; 3]).unwrap_or_else(|e| panic!("n={n} {place}: {e}"));
            let wants = [("solve", &want_x), ("cumsum", &want_c), ("exclusive cumsum", &want_e)];
            for ((name, want), got) in wants.into_iter().zip(got) {
                let same = got.iter().zip(want.iter()).all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(
                    same,
                    "n={n} ({}) {place}: {name} differs from the loop's bits",
                    if unrolled_rows(n) { "unrolled" } else { "loop" }
                );
            }
        }
    }
}

/// Barriers only where an op touches what a pending op wrote or read: two loads, then two
/// cumsums (each reading one load), then three stores (the cumsums and the first load, which
/// keeps its region live, so the second cumsum cannot reuse it) need two barriers, not one
/// per op (seven), and the simulator's race checks (every shared-memory access between two
/// barriers) pass.
#[test]
fn independent_ops_share_one_barrier() {
    use chunkc_codegen::builder::Builder;
    use chunkc_codegen::ir::{Access, Idx};
    use chunkc_codegen::ptx::emit_with;
    let (n, m) = (20usize, 24usize);
    let mut rng = Rng(3);
    let a: Vec<f32> = (0..n * m).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..n * m).map(|_| rng.normal() as f32).collect();
    let mut bld = Builder::new("independent");
    let (pa, pb, px, py, pz) = (
        bld.param("a", Access::Read),
        bld.param("b", Access::Read),
        bld.param("x", Access::Write),
        bld.param("y", Access::Write),
        bld.param("z", Access::Write),
    );
    let va = bld.load(pa, Idx::c(0), m as i64, 1, n, m, Idx::c(n as i64));
    let vb = bld.load(pb, Idx::c(0), m as i64, 1, n, m, Idx::c(n as i64));
    let x = bld.cumsum(va, false);
    let y = bld.cumsum(vb, true);
    bld.store(x, px, Idx::c(0), m as i64, 1, Idx::c(n as i64));
    bld.store(y, py, Idx::c(0), m as i64, 1, Idx::c(n as i64));
    bld.store(va, pz, Idx::c(0), m as i64, 1, Idx::c(n as i64));
    let kernel = bld.finish();
    let ptx = emit_with(&kernel, Sm::Sm90, EmitOptions::default()).expect("emit");
    assert_eq!(ptx.ptx.matches("bar.sync").count(), 2, "{}", ptx.ptx);
    assert_eq!(ptx.meta.tile_space, TileSpace::Shared, "the race checks cover shared memory");
    let out = run_one_cta(&ptx, &[&a, &b], &[n * m; 3]).expect("runs");
    let (x, y) = (&out[0], &out[1]);
    assert_eq!(out[2], a, "the load, stored back");
    for j in 0..m {
        let (mut sa, mut sb) = (0f32, 0f32);
        for i in 0..n {
            sa += a[i * m + j];
            assert_eq!(x[i * m + j].to_bits(), sa.to_bits(), "x[{i}, {j}]");
            assert_eq!(y[i * m + j].to_bits(), sb.to_bits(), "y[{i}, {j}]");
            sb += b[i * m + j];
        }
    }
}

/// `RowSum` by groups of lanes (`row_sum_lanes`): every shape's sums match the exact sums
/// within f32 rounding, in f32 and f64, through each path: one lane per row (the rows fill
/// the block), a group whose share of the columns is unrolled, one that loops over its share,
/// and a whole warp on one row. The grouped forms shuffle, in the simulator's checks of every
/// membermask; a mutation that skips the shuffles leaves the rows' partial sums, far off.
#[test]
fn row_sums_by_groups_of_lanes_match_the_exact_sums() {
    use chunkc_codegen::builder::Builder;
    use chunkc_codegen::ir::{Access, DType, Idx};
    use chunkc_codegen::ptx::{emit_with, row_sum_lanes};
    // (rows, cols): 256 threads.
    for (n, m, lanes) in [(256, 3, 1), (32, 128, 8), (16, 512, 16), (1, 64, 32), (5, 40, 8), (64, 64, 4)] {
        assert_eq!(row_sum_lanes(n, m, 256), lanes, "{n} x {m}");
        for dtype in [DType::F32, DType::F64] {
            let mut rng = Rng(n as u64 * 7 + m as u64);
            let a: Vec<f32> = (0..n * m).map(|_| rng.normal() as f32).collect();
            let mut bld = Builder::new("row_sums");
            let (pa, po) = (bld.param("a", Access::Read), bld.param("o", Access::Write));
            let va = bld.load(pa, Idx::c(0), m as i64, 1, n, m, Idx::c(n as i64));
            let wide = if dtype == DType::F64 { bld.cast(va, DType::F64) } else { va };
            let sum = bld.row_sum(wide);
            let sum = if dtype == DType::F64 { bld.cast(sum, DType::F32) } else { sum };
            bld.store(sum, po, Idx::c(0), 1, 1, Idx::c(n as i64));
            let ptx = emit_with(&bld.finish(), Sm::Sm90, EmitOptions::default()).expect("emit");
            assert_eq!(ptx.ptx.contains("shfl.sync.bfly"), lanes > 1, "{n} x {m}");
            let out = run_one_cta(&ptx, &[&a], &[n]).unwrap_or_else(|e| panic!("{n} x {m} {dtype:?}: {e}"));
            for (i, &got) in out[0].iter().enumerate() {
                let row = &a[i * m..(i + 1) * m];
                let exact: f64 = row.iter().map(|&x| x as f64).sum();
                let scale: f64 = row.iter().map(|&x| (x as f64).abs()).sum();
                let bound = if dtype == DType::F64 { 1e-7 } else { m as f64 * 6e-8 } * scale;
                assert!((got as f64 - exact).abs() <= bound, "{n} x {m} {dtype:?} row {i}: {got} vs {exact}");
            }
        }
    }
}
