//! Compiles two rules into object code (and PTX for sm_90) when this crate builds; cargo
//! reruns this only when a rule file changes.

use chunkc_build::{Heads, Kernels, Schedule, Sm};

fn main() {
    let generated = Kernels::new()
        .rule("../../rules/gated_delta_rule.toml", Heads::new(4, 32, 32), Schedule::chunked(16))
        .rule("../../rules/mlstm.toml", Heads::new(4, 32, 32), Schedule::chunked(16))
        .ptx(Sm::Sm90)
        .generate();
    if let Err(e) = generated {
        // One line, as cargo shows a build script's failure.
        eprintln!("chunkc-build: {e}");
        std::process::exit(1);
    }
}
