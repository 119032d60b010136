//! `chunkc grad` against outside truth: every case of the gradient goldens (torch autograd in
//! float64 through flash-linear-attention's naive references, ../shared/goldens-bwd) through
//! the f64 reference's reverse mode, the compiled recurrent backward (native code, at three
//! checkpoint intervals), the chunked backward (chunk 16 to 128) and both programs' PTX in the
//! simulator. Each file's forward outputs and every
//! gradient it holds are compared: relative RMS within 1e-5 on o, hT, dq, dk, dv, dh0 and
//! within 1e-4 on the gate, beta and low-rank gradients (the budgets; the reference
//! lands near 1e-7, the f32 backward near 2e-7).
//! Plus the command's errors: a missing `do`, a wrong shape, an unknown tensor.

mod common;

use chunkc::runtime::io::{read_safetensors, write_safetensors};
use chunkc::runtime::tensor::Tensor;
use chunkc::verify::rel_rms;
use common::{chunkc, goldens_bwd_dir, root};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;

fn tmp(name: &str) -> PathBuf {
    common::tmp("grad", name)
}

/// The budget of a tensor: 1e-5 for the outputs and the gradients of q, k, v, h0; 1e-4 for
/// the rest (gates, beta, low-rank vectors, per-head parameters).
fn budget(name: &str) -> f64 {
    match name {
        "o" | "hT" | "dq" | "dk" | "dv" | "dh0" => 1e-5,
        _ => 1e-4,
    }
}

/// Every case of the gradient goldens through `chunkc grad` with `args` (the backend and its
/// options), each derived tensor within its budget; returns the worst error.
fn every_gradient_golden_through(label: &str, args: &[&str]) -> f64 {
    every_gradient_golden_at(label, args, 0.0)
}

/// [`every_gradient_golden_through`] with every budget raised to at least `floor` (the
/// budget of a lower precision: tf32 dots 1e-3, bf16 inputs or dots 1e-2).
fn every_gradient_golden_at(label: &str, args: &[&str], floor: f64) -> f64 {
    let Some(dir) = goldens_bwd_dir() else { return 0.0 };
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).expect("index.json")).expect("json");
    let cases = index.as_array().expect("a list");
    assert!(cases.len() >= 18, "expected the 18 cases, found {}", cases.len());
    let (mut failures, mut compared, mut worst) = (vec![], 0, 0.0f64);
    for case in cases {
        let name = case["file"].as_str().expect("file");
        let file = dir.join(name);
        let family = case["family"].as_str().expect("family");
        let rule = root().join("rules").join(format!("{family}.toml"));
        let out = tmp(&format!("{label}-{name}"));
        let mut argv = vec![
            "grad",
            rule.to_str().unwrap(),
            "--inputs",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--allow-extra",
        ];
        argv.extend_from_slice(args);
        let o = chunkc(&argv);
        assert!(o.status.success(), "{label} {name}: {}", String::from_utf8_lossy(&o.stderr));
        let (want, _) = read_safetensors(&file).expect("golden");
        let (got, _) = read_safetensors(&out).expect("output");
        let mut line = format!("{label} {name:<26}");
        for (tensor, t) in &want {
            let derived =
                tensor == "o" || tensor == "hT" || (tensor.starts_with('d') && tensor != "do" && tensor != "dhT");
            if !derived {
                continue;
            }
            let Some(g) = got.get(tensor) else {
                failures.push(format!("{name}: no `{tensor}` written"));
                continue;
            };
            let err = rel_rms(&g.data, &t.data);
            line += &format!(" {tensor} {err:.1e}");
            worst = worst.max(err);
            compared += 1;
            let budget = budget(tensor).max(floor);
            if err.is_nan() || err > budget {
                failures.push(format!("{name} {tensor}: {err:.2e} over {budget:.0e}"));
            }
        }
        println!("{line}");
    }
    println!("{label}: worst relative RMS error {worst:.2e} over {compared} tensors");
    assert!(compared >= 128, "compared only {compared} tensors");
    assert!(failures.is_empty(), "{label}:\n{}", failures.join("\n"));
    worst
}

