//! The `chunkc` command as a user meets it: every error is one clear message with a non-zero
//! exit, rule errors point at file:line:col, and nothing panics.

use chunkc::runtime::io::write_safetensors;
use chunkc::runtime::tensor::Tensor;
use chunkc::verify::{rel_rms, F32_TOLERANCE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{chunkc, root};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    common::tmp("cli", name)
}

/// simple_gla inputs: q, k [1, 5, 2, 4], v [1, 5, 2, 3], g [1, 5, 2].
fn simple_gla_inputs() -> BTreeMap<String, Tensor> {
    common::simple_gla_inputs(5)
}

fn write(name: &str, t: &BTreeMap<String, Tensor>) -> PathBuf {
    let p = tmp(name);
    write_safetensors(&p, t, None).expect("write inputs");
    p
}

fn run_simple_gla(inputs: &Path, extra: &[&str]) -> Output {
    let out = tmp("out.safetensors");
    let mut args =
        vec!["run", "rules/simple_gla.toml", "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    chunkc(&args)
}

#[test]
fn run_writes_outputs_for_every_backend() {
    let p = write("ok.safetensors", &simple_gla_inputs());
    for backend in ["reference", "recurrent", "chunked"] {
        let o = run_simple_gla(&p, &["--backend", backend, "--chunk", "2"]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        assert!(stdout(&o).contains("wrote o and hT"), "{}", stdout(&o));
    }
}

/// A tensor the rule does not take (FLA's `initial_state` for `h0`) is an error naming the
/// ones it does, rather than a run from a zero state; `--allow-extra` lets it through.
#[test]
fn an_unknown_tensor_is_refused_unless_allowed() {
    let mut t = simple_gla_inputs();
    t.insert("initial_state".into(), Tensor { shape: vec![1, 2, 4, 3], data: vec![0.5; 24] });
    let p = write("extra.safetensors", &t);
    let o = run_simple_gla(&p, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("tensor `initial_state` in")
            && e.contains("it takes: q, k, v, g, h0, cu_seqlens; --allow-extra ignores the others"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    let o = run_simple_gla(&p, &["--allow-extra"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn missing_tensor_is_named_with_what_the_file_has() {
    let mut t = simple_gla_inputs();
    t.remove("g");
    let p = write("missing.safetensors", &t);
    let o = run_simple_gla(&p, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), format!("error: tensor `g` is missing from {} (it has: k, q, v)\n", p.display()));
}

#[test]
fn wrong_shape_names_tensor_expected_and_actual() {
    let mut t = simple_gla_inputs();
    t.insert("v".into(), Tensor { shape: vec![1, 6, 2, 3], data: vec![0.0; 36] });
    let p = write("shape.safetensors", &t);
    let o = run_simple_gla(&p, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "error: tensor `v`: expected shape [1, 5, 2, 3] ([B, T, H, V]), got [1, 6, 2, 3]\n");

    let mut t = simple_gla_inputs();
    t.insert("h0".into(), Tensor { shape: vec![1, 2, 4, 4], data: vec![0.0; 32] });
    let p = write("h0.safetensors", &t);
    let o = run_simple_gla(&p, &[]);
    assert_eq!(stderr(&o), "error: tensor `h0`: expected shape [1, 2, 4, 3] ([B, H, K, V]), got [1, 2, 4, 4]\n");

    let mut t = simple_gla_inputs();
    t.insert("q".into(), Tensor { shape: vec![5, 8], data: vec![0.0; 40] });
    let p = write("rank.safetensors", &t);
    let o = run_simple_gla(&p, &[]);
    assert_eq!(stderr(&o), "error: tensor `q`: expected 4 dimensions [B, T, H, K], got shape [5, 8]\n");
}

#[test]
fn unreadable_and_garbage_files_are_one_line() {
    let o = run_simple_gla(Path::new("/nonexistent/in.safetensors"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "error: cannot read /nonexistent/in.safetensors: No such file or directory (os error 2)\n");

    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"not a tensor file at all").expect("write");
    let o = run_simple_gla(&p, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!("error: {} is not a safetensors file: ", p.display())) && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn nan_inputs_warn_but_run() {
    let mut t = simple_gla_inputs();
    t.get_mut("k").unwrap().data[3] = f32::NAN;
    let p = write("nan.safetensors", &t);
    let o = run_simple_gla(&p, &["--backend", "recurrent"]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), format!("warning: tensor `k` in {} holds 1 NaN or infinite values\n", p.display()));
}

#[test]
fn zero_chunk_is_refused() {
    let p = write("ok2.safetensors", &simple_gla_inputs());
    let o = run_simple_gla(&p, &["--chunk", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "error: --chunk must be at least 1\n");
}

const NONLINEAR: &str = r#"name = "normalised"
step = """
S = sigmoid(S + outer(k, v))
o = S^T @ q
"""

[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
"#;

#[test]
fn nonlinear_rule_runs_recurrent_and_explains_why_not_chunked() {
    let rule = tmp("normalised.toml");
    std::fs::write(&rule, NONLINEAR).expect("write rule");
    let o = chunkc(&["check", rule.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("class: not chunkable: sigmoid(...) of a value that depends on the state is not linear"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("kernels: recurrent only"));

    let mut t = BTreeMap::new();
    t.insert("q".to_string(), Tensor { shape: vec![1, 3, 1, 2], data: vec![0.1; 6] });
    t.insert("k".to_string(), Tensor { shape: vec![1, 3, 1, 2], data: vec![0.2; 6] });
    t.insert("v".to_string(), Tensor { shape: vec![1, 3, 1, 2], data: vec![0.3; 6] });
    let p = write("nl.safetensors", &t);
    let out = tmp("nl-out.safetensors");
    let run = |backend: &str| {
        chunkc(&[
            "run",
            rule.to_str().unwrap(),
            "--inputs",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--backend",
            backend,
        ])
    };
    assert!(run("recurrent").status.success());
    let o = run("chunked");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with(&format!("{}:3:5: error: this rule cannot be chunked: sigmoid(...)", rule.display())), "{e}");
    assert!(e.contains('^'), "{e}");

    let o = chunkc(&["verify", rule.to_str().unwrap(), "--T", "5,40"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("verifying the recurrent kernel only"));

    // Asking for the chunked kernel by name verifies nothing: an error, not "0 passed".
    let o = chunkc(&["verify", rule.to_str().unwrap(), "--backend", "chunked"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("--backend chunked: rule `normalised` cannot be chunked (sigmoid(...)"),
        "{}",
        stderr(&o)
    );
}

/// An empty problem verifies nothing: every size must be at least 1.
#[test]
fn verify_refuses_empty_problems() {
    for (flag, value) in [("--B", "0"), ("--H", "0"), ("--K", "0"), ("--V", "0"), ("--T", "0,5")] {
        let o = chunkc(&["verify", "rules/simple_gla.toml", flag, value]);
        assert_eq!(o.status.code(), Some(1), "{flag} {value}: {}", stdout(&o));
        assert!(stderr(&o).contains("must be at least 1"), "{flag} {value}: {}", stderr(&o));
    }
}

/// A state that doubles every token overflows f32 after 128 tokens while the f64 reference
/// stays finite: the kernels' rows fail (an infinity never passes), and verify exits 1.
#[test]
fn a_failing_verify_row_exits_1() {
    let rule = tmp("doubling.toml");
    std::fs::write(
        &rule,
        "name = \"doubling\"\nstep = \"\"\"\nS = 2 * S + outer(k, v)\no = S^T @ q\n\"\"\"\n\n[inputs]\nq = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\n",
    )
    .expect("write rule");
    let o = chunkc(&["verify", rule.to_str().unwrap(), "--T", "3,200", "--chunk", "16"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{}", stderr(&o));
    let row = |backend: &str, t: &str| {
        out.lines().any(|l| l.starts_with(backend) && l.contains(&format!(" {t} ")) && l.ends_with("ok"))
    };
    assert!(row("recurrent", "3") && row("chunked", "3"), "short sequences stay finite and pass:\n{out}");
    assert!(out.lines().any(|l| l.starts_with("recurrent") && l.ends_with("FAIL")), "{out}");
    assert!(out.contains("2 failed"), "{out}");
}

#[test]
fn chunked_true_on_a_nonlinear_rule_is_an_error_with_a_caret() {
    let rule = tmp("required.toml");
    std::fs::write(&rule, NONLINEAR.replace("name = \"normalised\"\n", "name = \"normalised\"\nchunked = true\n"))
        .expect("write");
    let o = chunkc(&["check", rule.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let want = format!(
        "{}:4:5: error: this rule cannot be chunked: sigmoid(...) of a value that depends on the state is not linear
  |
4 | S = sigmoid(S + outer(k, v))
  |     ^^^^^^^^^^^^^^^^^^^^^^^^ here
  = help: chunked kernels need a state update of the form (diag(w) + a b^T) S + outer(k, v); the recurrent kernel and the reference run any rule (remove `chunked = true` to allow that)
",
        rule.display()
    );
    assert_eq!(stderr(&o), want);
}

#[test]
fn broken_rule_gets_location_and_caret() {
    let rule = tmp("broken.toml");
    std::fs::write(&rule, "name = \"x\"\nstep = \"\"\"\nS = S + outer(k, v\no = S^T @ q\n\"\"\"\n[inputs]\nq = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\n")
        .expect("write");
    let o = chunkc(&["check", rule.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with(&format!("{}:3:", rule.display())), "{e}");
    assert!(e.contains('^') && !e.contains("panicked"), "{e}");
}

#[test]
fn every_builtin_rule_checks_and_compiles() {
    for entry in std::fs::read_dir(root().join("rules")).expect("rules/") {
        let path = entry.expect("entry").path();
        let p = path.to_str().unwrap();
        let o = chunkc(&["check", p]);
        assert!(o.status.success(), "{p}: {}", stderr(&o));
        assert!(stdout(&o).contains("kernels: recurrent, chunked"), "{p}: {}", stdout(&o));
        for backend in ["recurrent", "chunked"] {
            let o = chunkc(&[
                "compile",
                p,
                "--target",
                "cpu",
                "--backend",
                backend,
                "--K",
                "8",
                "--V",
                "8",
                "--chunk",
                "16",
            ]);
            assert!(o.status.success(), "{p}: {}", stderr(&o));
            assert!(stdout(&o).contains("loop i in 0.."), "{p}");
        }
    }
}

#[test]
fn compile_for_gpu_targets_writes_ptx_and_launch_metadata() {
    for (target, isa) in [("sm_80", ".target sm_80"), ("sm_90", ".target sm_90")] {
        let dir = tmp(&format!("ptx-{target}"));
        let o = chunkc(&[
            "compile",
            "rules/gated_delta_rule.toml",
            "--target",
            target,
            "-o",
            dir.to_str().unwrap(),
            "--K",
            "32",
            "--V",
            "32",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ptx = std::fs::read_to_string(dir.join(format!("gated_delta_rule_chunked_c64_{target}.ptx")))
            .expect("ptx written");
        assert!(ptx.contains(isa) && ptx.contains(".entry"), "{target}");
        let meta =
            std::fs::read_to_string(dir.join(format!("gated_delta_rule_chunked_c64_{target}.json"))).expect("json");
        let meta: serde_json::Value = serde_json::from_str(&meta).expect("metadata is JSON");
        assert!(meta.is_object(), "{meta}");
    }
}

/// The split program of a delta rule: three phases, each with its PTX and launch metadata,
/// and the program's description naming them with their tensors and roles.
#[test]
fn compile_writes_every_phase_and_the_program() {
    let dir = tmp("ptx-split");
    let d = dir.to_str().unwrap();
    let args = ["compile", "rules/gated_delta_rule.toml", "--target", "sm_90", "-o", d, "--program", "split"];
    let o = chunkc(&[&args[..], &["--K", "32", "--V", "32", "--chunk", "16"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let name = "gated_delta_rule_chunked_c16";
    let spec = std::fs::read_to_string(dir.join(format!("{name}_split_sm_90.program.json"))).expect("program");
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("program is JSON");
    let phases: Vec<&str> =
        spec["phases"].as_array().expect("phases").iter().map(|p| p["entry"].as_str().unwrap()).collect();
    assert_eq!(phases, [format!("{name}_factors"), format!("{name}_states"), format!("{name}_outputs")]);
    let kinds: Vec<&str> = spec["phases"].as_array().unwrap().iter().map(|p| p["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["chunk_parallel", "sequential", "chunk_parallel"]);
    let role = |t: &str| spec["tensors"].as_array().unwrap().iter().find(|x| x["name"] == t).map(|x| x["role"].clone());
    assert_eq!(role("chunk.h"), Some("intermediate".into()));
    assert_eq!(role("o"), Some("output".into()));
    assert_eq!(role("h0"), Some("input".into()));
    for phase in phases {
        let ptx = std::fs::read_to_string(dir.join(format!("{phase}_sm_90.ptx"))).expect("ptx written");
        assert!(ptx.contains(&format!(".entry {phase}(")), "{phase}");
        let meta = std::fs::read_to_string(dir.join(format!("{phase}_sm_90.json"))).expect("json");
        let meta: serde_json::Value = serde_json::from_str(&meta).expect("metadata is JSON");
        let chunk_grid = meta["grid"].get("v_tiles_chunks_batch_heads").is_some();
        assert_eq!(chunk_grid, !phase.ends_with("_states"), "{phase}: {}", meta["grid"]);
    }
    // The CPU target prints the same program.
    let o = chunkc(&["compile", "rules/gated_delta_rule.toml", "--program", "split", "--chunk", "16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("intermediate  chunk.w  [B, T, H, K]"), "{}", stdout(&o));
    // A recurrent kernel has one phase.
    let o = chunkc(&["compile", "rules/gated_delta_rule.toml", "--backend", "recurrent", "--program", "split"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("the recurrent kernel is one phase"), "{}", stderr(&o));
}

/// The split backward of a delta rule (FLA's decomposition): the split forward's three
/// phases, then a sequential pass that carries only the state's adjoint (it reads neither the
/// stored states nor the values: a linear rule's adjoint does not depend on them) and stores
/// it at every chunk, then a chunk-parallel pass for every gradient; with V-tiles, every
/// phase but the factors has them.
#[test]
fn compile_grad_writes_the_split_backward_phases() {
    let dir = tmp("ptx-split-grad");
    let d = dir.to_str().unwrap();
    let args = ["compile", "rules/gated_delta_rule.toml", "--grad", "--program", "split", "--bv", "16"];
    let o = chunkc(&[&args[..], &["--K", "32", "--V", "32", "--chunk", "16", "--target", "sm_90", "-o", d]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let name = "gated_delta_rule_grad_chunked_c16_bv16_split";
    let spec = std::fs::read_to_string(dir.join(format!("{name}_sm_90.program.json"))).expect("program");
    let spec: serde_json::Value = serde_json::from_str(&spec).expect("program is JSON");
    let phases = spec["phases"].as_array().expect("phases");
    let field = |p: &serde_json::Value, f: &str| p[f].as_str().unwrap_or_default().to_string();
    let kinds: Vec<String> = phases.iter().map(|p| field(p, "kind")).collect();
    assert_eq!(kinds, ["chunk_parallel", "sequential", "chunk_parallel", "sequential", "chunk_parallel"]);
    let vtiles: Vec<u64> = phases.iter().map(|p| p["vtiles"].as_u64().unwrap()).collect();
    assert_eq!(vtiles, [1, 2, 2, 2, 2]);
    let params = |p: &serde_json::Value, access: &str| -> Vec<String> {
        let all = p["params"].as_array().unwrap().iter();
        all.filter(|q| q["access"] == access).map(|q| field(q, "tensor")).collect()
    };
    let adjoint = &phases[3];
    assert_eq!(field(adjoint, "entry"), format!("{name}_states"));
    assert_eq!(params(adjoint, "write"), ["chunk.dh", "dh0"]);
    let reads = params(adjoint, "read");
    assert!(!reads.contains(&"chunk.h".to_string()) && !reads.contains(&"v".to_string()), "{reads:?}");
    let local = &phases[4];
    assert_eq!(field(local, "entry"), format!("{name}_local"));
    assert!(params(local, "read").contains(&"chunk.dh".to_string()), "{local}");
    assert!(params(local, "write").contains(&"dk.by_vtile".to_string()), "{local}");
    for (phase, chunk_parallel) in [(format!("{name}_states"), false), (format!("{name}_local"), true)] {
        let meta = std::fs::read_to_string(dir.join(format!("{phase}_sm_90.json"))).expect("json");
        let meta: serde_json::Value = serde_json::from_str(&meta).expect("metadata is JSON");
        assert_eq!(meta["grid"].get("v_tiles_chunks_batch_heads").is_some(), chunk_parallel, "{}", meta["grid"]);
    }
}

/// `bench --grad`: forward + backward timed, one JSON line naming the chunked backward's
/// program and V-tiles.
#[test]
fn bench_grad_prints_one_json_line_with_its_program() {
    let base = ["bench", "rules/simple_gla.toml", "--grad", "--shape", "1,40,2,16,16", "--chunk", "16", "--runs", "2"];
    for (extra, program, bv) in [(&[][..], "fused", None), (&["--program", "split", "--bv", "8"][..], "split", Some(8))]
    {
        let o = chunkc(&[&base[..], extra, &["--json"]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out.lines().count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!((v["pass"].as_str(), v["program"].as_str()), (Some("forward+backward"), Some(program)));
        assert_eq!(v["bv"].as_u64(), bv);
        assert!(v["median_ms"].as_f64().is_some_and(|t| t > 0.0), "{v}");
    }
}

#[test]
fn bench_prints_one_json_line_and_refuses_bad_shapes() {
    let o =
        chunkc(&["bench", "rules/simple_gla.toml", "--shape", "1,40,2,8,8", "--chunk", "16", "--runs", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["rule"], "simple_gla");
    assert!(
        v["median_ms"].as_f64().is_some_and(|t| t > 0.0) && v["token_heads_per_s"].as_f64().is_some_and(|x| x > 0.0)
    );

    let o = chunkc(&["bench", "rules/simple_gla.toml", "--shape", "1,2,3"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "error: --shape takes five sizes: B,T,H,K,V\n");
}

// ---------------------------------------------------------------------------------------
// The PTX backends.

/// `chunkc run` on the simple_gla inputs into its own output file; returns (o, hT).
fn run_simple_gla_to(name: &str, extra: &[&str]) -> (Vec<f32>, Vec<f32>) {
    let inputs = write(&format!("{name}-in.safetensors"), &simple_gla_inputs());
    let out = tmp(&format!("{name}-out.safetensors"));
    let mut args =
        vec!["run", "rules/simple_gla.toml", "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = chunkc(&args);
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    let (t, meta) = chunkc::runtime::io::read_safetensors(&out).expect("outputs readable");
    let backend = extra.iter().skip_while(|a| **a != "--backend").nth(1).copied().unwrap_or("chunked");
    assert_eq!(meta.get("backend").map(String::as_str), Some(backend), "{meta:?}");
    (t["o"].data.clone(), t["hT"].data.clone())
}

#[test]
fn ptx_sim_run_matches_the_reference() {
    let (want_o, want_ht) = run_simple_gla_to("sim-ref", &["--backend", "reference"]);
    for (name, extra) in [
        ("sim-rec", vec!["--backend", "ptx-sim", "--kernel", "recurrent"]),
        ("sim-c2", vec!["--backend", "ptx-sim", "--chunk", "2", "--target", "sm_80"]),
        ("sim-c16", vec!["--backend", "ptx-sim", "--kernel", "chunked", "--chunk", "16", "--target", "sm_90"]),
    ] {
        let (o, ht) = run_simple_gla_to(name, &extra);
        let (eo, eh) = (rel_rms(&o, &want_o), rel_rms(&ht, &want_ht));
        assert!(eo <= F32_TOLERANCE && eh <= F32_TOLERANCE, "{extra:?}: o {eo:.2e}, hT {eh:.2e}");
    }
}

#[test]
fn ptx_sim_verify_passes_and_refuses_shapes_too_large_for_the_simulator() {
    let o = chunkc(&["verify", "rules/gated_delta_rule.toml", "--backend", "ptx-sim", "--chunk", "16", "--T", "1,17"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("PTX for sm_90") && stdout(&o).contains("4 passed, 0 failed"), "{}", stdout(&o));

    let o =
        chunkc(&["verify", "rules/simple_gla.toml", "--backend", "ptx-sim", "--T", "1000", "--K", "64", "--V", "64"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "error: --backend ptx-sim: B*H*T*K*V = 2*2*1000*64*64 is over the simulator's limit of {} (it interprets \
             every GPU thread on the CPU); use a smaller shape, or --backend cuda on a GPU\n",
            chunkc::gpu::SIM_MAX_ELEMENTS
        )
    );
    assert!(stdout(&o).is_empty(), "nothing runs before the error: {}", stdout(&o));
}

#[test]
fn cuda_without_a_gpu_is_one_line_and_a_failure() {
    let Err(why) = chunkc::runtime::cuda::device_count() else {
        println!("a CUDA device is present: tests/gpu.rs covers --backend cuda");
        return;
    };
    let want = format!("error: --backend cuda: {why}\n");
    let p = write("cuda.safetensors", &simple_gla_inputs());
    let o = run_simple_gla(&p, &["--backend", "cuda"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), want);
    let o = chunkc(&["verify", "rules/simple_gla.toml", "--backend", "cuda", "--T", "5"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), want);
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
}

#[test]
fn bad_target_and_misplaced_ptx_flags_are_clear_errors() {
    let p = write("target.safetensors", &simple_gla_inputs());
    let o = run_simple_gla(&p, &["--backend", "ptx-sim", "--target", "sm_70"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.starts_with("error: invalid value 'sm_70' for '--target <TARGET>'"), "{err}");
    assert!(err.contains("[possible values: sm_80, sm_90]"), "{err}");

    let o = run_simple_gla(&p, &["--backend", "chunked", "--target", "sm_80"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: --target goes with --backend ptx-sim or cuda (the CPU backends are named by their kernel)\n"
    );
    let o = run_simple_gla(&p, &["--kernel", "recurrent"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: --kernel goes with --backend ptx-sim or cuda (the CPU backends are named by their kernel)\n"
    );
}

/// `--dtype` and `--dot` on `run`: the outputs stay within the precision's tolerance of the
/// reference on the f32 inputs, and the output file records the precision.
#[test]
fn ptx_sim_run_at_16_bit_and_tf32_precision_matches_the_reference() {
    let (want_o, want_ht) = run_simple_gla_to("prec-ref", &["--backend", "reference"]);
    for (name, extra, tol) in [
        ("prec-bf16", vec!["--backend", "ptx-sim", "--chunk", "4", "--dtype", "bf16", "--dot", "bf16"], 1e-2),
        ("prec-f16", vec!["--backend", "ptx-sim", "--kernel", "recurrent", "--dtype", "f16"], 1e-2),
        ("prec-tf32", vec!["--backend", "ptx-sim", "--dot", "tf32", "--warps", "2"], 1e-3),
    ] {
        let (o, ht) = run_simple_gla_to(name, &extra);
        let (eo, eh) = (rel_rms(&o, &want_o), rel_rms(&ht, &want_ht));
        assert!(eo <= tol && eh <= tol, "{extra:?}: o {eo:.2e}, hT {eh:.2e}");
        let (_, meta) =
            chunkc::runtime::io::read_safetensors(tmp(&format!("{name}-out.safetensors"))).expect("outputs readable");
        let dtype = extra.iter().skip_while(|a| **a != "--dtype").nth(1).copied().unwrap_or("f32");
        assert_eq!(meta.get("dtype").map(String::as_str), Some(dtype), "{meta:?}");
    }
    // bf16 inputs are rounded: the result differs from the f32-input kernel's.
    let (o32, _) = run_simple_gla_to("prec-f32", &["--backend", "ptx-sim", "--chunk", "4"]);
    let (o16, _) = run_simple_gla_to("prec-bf16b", &["--backend", "ptx-sim", "--chunk", "4", "--dtype", "bf16"]);
    assert_ne!(o32, o16, "--dtype bf16 reached the kernel");
}

/// `verify` with tensor-core dots and 16-bit inputs: every row shows its precision and its
/// tolerance, and passes.
#[test]
fn ptx_sim_verify_shows_precision_and_tolerance() {
    let args = ["verify", "rules/gated_delta_rule.toml", "--backend", "ptx-sim", "--chunk", "16", "--T", "19"];
    let shape = ["--K", "16", "--V", "16", "--B", "1"];
    for (extra, precision, tol) in [
        (vec!["--dot", "tf32"], "f32 in, tf32 dots", "1e-3"),
        (vec!["--dtype", "bf16", "--dot", "bf16"], "bf16 in, bf16 dots", "1e-2"),
        (vec!["--dtype", "f16", "--dot", "f16"], "f16 in, f16 dots", "1e-2"),
    ] {
        let o = chunkc(&[&args[..], &shape[..], &extra[..]].concat());
        let out = stdout(&o);
        assert!(o.status.success(), "{extra:?}: {out}{}", stderr(&o));
        assert!(out.contains("2 passed, 0 failed"), "{out}");
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("ptx-sim")).collect();
        assert_eq!(rows.len(), 2, "{out}");
        assert!(rows.iter().all(|r| r.contains(precision) && r.contains(tol) && r.ends_with("ok")), "{out}");
    }
    let o = chunkc(&["verify", "rules/simple_gla.toml", "--backend", "ptx-sim", "--T", "3", "--chunk", "16"]);
    assert!(stdout(&o).lines().any(|l| l.contains("f32 in, f32 dots") && l.contains("1e-5")), "{}", stdout(&o));
    let help = stdout(&chunkc(&["verify", "--help"])).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains("in f64 on the original f32 inputs, also when the kernel reads them rounded"), "{help}");
}

/// The precision flags with a CPU backend, an invalid schedule or an unknown value: one line
/// and a failure, before anything runs.
#[test]
fn precision_flags_refuse_cpu_backends_and_invalid_values() {
    let p = write("precision.safetensors", &simple_gla_inputs());
    for (flag, value) in [("--dtype", "bf16"), ("--dot", "tf32"), ("--warps", "4")] {
        let o = run_simple_gla(&p, &["--backend", "chunked", flag, value]);
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o),
            format!(
                "error: {flag} goes with --backend ptx-sim or cuda (the CPU backends read f32 inputs and compute \
                 f32 dots)\n"
            )
        );
    }
    let o = chunkc(&["verify", "rules/simple_gla.toml", "--backend", "recurrent", "--dtype", "f16"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("error: --dtype goes with --backend ptx-sim or cuda"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));

    for warps in ["0", "33"] {
        let o = run_simple_gla(&p, &["--backend", "ptx-sim", "--warps", warps]);
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(stderr(&o), format!("error: --warps: ptx schedule: warps must be 1 to 32, not {warps}\n"));
    }
    let o = run_simple_gla(&p, &["--backend", "ptx-sim", "--dtype", "f64"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).starts_with("error: invalid value 'f64' for '--dtype <DTYPE>'"), "{}", stderr(&o));
    assert!(stderr(&o).contains("[possible values: f32, bf16, f16]"), "{}", stderr(&o));
    let o = run_simple_gla(&p, &["--backend", "ptx-sim", "--dot", "fp8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("[possible values: f32, tf32, bf16, f16]"), "{}", stderr(&o));
}

#[test]
fn compile_takes_the_ptx_schedule_flags() {
    let dir = tmp("ptx-bf16-pipelined");
    let o = chunkc(&[
        "compile",
        "rules/gla.toml",
        "--target",
        "sm_90",
        "-o",
        dir.to_str().unwrap(),
        "--K",
        "64",
        "--V",
        "64",
        "--chunk",
        "16",
        "--dtype",
        "bf16",
        "--dot",
        "bf16",
        "--stages",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ptx = std::fs::read_to_string(dir.join("gla_chunked_c16_sm_90.ptx")).expect("ptx written");
    for instruction in ["mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned", "cp.async", "cvt.rn.bf16x2.f32"] {
        assert!(ptx.contains(instruction), "no {instruction} in the bf16 pipelined kernel");
    }
    let meta = std::fs::read_to_string(dir.join("gla_chunked_c16_sm_90.json")).expect("json");
    let meta: serde_json::Value = serde_json::from_str(&meta).expect("metadata is JSON");
    assert_eq!(meta["schedule"]["dot"], "bf16", "{meta}");
    assert_eq!(meta["schedule"]["stages"], 2, "{meta}");

    let o = chunkc(&["compile", "rules/gla.toml", "--dot", "tf32"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: --dot goes with --target sm_80 or sm_90 (the CPU backend reads f32 inputs and computes f32 dots)\n"
    );
    let o = chunkc(&["compile", "rules/gla.toml", "--target", "sm_80", "--stages", "3"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "error: --stages must be 1 or 2, not 3\n");
}

#[test]
fn compile_grad_prints_the_backward_program() {
    let o = chunkc(&["compile", "rules/simple_gla.toml", "--grad", "--K", "16", "--V", "16", "--chunk", "32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("program simple_gla_grad_chunked_c32 (chunk 32): 2 phase(s)"), "{text}");
    assert!(text.contains("kernel simple_gla_grad_chunked_c32(") && text.contains("out dg"), "{text}");
    let o = chunkc(&["compile", "rules/gla.toml", "--grad", "--backend", "recurrent", "--checkpoint", "5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("kernel gla_grad_c5("), "{}", stdout(&o));
    // V-tiles: the gradients the columns share come per tile.
    let o = chunkc(&["compile", "rules/gla.toml", "--grad", "--bv", "8", "--K", "16", "--V", "16", "--chunk", "16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("program gla_grad_chunked_c16_bv8 (chunk 16): 2 phase(s)"), "{text}");
    assert!(text.contains("dk.by_vtile [B, T, H, NV, K]") && text.contains("2 V-tile(s)"), "{text}");
    let o = chunkc(&["compile", "rules/gla.toml", "--grad", "--backend", "recurrent", "--bv", "8"]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o).trim(),
        "error: --bv 8: only the chunked backward splits V into tiles; the recurrent one runs the whole V"
    );
}

/// A value-side gate on a delta rule is linear, but the planner has no chunked form for the
/// pair yet: `check` shows its form and promises the recurrent kernel only, `chunked = true`
/// is refused with the planner's reason, and a default `verify` runs (and passes) what exists.
#[test]
fn check_promises_no_chunked_kernel_the_planner_does_not_build() {
    let text = "name = \"value_gated_delta\"\nstep = \"\"\"\nS = exp(gv) * (S + outer(k, b * (v - S^T @ k)))\no = S^T @ q\n\"\"\"\n[inputs]\nq = \"[K]\"\nk = { shape = \"[K]\", domain = \"unit_norm\" }\nv = \"[V]\"\nb = { shape = \"scalar\", domain = \"unit\" }\ngv = { shape = \"[V]\", domain = \"log_gate\" }\n";
    let rule = tmp("value_gated_delta.toml");
    std::fs::write(&rule, text).expect("write");
    let o = chunkc(&["check", rule.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("class: delta, rank 1"), "{out}");
    assert!(out.contains("log d   = gv"), "{out}");
    assert!(
        out.contains("kernels: recurrent only (no chunked kernel: a value-side gate together with a low-rank"),
        "{out}"
    );
    let o = chunkc(&["verify", rule.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("10 passed, 0 failed"), "{}", stdout(&o));
    let required = tmp("value_gated_delta_required.toml");
    std::fs::write(
        &required,
        text.replace("name = \"value_gated_delta\"\n", "name = \"value_gated_delta\"\nchunked = true\n"),
    )
    .expect("write");
    let o = chunkc(&["check", required.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(":4:1: error: this rule cannot be chunked: a value-side gate together with a low-rank"), "{e}");
}

/// `inputs` writes what `run` and `grad` read: every input by name at the asked shape, h0
/// (unless --no-h0) and with --grad the cotangents; the chunked run of them matches the
/// reference run.
#[test]
fn inputs_writes_what_run_and_grad_read() {
    let rule = root().join("rules/gla.toml");
    let rule = rule.to_str().unwrap();
    let file = tmp("gla_inputs.safetensors");
    let o = chunkc(&["inputs", rule, "--shape", "2,37,3,8,12", "--grad", "--out", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (t, _) = chunkc::runtime::io::read_safetensors(&file).expect("inputs");
    let names: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(names, ["dhT", "do", "gk", "h0", "k", "q", "v"]);
    assert_eq!(t["q"].shape, [2, 37, 3, 8]);
    assert_eq!(t["v"].shape, [2, 37, 3, 12]);
    assert_eq!(t["h0"].shape, [2, 3, 8, 12]);
    assert!(t["gk"].data.iter().all(|&g| g <= 0.0), "log gates are drawn from their domain");
    let mut outs = vec![];
    for backend in ["reference", "chunked"] {
        let out = tmp(&format!("gla_{backend}.safetensors"));
        let o = chunkc(&[
            "run",
            rule,
            "--inputs",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--backend",
            backend,
            "--allow-extra",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(chunkc::runtime::io::read_safetensors(&out).expect("outputs").0);
    }
    assert!(chunkc::verify::rel_rms(&outs[1]["o"].data, &outs[0]["o"].data) <= 1e-5);
    let o = chunkc(&["inputs", rule, "--no-h0", "--out", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!chunkc::runtime::io::read_safetensors(&file).expect("inputs").0.contains_key("h0"));
}

/// A rule with an extra state (rules/mlstm.toml's normaliser `n`): `inputs` writes `n0`,
/// `run` takes it and writes `nT` on every CPU backend alike, `grad` takes `dnT` and gives
/// `dn0`, and a tensor it does not take is refused with the state's names in the list.
#[test]
fn an_extra_state_enters_and_leaves_by_name() {
    let inputs = tmp("mlstm_inputs.safetensors");
    let o =
        chunkc(&["inputs", "rules/mlstm.toml", "--shape", "1,37,2,8,6", "--out", inputs.to_str().unwrap(), "--grad"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("n0 [1, 2, 8]") && stdout(&o).contains("dnT [1, 2, 8]"), "{}", stdout(&o));
    let mut finals = vec![];
    for backend in ["reference", "recurrent", "chunked"] {
        let out = tmp(&format!("mlstm_{backend}.safetensors"));
        let args = ["run", "rules/mlstm.toml", "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let o = chunkc(&[&args[..], &["--backend", backend, "--chunk", "16", "--allow-extra"]].concat());
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        assert!(stdout(&o).contains("wrote o, hT and nT"), "{}", stdout(&o));
        let (t, _) = chunkc::runtime::io::read_safetensors(&out).expect("outputs");
        assert_eq!(t["nT"].shape, vec![1, 2, 8]);
        finals.push(t["nT"].data.clone());
    }
    for got in &finals[1..] {
        let err = rel_rms(got, &finals[0]);
        assert!(err <= F32_TOLERANCE, "nT off the reference's by {err:.2e}");
    }
    // Without --allow-extra, the cotangents are tensors `run` does not take; the list names n0.
    let out = tmp("mlstm_refused.safetensors");
    let o = chunkc(&["run", "rules/mlstm.toml", "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("it takes: q, k, v, fg, ig, h0, cu_seqlens, n0;"), "{}", stderr(&o));
    for backend in ["reference", "chunked"] {
        let out = tmp(&format!("mlstm_grad_{backend}.safetensors"));
        let o = chunkc(&[
            "grad",
            "rules/mlstm.toml",
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--backend",
            backend,
        ]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        let (t, _) = chunkc::runtime::io::read_safetensors(&out).expect("gradients");
        assert_eq!(t["dn0"].shape, vec![1, 2, 8], "{backend}");
        assert!(t.contains_key("nT") && t.contains_key("dh0"), "{backend}: {:?}", t.keys());
    }
}

/// `inputs --varlen` writes a packed batch with its `cu_seqlens`; `run` takes it on every
/// compiled backend, the sequences restarting their chunks, and gives each sequence what a
/// run of that sequence alone gives.
#[test]
fn run_takes_a_varlen_batch() {
    let inputs = tmp("varlen_inputs.safetensors");
    let args = ["inputs", "rules/gated_delta_rule.toml", "--shape", "1,1,2,8,4", "--varlen", "19,1,40"];
    let o = chunkc(&[&args[..], &["--out", inputs.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("cu_seqlens [4]") && stdout(&o).contains("h0 [3, 2, 8, 4]"), "{}", stdout(&o));
    let (packed, _) = chunkc::runtime::io::read_safetensors(&inputs).expect("inputs");
    assert_eq!(packed["cu_seqlens"].data, vec![0.0, 19.0, 20.0, 60.0]);
    let mut runs = vec![];
    for backend in [["--backend", "chunked"], ["--backend", "recurrent"], ["--backend", "ptx-sim"]] {
        let out = tmp(&format!("varlen_{}.safetensors", backend[1]));
        let args = ["run", "rules/gated_delta_rule.toml", "--inputs", inputs.to_str().unwrap(), "--chunk", "16"];
        let o = chunkc(&[&args[..], &backend[..], &["--out", out.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{backend:?}: {}", stderr(&o));
        let (t, _) = chunkc::runtime::io::read_safetensors(&out).expect("outputs");
        assert_eq!(t["o"].shape, vec![1, 60, 2, 4]);
        assert_eq!(t["hT"].shape, vec![3, 2, 8, 4]);
        runs.push(t);
    }
    // The third sequence alone, through the dense path.
    let mut alone = BTreeMap::new();
    for (name, t) in &packed {
        let one = match name.as_str() {
            "cu_seqlens" => continue,
            "h0" => Tensor { shape: vec![1, 2, 8, 4], data: t.data[2 * 64..3 * 64].to_vec() },
            _ => {
                let row = t.data.len() / 60;
                Tensor { shape: [&[1, 40], &t.shape[2..]].concat(), data: t.data[20 * row..].to_vec() }
            }
        };
        alone.insert(name.clone(), one);
    }
    let single = tmp("varlen_alone.safetensors");
    write_safetensors(&single, &alone, None).expect("write");
    let out = tmp("varlen_alone_out.safetensors");
    let args = ["run", "rules/gated_delta_rule.toml", "--inputs", single.to_str().unwrap(), "--backend", "reference"];
    let o = chunkc(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let (reference, _) = chunkc::runtime::io::read_safetensors(&out).expect("reference");
    for t in &runs {
        let err = rel_rms(&t["o"].data[20 * 8..], &reference["o"].data);
        assert!(err <= F32_TOLERANCE, "o of the third sequence: {err:.2e}");
        let err = rel_rms(&t["hT"].data[2 * 64..], &reference["hT"].data);
        assert!(err <= F32_TOLERANCE, "its final state: {err:.2e}");
    }
    let args = ["run", "rules/gated_delta_rule.toml", "--inputs", inputs.to_str().unwrap(), "--backend", "reference"];
    let o = chunkc(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "error: varlen batches run on compiled kernels, not --backend reference");
}

/// q and k with fewer heads than v (grouped value heads): `run` and `grad` take them as they
/// are, and `grad` gives dq and dk in their own shapes.
#[test]
fn run_and_grad_take_grouped_value_heads() {
    let inputs = tmp("grouped_inputs.safetensors");
    let args = ["inputs", "rules/gated_delta_rule.toml", "--shape", "1,21,4,8,4", "--grad"];
    let o = chunkc(&[&args[..], &["--out", inputs.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut t, _) = chunkc::runtime::io::read_safetensors(&inputs).expect("inputs");
    for name in ["q", "k"] {
        let data =
            t[name].data.chunks(8).enumerate().filter(|(i, _)| i % 4 < 2).flat_map(|(_, c)| c.to_vec()).collect();
        t.insert(name.into(), Tensor { shape: vec![1, 21, 2, 8], data });
    }
    let grouped = tmp("grouped.safetensors");
    write_safetensors(&grouped, &t, None).expect("write");
    let out = tmp("grouped_grad.safetensors");
    let mut grads = vec![];
    for backend in ["chunked", "reference"] {
        let args = ["grad", "rules/gated_delta_rule.toml", "--inputs", grouped.to_str().unwrap(), "--backend", backend];
        let o = chunkc(&[&args[..], &["--chunk", "16", "--out", out.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        let (g, _) = chunkc::runtime::io::read_safetensors(&out).expect("grads");
        assert_eq!(g["dq"].shape, vec![1, 21, 2, 8]);
        assert_eq!(g["dv"].shape, vec![1, 21, 4, 4]);
        grads.push(g);
    }
    for name in ["dq", "dk", "dv", "dg", "dbeta", "dh0"] {
        let err = rel_rms(&grads[0][name].data, &grads[1][name].data);
        assert!(err < 1e-5, "{name}: {err:.2e}");
    }
    let args = ["run", "rules/gated_delta_rule.toml", "--inputs", grouped.to_str().unwrap(), "--allow-extra"];
    let o = chunkc(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `chunkc model`: an estimate per phase of the emitted program, labelled as one, and its
/// one-line JSON form with the fields the GPU issue names; bad input is one line.
/// `model --grad`: the backward program's phases, each estimated; the split one has its
/// chunk-parallel gradient pass on a grid of at least a full wave.
#[test]
fn model_estimates_the_backward_phases() {
    let shape = ["--gpu", "h100", "--shape", "2,8192,16,128,128", "--chunk", "32", "--bv", "64", "--json"];
    let o = chunkc(&[&["model", "rules/gated_delta_rule.toml", "--grad", "--program", "split"][..], &shape].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON line");
    let phases = v["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().expect("name")).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names[3].ends_with("_split_states") && names[4].ends_with("_split_local"), "{names:?}");
    let grid =
        |p: &serde_json::Value| p["grid"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).product::<u64>();
    assert!(grid(&phases[4]) >= 132, "{}", phases[4]);
    let est = v["est_ms"].as_f64().expect("est_ms");
    let sum: f64 = phases.iter().map(|p| p["est_ms"].as_f64().unwrap()).sum();
    assert!(est.is_finite() && (est - sum).abs() < 1e-6 * est.max(1.0), "{est} vs the phases' {sum}");
    // Ranked: the backward's schedules, best first.
    let o = chunkc(&["model", "rules/gated_delta_rule.toml", "--grad", "--rank", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("one JSON line");
    let ests: Vec<f64> =
        v["candidates"].as_array().expect("candidates").iter().map(|c| c["est_ms"].as_f64().unwrap()).collect();
    assert!(ests.len() == 3 && ests.windows(2).all(|w| w[0] <= w[1]), "{ests:?}");
    let o = chunkc(&["model", "rules/gated_delta_rule.toml", "--grad", "--backend", "recurrent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model --grad estimates the chunked backward"), "{}", stderr(&o));
}

#[test]
fn model_estimates_every_phase_and_prints_one_json_line() {
    let args = ["model", "rules/gated_delta_rule.toml", "--gpu", "h100", "--shape", "2,8192,16,128,128", "--json"];
    let o = chunkc(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("one JSON line");
    let (est, floor) = (v["est_ms"].as_f64().expect("est_ms"), v["floor_ms"].as_f64().expect("floor_ms"));
    assert!(floor > 0.0 && est > floor, "{est} {floor}");
    let phases = v["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().expect("name")).collect();
    assert_eq!(
        names,
        [
            "gated_delta_rule_chunked_c64_factors",
            "gated_delta_rule_chunked_c64_states",
            "gated_delta_rule_chunked_c64_outputs"
        ]
    );
    let total: f64 = phases.iter().map(|p| p["est_ms"].as_f64().expect("est_ms")).sum();
    assert!((total - est).abs() < 1e-9 * est, "the phases add up to the estimate");
    // The chunk-parallel phases have a CTA per (V-tile, chunk, batch-head): 1 x 128 x 32.
    for p in [&phases[0], &phases[2]] {
        assert_eq!(p["grid"], serde_json::json!([1, 128, 32]), "{p}");
        assert_eq!(p["block"], 256);
        assert!(p["smem_bytes"].as_u64().is_some() && p["scratch_bytes"].as_u64().is_some());
    }
    assert_eq!(phases[1]["grid"], serde_json::json!([32, 1, 1]), "the state pass walks the chunks per (b, h)");
    // Twice the tokens: the state pass walks twice the chunks.
    let longer = chunkc(&["model", "rules/gated_delta_rule.toml", "--shape", "2,16384,16,128,128", "--json"]);
    let w: serde_json::Value = serde_json::from_str(&stdout(&longer)).expect("json");
    let ratio = w["phases"][1]["est_ms"].as_f64().expect("ms") / phases[1]["est_ms"].as_f64().expect("ms");
    assert!((ratio - 2.0).abs() < 0.01, "{ratio}");
    // The issue's structure at its shape: with V-tiles of 32 and chunks of 32 no phase has
    // global scratch, and every chunk-parallel phase has at least a wave of CTAs (132 SMs).
    let tiled = ["--program", "split", "--chunk", "32", "--bv", "32", "--stages", "2", "--json"];
    let o = chunkc(&[&["model", "rules/gated_delta_rule.toml", "--gpu", "h100"][..], &tiled].concat());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    for p in v["phases"].as_array().expect("phases") {
        assert_eq!(p["scratch_bytes"], 0, "{p}");
        let ctas: u64 = p["grid"].as_array().expect("grid").iter().map(|d| d.as_u64().expect("dim")).product();
        let chunk_parallel = p["grid"][1].as_u64() == Some(256);
        assert!(!chunk_parallel || ctas >= 132, "{p}");
    }
    // --ops: each phase's chain op by op, the loop's ops marked per chunk.
    let o = chunkc(&["model", "rules/gated_delta_rule.toml", "--program", "split", "--ops"]);
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("gated_delta_rule_chunked_c64_factors: one CTA's chain"), "{text}");
    assert!(text.lines().any(|l| l.contains("solve unit lower") && l.contains("per chunk")), "{text}");
    assert!(!chunkc(&["model", "rules/gated_delta_rule.toml", "--ops", "--json"]).status.success());
    // The table says what it is.
    let o = chunkc(&["model", "rules/simple_gla.toml", "--gpu", "a100"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("ESTIMATE (an analytic model, not a measurement)"), "{text}");
    assert!(text.contains("sm_80") && text.contains("roofline floor") && text.contains("assumes: "), "{text}");
    // --rank: the estimated candidates, best first, as flags to time.
    let o = chunkc(&["model", "rules/gated_delta_rule.toml", "--rank", "3", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let c = v["candidates"].as_array().expect("candidates");
    assert_eq!(c.len(), 3);
    let ms: Vec<f64> = c.iter().map(|x| x["est_ms"].as_f64().expect("ms")).collect();
    assert!(ms.windows(2).all(|w| w[0] <= w[1]) && ms[0] <= est, "{ms:?} against the default's {est}");
    assert!(c[0]["flags"].as_str().expect("flags").starts_with("--chunk "), "{}", c[0]);
    let o = chunkc(&["model", "rules/simple_gla.toml", "--gpu", "v100"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "error: no GPU `v100` in the model's table (known: a100, h100, h200)");
}

/// `bench --backend cuda` takes the PTX flags and, on a machine without a GPU, says so in
/// one line; the CPU backends refuse the PTX flags, and the simulator is not a bench target.
#[test]
fn bench_on_cuda_takes_the_ptx_flags_and_needs_a_device() {
    let base = ["bench", "rules/simple_gla.toml", "--shape", "1,64,2,16,16", "--runs", "1"];
    let o =
        chunkc(&[&base[..], &["--backend", "cuda", "--dtype", "bf16", "--dot", "bf16", "--target", "sm_80"]].concat());
    if chunkc::runtime::cuda::device_count().is_err() {
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        let err = stderr(&o);
        assert!(err.starts_with("error: --backend cuda: ") && err.trim().lines().count() == 1, "{err}");
    } else {
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains("(CUDA events)"), "{}", stdout(&o));
    }
    let o = chunkc(&[&base[..], &["--dot", "tf32"]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "error: --dot goes with --backend ptx-sim or cuda (the CPU backends read f32 inputs and compute f32 dots)"
    );
    let o = chunkc(&[&base[..], &["--backend", "ptx-sim"]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("the simulator is for correctness"), "{}", stderr(&o));
    let o = chunkc(&[&base[..], &["--backend", "cuda", "--grad"]].concat());
    assert_ne!(o.status.code(), Some(0));
}
