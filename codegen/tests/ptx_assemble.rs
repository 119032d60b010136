//! Rung 4 of the verification ladder: every kernel of every rule in rules/ assembles with
//! ptxas for sm_80 and sm_90, and ptxas's resource report is read back. Nothing here runs
//! the PTX (that is the simulator's and the GPU's rung).
//!
//! It fails on any ptxas error and on any spill (none today: the lowering keeps a few values
//! per thread in registers).
//!
//! ptxas comes from `scripts/install_ptxas.sh` (or `$CHUNKC_PTXAS`, or PATH). Without it
//! the assembly test prints one "skipped" line and passes, except when the environment
//! variable CI is set: then it fails with the one-line message.
//!
//! Also unit tests of the emitter's text for tiny hand-built kernels (structure only).

use chunkc_codegen::builder::Builder;
use chunkc_codegen::ir::*;
use chunkc_codegen::plan::{chunked, recurrent, Schedule, Shape};
use chunkc_codegen::ptx::{
    self, assemble, emit, emit_scheduled, emit_with, find_ptxas, DotPrecision, EmitOptions, ParamKind, PtxKernel,
    PtxSchedule, Sm, TileSpace, BLOCK_THREADS, PTXAS_MISSING,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

const TARGETS: [Sm; 2] = [Sm::Sm80, Sm::Sm90];

/// The rule files in rules/, sorted.
fn rule_paths() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("rules/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no rules in {}", dir.display());
    paths
}

/// True when ptxas is installed; otherwise prints one "skipped" line, or fails when CI is set.
fn have_ptxas() -> bool {
    if find_ptxas().is_some() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{PTXAS_MISSING}");
    println!("skipped: {PTXAS_MISSING}");
    false
}

