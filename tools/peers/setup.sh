#!/usr/bin/env bash
# Creates the peers' virtual environment when it is absent (pip, from PyPI), with pinned,
# mutually compatible versions: torch 2.14.1, fbgemm-gpu-cpu 1.9.0 (built for torch 2.14) and
# torchrec 1.9.2 (installed with --no-deps beside fbgemm-gpu-cpu, so that pip does not pull the
# CUDA fbgemm-gpu; tensordict also --no-deps, with pyvers, its own dependency, so that torchrec
# imports: tools/peers/dlrm.py needs it). torch from PyPI brings its nvidia-* CUDA wheels (several GB); only the CPU
# paths are used.
#
#   bash tools/peers/setup.sh            # creates $EMBER_PEERS_VENV (default ~/.cache/ember/peers-venv)
#
# Prints the venv's python on its last line. Exits 3 ("skip") when python3 or the network is
# missing, leaving no half-made venv behind as valid (a marker file is written last).
set -euo pipefail
VENV="${EMBER_PEERS_VENV:-$HOME/.cache/ember/peers-venv}"
TORCH=2.14.1
FBGEMM=1.9.0
TORCHREC=1.9.2
MARK="$VENV/.ember-peers-$TORCH-$FBGEMM-$TORCHREC-2"
if [[ -f "$MARK" ]]; then echo "$VENV/bin/python"; exit 0; fi
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null; then echo "peers: skipped (no $PY)" >&2; exit 3; fi
rm -rf "$VENV"
"$PY" -m venv "$VENV" || { echo "peers: skipped (python venv failed)" >&2; exit 3; }
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "${PIP[@]}" "torch==$TORCH" "fbgemm-gpu-cpu==$FBGEMM" "numpy<3" \
   || ! "${PIP[@]}" --no-deps "torchrec==$TORCHREC" \
   || ! "${PIP[@]}" "torchmetrics==1.0.3" "iopath==0.1.10" "pyre-extensions==0.0.32" tqdm \
        cloudpickle orjson \
   || ! "${PIP[@]}" --no-deps "tensordict==0.15.3" \
   || ! "${PIP[@]}" "pyvers==0.2.3"; then
  echo "peers: skipped (pip install failed: no network or no wheel for this platform)" >&2
  exit 3
fi
touch "$MARK"
echo "$VENV/bin/python"
