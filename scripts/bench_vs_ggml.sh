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
text = open(sys.argv[1]).read()
peer = {m[0]: float(m[1]) for m in re.findall(r"ggml (\w+) .*?, ([0-9.]+) M token-heads/s", text)}
rows = re.findall(r"^(\w+)/(\w+)\s.*?\n.*?thrpt:\s+\[[0-9.]+ \w+ ([0-9.]+) (\w)elem/s", text, re.M)
scale = {"K": 1e-3, "M": 1.0, "G": 1e3}
print("\n| kernel | M token-heads/s | ggml peer | ratio |\n|---|---|---|---|")
for fam, kind, val, unit in rows:
    mt = float(val) * scale.get(unit, 1.0)
    op = "GATED_DELTA_NET" if "delta" in fam else "GATED_LINEAR_ATTN"
    p = peer.get(op)
    print(f"| {fam} {kind} | {mt:.3f} | {op} {p:.3f} | {mt / p:.2f}x |" if p else f"| {fam} {kind} | {mt:.3f} | - | - |")
PY
rm -f "$log"
