#!/usr/bin/env bash
# Profile of one chunkc kernel by tile-IR op: perf samples in the JIT code are attributed to
# the statement that generated them (CHUNKC_PERF_MAP, codegen/src/cpu/profile.rs); samples
# elsewhere are grouped by perf's own symbol.
#
#   scripts/perf_ops.sh RULE [extra `chunkc bench` args]     e.g. scripts/perf_ops.sh rules/gla.toml
set -euo pipefail
cd "$(dirname "$0")/.."
rule=${1:?usage: scripts/perf_ops.sh RULE [bench args]}
shift
data=$(mktemp /tmp/chunkc-perf.XXXXXX)
CHUNKC_PERF_MAP=1 perf record -q -o "$data" -- target/release/chunkc bench "$rule" --threads 1 "$@" >/dev/null 2>&1 &
wait $! || true
pid=$(perf script -i "$data" -F pid 2>/dev/null | awk 'NR==1{print $1}')
perf script -i "$data" -F ip,sym,dso 2>/dev/null | python3 -c '
import sys, bisect, collections
ranges = []
try:
    for line in open(sys.argv[1]):
        a, n, name = line.split(maxsplit=2)
        ranges.append((int(a, 16), int(n, 16), name.strip()))
except FileNotFoundError:
    pass
fn = [r for r in ranges if "::" not in r[2]]
ops = sorted(r for r in ranges if "::" in r[2])
starts = [r[0] for r in ops]
count, total = collections.Counter(), 0
for line in sys.stdin:
    parts = line.split(maxsplit=1)
    if not parts:
        continue
    total += 1
    ip = int(parts[0], 16)
    i = bisect.bisect_right(starts, ip) - 1
    if i >= 0 and ip < ops[i][0] + ops[i][1]:
        count[ops[i][2]] += 1
    elif any(a <= ip < a + n for a, n, _ in fn):
        count["(jit, untagged)"] += 1
    else:
        count[parts[1].strip() if len(parts) > 1 else "?"] += 1
for name, c in count.most_common(int(sys.argv[2])):
    print(f"{100 * c / total:6.2f}%  {name}")
# By kind: JIT ops by their op name, every other symbol as itself.
jit = {r[2] for r in ops}
kinds = collections.Counter()
for name, c in count.items():
    if name in jit:
        op = name.split("::", 1)[1]
        kinds[op.split("=", 1)[1].split("[")[0] if "=" in op else op.split(" %")[0]] += c
    else:
        kinds[name] += c
print("by op kind (JIT ops by kind, other code by symbol):")
for name, c in kinds.most_common(int(sys.argv[2]) or 25):
    print(f"{100 * c / total:6.2f}%  {name}")
print(f"{total} samples")
' "/tmp/chunkc-ops-$pid.map" "${CHUNKC_PERF_TOP:-30}"
rm -f "$data" "/tmp/chunkc-ops-$pid.map"