/// Every (label, kernel) the rule library yields: the recurrent kernel and the chunked one
/// for chunk 16 and 64, at K = V = 64 (and 128 for the chunk-64 kernel), H = 2.
fn library_kernels() -> Vec<(String, Kernel)> {
    let mut out = vec![];
    for path in rule_paths() {
        let rule = chunkc_dsl::load_rule(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let canon = chunkc_dsl::canon::canonicalize(&rule);
        for kv in [64usize, 128] {
            let shape = Shape { heads: 2, k: kv, v: kv, scale: 1.0 / (kv as f64).sqrt() };
            if kv == 64 {
                let k = recurrent::build(&rule, shape, ElemType::F32, None)
                    .unwrap_or_else(|e| panic!("{}: recurrent: {e}", rule.name));
                out.push((format!("{} recurrent K=V={kv}", rule.name), k));
            }
            let Ok(canon) = &canon else { continue };
            let chunks: &[usize] = if kv == 64 { &[16, 64] } else { &[64] };
            for &c in chunks {
                // `check` promises a chunked kernel for every canonical rule: a refusal fails.
                let k = chunked::build(&rule, canon, shape, Schedule::with_chunk(c))
                    .unwrap_or_else(|e| panic!("{}: chunked c{c} refused: {e}", rule.name));
                out.push((format!("{} chunked c{c} K=V={kv}", rule.name), k));
            }
        }
    }
    out
}

/// Every library kernel under every default schedule (f32 fma, tf32, bf16) for both targets:
/// no ptxas error, no spill; a chunked kernel under a tensor-core schedule must contain mma.
#[test]
fn every_rule_assembles_for_sm80_and_sm90() {
    if !have_ptxas() {
        return;
    }
    let kernels = library_kernels();
    let schedules = PtxSchedule::defaults();
    let jobs: Vec<(&str, &Kernel, Sm, PtxSchedule)> = kernels
        .iter()
        .flat_map(|(l, k)| schedules.iter().flat_map(move |s| TARGETS.map(|t| (l.as_str(), k, t, *s))))
        .collect();
    let version = assemble_all(&jobs);
    println!("ptxas: {version}; {} kernels x {} schedules x {} targets", kernels.len(), schedules.len(), TARGETS.len());
}

/// The double-buffered schedules (`stages = 2`, opt-in shared memory) with tf32 and bf16
/// dots, for both targets, on the kernels where they matter: the chunked ones (the recurrent
/// kernels' loads are single rows), at K = V = 64 (c16, c64) and 128 (c64), whose workspaces
/// exceed 48 KiB. No ptxas error, no spill, tensor cores used, shared memory within the
/// target's limit; the table shows which kernels got two stages (the others' doubled
/// workspace is over the limit). Half as many ptxas runs as the default-schedule test.
#[test]
fn pipelined_schedules_assemble_for_sm80_and_sm90() {
    if !have_ptxas() {
        return;
    }
    let kernels: Vec<(String, Kernel)> = library_kernels().into_iter().filter(|(l, _)| l.contains("chunked")).collect();
    let schedules = [DotPrecision::Tf32, DotPrecision::Bf16].map(PtxSchedule::pipelined);
    let jobs: Vec<(&str, &Kernel, Sm, PtxSchedule)> = kernels
        .iter()
        .flat_map(|(l, k)| schedules.iter().flat_map(move |s| TARGETS.map(|t| (l.as_str(), k, t, *s))))
        .collect();
    let version = assemble_all(&jobs);
    println!("ptxas: {version}; {} kernels x {} schedules x {} targets", kernels.len(), schedules.len(), TARGETS.len());
}

/// The split programs' phases (the delta rules' UT factors, the state pass and the
/// chunk-parallel output pass) of every rule at c64, K = V = 64: the plain schedule for sm_80 and bf16 dots for sm_90 (one each,
/// to keep the ptxas time small). No ptxas error, no spill.
#[test]
fn split_program_phases_assemble() {
    if !have_ptxas() {
        return;
    }
    let mut kernels = vec![];
    for path in rule_paths() {
        let rule = chunkc_dsl::load_rule(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let Ok(canon) = chunkc_dsl::canon::canonicalize(&rule) else { continue };
        let shape = Shape { heads: 2, k: 64, v: 64, scale: 0.125 };
        let sched = Schedule::with_chunk(64).with_program(chunkc_codegen::plan::ProgramShape::Split);
        let p = chunkc_codegen::plan::program::chunked(&rule, &canon, shape, sched)
            .unwrap_or_else(|e| panic!("{}: split c64 refused: {e}", rule.name));
        assert_eq!(p.kernels.len(), chunkc_codegen::plan::chunked::split_phases(&canon).len());
        kernels.extend(p.kernels.into_iter().map(|k| (format!("{} chunked split c64 K=V=64", k.name), k)));
    }
    let jobs: Vec<(&str, &Kernel, Sm, PtxSchedule)> = kernels
        .iter()
        .flat_map(|(l, k)| {
            [(Sm::Sm80, PtxSchedule::default()), (Sm::Sm90, PtxSchedule::with_dot(DotPrecision::Bf16))]
                .map(|(t, s)| (l.as_str(), k, t, s))
        })
        .collect();
    let version = assemble_all(&jobs);
    println!("ptxas: {version}; {} split-program phases x 2 (target, schedule)", kernels.len());
}

/// The backward programs' phases of every rule (the recurrent one at checkpoint 4, the
/// chunked one at chunk 32, and for three rules also in V-tiles of 16, fused and split), K = V
/// = 32, for sm_90 (f32): no ptxas error, no spill.
#[test]
fn backward_program_phases_assemble() {
    if !have_ptxas() {
        return;
    }
    let mut kernels = vec![];
    for path in rule_paths() {
        let rule = chunkc_dsl::load_rule(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let shape = Shape { heads: 2, k: 32, v: 32, scale: 0.125 };
        let p = chunkc_codegen::plan::backward::recurrent(&rule, shape, ElemType::F32, 4)
            .unwrap_or_else(|e| panic!("{}: backward refused: {e}", rule.name));
        assert_eq!(p.kernels.len(), 2);
        kernels.extend(p.kernels.into_iter().map(|k| (format!("{} K=V=32", k.name), k)));
        let Ok(canon) = chunkc_dsl::canon::canonicalize(&rule) else { continue };
        let p = chunkc_codegen::plan::backward::chunked(&rule, &canon, shape, Schedule::with_chunk(32), 1)
            .unwrap_or_else(|e| panic!("{}: chunked backward refused: {e}", rule.name));
        kernels.extend(p.kernels.into_iter().map(|k| (format!("{} K=V=32", k.name), k)));
        if ["gated_delta_rule", "kda", "mlstm"].contains(&rule.name.as_str()) {
            // Split into V-tiles of 16 columns (the shared gradients written per tile).
            let sched = Schedule::with_chunk(32).with_bv(Some(16));
            let p = chunkc_codegen::plan::backward::chunked(&rule, &canon, shape, sched, 1)
                .unwrap_or_else(|e| panic!("{}: chunked backward with V-tiles refused: {e}", rule.name));
            assert!(p.kernels.iter().all(|k| k.vtiles == 2), "{}", rule.name);
            kernels.extend(p.kernels.into_iter().map(|k| (format!("{} K=V=32", k.name), k)));
            // The split backward (FLA's decomposition): its two backward phases.
            let sched = sched.with_program(chunkc_codegen::plan::ProgramShape::Split);
            let p = chunkc_codegen::plan::backward::chunked(&rule, &canon, shape, sched, 1)
                .unwrap_or_else(|e| panic!("{}: split backward refused: {e}", rule.name));
            let backward = p.kernels.into_iter().filter(|k| k.name.contains("_grad_"));
            kernels.extend(backward.map(|k| (format!("{} K=V=32", k.name), k)));
        }
    }
    // Every phase in f32; the chunked backward's also with tf32 and bf16 dots, none spilling
    // (bf16 did, 4-28 bytes at 40-56 registers, until the kernels carried `.maxnreg`).
    let mut jobs: Vec<(&str, &Kernel, Sm, PtxSchedule)> =
        kernels.iter().map(|(l, k)| (l.as_str(), k, Sm::Sm90, PtxSchedule::default())).collect();
    let chunked: Vec<&(String, Kernel)> = kernels.iter().filter(|(_, k)| k.name.contains("_chunked_")).collect();
    for (label, kernel) in &chunked {
        for dot in [DotPrecision::Tf32, DotPrecision::Bf16] {
            jobs.push((label.as_str(), kernel, Sm::Sm90, PtxSchedule::with_dot(dot)));
        }
    }
    let version = assemble_all(&jobs);
    println!("ptxas: {version}; {} backward phases", kernels.len());
}

/// Kernels ptxas assembles with a small spill, each `label dot target`. Empty since the
/// kernels carry `.maxnreg` (`PtxSchedule::max_registers`): left to its own register target,
/// ptxas spilled rank-2 DeltaProduct's and the mLSTM's c64 tf32 forwards on sm_80 at 80
/// registers (it now takes 255 and 196), and the unrolled solves at 48-128. A listed kernel
/// that stops spilling fails the test, so the list only shrinks.
const KNOWN_SPILLS: &[&str] = &[];

/// Emits and assembles every job on all cores (ptxas is single-threaded), prints one line per
/// job in order, and panics listing every failure; returns ptxas's version.
fn assemble_all(jobs: &[(&str, &Kernel, Sm, PtxSchedule)]) -> String {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<String, String>>>> = Mutex::new(vec![None; jobs.len()]);
    let version = Mutex::new(String::new());
    let workers = std::thread::available_parallelism().map_or(4, |n| n.get()).min(16);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(label, kernel, target, sched)) = jobs.get(n) else { break };
                let dot = sched.dot.name();
                let line = match emit_scheduled(kernel, target, EmitOptions::default(), &sched) {
                    Err(e) => Err(format!("{label} {dot} {target}: emit: {e}")),
                    Ok(PtxKernel { ptx, meta }) => match dump(&ptx, &meta).and_then(|()| assemble(&ptx, target)) {
                        Err(e) => Err(format!("{label} {dot} {target}: {e}")),
                        Ok(r) if r.spill_stores + r.spill_loads > 0 => {
                            let key = format!("{label} {dot} {target}");
                            if KNOWN_SPILLS.iter().any(|k| key.split_whitespace().eq(k.split_whitespace())) {
                                Ok(format!("{label:<40} {dot:<4} {r} (a known spill, see KNOWN_SPILLS)"))
                            } else {
                                Err(format!("{key}: spills: {r}"))
                            }
                        }
                        Ok(r)
                            if KNOWN_SPILLS.iter().any(|k| {
                                format!("{label} {dot} {target}").split_whitespace().eq(k.split_whitespace())
                            }) =>
                        {
                            Err(format!("{label} {dot} {target}: listed in KNOWN_SPILLS but no longer spills ({r})"))
                        }
                        Ok(_) if label.contains("chunked") && sched.dot.tensor_cores() && !ptx.contains("mma.sync") => {
                            Err(format!("{label} {dot} {target}: no dot ran on tensor cores"))
                        }
                        Ok(_)
                            if meta.tile_space == TileSpace::Shared
                                && meta.dynamic_smem_bytes + meta.static_smem_bytes
                                    > ptx::smem_limit(&sched, target, EmitOptions::default().smem_limit) =>
                        {
                            Err(format!("{label} {dot} {target}: shared memory over the schedule's limit"))
                        }
                        Ok(r) => {
                            version.lock().unwrap().clone_from(&r.version);
                            let place = match meta.tile_space {
                                TileSpace::Shared => format!("smem {} B", meta.dynamic_smem_bytes),
                                TileSpace::Global => format!("scratch {} B/CTA", meta.scratch_bytes_per_cta),
                            };
                            let stage = meta.static_smem_bytes;
                            // The stages the kernel got: a double-buffered workspace over the
                            // limit falls back to one stage.
                            let st = if ptx.contains("cp.async.wait_group 1") { 2 } else { 1 };
                            Ok(format!("{label:<40} {dot:<4} stages {st} {r} | tiles: {place}, staging {stage} B"))
                        }
                    },
                };
                results.lock().unwrap()[n] = Some(line);
            });
        }
    });
    let mut failures = vec![];
    for r in results.into_inner().unwrap() {
        match r.expect("every job ran") {
            Ok(line) => println!("{line}"),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "ptxas rejected:\n{}", failures.join("\n"));
    version.into_inner().unwrap()
}

