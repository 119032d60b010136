//! `chunkc grad` against outside truth: every case of the gradient goldens (torch autograd in
//! float64 through flash-linear-attention's naive references, ../shared/goldens-bwd) through
//! the f64 reference's reverse mode. Each file's forward outputs and every gradient it holds
//! are compared: relative RMS within 1e-5 on o, hT, dq, dk, dv, dh0 and within 1e-4 on the
//! gate, beta and low-rank gradients (the budgets; the reference lands near 1e-7).
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

#[test]
fn every_gradient_golden_through_chunkc_grad() {
    let Some(dir) = goldens_bwd_dir() else { return };
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).expect("index.json")).expect("json");
    let cases = index.as_array().expect("a list");
    assert!(cases.len() >= 18, "expected the 18 cases, found {}", cases.len());
    let (mut failures, mut compared, mut worst) = (vec![], 0, 0.0f64);
    for case in cases {
        let file = dir.join(case["file"].as_str().expect("file"));
        let family = case["family"].as_str().expect("family");
        let rule = root().join("rules").join(format!("{family}.toml"));
        let out = tmp(&format!("{family}.safetensors"));
        let o = chunkc(&[
            "grad",
            rule.to_str().unwrap(),
            "--inputs",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--allow-extra",
        ]);
        assert!(o.status.success(), "{family}: {}", String::from_utf8_lossy(&o.stderr));
        let (want, _) = read_safetensors(&file).expect("golden");
        let (got, _) = read_safetensors(&out).expect("output");
        let mut line = format!("{:<26}", case["file"].as_str().unwrap_or(""));
        for (name, t) in &want {
            let derived = name == "o" || name == "hT" || (name.starts_with('d') && name != "do" && name != "dhT");
            if !derived {
                continue;
            }
            let Some(g) = got.get(name) else {
                failures.push(format!("{family}: no `{name}` written"));
                continue;
            };
            let err = rel_rms(&g.data, &t.data);
            line += &format!(" {name} {err:.1e}");
            worst = worst.max(err);
            compared += 1;
            if err.is_nan() || err > budget(name) {
                failures.push(format!("{family} {name}: {err:.2e} over {:.0e}", budget(name)));
            }
        }
        println!("{line}");
    }
    println!("worst relative RMS error {worst:.2e} over {compared} tensors");
    assert!(compared >= 128, "compared only {compared} tensors");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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
