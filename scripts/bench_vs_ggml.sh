#!/usr/bin/env bash
# chunkc's CPU kernels next to ggml's recurrent CPU ops, in one run, one thread:
# B=1, T=2048, H=8, K=V=128, f32. Prints both sets of numbers and the ratios.
# Usage: scripts/bench_vs_ggml.sh     (needs python3; creates the ggml venv on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
echo "== ggml (ggml-python wheel), 1 thread"
scripts/ggml_peer.sh 2048 8 128 1 | tee "$log"
echo "== chunkc (criterion, 1 thread)"
cargo bench --bench forward 2>/dev/null | grep -E '^[a-z_]+/[a-z0-9]+|thrpt' | tee -a "$log"
python3 - "$log" <<'PY'
import re, sys
peer, rows, name = {}, [], None
scale = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}
for line in open(sys.argv[1]):
    m = re.match(r"ggml (\w+) .*?, ([0-9.]+) M token-heads/s", line)
    if m:
        peer[m[1]] = float(m[2])
    m = re.match(r"^(\w+)/(\w+)", line)
    if m:
        name = (m[1], m[2])
    m = re.search(r"thrpt:\s+\[\S+ \S+ ([0-9.]+) ([KMG]?)elem/s", line)
    if m and name:
        rows.append((*name, float(m[1]) * scale[m[2]]))
print("\n| kernel (1 thread, f32) | M token-heads/s | ggml op | ggml M token-heads/s | ratio |")
print("|---|---|---|---|---|")
for fam, kind, mt in rows:
    op = "GATED_DELTA_NET" if "delta" in fam or fam == "kda" else "GATED_LINEAR_ATTN"
    p = peer.get(op, float("nan"))
    print(f"| {fam} {kind} | {mt:.3f} | {op} | {p:.3f} | {mt / p:.2f}x |")
PY
rm -f "$log"
