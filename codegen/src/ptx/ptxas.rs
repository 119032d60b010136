//! Running NVIDIA's `ptxas` on emitted PTX and reading its `-v` resource report.
//!
//! ptxas is found through `$CHUNKC_PTXAS`, else the venv `scripts/install_ptxas.sh` creates
//! in the workspace root (`.venv-ptxas/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas`),
//! else `ptxas` on `PATH`. It needs no GPU.

use super::{PtxError, Sm};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The message of the error returned when no ptxas can be found.
pub const PTXAS_MISSING: &str = "ptxas not found: run scripts/install_ptxas.sh or set CHUNKC_PTXAS";

/// ptxas's resource report for one entry (the numbers of `ptxas -v`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PtxasReport {
    /// `ptxas --version`'s last line, e.g. `Cuda compilation tools, release 12.9, V12.9.86`.
    pub version: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    /// Static shared memory (`smem`) in bytes; dynamic shared memory is not in the report.
    pub shared_bytes: u32,
    pub barriers: u32,
    /// Constant bank 0 bytes (the parameters).
    pub cmem0_bytes: u32,
    /// Lines of ptxas's output that are warnings.
    pub warnings: Vec<String>,
    /// ptxas's full stderr and stdout.
    pub raw: String,
}

impl std::fmt::Display for PtxasReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} registers, {} B spill stores, {} B spill loads, {} B stack, {} B smem, {} barriers",
            self.arch,
            self.registers,
            self.spill_stores,
            self.spill_loads,
            self.stack_frame,
            self.shared_bytes,
            self.barriers
        )
    }
}

fn venv_ptxas(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".venv-ptxas").join("lib");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter().map(|d| d.join("site-packages/nvidia/cuda_nvcc/bin/ptxas")).find(|p| p.is_file())
}

/// Where ptxas is: `$CHUNKC_PTXAS` (None when set to something that is not a file), the workspace's `.venv-ptxas` (this crate's workspace,
/// then the current directory and its ancestors), or `ptxas` on `PATH`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHUNKC_PTXAS").filter(|p| !p.is_empty()) {
        // An explicit choice: no fallback when it does not name a file.
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut roots = vec![];
    if let Some(ws) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        roots.push(ws.to_path_buf());
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Some(p) = roots.iter().find_map(|r| venv_ptxas(r)) {
        return Some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file())
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses the `ptxas -v` lines of one entry.
fn parse_report(out: &str, report: &mut PtxasReport) {
    for line in out.lines() {
        if line.contains("warning") {
            report.warnings.push(line.trim().to_string());
        }
        if line.contains("Used ") && line.contains("registers") {
            let body = &line[line.find("Used ").map_or(0, |i| i + 5)..];
            for part in body.split(',') {
                let part = part.trim();
                if part.ends_with("registers") {
                    report.registers = number_before(part, "registers").unwrap_or(0);
                } else if part.ends_with("barriers") {
                    report.barriers = number_before(part, "barriers").unwrap_or(0);
                } else if part.ends_with("smem") {
                    report.shared_bytes = number_before(part, "bytes smem").unwrap_or(0);
                } else if part.ends_with("cmem[0]") {
                    report.cmem0_bytes = number_before(part, "bytes cmem[0]").unwrap_or(0);
                }
            }
        }
        if line.contains("stack frame") {
            report.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
            report.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            report.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Assembles `ptx` for `target` with `ptxas -v` and returns its resource report. Fails with
/// ptxas's first error line when it rejects the PTX, and with [`PTXAS_MISSING`] when no
/// ptxas can be found.
pub fn assemble(ptx: &str, target: Sm) -> Result<PtxasReport, PtxError> {
    let ptxas = find_ptxas().ok_or_else(|| PtxError(PTXAS_MISSING.into()))?;
    let version = Command::new(&ptxas)
        .arg("--version")
        .output()
        .map_err(|e| PtxError(format!("{PTXAS_MISSING} ({}: {e})", ptxas.display())))?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .rfind(|l| l.contains("release"))
        .unwrap_or("")
        .trim()
        .to_string();

    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let stem = std::env::temp_dir().join(format!("chunkc-ptx-{}-{n}", std::process::id()));
    let (src, cubin) = (stem.with_extension("ptx"), stem.with_extension("cubin"));
    std::fs::write(&src, ptx).map_err(|e| PtxError(format!("cannot write {}: {e}", src.display())))?;
    let out =
        Command::new(&ptxas).arg(format!("-arch={}", target.name())).arg("-v").arg("-o").arg(&cubin).arg(&src).output();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&cubin);
    let out = out.map_err(|e| PtxError(format!("cannot run {}: {e}", ptxas.display())))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        let first = text.lines().find(|l| l.contains("error")).or_else(|| text.lines().next()).unwrap_or("no output");
        return Err(PtxError(format!("ptxas -arch={} failed: {}", target.name(), first.trim())));
    }
    let mut report = PtxasReport { version, arch: target.name().to_string(), raw: text.clone(), ..Default::default() };
    parse_report(&text, &mut report);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report() {
        let text = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
            ptxas info    : Function properties for k\n\
            \x20   16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 16 bytes smem, 392 bytes cmem[0]\n";
        let mut r = PtxasReport::default();
        parse_report(text, &mut r);
        assert_eq!((r.registers, r.barriers, r.shared_bytes, r.cmem0_bytes), (40, 1, 16, 392));
        assert_eq!((r.stack_frame, r.spill_stores, r.spill_loads), (16, 8, 12));
    }
}
