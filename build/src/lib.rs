//! chunkc at build time. From a `build.rs`, compile rule files into CPU object code and PTX
//! text, and generate a Rust module with one typed function per rule, so that the program
//! links the kernels and `chunkc-runtime` only: no JIT, no compiler at run time.
//!
//! ```no_run
//! // build.rs
//! use chunkc_build::{Heads, Kernels, Schedule, Sm};
//! fn main() {
//!     Kernels::new()
//!         .rule("rules/gated_delta_rule.toml", Heads::new(4, 64, 64), Schedule::chunked(16))
//!         .ptx(Sm::Sm90)
//!         .generate()
//!         .unwrap_or_else(|e| panic!("chunkc: {e}"));
//! }
//! // src/main.rs
//! // include!(concat!(env!("OUT_DIR"), "/chunkc_kernels.rs"));
//! // let out = gated_delta_rule::forward(&q, &k, &v, &g, &beta, None)?;
//! // let gpu = gated_delta_rule::forward_sm_90(gated_delta_rule::Device::Cuda, &q, &k, &v, &g, &beta, None)?;
//! ```
//!
//! What lands in `OUT_DIR`: `libchunkc_kernels.a` (one object per rule, from
//! cranelift-object), `chunkc_kernels.rs` (the module), and per rule its program description
//! (`<rule>.spec.json`) and, for each PTX target, one `.ptx` file and its launch metadata per
//! phase. Each rule's module has `forward` (the linked CPU kernels) and, per PTX target,
//! `forward_<sm>` (the embedded PTX on a CUDA device or in the PTX simulator). Cargo reruns
//! the script only when a rule file (or the script) changes.

mod archive;
mod module;

pub use chunkc::codegen::schedule::ProgramShape;
pub use chunkc::{Error, Heads, Schedule, Sm};

use chunkc::codegen::cpu::object::compile_object;
use chunkc::codegen::cpu::Simd;
use chunkc::dsl::reference::Dims;
use std::path::{Path, PathBuf};

/// One rule to compile.
#[derive(Clone, Debug)]
struct Entry {
    path: PathBuf,
    module: Option<String>,
    heads: Heads,
    schedule: Choice,
}

/// Where a rule's schedule comes from.
#[derive(Clone, Debug)]
enum Choice {
    Given(Schedule),
    /// The tuning cache at `cache` (relative to the manifest directory), for problems of
    /// about `batch` x `seq_len` on `threads` threads on the build machine.
    Tuned {
        cache: PathBuf,
        batch: usize,
        seq_len: usize,
        threads: usize,
    },
}

/// The kernels a crate embeds: rules with the sizes and schedules to compile them for, and
/// the PTX targets to emit.
#[derive(Clone, Debug, Default)]
pub struct Kernels {
    entries: Vec<Entry>,
    ptx: Vec<Sm>,
}

/// What [`Kernels::generate_into`] wrote, and what cargo must be told.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The Rust module to `include!`.
    pub module: PathBuf,
    /// The static library of every rule's object code.
    pub library: PathBuf,
    /// The `cargo:` lines for the build script to print.
    pub cargo_lines: Vec<String>,
}

impl Kernels {
    pub fn new() -> Kernels {
        Kernels::default()
    }

    /// Compiles the rule file at `path` (relative to the crate's manifest directory) for
    /// `heads` under `schedule`, as the module named after the rule.
    pub fn rule(self, path: impl AsRef<Path>, heads: Heads, schedule: Schedule) -> Kernels {
        self.push(path, None, heads, Choice::Given(schedule))
    }

    /// [`Kernels::rule`] with the schedule `chunkc tune` found for this rule on the build
    /// machine: from the tuning cache file `cache` (relative to the manifest directory, a
    /// file committed beside the crate), at the shape `batch` x `seq_len` with `heads`, on
    /// `threads` threads, or the nearest tuned shape within 2x of it. No entry is an error
    /// that says which `chunkc tune` command makes one; cargo reruns the script when the
    /// cache changes.
    pub fn rule_tuned(
        self,
        path: impl AsRef<Path>,
        heads: Heads,
        (batch, seq_len): (usize, usize),
        threads: usize,
        cache: impl AsRef<Path>,
    ) -> Kernels {
        let choice = Choice::Tuned { cache: cache.as_ref().to_path_buf(), batch, seq_len, threads };
        self.push(path, None, heads, choice)
    }

    /// [`Kernels::rule`], as the module `module` (two programs of one rule: a chunked one
    /// for prefill and a recurrent one for decoding, say).
    pub fn rule_as(self, module: &str, path: impl AsRef<Path>, heads: Heads, schedule: Schedule) -> Kernels {
        self.push(path, Some(module.to_string()), heads, Choice::Given(schedule))
    }

    fn push(mut self, path: impl AsRef<Path>, module: Option<String>, heads: Heads, schedule: Choice) -> Kernels {
        self.entries.push(Entry { path: path.as_ref().to_path_buf(), module, heads, schedule });
        self
    }

