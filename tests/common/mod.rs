//! What the integration tests share: finding the goldens, running `chunkc run` on a case and
//! checking every case under a list of configurations (tests/goldens.rs, tests/gpu.rs); and
//! the property runner with its regression and fresh seeds (tests/properties.rs,
//! tests/library.rs).

#![allow(dead_code)] // each test binary uses part of it

use chunkc::runtime::io::read_safetensors;
use chunkc::verify::rel_rms;
use proptest::prelude::{ProptestConfig, Strategy};
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The checkout: $CHUNKC_ROOT when set (a test binary carried to another machine, as
/// scripts/gpu_check.sh runs tests/gpu.rs), else where it was built.
pub fn root() -> PathBuf {
    std::env::var_os("CHUNKC_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The chunkc binary: $CHUNKC_BIN when set (see [`root`]), else the one cargo built.
pub fn chunkc_bin() -> PathBuf {
    std::env::var_os("CHUNKC_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_chunkc")))
}

/// The goldens folder: $CHUNKC_GOLDENS, else ../shared/goldens beside the checkout (the
/// outside truth), else the copy of it in tests/goldens.
///
/// A missing golden set fails the test: a goldens test that passes without goldens would say
/// nothing. `CHUNKC_SKIP_GOLDENS=1` skips it instead, loudly (`.ci/run` refuses that variable).
pub fn goldens_dir() -> Option<PathBuf> {
    golden_set("goldens", "CHUNKC_GOLDENS")
}

/// The gradient goldens: $CHUNKC_GOLDENS_BWD, else ../shared/goldens-bwd, else the copy in
/// tests/goldens-bwd; missing, as [`goldens_dir`].
pub fn goldens_bwd_dir() -> Option<PathBuf> {
    golden_set("goldens-bwd", "CHUNKC_GOLDENS_BWD")
}

fn golden_set(name: &str, var: &str) -> Option<PathBuf> {
    let candidates = match std::env::var_os(var) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![root().join("../shared").join(name), root().join("tests").join(name)],
    };
    if let Some(dir) = candidates.iter().find(|d| d.join("index.json").is_file()) {
        return Some(dir.clone());
    }
    let skip = std::env::var_os("CHUNKC_SKIP_GOLDENS").is_some_and(|v| v == "1");
    assert!(skip, "no {name} at {candidates:?} (set {var}, or CHUNKC_SKIP_GOLDENS=1 to skip)");
    eprintln!("SKIPPED (CHUNKC_SKIP_GOLDENS=1): no {name} at {candidates:?}");
    None
}

/// Where both exist, the copy in tests/`name` must be byte-identical to ../shared/`name` (the
/// outside truth): every case file and the index. Returns how many files were compared (0
/// when ../shared/`name` is not beside this checkout).
pub fn check_golden_copy(name: &str) -> usize {
    let (shared, copy) = (root().join("../shared").join(name), root().join("tests").join(name));
    assert!(copy.join("index.json").is_file(), "tests/{name} is missing from the checkout");
    if !shared.join("index.json").is_file() {
        println!("no ../shared/{name} beside this checkout: the copy is the only set");
        return 0;
    }
    let mut compared = 0;
    for entry in std::fs::read_dir(&shared).expect("read the shared set") {
        let file = entry.expect("entry").file_name();
        let file = file.to_string_lossy();
        if !(file.ends_with(".safetensors") || file == "index.json") {
            continue;
        }
        let want = std::fs::read(shared.join(&*file)).expect("shared file");
        let got = std::fs::read(copy.join(&*file)).unwrap_or_else(|_| panic!("tests/{name} lacks {file}"));
        assert!(got == want, "tests/{name}/{file} differs from ../shared/{name}/{file}: copy it again");
        compared += 1;
    }
    compared
}

/// Deterministic simple_gla inputs of `seq_len` tokens: q, k `[1, T, 2, 4]`, v `[1, T, 2, 3]`,
/// g `[1, T, 2]` (-0.1 everywhere).
pub fn simple_gla_inputs(seq_len: usize) -> std::collections::BTreeMap<String, chunkc::runtime::tensor::Tensor> {
    use chunkc::runtime::tensor::Tensor;
    let t = |shape: Vec<usize>, f: f32| {
        let n = shape.iter().product();
        Tensor { shape, data: (0..n).map(|i| f * ((i % 7) as f32 - 3.0) / 7.0).collect() }
    };
    let mut m = std::collections::BTreeMap::new();
    m.insert("q".into(), t(vec![1, seq_len, 2, 4], 1.0));
    m.insert("k".into(), t(vec![1, seq_len, 2, 4], 0.5));
    m.insert("v".into(), t(vec![1, seq_len, 2, 3], 1.0));
    m.insert("g".into(), Tensor { shape: vec![1, seq_len, 2], data: vec![-0.1; 2 * seq_len] });
    m
}

/// Runs the `chunkc` binary from the checkout's root.
pub fn chunkc(args: &[&str]) -> std::process::Output {
    Command::new(chunkc_bin()).current_dir(root()).args(args).output().expect("chunkc runs")
}

