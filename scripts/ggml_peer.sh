#!/usr/bin/env bash
# Times llama.cpp's ggml recurrent CPU ops (GATED_LINEAR_ATTN, GATED_DELTA_NET) through the
# ggml-python wheel, as a peer for chunkc's CPU kernels.
#
#   scripts/ggml_peer.sh [T H D threads]      (B = 1; default 2048 8 128 1)
#
# CHUNKC_PEERS_VENV: the Python venv to use, created with ggml-python and numpy if missing
#                    (default /work/peers/venv; keep it outside the repository).
# CHUNKC_SHARED:     the shared directory holding tools/ggml_peer.py (default <repo>/../shared).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CHUNKC_PEERS_VENV:-/work/peers/venv}"
peer="${CHUNKC_SHARED:-$repo/../shared}/tools/ggml_peer.py"

if [[ ! -f "$peer" ]]; then
    echo "ggml_peer.sh: $peer not found (set CHUNKC_SHARED to the directory holding tools/ggml_peer.py)" >&2
    exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then
    if ! command -v python3 >/dev/null 2>&1; then
        echo "ggml_peer.sh: python3 not found on PATH; it is needed to create the venv $venv" >&2
        exit 1
    fi
    echo "ggml_peer.sh: creating $venv" >&2
    python3 -m venv "$venv"
fi
# Also repairs a venv whose first install was interrupted.
if ! "$venv/bin/python" -c "import ggml, numpy" >/dev/null 2>&1; then
    echo "ggml_peer.sh: installing ggml-python and numpy into $venv" >&2
    "$venv/bin/pip" install --quiet ggml-python numpy >&2
fi

if [[ $# -eq 0 ]]; then
    set -- 2048 8 128 1
fi
exec "$venv/bin/python" "$peer" "$@"
