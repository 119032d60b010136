#!/usr/bin/env bash
# Installs ptxas (NVIDIA's PTX assembler, no GPU needed) from PyPI into a venv inside the
# checkout (.venv-ptxas, ignored by git) and prints the path of the ptxas binary.
# Idempotent: a second run reuses the venv and the installed wheel.
#
#   scripts/install_ptxas.sh            # prints e.g. /repo/.venv-ptxas/lib/python3.11/site-packages/nvidia/cuda_nvcc/bin/ptxas
#   export CHUNKC_PTXAS="$(scripts/install_ptxas.sh)"
#
# The version is pinned to one verified to assemble chunkc's PTX for sm_80 and sm_90
# (CUDA 12.9 ptxas accepts PTX ISA up to 8.8).
set -euo pipefail

NVCC_VERSION="12.9.86"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-ptxas"

die() {
    echo "install_ptxas: $*" >&2
    exit 1
}

command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH (needed to create $venv)"

find_ptxas() {
    local p
    for p in "$venv"/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas; do
        if [[ -x "$p" ]]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

if ! [[ -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv" >&2 || die "python3 -m venv $venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

installed="$("$venv/bin/python" -m pip show nvidia-cuda-nvcc-cu12 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [[ "$installed" != "$NVCC_VERSION" ]] || ! find_ptxas >/dev/null; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvcc-cu12==$NVCC_VERSION" >&2 \
        || die "pip install nvidia-cuda-nvcc-cu12==$NVCC_VERSION failed (is PyPI reachable?)"
fi

ptxas="$(find_ptxas)" || die "nvidia-cuda-nvcc-cu12 is installed but no ptxas under $venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/"
"$ptxas" --version >/dev/null 2>&1 || die "$ptxas does not run on this machine"
echo "$ptxas"
