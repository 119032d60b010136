#!/usr/bin/env bash
# Two builds (or two schedules) of `chunkc bench`, alternated run by run, so that a shared
# machine's drifting speed falls on both sides alike; prints every JSON line and, per rule,
# each side's best and median run and the ratio of the best runs (A over B: above 1, B is
# faster).
#
#   scripts/ab_bench.sh A_BIN "A_ARGS" B_BIN "B_ARGS" ROUNDS RULE...
#
# e.g. the build before a change against the one after, fused program at chunk 64:
#   scripts/ab_bench.sh /tmp/before/chunkc "--chunk 64" target/release/chunkc "--chunk 64" 3 gla kda
# or the fused against the split program, one build:
#   scripts/ab_bench.sh target/release/chunkc "--program fused" target/release/chunkc "--program split" 3 gla
# Every run: `bench RULE ARGS --runs 5 --json` at the default shape (B1 T2048 H8 K=V=128, one
# thread); add `--shape ...` to the ARGS for another.
set -euo pipefail
[[ $# -ge 6 ]] || { sed -n 2,15p "$0" >&2; exit 2; }
a_bin=$1 a_args=$2 b_bin=$3 b_args=$4 rounds=$5
shift 5
cd "$(dirname "$0")/.."
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for rule in "$@"; do
    a_runs=() b_runs=()
    for ((r = 0; r < rounds; r++)); do
        # shellcheck disable=SC2086 # the ARGS are word lists on purpose
        a=$("$a_bin" bench "rules/$rule.toml" $a_args --runs 5 --json)
        # shellcheck disable=SC2086
        b=$("$b_bin" bench "rules/$rule.toml" $b_args --runs 5 --json)
        echo "A $a"
        echo "B $b"
        a_runs+=("$a") b_runs+=("$b")
    done
    python3 - "$rule" "${#a_runs[@]}" "${a_runs[@]}" "${b_runs[@]}" <<'PY'
import json, sys
rule, n = sys.argv[1], int(sys.argv[2])
runs = [json.loads(x) for x in sys.argv[3:]]
a, b = runs[:n], runs[n:]
best = lambda rs: min(r["best_ms"] for r in rs)
median = lambda rs: sorted(r["median_ms"] for r in rs)[len(rs) // 2]
print(f"{rule}: A best {best(a):.3f} ms (median {median(a):.3f}), B best {best(b):.3f} ms "
      f"(median {median(b):.3f}); A/B best {best(a) / best(b):.3f}x, medians {median(a) / median(b):.3f}x")
PY
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
