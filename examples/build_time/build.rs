//! Compiles two rules (and one of them again at the benchmark shape) into object code (and PTX for sm_90) when this crate builds; cargo
//! reruns this only when a rule file changes.

use chunkc_build::{Heads, Kernels, Schedule, Sm};

fn main() {
    let generated = Kernels::new()
        .rule("../../rules/gated_delta_rule.toml", Heads::new(4, 32, 32), Schedule::chunked(16))
        .rule("../../rules/mlstm.toml", Heads::new(4, 32, 32), Schedule::chunked(16))
        // The benchmark shape of docs/performance.md, for `build_time --bench`.
        .rule_as(
            "gated_delta_rule_k128",
            "../../rules/gated_delta_rule.toml",
            Heads::new(8, 128, 128),
            Schedule::chunked(16),
        )
        .ptx(Sm::Sm90)
        .generate();
    if let Err(e) = generated {
        // One line, as cargo shows a build script's failure.
        eprintln!("chunkc-build: {e}");
        std::process::exit(1);
    }
}