/// With `CHUNKC_PTX_DUMP=DIR`, writes each kernel's PTX and launch metadata there.
fn dump(ptx: &str, meta: &ptx::LaunchMeta) -> Result<(), ptx::PtxError> {
    let Some(dir) = std::env::var_os("CHUNKC_PTX_DUMP") else { return Ok(()) };
    let stem = PathBuf::from(dir).join(format!("{}.{}", meta.entry, meta.target));
    let json = serde_json::to_string_pretty(meta).map_err(|e| ptx::PtxError(e.to_string()))?;
    std::fs::write(stem.with_extension(format!("{}.ptx", meta.target)), ptx)
        .and_then(|()| std::fs::write(stem.with_extension(format!("{}.json", meta.target)), json))
        .map_err(|e| ptx::PtxError(format!("CHUNKC_PTX_DUMP: {e}")))
}

/// Global scratch placement assembles too (the library kernels mostly fit one or the other).
#[test]
fn both_tile_placements_assemble() {
    if find_ptxas().is_none() {
        println!("skipped: {PTXAS_MISSING}");
        return;
    }
    let k = tiny_kernel();
    for limit in [0, usize::MAX] {
        let out = emit_with(&k, Sm::Sm90, EmitOptions { smem_limit: limit }).expect("emit");
        let r = assemble(&out.ptx, Sm::Sm90).unwrap_or_else(|e| panic!("smem_limit {limit}: {e}"));
        println!("tiny kernel, smem_limit {limit}: {r}");
    }
}

