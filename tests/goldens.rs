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

/// `--backend ptx-sim --target TARGET` plus `kernel` on every golden; one test per
/// configuration, so that the test harness runs them on separate cores.
fn goldens_in_the_simulator(tag: &str, target: &'static str, kernel: &[&'static str]) {
    let Some(dir) = goldens_dir() else { return };
    let config = [&["--backend", "ptx-sim", "--target", target][..], kernel].concat();
    check_every_golden(&dir, tag, &[config]);
}

#[test]
fn every_golden_through_the_ptx_simulator_recurrent_sm90() {
    goldens_in_the_simulator("sim-rec", "sm_90", &["--kernel", "recurrent"]);
}

#[test]
fn every_golden_through_the_ptx_simulator_chunked_c16_sm80() {
    goldens_in_the_simulator("sim-c16", "sm_80", &["--kernel", "chunked", "--chunk", "16"]);
}

#[test]
fn every_golden_through_the_ptx_simulator_chunked_c64_sm90() {
    goldens_in_the_simulator("sim-c64", "sm_90", &["--kernel", "chunked", "--chunk", "64"]);
}
