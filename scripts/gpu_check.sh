#!/usr/bin/env bash
# Proves chunkc's GPU path on a fresh GPU machine (no Rust toolchain needed there), in under
# 8 minutes at the default settings. Build the two binaries on a machine with Rust:
#
#   cargo build --release -p chunkc
#   cargo test --release --test gpu --no-run      # prints target/release/deps/gpu-<hash>
#   mkdir -p target/gpu && strip -o target/gpu/chunkc target/release/chunkc \
#       && strip -o target/gpu/gpu_test target/release/deps/gpu-<hash>   # 9 + 8 MB, not 71 + 64
#
# carry target/gpu to the GPU machine with the checkout, and run from the checkout's root:
#
#   scripts/gpu_check.sh target/gpu/chunkc target/gpu/gpu_test
#
# 1. tests/gpu.rs with CHUNKC_REQUIRE_GPU=1: every golden through `chunkc run --backend cuda`
#    (recurrent, chunked at 16-128, split; tf32 and bf16 at their budgets) and a random sweep
#    of every rule; a missing driver or device fails it.
# 2. `chunkc verify --backend cuda` for four rules (random shapes, T not a multiple of C).
# 3. When torch and flash-linear-attention import: FLA's Triton kernels against
#    `chunkc run/bench --backend cuda` on the same inputs (scripts/fla_gpu_peer.py), with the
#    relative error and the time ratio. Skipped, with a line saying so, when they do not.
set -euo pipefail
chunkc=${1:?usage: scripts/gpu_check.sh CHUNKC_BIN GPU_TEST_BIN}
gpu_test=${2:?usage: scripts/gpu_check.sh CHUNKC_BIN GPU_TEST_BIN}
cd "$(dirname "$0")/.."
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"

echo "== 1. goldens and the random sweep on the device (tests/gpu.rs, CHUNKC_REQUIRE_GPU=1)"
CHUNKC_REQUIRE_GPU=1 CHUNKC_BIN="$(realpath "$chunkc")" CHUNKC_ROOT="$PWD" "$gpu_test" --nocapture --test-threads 1

echo "== 2. verify --backend cuda"
for rule in simple_gla gla gated_delta_rule kda; do
    "$chunkc" verify "rules/$rule.toml" --backend cuda --T 1,37,130 --chunk 16,64 | tail -1
done

echo "== 3. against FLA's Triton kernels"
if python3 -c "import torch, fla; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 scripts/fla_gpu_peer.py "$chunkc" "${CHUNKC_GPU_SHAPE:-2,8192,16,128,128}"
else
    echo "skipped: torch with CUDA and flash-linear-attention do not import here (pip install flash-linear-attention)"
fi
echo "== 4. the model's best estimated schedules, timed (chunkc model --rank)"
for rule in gated_delta_rule simple_gla; do
    "$chunkc" model "rules/$rule.toml" --rank 3 --json | python3 -c 'import json,sys; [print(c["flags"]) for c in json.load(sys.stdin)["candidates"]]' |
    while read -r flags; do
        # shellcheck disable=SC2086 # the flags are words
        "$chunkc" bench "rules/$rule.toml" --backend cuda --dtype bf16 --dot bf16 --shape "${CHUNKC_GPU_SHAPE:-2,8192,16,128,128}" $flags --runs 10 | sed "s/^/  [$flags] /"
    done
done
echo "gpu_check: done in $(( $(date +%s) - start )) s"
