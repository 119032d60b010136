#!/usr/bin/env bash
# chunkc's CPU chunked forward next to its peers, in one run, with the machine's FMA peak:
#   - ggml's GATED_LINEAR_ATTN / GATED_DELTA_NET (llama.cpp CPU ops, ggml-python wheel);
#   - flash-linear-attention's pure-torch chunked references (torch CPU, MKL matmuls);
#   - one core's f32 FMA peak (register-resident FMA chains, codegen/benches/peak.rs).
# Shape: B=1, T=2048, H=8, K=V=128, f32; 1 and 2 threads. Prints the 1-minute load average at
# the start and the end (the machine is shared), every raw line, and the ratio table.
#
#   scripts/bench_peers.sh [threads...]        (default: 1 2)
#
# CHUNKC_PEERS_VENV  venv with ggml-python + numpy (default /work/peers/venv; scripts/ggml_peer.sh
#                    creates it on first use)
# CHUNKC_TORCH_VENV  venv with torch + flash-linear-attention (default /work/venv-torch; the
#                    torch rows are skipped when it has no python)
# CHUNKC_SHARED      directory holding tools/ggml_peer.py and tools/torch_cpu_peer.py
#                    (default <repo>/../shared)
# CHUNKC_CHUNK       chunkc's chunk size (default 64; the FLOP count follows it)
# CHUNKC_TUNED=1     run `chunkc tune` for each rule and thread count first (into a temporary
#                    cache) and bench the schedule it picks (`--tuned`) instead of CHUNKC_CHUNK
set -euo pipefail
cd "$(dirname "$0")/.."
threads=("$@")
[[ ${#threads[@]} -gt 0 ]] || threads=(1 2)
shared="${CHUNKC_SHARED:-$PWD/../shared}"
torch_venv="${CHUNKC_TORCH_VENV:-/work/venv-torch}"
rules=(simple_gla gla mamba2 gated_delta_rule kda)
chunk="${CHUNKC_CHUNK:-64}"
tuned="${CHUNKC_TUNED:-0}"
log=$(mktemp)
tune_cache="$log.tune.toml"
trap 'rm -f "$log" "$tune_cache"' EXIT

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
cargo build --release --quiet
echo "== FMA peak (one core)"
cargo bench --quiet -p chunkc-codegen --bench peak 2>/dev/null | grep -E '^fma_peak|thrpt' | tee -a "$log" || true

for n in "${threads[@]}"; do
    echo "== chunkc, $n thread(s)"
    for r in "${rules[@]}"; do
        if [[ "$tuned" == 1 ]]; then
            target/release/chunkc tune "rules/$r.toml" --shape 1,2048,8,128,128 --threads "$n" --cache "$tune_cache" | grep -E '^(winner|confirm)'
            schedule=(--tuned --cache "$tune_cache")
        else
            schedule=(--chunk "$chunk")
        fi
        target/release/chunkc bench "rules/$r.toml" --shape 1,2048,8,128,128 "${schedule[@]}" --threads "$n" --runs 5 --json | tee -a "$log"
    done
    echo "== ggml, $n thread(s)"
    scripts/ggml_peer.sh 2048 8 128 "$n" 2>&1 | tee -a "$log" || echo "ggml peer failed" >&2
    if [[ -x "$torch_venv/bin/python" && -f "$shared/tools/torch_cpu_peer.py" ]]; then
        echo "== torch (FLA naive chunked), $n thread(s)"
        OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n "$torch_venv/bin/python" -W ignore -c "
import sys, torch
torch.set_num_threads($n)
sys.argv = ['torch_cpu_peer.py', '1', '2048', '8', '128', '128']
exec(open('$shared/tools/torch_cpu_peer.py').read())
# FLA's pure-torch chunked KDA (per-channel gates and the delta rule), the peer of the kda row.
from fla.ops.kda.naive import naive_chunk_kda
gk = F.logsigmoid(torch.randn(B, T, H, K) + 3)
t = best(lambda: naive_chunk_kda(q, k, v, gk, beta, chunk_size=C))
print(f'kda chunk B{B} T{T} H{H} K{K} V{V}: {t*1e3:.1f} ms, {B*T*H/t/1e6:.2f} Mtok-head/s, {fl/t/1e9:.1f} GFLOP/s (chunk-form flops)')" 2>&1 | grep -v -i warn | sed "s/^/torch threads$n: /" | tee -a "$log" || true
    else
        echo "(no torch venv at $torch_venv: torch rows skipped)"
    fi
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"

python3 - "$log" <<'PY'
import json, re, sys
peak, chunkc, ggml, torch = None, {}, {}, {}
scale = {"": 1e-9, "K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}
for line in open(sys.argv[1]):
    m = re.search(r"thrpt:\s+\[\S+ \S+ ([0-9.]+) ([KMGT]?)elem/s", line)
    if m:
        peak = max(peak or 0.0, float(m[1]) * scale[m[2]])
    if line.startswith("{"):
        j = json.loads(line)
        best = j["token_heads_per_s"] / 1e6 * j["median_ms"] / j["best_ms"]
        kernel = j["backend"] + (j["chunk"] if j["backend"] == "chunked" else "")
        schedule = f"{kernel} tb{j['time_block']}" + (f" bv{j['bv']}" if j.get("bv") else "")
        chunkc[(j["rule"], j["threads"])] = (j["token_heads_per_s"] / 1e6, j["gflops"], best, schedule)
    m = re.match(r"ggml (\w+) .*threads(\d+): .*?, ([0-9.]+) M token-heads/s", line)
    if m:
        ggml[(m[1], int(m[2]))] = float(m[3])
    m = re.match(r"torch threads(\d+): (\w+) chunk B(\d+) T(\d+) H(\d+) .*?: ([0-9.]+) ms", line)
    if m:
        # From the time: the peer prints the rate with only two decimals.
        torch[(m[2], int(m[1]))] = int(m[3]) * int(m[4]) * int(m[5]) / (float(m[6]) * 1e3)
nan = float("nan")
ratio = lambda a, b: a / b if b > 0 else nan
print(f"\nFMA peak, one core: {peak:.0f} GFLOP/s" if peak else "\nFMA peak: not measured")
print("\n| kernel (f32, B1 T2048 H8 K=V=128) | threads | chunkc M tok-heads/s (best run) | chunk-form GFLOP/s | % of peak | ggml op | ggml M | vs ggml | torch FLA M | vs torch |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (rule, n), (mt, gf, best, schedule) in sorted(chunkc.items(), key=lambda x: (x[0][1], x[0][0])):
    delta = "delta" in rule or rule == "kda"
    op = "GATED_DELTA_NET" if delta else "GATED_LINEAR_ATTN"
    g = ggml.get((op, n), nan)
    peer = "kda" if rule == "kda" else ("gated_delta" if delta else "simple_gla")
    t = torch.get((peer, n), nan)
    pct = 100 * gf / (peak * n) if peak else nan
    print(f"| {rule} {schedule} | {n} | {mt:.3f} ({best:.3f}) | {gf:.1f} | {pct:.0f}% | {op} | {g:.3f} | {ratio(mt, g):.2f}x | {t:.3f} | {ratio(mt, t):.2f}x |")
print("\ntorch FLA peers: naive_chunk_simple_gla for simple_gla, mamba2 and gla (FLA has no pure-torch chunked GLA;"
      " the scalar-gated form is cheaper, so the gla ratio flatters torch), naive_chunk_gated_delta_rule, naive_chunk_kda.")
PY