/// A small kernel touching every op: load, masks, casts, unary/binary with broadcasting,
/// cumsum, row sum, dot (transposed), gated dot, solve, index value, a loop with carry, store.
fn tiny_kernel() -> Kernel {
    let mut b = Builder::new("tiny.kernel");
    let x = b.param("x", Access::Read);
    let o = b.param("o", Access::Write);
    let t = Idx::var(IdxVar::SeqLen);
    let base = Idx::var(IdxVar::Batch).mul(Idx::c(2)).add(Idx::var(IdxVar::Head)).mul(Idx::c(64));
    let s0 = b.load(x, base.clone(), 8, 1, 8, 8, t.clone().min(Idx::c(8)));
    let it = b.begin_loop(t.clone().ceil_div(4), &[s0]);
    let s = it[0];
    let tr = b.mask(s, MaskKind::Tril { strict: true }, f64::NEG_INFINITY);
    let e = b.exp(tr);
    let g = b.cast(s, DType::F64);
    let cs = b.cumsum(g, true);
    let sg = b.unary(UnOp::Sigmoid, cs);
    let rs = b.row_sum(sg);
    let mx = b.binary(BinOp::Max, sg, rs);
    let back = b.cast(mx, DType::F32);
    let iv = b.idx_value(Idx::var(IdxVar::Iter));
    let sc = b.mul(back, iv);
    let d = b.dot(e, sc, true, false, Some(s));
    let gd = b.gated_dot(d, g, sc, cs, false);
    let sol = b.solve_unit_lower(gd, d);
    let rows = b.rows(sol, 4, 4);
    let tp = b.transpose(sol);
    let m = b.mask(tp, MaskKind::RowsBefore(t.clone()), 0.0);
    b.store(rows, o, base.clone(), 8, 1, Idx::c(4));
    let last = b.end_loop(&[m]);
    b.store(last[0], o, base.add(Idx::c(32)), 1, 8, t.min(Idx::c(8)));
    b.finish()
}

