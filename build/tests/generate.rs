//! `Kernels::generate_into` on real rule files: what lands in the output directory, the
//! generated module's functions, a schedule taken from a tuning cache, and the errors.

use chunkc::autotune::{Cache, Entry, KernelKind, ProgramShape};
use chunkc_build::{Heads, Kernels, Schedule, Sm};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn out_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chunkc-build-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn generates_the_library_the_module_and_the_ptx() {
    let dir = out_dir("generate");
    let heads = Heads::new(2, 16, 8);
    let generated = Kernels::new()
        .rule("rules/gated_delta_rule.toml", heads, Schedule::chunked(16))
        .rule_as("gdn_decode", "rules/gated_delta_rule.toml", heads, Schedule::recurrent())
        .rule("rules/mlstm.toml", heads, Schedule::chunked(32))
        .ptx(Sm::Sm80)
        .generate_into(&dir, &root())
        .expect("generates");
    let module = std::fs::read_to_string(&generated.module).expect("module");
    for want in [
        "pub mod gated_delta_rule {",
        "pub mod gdn_decode {",
        "pub mod mlstm {",
        "pub fn forward(q: &TensorRef<'_>, k: &TensorRef<'_>, v: &TensorRef<'_>, g: &TensorRef<'_>, beta: &TensorRef<'_>, h0: Option<&TensorRef<'_>>)",
        "n0: Option<&TensorRef<'_>>",
        "pub n_t: Tensor,",
        "pub fn forward_sm_80(device: Device,",
        "the chunked kernel at chunk 16 (fused program), compiled for H = 2, K = 16, V = 8",
        "the recurrent kernel",
    ] {
        assert!(module.contains(want), "the module lacks `{want}`:\n{module}");
    }
    let library = std::fs::read(&generated.library).expect("library");
    assert!(library.starts_with(b"!<arch>\n/ "), "an archive with its symbol index first");
    let symbols =
        ["chunkc_gated_delta_rule_gated_delta_rule_chunked_c16", "chunkc_gdn_decode_gated_delta_rule_recurrent"];
    for symbol in symbols {
        assert!(library.windows(symbol.len()).any(|w| w == symbol.as_bytes()), "{symbol} is not in the index");
        assert!(module.contains(symbol), "{symbol} is not declared");
    }
    for file in
        ["gated_delta_rule.spec.json", "mlstm.spec.json", "gated_delta_rule.sm_80.gated_delta_rule_chunked_c16.ptx"]
    {
        assert!(dir.join(file).exists(), "{file}");
    }
    assert!(generated.cargo_lines.iter().any(|l| l == "cargo:rustc-link-lib=static=chunkc_kernels"));
    assert!(generated
        .cargo_lines
        .iter()
        .any(|l| l.starts_with("cargo:rerun-if-changed=") && l.ends_with("mlstm.toml")));
}

#[test]
fn a_tuned_schedule_comes_from_the_cache_or_the_error_says_how_to_tune() {
    let dir = out_dir("tuned");
    let cache_path = dir.join("tune.toml");
    let rule_path = root().join("rules/simple_gla.toml");
    let rule = chunkc::load_rule(&rule_path).expect("rule").rule;
    let dims = chunkc::dsl::reference::Dims { batch: 1, seq_len: 512, heads: 2, k: 16, v: 8 };
    let key = chunkc::tune::key(&rule, &dims, 1);
    let mut cache = Cache::open(&cache_path).expect("cache");
    cache.insert(Entry {
        device: key.device,
        rule: key.rule,
        rule_hash: key.rule_hash,
        shape: key.shape,
        threads: 1,
        kernel: KernelKind::Chunked,
        chunk: 32,
        time_block: 128,
        bv: None,
        program: ProgramShape::Split,
        best_ms: 1.0,
        default_best_ms: None,
        tuned_unix: 0,
    });
    cache.save().expect("saved");
    let heads = Heads::new(2, 16, 8);
    // T = 400 is within 2x of the tuned 512: the nearest entry serves.
    let generated = Kernels::new()
        .rule_tuned("rules/simple_gla.toml", heads, (1, 400), 1, &cache_path)
        .generate_into(&dir, &root())
        .expect("generates");
    let module = std::fs::read_to_string(&generated.module).expect("module");
    assert!(module.contains("the chunked kernel at chunk 32 (split program)"), "{module}");
    assert!(module.contains("LinkedProgram::new(SPEC, kernels, 128,"), "the tuned time block");
    assert!(generated.cargo_lines.iter().any(|l| l.ends_with("tune.toml")), "rerun when the cache changes");
    let e = Kernels::new()
        .rule_tuned("rules/simple_gla.toml", heads, (1, 4096), 1, &cache_path)
        .generate_into(&dir, &root())
        .expect_err("no entry near T = 4096")
        .to_string();
    assert!(e.contains("has no schedule for rule `simple_gla`") && e.contains("chunkc tune"), "{e}");
}

#[test]
fn bad_requests_are_one_clear_error() {
    let dir = out_dir("errors");
    let heads = Heads::new(1, 4, 4);
    let none = Kernels::new().generate_into(&dir, &root()).expect_err("nothing to do").to_string();
    assert_eq!(none, "no rules to compile: add one with Kernels::rule");
    let twice = Kernels::new()
        .rule("rules/simple_gla.toml", heads, Schedule::chunked(16))
        .rule("rules/simple_gla.toml", heads, Schedule::recurrent())
        .generate_into(&dir, &root())
        .expect_err("same module")
        .to_string();
    assert_eq!(twice, "two rules would both be the module `simple_gla`: name one with Kernels::rule_as");
    let missing = Kernels::new()
        .rule("rules/no_such_rule.toml", heads, Schedule::chunked(16))
        .generate_into(&dir, &root())
        .expect_err("no file")
        .to_string();
    assert!(missing.contains("no_such_rule.toml"), "{missing}");
    let outside_cargo = Kernels::new().rule("rules/simple_gla.toml", heads, Schedule::chunked(16)).generate();
    if std::env::var_os("OUT_DIR").is_none() {
        assert_eq!(
            outside_cargo.expect_err("no OUT_DIR").to_string(),
            "OUT_DIR is not set: Kernels::generate runs from a build script"
        );
    }
}