    /// Also emits every rule's PTX for `sm`.
    pub fn ptx(mut self, sm: Sm) -> Kernels {
        if !self.ptx.contains(&sm) {
            self.ptx.push(sm);
        }
        self
    }

    /// For a build script: generates into `OUT_DIR`, rule paths relative to
    /// `CARGO_MANIFEST_DIR`, and prints the `cargo:` lines (link the library, rerun when a
    /// rule changes).
    pub fn generate(&self) -> Result<Generated, Error> {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or_else(|| Error::Input(format!("{name} is not set: Kernels::generate runs from a build script")))
        };
        let generated = self.generate_into(&var("OUT_DIR")?, &var("CARGO_MANIFEST_DIR")?)?;
        for line in &generated.cargo_lines {
            println!("{line}");
        }
        Ok(generated)
    }

    /// Generates into `out_dir`, reading rule paths relative to `base`.
    pub fn generate_into(&self, out_dir: &Path, base: &Path) -> Result<Generated, Error> {
        let io = |what: &Path, e: std::io::Error| Error::Input(format!("cannot write {}: {e}", what.display()));
        if self.entries.is_empty() {
            return Err(Error::Input("no rules to compile: add one with Kernels::rule".into()));
        }
        let mut objects = vec![];
        let mut modules = vec![];
        let mut cargo_lines = vec![];
        for entry in &self.entries {
            let path = base.join(&entry.path);
            cargo_lines.push(format!("cargo:rerun-if-changed={}", path.display()));
            let rule = chunkc::Rule::load(&path)?;
            let name = module::identifier(entry.module.as_deref().unwrap_or(rule.name()));
            if modules.iter().any(|m: &module::RuleModule| m.name == name) {
                return Err(Error::Input(format!(
                    "two rules would both be the module `{name}`: name one with Kernels::rule_as"
                )));
            }
            let schedule = match &entry.schedule {
                Choice::Given(s) => *s,
                Choice::Tuned { cache, batch, seq_len, threads } => {
                    let cache = base.join(cache);
                    cargo_lines.push(format!("cargo:rerun-if-changed={}", cache.display()));
                    let h = entry.heads;
                    let dims = Dims { batch: *batch, seq_len: *seq_len, heads: h.heads, k: h.k, v: h.v };
                    chunkc::tune::tuned_schedule(rule.ast(), &dims, *threads, &cache)?.schedule
                }
            };
            let program = chunkc::backend::build_program(rule.ast(), shape(entry.heads), &schedule)?;
            let object = compile_object(&program, &name, Simd::best()).map_err(|e| Error::Internal(e.to_string()))?;
            let spec_file = out_dir.join(format!("{name}.spec.json"));
            let spec_json = serde_json::to_string_pretty(&program.spec).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&spec_file, spec_json).map_err(|e| io(&spec_file, e))?;
            let mut ptx = vec![];
            for &sm in &self.ptx {
                let emitted = chunkc::gpu::emit(&program, sm, &schedule.ptx)?;
                for phase in &emitted.phases {
                    let stem = format!("{name}.{}.{}", sm.name(), phase.meta.entry);
                    let (text, meta) = (out_dir.join(format!("{stem}.ptx")), out_dir.join(format!("{stem}.json")));
                    std::fs::write(&text, &phase.ptx).map_err(|e| io(&text, e))?;
                    let json = serde_json::to_string_pretty(&phase.meta).map_err(|e| Error::Internal(e.to_string()))?;
                    std::fs::write(&meta, json).map_err(|e| io(&meta, e))?;
                    ptx.push((sm, phase.meta.entry.clone(), stem));
                }
            }
            let symbols = object.kernels.iter().map(|k| k.symbol.clone()).collect();
            objects.push(archive::Member { bytes: object.bytes, symbols });
            modules.push(module::RuleModule {
                name,
                source: entry.path.display().to_string(),
                rule: rule.ast().clone(),
                heads: entry.heads,
                schedule,
                kernels: object.kernels,
                simd: object.simd,
                ptx,
            });
        }
        let library = out_dir.join("libchunkc_kernels.a");
        std::fs::write(&library, archive::write(&objects)?).map_err(|e| io(&library, e))?;
        let module_path = out_dir.join("chunkc_kernels.rs");
        std::fs::write(&module_path, module::render(&modules)).map_err(|e| io(&module_path, e))?;
        cargo_lines.push(format!("cargo:rustc-link-search=native={}", out_dir.display()));
        cargo_lines.push("cargo:rustc-link-lib=static=chunkc_kernels".into());
        Ok(Generated { module: module_path, library, cargo_lines })
    }
}

fn shape(heads: Heads) -> chunkc::codegen::plan::Shape {
    let scale = heads.scale.unwrap_or(1.0 / (heads.k as f64).sqrt());
    chunkc::codegen::plan::Shape { heads: heads.heads, k: heads.k, v: heads.v, scale }
}