#[test]
fn every_gradient_golden_through_the_reference_gradient() {
    every_gradient_golden_through("reference", &["--backend", "reference"]);
}

/// The compiled backward at its default checkpoint interval, at every token (1: no
/// recomputation), and at 5 (segments that end mid-sequence, the last one padded).
#[test]
fn every_gradient_golden_through_the_recurrent_backward() {
    // (`grad`'s default backend for a rule linear in S is the chunked one: name this one.)
    every_gradient_golden_through("recurrent", &["--backend", "recurrent"]);
    every_gradient_golden_through("recurrent-c1", &["--backend", "recurrent", "--checkpoint", "1", "--threads", "1"]);
    every_gradient_golden_through("recurrent-c5", &["--backend", "recurrent", "--checkpoint", "5"]);
}

/// The chunked backward at chunk 16, 32, 64 and 128, every family; and at chunk 16 storing
/// the state every 48 tokens (segments of three chunks, the states between recomputed; the
/// last segment runs past T).
#[test]
fn every_gradient_golden_through_the_chunked_backward() {
    for chunk in ["16", "32", "64", "128"] {
        let label = format!("chunked-c{chunk}");
        every_gradient_golden_through(&label, &["--backend", "chunked", "--chunk", chunk]);
    }
    let every_third = ["--backend", "chunked", "--chunk", "16", "--checkpoint", "48"];
    every_gradient_golden_through("chunked-c16-every48", &every_third);
}

/// The split chunked backward (the split forward, a sequential pass carrying the state's
/// adjoint, a chunk-parallel pass for every gradient) at chunk 16 and 64 on the CPU, and its
/// PTX in the simulator at chunk 16, in f32 and with tf32 dots.
#[test]
fn every_gradient_golden_through_the_split_chunked_backward() {
    for chunk in ["16", "64"] {
        let args = ["--backend", "chunked", "--program", "split", "--chunk", chunk];
        every_gradient_golden_through(&format!("split-c{chunk}"), &args);
    }
    let sim = ["--backend", "ptx-sim", "--kernel", "chunked", "--program", "split", "--chunk", "16"];
    every_gradient_golden_through("ptx-sim-split", &sim);
    let tf32 = every_gradient_golden_at("ptx-sim-split-tf32", &[&sim[..], &["--dot", "tf32"]].concat(), 1e-3);
    assert!(tf32 > 1e-5, "tf32 worst {tf32:.1e}: the dot precision was ignored");
}

/// The chunked backward split into V-tiles of 8 columns (3 or 4 per head: V is 24 or 32),
/// the gradients the columns share summed over the tiles; at chunk 16 and at chunk 32 storing
/// the state every 64 tokens; on the CPU and in the PTX simulator.
#[test]
fn every_gradient_golden_through_the_chunked_backward_in_v_tiles() {
    every_gradient_golden_through("chunked-c16-bv8", &["--backend", "chunked", "--chunk", "16", "--bv", "8"]);
    let every_other = ["--backend", "chunked", "--chunk", "32", "--bv", "8", "--checkpoint", "64"];
    every_gradient_golden_through("chunked-c32-bv8-every64", &every_other);
    let sim = ["--backend", "ptx-sim", "--kernel", "chunked", "--chunk", "16", "--bv", "8"];
    every_gradient_golden_through("ptx-sim-chunked-bv8", &sim);
}

/// The same programs' PTX (sm_90, f32), run by the PTX simulator: the recurrent and the
/// chunked backward of every family.
#[test]
fn every_gradient_golden_through_the_backward_in_the_ptx_simulator() {
    every_gradient_golden_through("ptx-sim", &["--backend", "ptx-sim", "--checkpoint", "8"]);
    let chunked = ["--backend", "ptx-sim", "--kernel", "chunked", "--chunk", "16"];
    every_gradient_golden_through("ptx-sim-chunked", &chunked);
}