fn emitted(target: Sm) -> PtxKernel {
    emit(&tiny_kernel(), target).expect("emit the tiny kernel")
}

#[test]
fn header_declares_isa_target_and_address_size() {
    for (target, version) in [(Sm::Sm80, ".version 7.8"), (Sm::Sm90, ".version 8.0")] {
        let ptx = emitted(target).ptx;
        let lines: Vec<&str> = ptx.lines().filter(|l| !l.starts_with("//") && !l.trim().is_empty()).collect();
        assert_eq!(lines[0], version);
        assert_eq!(lines[1], format!(".target {}", target.name()));
        assert_eq!(lines[2], ".address_size 64");
        assert!(ptx.contains(".visible .entry tiny_kernel("), "entry name is sanitised");
        assert!(ptx.contains(&format!(".maxntid {BLOCK_THREADS}, 1, 1")));
    }
}

#[test]
fn uses_the_documented_instructions() {
    let ptx = emitted(Sm::Sm80).ptx;
    for needle in [
        "ex2.approx.ftz.f32",
        "fma.rn.f32",
        "bar.sync 0",
        "%ctaid.x",
        "%tid.x",
        "max.f64",
        "add.rn.f64",
        "cvt.rn.f32.f64",
        "cvt.f64.f32",
        "cvt.rn.f32.s64",
        "ld.global.f32",
        "st.global.f32",
        "div.s64",
        "0fFF800000", // the -inf fill
    ] {
        assert!(ptx.contains(needle), "missing {needle}");
    }
    assert!(!ptx.contains("mma."), "no tensor cores in this rung");
    // Every `{` opened by the entry is closed; the body ends with ret.
    assert_eq!(ptx.matches('{').count(), ptx.matches('}').count());
    assert!(ptx.trim_end().ends_with("ret;\n}") || ptx.trim_end().ends_with('}'));
}

#[test]
fn every_label_is_defined_once_and_every_branch_hits_one() {
    let ptx = emitted(Sm::Sm90).ptx;
    let defined: Vec<&str> = ptx.lines().filter_map(|l| l.strip_suffix(':')).collect();
    let mut sorted = defined.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), defined.len(), "duplicate labels");
    for l in ptx.lines() {
        if let Some(at) = l.find("bra") {
            let target = l[at..].split_whitespace().nth(1).expect("branch target").trim_end_matches(';');
            assert!(defined.contains(&target), "branch to undefined {target}");
        }
    }
}

#[test]
fn registers_are_declared_before_use() {
    let ptx = emitted(Sm::Sm80).ptx;
    for (prefix, decl) in [("%rd", ".b64"), ("%fd", ".f64"), ("%f", ".f32"), ("%p", ".pred"), ("%r", ".b32")] {
        let needle = format!(".reg {decl} {prefix}<");
        let at = ptx.find(&needle).unwrap_or_else(|| panic!("no {needle}"));
        let n: usize = ptx[at + needle.len()..].split('>').next().expect(">").parse().expect("count");
        // The highest register of this class used in the body is below the declared count.
        let body = &ptx[at..];
        let mut max = 0;
        for (i, _) in body.match_indices(prefix) {
            let digits: String = body[i + prefix.len()..].chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(k) = digits.parse::<usize>() {
                max = max.max(k + 1);
            }
        }
        assert!(max <= n, "{prefix}: uses {max}, declares {n}");
    }
}

