//! `chunkc tune` and `--tuned` as a user meets them: a tuning run saves a verified schedule
//! that `bench` and `run` then use (and whose outputs still match the reference), and a missing
//! or stale entry is one clear line.

use chunkc::runtime::io::{read_safetensors, write_safetensors};
use chunkc::runtime::tensor::Tensor;
use chunkc::verify::{rel_rms, F32_TOLERANCE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn chunkc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chunkc"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CHUNKC_TUNE_CACHE")
        .args(args)
        .output()
        .expect("chunkc runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chunkc-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A tiny problem so that a whole search takes well under a second of timing.
const SHAPE: &str = "1,100,2,16,16";

fn tune(rule: &str, cache: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["tune", rule, "--shape", SHAPE, "--rounds", "2", "--cache", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    chunkc(&args)
}

fn json_line(out: &str) -> serde_json::Value {
    let line = out.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
    serde_json::from_str(line).expect("valid JSON")
}

/// simple_gla inputs at SHAPE, from a fixed pattern.
fn simple_gla_inputs(path: &Path) {
    let t = |shape: Vec<usize>, f: f32| {
        let n = shape.iter().product();
        Tensor { shape, data: (0..n).map(|i| f * (((i * 7919) % 13) as f32 - 6.0) / 13.0).collect() }
    };
    let mut m = BTreeMap::new();
    m.insert("q".to_string(), t(vec![1, 100, 2, 16], 1.0));
    m.insert("k".to_string(), t(vec![1, 100, 2, 16], 0.5));
    m.insert("v".to_string(), t(vec![1, 100, 2, 16], 1.0));
    m.insert(
        "g".to_string(),
        Tensor { shape: vec![1, 100, 2], data: (0..200).map(|i| -0.02 * (i % 5) as f32).collect() },
    );
    write_safetensors(path, &m, None).expect("write inputs");
}

#[test]
fn tune_saves_a_verified_schedule_that_bench_and_run_then_use() {
    let dir = fresh_dir("use");
    let cache = dir.join("tune.toml");
    let o = tune("rules/simple_gla.toml", &cache, &["--json"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let out = text(&o.stdout);
    for stage in ["kernel ", "time block ", "V tile "] {
        assert!(out.lines().any(|l| l.starts_with(stage)), "no {stage} stage:\n{out}");
    }
    for candidate in ["recurrent", "chunked C=16", "chunked C=32", "chunked C=64", "chunked C=128"] {
        assert!(out.contains(candidate), "{candidate} not tried:\n{out}");
    }
    assert!(out.contains("winner: "), "{out}");
    let winner = json_line(&out);
    let chunk = winner["chunk"].as_u64().expect("chunk");
    let saved = std::fs::read_to_string(&cache).expect("the cache was written");
    assert!(saved.contains("rule = \"simple_gla\"") && saved.contains("shape = [1, 100, 2, 16, 16]"), "{saved}");

    let o =
        chunkc(&["bench", "rules/simple_gla.toml", "--shape", SHAPE, "--tuned", "--cache", cache.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).starts_with("tuned schedule: "), "{}", text(&o.stderr));
    let bench = json_line(&text(
        &chunkc(&[
            "bench",
            "rules/simple_gla.toml",
            "--shape",
            SHAPE,
            "--tuned",
            "--cache",
            cache.to_str().unwrap(),
            "--json",
        ])
        .stdout,
    ));
    assert_eq!(bench["time_block"], winner["time_block"]);
    if winner["kernel"] == "chunked" {
        assert_eq!(bench["chunk"], chunk.to_string());
    }

    // `run --tuned` on inputs of the tuned shape: the tuned kernel's outputs match the reference.
    let inputs = dir.join("in.safetensors");
    simple_gla_inputs(&inputs);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["run", "rules/simple_gla.toml", "--inputs", inputs.to_str().unwrap()];
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = chunkc(&args);
        assert!(o.status.success(), "{extra:?}: {}", text(&o.stderr));
        read_safetensors(&out).expect("outputs")
    };
    let (tuned, meta) = run("tuned.safetensors", &["--tuned", "--cache", cache.to_str().unwrap(), "--threads", "1"]);
    let (reference, _) = run("ref.safetensors", &["--backend", "reference"]);
    assert_eq!(meta.get("backend").map(String::as_str), winner["kernel"].as_str(), "{meta:?}");
    for name in ["o", "hT"] {
        let err = rel_rms(&tuned[name].data, &reference[name].data);
        assert!(err <= F32_TOLERANCE, "{name}: {err:e}");
    }
}

#[test]
fn a_missing_or_stale_schedule_is_one_line_naming_the_command_to_run() {
    let dir = fresh_dir("stale");
    let cache = dir.join("tune.toml");
    let rule = dir.join("mine.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/simple_gla.toml"), &rule).expect("copy the rule");
    let rule_s = rule.to_str().unwrap();
    let bench = |shape: &str| {
        chunkc(&["bench", rule_s, "--shape", shape, "--runs", "1", "--tuned", "--cache", cache.to_str().unwrap()])
    };

    let o = bench(SHAPE);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(e.starts_with("error: --tuned: ") && e.contains("has no schedule for rule `simple_gla`"), "{e}");
    assert!(e.contains(&format!("run `chunkc tune {rule_s} --shape {SHAPE} --threads 1`")), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");

    assert!(tune(rule_s, &cache, &[]).status.success());
    assert!(bench(SHAPE).status.success());
    // Another shape has no entry...
    assert!(text(&bench("1,100,2,16,32").stderr).contains("has no schedule"));
    // ... but one within 2x of the tuned T, same K and V, takes the tuned schedule, and says so.
    let [b, t, h, k, v]: [usize; 5] =
        SHAPE.split(',').map(|x| x.parse().unwrap()).collect::<Vec<_>>().try_into().unwrap();
    let near = format!("{b},{},{h},{k},{v}", t + t / 2);
    let o = bench(&near);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let e = text(&o.stderr);
    assert!(e.contains(&format!("tuned at B={b} T={t} H={h} K={k} V={v}, the nearest tuned shape")), "{e}");

    // Editing the rule makes the entry stale, not silently reused.
    let mut source = std::fs::read_to_string(&rule).expect("read");
    source.push_str("\n# edited\n");
    std::fs::write(&rule, source).expect("write");
    let o = bench(SHAPE);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(e.contains("the rule file has changed since"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");

    // `--tuned` conflicts with the flags it replaces.
    let o = chunkc(&["bench", rule_s, "--tuned", "--chunk", "32"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("'--tuned' cannot be used with '--chunk <CHUNK>'"), "{}", text(&o.stderr));
}

#[test]
fn a_rule_without_a_chunked_kernel_tunes_the_recurrent_one() {
    let dir = fresh_dir("nonlinear");
    let rule = dir.join("normalised.toml");
    std::fs::write(
        &rule,
        "name = \"normalised\"\nstep = \"\"\"\nS = sigmoid(S + outer(k, v))\no = S^T @ q\n\"\"\"\n\n\
         [inputs]\nq = \"[K]\"\nk = \"[K]\"\nv = \"[V]\"\n",
    )
    .expect("write rule");
    let o = tune(rule.to_str().unwrap(), &dir.join("tune.toml"), &["--json"]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let out = text(&o.stdout);
    assert!(!out.contains("chunked C="), "{out}");
    assert_eq!(json_line(&out)["kernel"], "recurrent");
}

#[test]
fn a_corrupt_cache_is_an_error_naming_the_file() {
    let dir = fresh_dir("corrupt");
    let cache = dir.join("tune.toml");
    std::fs::write(&cache, "[[entry]]\nrule = 3\n").expect("write");
    let o = tune("rules/simple_gla.toml", &cache, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(e.starts_with(&format!("error: {}: ", cache.display())), "{e}");
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), "[[entry]]\nrule = 3\n", "a bad cache is not overwritten");
}

/// `--shape` repeated tunes each shape in turn, one cache entry each; a shape that is not
/// five sizes is one line.
#[test]
fn several_shapes_tune_in_one_go() {
    let dir = fresh_dir("shapes");
    let cache = dir.join("tune.toml");
    let o = chunkc(&[
        "tune",
        "rules/simple_gla.toml",
        "--shape",
        "1,40,2,8,8",
        "--shape",
        "1,24,1,8,16",
        "--rounds",
        "1",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("shape 1 of 2") && out.contains("shape 2 of 2"), "{out}");
    assert!(out.contains("B=1 T=40 H=2 K=8 V=8") && out.contains("B=1 T=24 H=1 K=8 V=16"), "{out}");
    let saved = std::fs::read_to_string(&cache).expect("the cache");
    assert_eq!(saved.matches("[[entry]]").count(), 2, "{saved}");
    let o = chunkc(&["tune", "rules/simple_gla.toml", "--shape", "1,40,2,8", "--cache", cache.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("five sizes per shape"), "{}", text(&o.stderr));
}
