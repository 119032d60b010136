//! Per-op profile map for JIT code: which machine-code ranges each tile-IR statement became.
//!
//! perf sees the generated kernel as one symbol, which says nothing about which op is slow.
//! With `CHUNKC_PERF_MAP` set, [`write`] appends `start size name` lines (perf's map format,
//! hex addresses) to `/tmp/chunkc-ops-<pid>.map`, one per contiguous range of code lowered
//! from one statement (`lower.rs` tags code with source locations). perf itself reads
//! `/tmp/perf-<pid>.map`, where cranelift-jit already writes the whole function under
//! `perf record`; overlapping symbols there would be ambiguous, so this map is separate and
//! `scripts/perf_ops.sh` attributes `perf script` samples to it.

use std::collections::HashMap;
use std::io::Write;

use cranelift_codegen::ir::SourceLoc;

use super::lower::{LOOP_LOC, STORE_LOC};
use crate::ir::*;

/// Whether the map was asked for.
pub(super) fn enabled() -> bool {
    std::env::var_os("CHUNKC_PERF_MAP").is_some_and(|v| !v.is_empty())
}

/// A short name of what produced code tagged `loc`: the op and its result shape.
fn describe(kernel: &Kernel, defs: &HashMap<u32, &Op>, loc: u32) -> String {
    if loc == LOOP_LOC {
        return "loop copies".into();
    }
    if loc >= STORE_LOC {
        return format!("store %{}", loc - STORE_LOC);
    }
    let Some(id) = loc.checked_sub(1) else { return "entry".into() };
    let t = kernel.values.get(id as usize).copied();
    let shape = t.map(|t| format!("{}x{}{}", t.rows, t.cols, if t.dtype == DType::F64 { "d" } else { "" }));
    let what = match defs.get(&id) {
        Some(Op::Load { .. }) => "load".to_string(),
        Some(Op::Const { .. }) => "const".into(),
        Some(Op::IdxValue(_)) => "idx".into(),
        Some(Op::Unary { op, .. }) => format!("{op:?}").to_lowercase(),
        Some(Op::Binary { op, .. }) => format!("{op:?}").to_lowercase(),
        Some(Op::Cast { .. }) => "cast".into(),
        Some(Op::Dot { ta, tb, .. }) => format!("dot{}{}", if *ta { "_ta" } else { "" }, if *tb { "_tb" } else { "" }),
        Some(Op::Cumsum { .. }) => "cumsum".into(),
        Some(Op::RowSum { .. }) => "rowsum".into(),
        Some(Op::Mask { .. }) => "mask".into(),
        Some(Op::GatedDot { .. }) => "gated_dot".into(),
        Some(Op::GatedMatMul { .. }) => "gated_matmul".into(),
        Some(Op::SolveUnitLower { .. }) => "solve".into(),
        Some(Op::Concat { .. }) => "concat".into(),
        Some(Op::Rows { .. }) | Some(Op::Transpose { .. }) => "view".into(),
        None => "?".into(),
    };
    format!("%{id}={what}[{}]", shape.unwrap_or_default())
}

fn collect<'k>(stmts: &'k [Stmt], defs: &mut HashMap<u32, &'k Op>) {
    for s in stmts {
        match s {
            Stmt::Let { id, op } => {
                defs.insert(id.0, op);
            }
            Stmt::Loop { body, .. } => collect(body, defs),
            Stmt::Store { .. } => {}
        }
    }
}

/// Appends the ranges of the function at `code` (`len` bytes) to the map; errors are
/// reported on stderr and otherwise ignored (profiling must not break a run).
pub(super) fn write(kernel: &Kernel, code: *const u8, len: usize, ranges: &[(u32, u32, SourceLoc)]) {
    let mut defs = HashMap::new();
    collect(&kernel.body, &mut defs);
    let base = code as usize;
    let mut text = format!("{base:x} {len:x} chunkc_{}\n", kernel.name);
    for &(start, end, loc) in ranges {
        if end <= start {
            continue;
        }
        let name = if loc.is_default() { "untagged".to_string() } else { describe(kernel, &defs, loc.bits()) };
        text.push_str(&format!("{:x} {:x} {}::{name}\n", base + start as usize, end - start, kernel.name));
    }
    let path = format!("/tmp/chunkc-ops-{}.map", std::process::id());
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = res {
        eprintln!("chunkc: CHUNKC_PERF_MAP: writing {path}: {e}");
    }
}