/// The chunked backward's PTX with its dots on tensor cores: tf32 operands, and bf16 inputs
/// with bf16 operands, each held to its precision's budget.
#[test]
fn every_gradient_golden_through_the_tensor_core_backward_in_the_ptx_simulator() {
    let chunked = ["--backend", "ptx-sim", "--kernel", "chunked", "--chunk", "16"];
    let tf32 = every_gradient_golden_at("ptx-sim-tf32", &[&chunked[..], &["--dot", "tf32"]].concat(), 1e-3);
    let bf16 = [&chunked[..], &["--dtype", "bf16", "--dot", "bf16"]].concat();
    let bf16 = every_gradient_golden_at("ptx-sim-bf16", &bf16, 1e-2);
    // Rounding must show: a run at f32 accuracy would mean the precision flags were ignored.
    assert!(tf32 > 1e-5 && bf16 > 1e-4, "tf32 worst {tf32:.1e}, bf16 worst {bf16:.1e}");
}

#[test]
fn the_copy_of_the_gradient_goldens_matches_the_shared_set() {
    let compared = common::check_golden_copy("goldens-bwd");
    assert!(compared == 0 || compared >= 19, "expected the 18 cases and the index, compared {compared}");
}

/// simple_gla inputs of 3 tokens with `do` `[1, 3, 2, 3]`.
fn simple_gla_grad_inputs() -> BTreeMap<String, Tensor> {
    let mut m = common::simple_gla_inputs(3);
    m.insert("do".into(), Tensor { shape: vec![1, 3, 2, 3], data: (0..18).map(|i| (i % 5) as f32 - 2.0).collect() });
    m
}

