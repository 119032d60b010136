#!/usr/bin/env bash
# chunkc's backward next to its own forward and to torch autograd through FLA's pure-torch
# chunked references, in one run (issue 14's speed table):
#   - chunkc: `bench` (chunked forward) and `bench --grad` (forward + backward), alternated
#     rule by rule so that both see the same machine;
#   - torch: forward + backward of naive_chunk_simple_gla, naive_chunk_gated_delta_rule and
#     naive_chunk_kda (autograd, MKL matmuls), loss sum(o * do) + sum(hT * dhT), as chunkc's.
# Shape: B=1, T=2048, H=8, K=V=128, f32, chunk 64. Prints every raw line and the ratio table.
#
#   scripts/bench_grad_peers.sh [threads]        (default 1)
#
# CHUNKC_TORCH_VENV  venv with torch + flash-linear-attention (default /work/venv-torch; the
#                    torch column is empty when it has no python)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-1}"
torch_venv="${CHUNKC_TORCH_VENV:-/work/venv-torch}"
rules=(simple_gla gla gated_delta_rule kda retention linear_attn mamba2 delta_rule)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
cargo build --release --quiet
for r in "${rules[@]}"; do
    for pass in "" "--grad"; do
        # shellcheck disable=SC2086
        target/release/chunkc bench "rules/$r.toml" --shape 1,2048,8,128,128 --chunk 64 --threads "$threads" \
            --runs 5 $pass --json | tee -a "$log"
    done
done
if [[ -x "$torch_venv/bin/python" ]]; then
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$torch_venv/bin/python" -W ignore - "$threads" <<'PY' 2>&1 |
import sys, time, torch, torch.nn.functional as F
from fla.ops.simple_gla.naive import naive_chunk_simple_gla
from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
from fla.ops.kda.naive import naive_chunk_kda
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
B, T, H, K, V, C = 1, 2048, 8, 128, 128, 64
def leaf(x):
    return x.detach().requires_grad_(True)
q, k, v = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1), torch.randn(B, T, H, V)
g = F.logsigmoid(torch.randn(B, T, H) + 3)
gk = F.logsigmoid(torch.randn(B, T, H, K) + 3)
beta = torch.sigmoid(torch.randn(B, T, H))
h0 = torch.randn(B, H, K, V) * 0.1
do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
peers = {
    "simple_gla": lambda x: naive_chunk_simple_gla(x[0], x[1], x[2], x[3], initial_state=x[4], output_final_state=True, chunk_size=C),
    "gated_delta_rule": lambda x: naive_chunk_gated_delta_rule(x[0], x[1], x[2], x[3], x[5], chunk_size=C, initial_state=x[4], output_final_state=True),
    "kda": lambda x: naive_chunk_kda(x[0], x[1], x[2], x[6], x[5], initial_state=x[4], output_final_state=True, chunk_size=C),
}
def fwd_bwd(f):
    x = [leaf(t) for t in (q, k, v, g, h0, beta, gk)]
    o, ht = f(x)
    ((o * do).sum() + (ht * dht).sum()).backward()
for name, f in peers.items():
    fwd_bwd(f)
    ts = []
    for _ in range(3):
        t = time.perf_counter(); fwd_bwd(f); ts.append(time.perf_counter() - t)
    ts.sort()
    print(f"torch {name} forward+backward threads{sys.argv[1]}: median {ts[1]*1e3:.1f} ms (best {ts[0]*1e3:.1f})")
PY
        grep -v -i warn | tee -a "$log" || true
else
    echo "(no torch venv at $torch_venv: torch column empty)"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"

python3 - "$log" <<'PY'
import json, re, sys
fwd, both, torch = {}, {}, {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        j = json.loads(line)
        (both if j.get("pass") == "forward+backward" else fwd)[j["rule"]] = (j["median_ms"], j["best_ms"])
    m = re.match(r"torch (\w+) forward\+backward threads\d+: median ([0-9.]+) ms \(best ([0-9.]+)\)", line)
    if m:
        torch[m[1]] = (float(m[2]), float(m[3]))
nan = (float("nan"), float("nan"))
print("\n| rule (f32, B1 T2048 H8 K=V=128, chunk 64) | chunkc forward ms (best) | forward + backward ms (best) | fwd+bwd / fwd (best runs; target <= 3x) | torch FLA autograd fwd+bwd ms (best) | torch / chunkc (best runs; target >= 5x) |")
print("|---|---|---|---|---|---|")
for rule in fwd:
    f, b, t = fwd[rule], both.get(rule, nan), torch.get(rule, nan)
    print(f"| {rule} | {f[0]:.1f} ({f[1]:.1f}) | {b[0]:.1f} ({b[1]:.1f}) | {b[1] / f[1]:.2f}x | {t[0]:.1f} ({t[1]:.1f}) | {t[1] / b[1]:.2f}x |")
PY