#[test]
fn at_most_one_barrier_per_op_and_none_for_views_or_fused_values() {
    let k = tiny_kernel();
    let ptx = emit(&k, Sm::Sm80).unwrap().ptx;
    // What the mid-end fused for this target emits nothing: its consumer computes it.
    let prepared = chunkc_codegen::midend::prepare(&k, &chunkc_codegen::midend::Abilities::simt()).expect("prepare");
    let fused = &prepared.fusion.fused;
    assert!(fused.iter().any(|f| *f), "the tiny kernel has chains to fuse");
    // Non-view, non-fused Lets and Stores (inside and outside the loop), plus loop copies: 1
    // carried init and 1 yield copy (none when the update is written in place).
    fn count(stmts: &[Stmt], fused: &[bool]) -> usize {
        stmts
            .iter()
            .map(|s| match s {
                Stmt::Let { id, op } => usize::from(!op.is_view() && !fused[id.0 as usize]),
                Stmt::Store { .. } => 1,
                Stmt::Loop { body, carried, .. } => count(body, fused) + 2 * carried.len(),
            })
            .sum()
    }
    // One barrier per op was the bound before barriers followed the hazards; the kernel's
    // consecutive ops read one another, so most remain, but not all.
    let in_place = prepared.in_place.iter().flatten().count();
    let (barriers, ops) = (ptx.matches("bar.sync 0").count(), count(&prepared.kernel.body, fused) - in_place);
    assert!(barriers >= 1 && barriers < ops, "{barriers} barriers for {ops} ops");
}

#[test]
fn launch_meta_describes_the_entry() {
    let k = tiny_kernel();
    let shared = emit(&k, Sm::Sm80).unwrap().meta;
    assert_eq!(shared.entry, "tiny_kernel");
    assert_eq!(shared.block, [BLOCK_THREADS, 1, 1]);
    assert_eq!(shared.tile_space, TileSpace::Shared);
    assert!(shared.dynamic_smem_bytes > 0 && shared.scratch_bytes_per_cta == 0);
    let names: Vec<&str> = shared.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["x", "o", "batch", "heads", "seq_len"]);
    assert_eq!(shared.scalars, ["batch", "heads", "seq_len"]);
    assert_eq!(shared.grid.dims(3, 2, 100), Some([6, 1, 1]));

    let global = emit_with(&k, Sm::Sm90, EmitOptions { smem_limit: 0 }).unwrap();
    assert_eq!(global.meta.tile_space, TileSpace::Global);
    assert_eq!(global.meta.dynamic_smem_bytes, 0);
    assert_eq!(global.meta.scratch_bytes_per_cta, shared.dynamic_smem_bytes);
    let kinds: Vec<ParamKind> = global.meta.params.iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        [
            ParamKind::Tensor,
            ParamKind::Tensor,
            ParamKind::Scratch,
            ParamKind::Scalar,
            ParamKind::Scalar,
            ParamKind::Scalar
        ]
    );
    assert!(!global.ptx.contains(".shared"), "global placement declares no shared memory");
    assert!(global.ptx.contains(".param .u64 tiny_kernel_param_5"));

    // The metadata round-trips through JSON.
    let json = serde_json::to_string(&global.meta).unwrap();
    assert!(json.contains("\"target\":\"sm_90\""), "{json}");
    assert!(json.contains("\"grid\":\"batch_heads_x\""), "{json}");
    let back: ptx::LaunchMeta = serde_json::from_str(&json).unwrap();
    assert_eq!(back, global.meta);
}

