//! `chunkc verify`'s default sweep for every rule in rules/: the recurrent kernel and the
//! chunked kernel at chunk 16, 32, 64 and 128, with T in {1, C-1, C+1, 1000}, on random
//! inputs from each input's domain, against the f64 reference (relative RMS <= 1e-5); and
//! the same chunked sweep through the split program (a state pass, then a chunk-parallel
//! output pass), whose boundary states start NaN-filled.

use chunkc::backend::{Backend, Engine};
use chunkc::codegen::schedule::ProgramShape;
use chunkc::verify::{verify, Plan};
use std::path::PathBuf;

/// `verify`'s default sweep (chunks 16 to 128, T in {1, C-1, C+1, 1000}, B = H = 2,
/// K = 32, V = 40, seed 1) of `runs` under `schedule`.
fn default_sweep(runs: Vec<(Backend, Engine)>, schedule: chunkc::Schedule) -> Plan {
    Plan {
        runs,
        chunks: vec![16, 32, 64, 128],
        seq_lens: None,
        batch: 2,
        heads: 2,
        k: 32,
        v: 40,
        threads: 0,
        seed: 1,
        schedule,
    }
}

#[test]
fn every_rule_passes_the_default_verify_sweep() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut failures = vec![];
    let mut runs = 0;
    let mut rules: Vec<PathBuf> = std::fs::read_dir(&dir).expect("rules/").map(|e| e.expect("entry").path()).collect();
    rules.sort();
    assert!(rules.len() >= 13, "expected the 13 built-in rules");
    for path in rules {
        let loaded = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(loaded.canonical.is_ok(), "{}: every built-in rule is chunkable", path.display());
        for (program, runs_of) in [
            (ProgramShape::Fused, vec![(Backend::Recurrent, Engine::Jit), (Backend::Chunked, Engine::Jit)]),
            (ProgramShape::Split, vec![(Backend::Chunked, Engine::Jit)]),
        ] {
            let plan = default_sweep(runs_of, chunkc::Schedule::default().with_program(program));
            let rows = verify(&loaded.rule, &plan, |_| {}).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            runs += rows.len();
            let worst = rows.iter().map(|r| r.err_o.max(r.err_ht)).fold(0.0, f64::max);
            println!(
                "{:<20} {:<5} {} runs, worst relative error {worst:.2e}",
                loaded.rule.name,
                program.name(),
                rows.len()
            );
            for r in rows.iter().filter(|r| !r.pass) {
                failures.push(format!(
                    "{} {} {} chunk {:?} T={}: o {:.2e}, hT {:.2e}",
                    loaded.rule.name,
                    program.name(),
                    r.label(),
                    r.chunk,
                    r.seq_len,
                    r.err_o,
                    r.err_ht
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {runs} runs failed:\n{}", failures.len(), failures.join("\n"));
}

/// `chunkc verify --grad`'s default sweep for every rule in rules/: the recurrent backward
/// (a checkpoint at every token and at its default interval) and, where it is built, the
/// chunked backward at chunk 16, 32, 64 and 128, T in {1, C-1, C+1, 1000}, every gradient
/// against the reference gradient within its budget. Every rule must have a chunked backward.
#[test]
fn every_rule_passes_the_default_verify_grad_sweep() {
    use chunkc::verify_grad::verify_grad;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut rules: Vec<PathBuf> = std::fs::read_dir(&dir).expect("rules/").map(|e| e.expect("entry").path()).collect();
    rules.sort();
    let (mut failures, mut rows_seen, mut chunked) = (vec![], 0, vec![]);
    let count = rules.len();
    for path in rules {
        let loaded = chunkc::load_rule(&path).unwrap_or_else(|e| panic!("{e}"));
        let canon = loaded.canonical.as_ref().expect("every built-in rule is chunkable");
        let probe = chunkc::codegen::plan::Shape { heads: 1, k: 4, v: 4, scale: 0.5 };
        let has_chunked =
            chunkc::codegen::plan::backward::chunked(&loaded.rule, canon, probe, chunkc::Schedule::chunked(4), 1)
                .is_ok();
        let mut runs = vec![(Backend::Recurrent, Engine::Jit)];
        if has_chunked {
            runs.push((Backend::Chunked, Engine::Jit));
            chunked.push(loaded.rule.name.clone());
        }
        let plan = default_sweep(runs, chunkc::Schedule::default());
        let rows = verify_grad(&loaded.rule, &plan, |_| {}).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        rows_seen += rows.len();
        let worst = rows.iter().map(|r| r.err / r.tolerance).fold(0.0, f64::max);
        println!("{:<20} {} rows, worst error {worst:.3} of its tolerance", loaded.rule.name, rows.len());
        for r in rows.iter().filter(|r| !r.pass) {
            failures.push(format!(
                "{} {} chunk {} T={} {}: {:.2e} > {:.0e}",
                loaded.rule.name, r.label, r.chunk, r.seq_len, r.tensor, r.err, r.tolerance
            ));
        }
    }
    assert_eq!(chunked.len(), count, "every built-in rule has a chunked backward: {chunked:?}");
    assert!(rows_seen > 1000, "only {rows_seen} rows");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The failures of `text`'s rule, forward and backward, on the native kernels (chunks 16 to
/// 128, and V split in tiles of 8 columns) and the PTX simulator (chunk 16, T = 1 and 37).
fn verify_everywhere(text: &str) -> Vec<String> {
    use chunkc::codegen::ptx::Sm;
    use chunkc::gpu::Device;
    use chunkc::verify_grad::verify_grad;
    let rule = chunkc::dsl::parse_rule("t.toml", text).unwrap_or_else(|d| panic!("{d}"));
    let sim = Engine::Ptx { device: Device::Sim, target: Sm::Sm90 };
    let native = vec![(Backend::Recurrent, Engine::Jit), (Backend::Chunked, Engine::Jit)];
    let sweeps = [
        (native.clone(), vec![16, 32, 64, 128], None, chunkc::Schedule::default()),
        (vec![(Backend::Chunked, Engine::Jit)], vec![16, 64], None, chunkc::Schedule::default().with_bv(Some(8))),
        (
            vec![(Backend::Recurrent, sim), (Backend::Chunked, sim)],
            vec![16],
            Some(vec![1, 37]),
            chunkc::Schedule::default(),
        ),
    ];
    let mut failures = vec![];
    for (runs, chunks, seq_lens, schedule) in sweeps {
        let plan = Plan { chunks, seq_lens, ..default_sweep(runs, schedule) };
        let rows = verify(&rule, &plan, |_| {}).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
        assert!(!rows.is_empty());
        for r in rows.iter().filter(|r| !r.pass) {
            failures.push(format!(
                "{} {} chunk {:?} T={}: o {:.2e}, hT {:.2e}",
                rule.name,
                r.label(),
                r.chunk,
                r.seq_len,
                r.err_o,
                r.err_ht
            ));
        }
        if plan.schedule.bv.is_some() {
            continue; // the backward refuses V-tiles
        }
        let rows = verify_grad(&rule, &plan, |_| {}).unwrap_or_else(|e| panic!("{}: {e}", rule.name));
        assert!(!rows.is_empty());
        for r in rows.iter().filter(|r| !r.pass) {
            failures.push(format!(
                "{} {} chunk {} T={} {}: {:.2e}",
                rule.name, r.label, r.chunk, r.seq_len, r.tensor, r.err
            ));
        }
    }
    failures
}

/// A rule that uses every piecewise function (`relu`, `abs`, `tanh`, `min`, `max`, `clip`,
/// the comparisons and `where`) in its gate, key, value and output.
#[test]
fn the_piecewise_functions_verify_on_every_backend_forward_and_backward() {
    let failures = verify_everywhere(
        r#"name = "piecewise"
chunked = true
step = """
g = -relu(a) - 0.05 * abs(tanh(c)) - 0.01
kk = where(k >= 0, k, 0.1 * k)
S = exp(g) * S + outer(clip(kk, -1.5, 1.5), min(v, 2 * max(v, 0.2)))
o = where(b != 0, scale * S^T @ q, v)
"""

[inputs]
q = "[K]"
k = "[K]"
v = "[V]"
a = "[K]"
c = "[K]"
b = { shape = "scalar", per_head = true }
"#,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Affine rules: a constant inside a delta rule's write, written in an order that used to
/// be refused, and constants added to the state and to the output.
#[test]
fn affine_rules_verify_on_every_backend_forward_and_backward() {
    let mut failures = vec![];
    for step in [
        "S = S + outer(k, beta * (v - S^T @ k + 1))\no = S^T @ q",
        "S = exp(-beta * beta) * (S + 0.5 * beta) + k + outer(k, v)\no = S^T @ q + 1",
    ] {
        let text = format!(
            "name = \"affine\"\nchunked = true\nstep = \"\"\"\n{step}\n\"\"\"\n[inputs]\nq = \"[K]\"\n\
             k = {{ shape = \"[K]\", domain = \"unit_norm\" }}\nv = \"[V]\"\n\
             beta = {{ shape = \"scalar\", domain = \"unit\" }}\n"
        );
        failures.extend(verify_everywhere(&text));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The planner's refusals reach `check` through `chunkc::checked`: a linear rule whose form
/// has no chunked kernel yet keeps its canonical form (`form`) and says why (`canonical`).
#[test]
fn forms_without_a_chunked_kernel_say_why() {
    let io = "q = \"[K]\"\nk = { shape = \"[K]\", domain = \"unit_norm\" }\nv = \"[V]\"\nb = { shape = \"scalar\", domain = \"unit\" }\ngv = { shape = \"[V]\", domain = \"log_gate\" }\n";
    let cases =
        [("S = exp(gv) * (S + outer(k, b * (v - S^T @ k)))", "a value-side gate together with a low-rank transition")];
    for (update, why) in cases {
        let text = format!("name = \"t\"\nstep = \"\"\"\n{update}\no = S^T @ q\n\"\"\"\n[inputs]\n{io}");
        let rule = chunkc::dsl::parse_rule("t.toml", &text).unwrap_or_else(|d| panic!("{d}"));
        let loaded = chunkc::checked(rule).unwrap_or_else(|e| panic!("{e}"));
        assert!(loaded.form.is_some(), "{update}: linear, with a canonical form");
        let reason = loaded.canonical.expect_err(update).reason;
        assert!(reason.contains(why), "{update}: {reason}");
    }
}
