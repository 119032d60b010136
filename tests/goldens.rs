//! Outside truth: every case in ../shared/goldens (flash-linear-attention's own naive
//! references) through `chunkc run`, within 1e-5 relative RMS error on `o` and `hT`:
//! - on the CPU, the recurrent and the chunked kernels at chunk 16, 32, 64 and 128;
//! - as PTX in the simulator (`--backend ptx-sim`), the recurrent kernel and the chunked one
//!   at chunk 16 and 64, for sm_90 and sm_80 (the simulator runs the PTX text, so both
//!   targets' output is executed).

mod common;

use common::{check_every_golden, goldens_dir};

#[test]
fn every_golden_through_chunkc_run() {
    let Some(dir) = goldens_dir() else { return };
    let configs: Vec<Vec<&str>> = std::iter::once(vec!["--backend", "recurrent"])
        .chain(["16", "32", "64", "128"].iter().map(|c| vec!["--backend", "chunked", "--chunk", c]))
        .collect();
    check_every_golden(&dir, "cpu", &configs);
}

#[test]
fn every_golden_through_the_ptx_simulator() {
    let Some(dir) = goldens_dir() else { return };
    let sim = |target: &'static str, kernel: &[&'static str]| {
        [&["--backend", "ptx-sim", "--target", target][..], kernel].concat()
    };
    let configs = vec![
        sim("sm_90", &["--kernel", "recurrent"]),
        sim("sm_80", &["--kernel", "chunked", "--chunk", "16"]),
        sim("sm_90", &["--kernel", "chunked", "--chunk", "64"]),
    ];
    check_every_golden(&dir, "ptx-sim", &configs);
}