#[test]
fn malformed_kernels_are_errors_not_panics() {
    let mut k = tiny_kernel();
    k.body.insert(0, Stmt::Let { id: ValueId(9999), op: Op::Const { value: 0.0, ty: TileTy::f32(1, 1) } });
    let e = emit(&k, Sm::Sm80).expect_err("undeclared value");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn missing_ptxas_is_one_clear_line() {
    // Only checks the message when ptxas is absent; `find_ptxas` decides.
    if find_ptxas().is_some() {
        return;
    }
    let e = assemble(".version 7.8\n", Sm::Sm80).expect_err("no ptxas");
    assert_eq!(e.to_string(), PTXAS_MISSING);
    assert_eq!(PTXAS_MISSING, "ptxas not found: run scripts/install_ptxas.sh or set CHUNKC_PTXAS");
}

#[test]
fn ptxas_errors_are_one_line() {
    if find_ptxas().is_none() {
        println!("skipped: {PTXAS_MISSING}");
        return;
    }
    let e = assemble(".version 7.8\n.target sm_80\n.address_size 64\nnot ptx;\n", Sm::Sm80).expect_err("bad PTX");
    let msg = e.to_string();
    assert!(msg.starts_with("ptxas -arch=sm_80 failed:") && !msg.contains('\n'), "{msg}");
}

/// A chunked kernel under the tensor-core schedules: the instructions of each path are
/// there, the launch metadata records the schedule, block size and staging, and the kernel
/// assembles without spills (when ptxas is installed).
#[test]
fn tensor_core_schedules_emit_their_instructions() {
    let rule = chunkc_dsl::load_rule(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules/gated_delta_rule.toml"))
        .expect("rule");
    let canon = chunkc_dsl::canon::canonicalize(&rule).expect("canonical");
    let shape = Shape { heads: 2, k: 32, v: 32, scale: 32f64.sqrt().recip() };
    // K = V = 32, chunk 16: the tiles fit in shared memory next to the staging, so loads use
    // cp.async.
    let kernel = chunked::build(&rule, &canon, shape, Schedule::with_chunk(16)).expect("plan");
    for (dot, needles) in [
        (DotPrecision::Tf32, &["mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "cvt.rna.tf32.f32"][..]),
        (
            DotPrecision::Bf16,
            &[
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                "cvt.rn.bf16x2.f32",
            ],
        ),
        (DotPrecision::F16, &["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "cvt.rn.f16x2.f32"]),
    ] {
        let sched = PtxSchedule { warps: 4, ..PtxSchedule::with_dot(dot) };
        let out = emit_scheduled(&kernel, Sm::Sm80, EmitOptions::default(), &sched).expect("emit");
        assert_eq!(out.meta.tile_space, TileSpace::Shared, "{dot:?}");
        for n in needles.iter().chain(&[
            "cp.async.ca.shared.global",
            "cp.async.cg.shared.global",
            "cp.async.commit_group",
            "cp.async.wait_group 0",
        ]) {
            assert!(out.ptx.contains(n), "{dot:?}: missing {n}");
        }
        assert!(out.ptx.contains(".maxntid 128, 1, 1"), "{dot:?}: 4 warps");
        assert_eq!(out.meta.block, [128, 1, 1]);
        assert_eq!(out.meta.schedule, sched);
        // q, k, v rows are 16-byte chunks: those tensors must be 16-byte aligned; h0 too.
        let align = |n: &str| out.meta.params.iter().find(|p| p.name == n).map(|p| p.align);
        assert_eq!(align("q"), Some(16), "{dot:?}");
        assert_eq!(align("o"), Some(4), "{dot:?}: stores assume the element size");
        let half = matches!(dot, DotPrecision::Bf16 | DotPrecision::F16);
        assert_eq!(out.meta.static_smem_bytes > 0, half, "{dot:?}: staging only for 16-bit operands");
        assert!(out.meta.static_smem_bytes <= sched.staging_bytes);
        if find_ptxas().is_some() {
            let r = assemble(&out.ptx, Sm::Sm80).unwrap_or_else(|e| panic!("{dot:?}: {e}"));
            assert_eq!(r.spill_stores + r.spill_loads, 0, "{dot:?}: {r}");
            assert_eq!(r.shared_bytes as usize, out.meta.static_smem_bytes, "{dot:?}: ptxas sees the staging");
            println!("gated_delta_rule c16 K=V=32 {}: {r}", dot.name());
        }
    }
    // The default schedule is the fma lowering: no tensor cores, no staging, no cp.async.
    let plain = emit(&kernel, Sm::Sm80).expect("emit");
    assert!(!plain.ptx.contains("mma.") && !plain.ptx.contains("cp.async"));
    assert_eq!(plain.meta.static_smem_bytes, 0);
    assert_eq!(plain.meta.schedule, PtxSchedule::default());
    // An invalid schedule is a one-line error.
    let bad = PtxSchedule { warps: 0, ..PtxSchedule::default() };
    let e = emit_scheduled(&kernel, Sm::Sm80, EmitOptions::default(), &bad).expect_err("invalid");
    assert!(!e.to_string().contains('\n'), "{e}");
}
