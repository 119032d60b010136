//! Outside truth: every case in ../shared/goldens (flash-linear-attention's own naive
//! references) through `chunkc run`, within 1e-5 relative RMS error on `o` and `hT`:
//! - on the CPU, the recurrent and the chunked kernels at chunk 16, 32, 64 and 128, the
//!   split program (a state pass, then a chunk-parallel output pass) at the same chunks, and
//!   chunk 16 and 64 with V-tiles of 8 columns (`--bv 8`, fused and split);
//! - as PTX in the simulator (`--backend ptx-sim`), the recurrent kernel and the chunked one
//!   at chunk 16 and 64, for sm_90 and sm_80 (the simulator runs the PTX text, so both
//!   targets' output is executed);
//! - in the simulator with tensor-core schedules: tf32 dots (within 1e-3) on the chunked
//!   kernel at chunk 16 and 64, and bf16 inputs with bf16 dots (within 1e-2, against the
//!   goldens computed from the f32 inputs) on the chunked kernel at 16 and 64 and on the
//!   recurrent one;
//! - the split program in the simulator: f32 at chunk 16 (sm_80), tf32 dots at 64 (sm_90),
//!   bf16 inputs and dots at 16 (sm_80), its boundary states NaN-filled before the run.

mod common;

use chunkc::{F32_TOLERANCE, SIXTEEN_BIT_TOLERANCE};
use common::{check_every_golden, goldens_dir};

/// DESIGN.md's budget for tf32 dots.
const TF32_TOLERANCE: f64 = 1e-3;

#[test]
fn every_golden_through_chunkc_run() {
    let Some(dir) = goldens_dir() else { return };
    let chunks = ["16", "32", "64", "128"];
    let configs: Vec<Vec<&str>> = std::iter::once(vec!["--backend", "recurrent"])
        .chain(chunks.iter().map(|c| vec!["--backend", "chunked", "--chunk", c]))
        .chain(chunks.iter().map(|c| vec!["--backend", "chunked", "--chunk", c, "--program", "split"]))
        .collect();
    check_every_golden(&dir, "cpu", &configs, F32_TOLERANCE);
}

/// The same on the CPU with V split into tiles of 8 columns (`--bv 8`: V is 24 or 32 in the
/// goldens, so 3 or 4 V-tiles per head).
#[test]
fn every_golden_through_chunkc_run_with_v_tiles() {
    let Some(dir) = goldens_dir() else { return };
    let configs: Vec<Vec<&str>> = std::iter::once(vec!["--backend", "recurrent", "--bv", "8"])
        .chain(["16", "64"].iter().map(|c| vec!["--backend", "chunked", "--chunk", c, "--bv", "8"]))
        .chain(std::iter::once(vec!["--backend", "chunked", "--chunk", "16", "--bv", "8", "--program", "split"]))
        .collect();
    check_every_golden(&dir, "cpu-bv8", &configs, F32_TOLERANCE);
}

/// `--backend ptx-sim --target TARGET` plus `kernel` on every golden, held to `tolerance`;
/// one test per configuration, so that the test harness runs them on separate cores.
fn goldens_in_the_simulator_within(tag: &str, target: &'static str, kernel: &[&'static str], tolerance: f64) {
    let Some(dir) = goldens_dir() else { return };
    let config = [&["--backend", "ptx-sim", "--target", target][..], kernel].concat();
    check_every_golden(&dir, tag, &[config], tolerance);
}

/// The f32 paths (fma dots, f32 inputs) in the simulator, held to the f32 tolerance.
fn goldens_in_the_simulator(tag: &str, target: &'static str, kernel: &[&'static str]) {
    goldens_in_the_simulator_within(tag, target, kernel, F32_TOLERANCE);
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

#[test]
fn every_golden_through_the_ptx_simulator_tf32_dots_c16_sm80() {
    goldens_in_the_simulator_within("sim-tf32-c16", "sm_80", &["--chunk", "16", "--dot", "tf32"], TF32_TOLERANCE);
}

#[test]
fn every_golden_through_the_ptx_simulator_tf32_dots_c64_sm90() {
    goldens_in_the_simulator_within("sim-tf32-c64", "sm_90", &["--chunk", "64", "--dot", "tf32"], TF32_TOLERANCE);
}

#[test]
fn every_golden_through_the_ptx_simulator_bf16_c16_sm80() {
    let bf16 = ["--chunk", "16", "--dtype", "bf16", "--dot", "bf16"];
    goldens_in_the_simulator_within("sim-bf16-c16", "sm_80", &bf16, SIXTEEN_BIT_TOLERANCE);
}

#[test]
fn every_golden_through_the_ptx_simulator_bf16_c64_sm90() {
    let bf16 = ["--chunk", "64", "--dtype", "bf16", "--dot", "bf16"];
    goldens_in_the_simulator_within("sim-bf16-c64", "sm_90", &bf16, SIXTEEN_BIT_TOLERANCE);
}

#[test]
fn every_golden_through_the_ptx_simulator_bf16_recurrent_sm90() {
    let bf16 = ["--kernel", "recurrent", "--dtype", "bf16", "--dot", "bf16"];
    goldens_in_the_simulator_within("sim-bf16-rec", "sm_90", &bf16, SIXTEEN_BIT_TOLERANCE);
}

#[test]
fn every_golden_through_the_ptx_simulator_split_c16_sm80() {
    goldens_in_the_simulator("sim-split-c16", "sm_80", &["--chunk", "16", "--program", "split"]);
}

#[test]
fn every_golden_through_the_ptx_simulator_split_tf32_dots_c64_sm90() {
    let tf32 = ["--chunk", "64", "--dot", "tf32", "--program", "split"];
    goldens_in_the_simulator_within("sim-split-tf32-c64", "sm_90", &tf32, TF32_TOLERANCE);
}

#[test]
fn every_golden_through_the_ptx_simulator_split_bf16_c16_sm80() {
    let bf16 = ["--chunk", "16", "--dtype", "bf16", "--dot", "bf16", "--program", "split"];
    goldens_in_the_simulator_within("sim-split-bf16-c16", "sm_80", &bf16, SIXTEEN_BIT_TOLERANCE);
}

/// tests/goldens is a copy of ../shared/goldens (for checkouts without ../shared): where both
/// exist, every case file and the index must be byte-identical, so the copy cannot drift from
/// the outside truth unnoticed.
#[test]
fn the_copy_of_the_goldens_matches_the_shared_set() {
    let compared = common::check_golden_copy("goldens");
    assert!(compared == 0 || compared >= 19, "expected the 18 cases and the index, compared {compared}");
}
