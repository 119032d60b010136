#!/usr/bin/env bash
# The new_mixer walk-through (README.md here), end to end: check, verify (forward and
# backward), tune, write inputs, run, differentiate and time a rule that is not in rules/.
# Uses the release build (`cargo build --release` first) or $CHUNKC; fails on the first error.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
chunkc="${CHUNKC:-$here/../../target/release/chunkc}"
[[ -x "$chunkc" ]] || { echo "error: $chunkc not found; run cargo build --release first" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rule="$here/gla_tempered.toml"
step() { echo; echo "\$ chunkc $*"; "$chunkc" "$@"; }

step check "$rule"
step verify "$rule"
step verify "$rule" --grad --T 1,100
step tune "$rule" --shape 1,512,2,64,64 --rounds 2 --cache "$work/tune.toml"
step inputs "$rule" --shape 1,512,2,64,64 --grad --out "$work/in.safetensors"
step run "$rule" --inputs "$work/in.safetensors" --out "$work/out.safetensors" --allow-extra --threads 1 --tuned \
    --cache "$work/tune.toml"
step grad "$rule" --inputs "$work/in.safetensors" --out "$work/grads.safetensors"
step bench "$rule" --shape 1,512,2,64,64 --runs 3