/// A path in this test process's own temporary folder (`tag` keeps test files apart).
pub fn tmp(tag: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chunkc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// `chunkc run` on one golden file; returns `o` and `hT` (when written).
pub fn run_case(file: &Path, family: &str, args: &[&str], out: &Path) -> (Vec<f32>, Option<Vec<f32>>) {
    let rule = root().join("rules").join(format!("{family}.toml"));
    let status = Command::new(chunkc_bin())
        .arg("run")
        .arg(&rule)
        .arg("--inputs")
        .arg(file)
        .arg("--out")
        .arg(out)
        .arg("--allow-extra") // the golden files also hold the expected outputs
        .args(args)
        .output()
        .expect("chunkc runs");
    assert!(
        status.status.success(),
        "chunkc run {family} {args:?} failed:\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let (t, _) = read_safetensors(out).expect("output readable");
    (t["o"].data.clone(), t.get("hT").map(|x| x.data.clone()))
}

/// Every golden case under every configuration (extra `chunkc run` arguments), each held to
/// `tolerance` on `o` and `hT`; prints one line per run and the worst errors. `tag` names
/// the temp folder.
pub fn check_every_golden(dir: &Path, tag: &str, configs: &[Vec<&str>], tolerance: f64) {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).expect("index.json")).expect("json");
    let cases = index.as_array().expect("index is a list");
    assert!(cases.len() >= 18, "expected the 18 golden cases, found {}", cases.len());
    let tmp = std::env::temp_dir().join(format!("chunkc-goldens-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut failures = vec![];
    let mut checked = 0;
    let mut worst = 0.0f64;
    for case in cases {
        let file = dir.join(case["file"].as_str().expect("file"));
        let family = case["family"].as_str().expect("family");
        let (want, _) = read_safetensors(&file).expect("golden readable");
        for cfg in configs {
            let out = tmp.join("out.safetensors");
            let (o, ht) = run_case(&file, family, cfg, &out);
            let err_o = rel_rms(&o, &want["o"].data);
            let err_ht = match (want.get("hT"), ht) {
                (Some(w), Some(h)) => rel_rms(&h, &w.data),
                (None, _) => 0.0,
                (Some(_), None) => f64::INFINITY,
            };
            println!(
                "{:<28} {:<44} err o {err_o:.2e}  err hT {err_ht:.2e}",
                case["file"].as_str().unwrap_or(""),
                cfg.join(" ")
            );
            worst = worst.max(err_o).max(err_ht);
            if !(err_o <= tolerance && err_ht <= tolerance) {
                failures.push(format!("{} {}: o {err_o:.2e}, hT {err_ht:.2e}", family, cfg.join(" ")));
            }
            checked += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{tag}: worst rel RMS error {worst:.2e} over {checked} runs (tolerance {tolerance:.0e})");
    assert!(failures.is_empty(), "{} of {checked} golden runs failed:\n{}", failures.len(), failures.join("\n"));
}

/// The rule files in rules/, sorted (all 11 built-in ones at least).
pub fn rule_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("rules"))
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 11, "expected the 11 built-in rules");
    paths
}

/// The regression seed: every run draws these cases first, so a case that once failed (and
/// was fixed) stays covered.
pub const REGRESSION_SEED: u64 = 0x0c4a_4e6b;

/// A fresh seed for this run: `CHUNKC_PROPTEST_SEED=n` replays one; `CHUNKC_PROPTEST_FRESH=1`
/// (as `.ci/run` sets) draws one from the clock; otherwise None (the regression seed alone).
pub fn fresh_seed() -> Option<u64> {
    if let Some(s) = replay_seed() {
        return Some(s);
    }
    let fresh = std::env::var_os("CHUNKC_PROPTEST_FRESH").is_some_and(|v| v == "1");
    fresh.then(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (now as u64) ^ (u64::from(std::process::id()) << 32)
    })
}

/// The seed `CHUNKC_PROPTEST_SEED` asks to replay.
pub fn replay_seed() -> Option<u64> {
    let s = std::env::var("CHUNKC_PROPTEST_SEED").ok().filter(|s| !s.is_empty())?;
    Some(s.parse().unwrap_or_else(|_| panic!("CHUNKC_PROPTEST_SEED={s} is not a u64")))
}

/// Runs `test` on `cases` draws of `strategy` (kept small: a few seconds each in a release
/// build; `PROPTEST_CASES` overrides the count), first with [`REGRESSION_SEED`], then with
/// [`fresh_seed`] when there is one. The fresh seed is printed before it runs, and a failure
/// names it with the line that replays it.
pub fn property<S: Strategy>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    property_with(name, cases, strategy, true, test)
}

/// [`property`], with the fresh seed only when `fresh` (tests/properties.rs: the properties
/// that run without it, and why).
pub fn property_with<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    fresh: bool,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let base = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { base.cases } else { cases };
    let mut seeds = vec![(REGRESSION_SEED, "regression")];
    seeds.extend(if fresh { fresh_seed() } else { replay_seed() }.map(|s| (s, "fresh")));
    for (seed, kind) in seeds {
        if kind == "fresh" {
            eprintln!("{name}: fresh proptest seed {seed} (replay: CHUNKC_PROPTEST_SEED={seed})");
        }
        let config =
            ProptestConfig { cases, rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..base.clone() };
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name} failed with the {kind} seed {seed} (replay: CHUNKC_PROPTEST_SEED={seed}): {e}");
        }
    }
}
