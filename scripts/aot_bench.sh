#!/usr/bin/env bash
# The same kernel compiled at build time (chunkc-build, linked object code) and by the JIT,
# timed one after the other: gated_delta_rule, B1 T2048 H8 K=V=128, chunk 16, one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p chunkc -p build_time
for round in 1 2 3; do
    echo "-- round $round"
    target/release/build_time --bench
    target/release/chunkc bench rules/gated_delta_rule.toml --shape 1,2048,8,128,128 --chunk 16 --threads 1 --runs 10 | grep -E "ms|median" | head -3
done