fn grad_with(name: &str, tensors: &BTreeMap<String, Tensor>) -> Output {
    let (inp, out) = (tmp(&format!("{name}-in.safetensors")), tmp(&format!("{name}-out.safetensors")));
    write_safetensors(&inp, tensors, None).expect("write inputs");
    chunkc(&["grad", "rules/simple_gla.toml", "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap()])
}

#[test]
fn grad_writes_every_gradient_and_refuses_bad_inputs_in_one_line() {
    let ok = simple_gla_grad_inputs();
    let o = grad_with("ok", &ok);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (written, _) = read_safetensors(tmp("ok-out.safetensors")).expect("written");
    let names: Vec<&str> = written.keys().map(String::as_str).collect();
    assert_eq!(names, ["dg", "dk", "dq", "dv", "hT", "o"], "no h0 given: no dh0");
    assert_eq!(written["dg"].shape, vec![1, 3, 2]);

    type Change = Box<dyn Fn(&mut BTreeMap<String, Tensor>)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        ("no_do", Box::new(|t| drop(t.remove("do"))), "tensor `do` is missing from"),
        (
            "bad_do",
            Box::new(|t| drop(t.insert("do".into(), Tensor { shape: vec![1, 3, 2, 4], data: vec![0.0; 24] }))),
            "tensor `do`: expected shape [1, 3, 2, 3] ([B, T, H, V]), got [1, 3, 2, 4]",
        ),
        (
            "bad_dht",
            Box::new(|t| drop(t.insert("dhT".into(), Tensor { shape: vec![1, 2, 4], data: vec![0.0; 8] }))),
            "tensor `dhT`: expected shape [1, 2, 4, 3]",
        ),
        (
            "extra",
            Box::new(|t| drop(t.insert("initial_state".into(), Tensor { shape: vec![1], data: vec![0.0] }))),
            "tensor `initial_state` in",
        ),
    ];
    for (name, change, want) in cases {
        let mut t = ok.clone();
        change(&mut t);
        let o = grad_with(name, &t);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{name}: one line: {e}");
    }
}

/// The edge cases flash-linear-attention's issues record, through the compiled backwards
/// (recurrent with checkpoints at 1 and 16 tokens, chunked at 16) against the reference
/// gradient (every tensor within its budget): T = 1, no h0 (the first
/// token's gate gradient), log gates of -20 next to ones near 0, dhT alone (do = 0), a scale
/// other than 1/sqrt(K), and T not a multiple of the checkpoint interval.
#[test]
fn backward_edge_cases_match_the_reference_gradient() {
    use chunkc::backend::Backend;
    use chunkc::dsl::ast::Domain;
    use chunkc::dsl::reference::Dims;
    use chunkc::grad::{grad, GradOptions};
    use chunkc::verify_grad::{random_grad_inputs, tolerance};
    let mut failures = vec![];
    let mut compared = 0;
    for family in ["simple_gla", "gla", "gated_delta_rule", "kda", "mamba2", "rwkv6"] {
        let loaded = chunkc::load_rule(&root().join("rules").join(format!("{family}.toml"))).expect("rule");
        let rule = &loaded.rule;
        type Edit<'r> = Box<dyn Fn(&mut BTreeMap<String, Tensor>) + 'r>;
        let cases: Vec<(&str, usize, Option<f64>, Edit)> = vec![
            ("T=1", 1, None, Box::new(|_| {})),
            ("T=1, no h0", 1, None, Box::new(|t| drop(t.remove("h0")))),
            ("no h0", 37, None, Box::new(|t| drop(t.remove("h0")))),
            ("dhT alone", 37, None, Box::new(|t| t.get_mut("do").expect("do").data.fill(0.0))),
            ("do alone", 37, None, Box::new(|t| drop(t.remove("dhT")))),
            ("scale 0.37", 20, Some(0.37), Box::new(|_| {})),
            (
                "gates -20 among -1e-3",
                40,
                None,
                Box::new(move |t| {
                    for inp in rule.inputs.iter().filter(|i| i.domain == Domain::LogGate && !i.per_head) {
                        let g = t.get_mut(&inp.name).expect("gate");
                        let per_token = g.data.len() / (2 * 40);
                        for (i, x) in g.data.iter_mut().enumerate() {
                            let token = (i / per_token / 2) % 40;
                            *x = if token == 7 || token == 23 { -20.0 } else { -1e-3 };
                        }
                    }
                }),
            ),
        ];
        for (what, seq_len, scale, edit) in cases {
            let dims = Dims { batch: 1, seq_len, heads: 2, k: 16, v: 12 };
            let mut inputs = random_grad_inputs(rule, &dims, 11 + seq_len as u64);
            edit(&mut inputs);
            let reference = grad(rule, &inputs, what, &GradOptions { scale, ..Default::default() }, false)
                .unwrap_or_else(|e| panic!("{family} {what}: reference: {e}"));
            // (backend, chunk, tokens between stored states): the chunked backward storing
            // every chunk's state, and every fourth (segments that run past T = 1, 20, 37, 40).
            let configs = [
                (Backend::Recurrent, 1, 1),
                (Backend::Recurrent, 16, 16),
                (Backend::Chunked, 16, 16),
                (Backend::Chunked, 8, 32),
            ];
            for (backend, chunk, every) in configs {
                let size = every;
                let opts = GradOptions { backend, scale, checkpoint: Some(every), chunk, ..Default::default() };
                let got = grad(rule, &inputs, what, &opts, false).unwrap_or_else(|e| panic!("{family} {what}: {e}"));
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    reference.keys().collect::<Vec<_>>(),
                    "{family} {what}: the same tensors"
                );
                for (name, want) in &reference {
                    let err = rel_rms(&got[name].data, &want.data);
                    compared += 1;
                    if err.is_nan() || err > tolerance(rule, name) {
                        failures.push(format!("{family} {what} {} {size}: {name} {err:.2e}", backend.name()));
                    }
                }
            }
        }
    }
    println!("{compared} tensors compared");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
