#!/usr/bin/env bash
# One prepared GPU check for the CUDA backend, NCCL, and 2D training on one GPU.
#
#   tools/gpu-check.sh            here: build the release binary with --features cuda,nccl, stage it
#                                 with the test binaries and the torch reference in .gpu/
#                                 (git-ignored), and print how to run it on the GPU machine.
#   bash .gpu/gpu-check.sh device on the GPU machine: find libnvrtc/libcublas, run the selftest
#                                 with benchmarks, `ember bench embedding`, the torch reference,
#                                 and write a markdown results table to $OUT/gpu-results.md.
set -uo pipefail
mode=${1:-host}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ "$mode" = host ]; then
    set -e
    cd "$here"
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target}
    cargo build --release -p ember-tools --features cuda,nccl
    mkdir -p .gpu
    cp "$CARGO_TARGET_DIR/release/ember" .gpu/ember
    testbin() {  # testbin TARGET-NAME CARGO-ARGS...: path of a prebuilt test binary
        local name=$1; shift
        cargo test --release "$@" --no-run --message-format=json 2>/dev/null | python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]: print(m["executable"])' "$name" | tail -1
    }
    # The NCCL 1-rank smoke test (cuda/tests/nccl.rs), as a prebuilt test binary.
    cp "$(testbin nccl -p ember-cuda --features nccl --test nccl)" .gpu/nccl-test
    # GPU unit tests: pinned staging round trip (engine), dma-buf export of pool memory (cuda).
    cp "$(testbin ember_engine -p ember-engine --features cuda --lib)" .gpu/engine-lib-test
    cp "$(testbin ember_cuda -p ember-cuda --features cuda --lib)" .gpu/cuda-lib-test
    # The CUDA backend against the CPU self-test and 2D on one GPU against the f64 oracle.
    cp "$(testbin cuda_backend -p ember-tests --features cuda --test cuda_backend)" .gpu/cuda-backend-test
    strip .gpu/ember 2>/dev/null || true
    cp tools/torch_ref.py tools/gpu-check.sh .gpu/
    du -sh .gpu
    cat <<'CALL'
On the GPU machine (about 6 minutes on an H100/H200), copy the repository with its .gpu/
folder there, then run from the repository root:
  timeout 470 bash .gpu/gpu-check.sh device
It writes its log and tables to $OUT (default /tmp/gpu-out); copy $OUT/gpu-results.md back
into docs/gpu-results.md and $OUT/machine-gpu.toml (this GPU's calibrated machine file for the
scale model, docs/machine.md) into docs/machine-gpu.toml.
CALL
    exit 0
fi

# ---------------------------------------------------------------- device side
cd "$here"
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
log="$OUT/gpu-check.log"
exec > >(tee "$log") 2>&1
echo "== gpu-check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true

# Libraries: libcuda comes with the driver; libnvrtc and libcublas from a toolkit or wheels.
libdirs=""
for pat in libnvrtc.so.13 libcublas.so.13; do
    d=$( { ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib \
              /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib \
              /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
              /usr/lib/x86_64-linux-gnu 2>/dev/null; } | while read -r x; do
              [ -e "$x/$pat" ] && { echo "$x"; break; }; done)
    if [ -z "$d" ]; then
        d=$(find / -xdev -name "$pat*" -not -path '*/proc/*' 2>/dev/null | head -1 | xargs -r dirname)
    fi
    echo "$pat: ${d:-NOT FOUND}"
    [ -n "$d" ] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

PY=/opt/torch/.venv/bin/python3
[ -x "$PY" ] || PY=python3

# NCCL: the wheel's libnccl.so.2, linked as the libnccl.so cudarc opens (docs/cuda.md).
nccl=$(find / -xdev -name 'libnccl.so.2*' -not -path '/proc/*' 2>/dev/null | head -1)
if [ -n "$nccl" ]; then
    mkdir -p /tmp/nccl-link && ln -sf "$nccl" /tmp/nccl-link/libnccl.so
    export LD_LIBRARY_PATH="/tmp/nccl-link:$LD_LIBRARY_PATH"
fi
echo "libnccl: ${nccl:-NOT FOUND}"

echo "== ember selftest --device cuda --bench"
timeout 240 .gpu/ember selftest --device cuda --bench --markdown "$OUT/selftest.md"
st=$?
echo "selftest exit: $st"

echo "== ember bench embedding --device cuda (B = 65536, L = 20, 4M rows: the figures in docs/cuda.md)"
: > "$OUT/bench.txt"
for d in 64 128; do
    for z in "" "--zipf 1.05"; do
        echo "-- D=$d ${z:-uniform}" | tee -a "$OUT/bench.txt"
        timeout 40 .gpu/ember bench embedding --device cuda --tables 1 --rows 4000000 --dim $d --batch-size 65536 --bag-size 20 $z 2>&1 | tee -a "$OUT/bench.txt" || true
    done
done

if [ "$st" != 0 ]; then
    echo "== selftest failed: rerun with the general (sort-based) backward (EMBER_CUDA_BWD=legacy) to isolate"
    EMBER_CUDA_BWD=legacy timeout 120 .gpu/ember selftest --device cuda --markdown "$OUT/selftest-legacy.md" | tail -5
fi

echo "== CLI runs on the device"
: > "$OUT/cli.txt"
cli() {  # cli TIMEOUT ARGS...: run .gpu/ember ARGS, log the exact command and its output
    local t=$1; shift
    echo "\$ ember $*" | tee -a "$OUT/cli.txt"
    timeout "$t" .gpu/ember "$@" 2>&1 | grep -v '^\s*$' | tee -a "$OUT/cli.txt"
    echo "(exit ${PIPESTATUS[0]})" | tee -a "$OUT/cli.txt"
}
cli 60 bench embedding --device cuda
cli 60 bench embedding --device cuda --batch-size 65536
cli 90 bench dlrm --device cuda --batch-size 4096
cli 120 bench dlrm --device cuda --batch-size 65536
cli 60 bench mem --device cuda
cli 30 bench gemm --device cuda --batch-size 8192
# The scale model's figures of this GPU (docs/machine.md): memory, GEMM and embedding kernels
# measured, node shape and links from the matching preset; at most ~1 minute.
cli 90 simulate --calibrate "$OUT/machine-gpu.toml" --calibrate-device cuda
# 2D on one GPU (4 in-process ranks, own streams and pool arenas); target: grid 2x2
# >= 3x the torch reference of the same model and >= 20x the 2-core CPU backend.
cli 120 bench dlrm --device cuda --grid 2x2 --batch-size 4096
cli 150 bench dlrm --device cuda --grid 2x2 --batch-size 65536
cli 120 train --device cuda --grid 2x2 --steps 200
# Replica sync on the device path (peers: the packed rows gathered and scattered by kernels):
# its milliseconds, bytes and host<->device bytes per step, the model of docs/2d.md's speed table.
cli 90 train --device cuda --preset bench --max-rows 100000 --batch-size 4096 --steps 20 --grid 2x2
cli 90 train --device cuda --steps 200
echo "== GPU tests (ignored without a GPU): pinned staging, dma-buf export, CUDA backend vs CPU, 2D vs the f64 oracle"
for t in "engine-lib-test staging" "cuda-lib-test dmabuf" "cuda-backend-test ''"; do
    eval set -- $t
    echo "\$ $1 $2 --ignored --nocapture" | tee -a "$OUT/cli.txt"
    timeout 150 .gpu/$1 $2 --ignored --nocapture 2>&1 | grep -E "^test |test result|dma-buf|panicked|needs" | tee -a "$OUT/cli.txt"
    echo "(exit ${PIPESTATUS[0]})" | tee -a "$OUT/cli.txt"
done
echo "== NCCL 1-rank smoke test and bench"
timeout 120 .gpu/nccl-test --ignored --skip one_rank_per_gpu --nocapture 2>&1 | tail -30 | tee -a "$OUT/cli.txt"
cli 60 bench a2a --transport nccl --ranks 1 -b 1K -e 64M -f 4
cli 60 bench allreduce --transport nccl --ranks 1 -b 1K -e 64M -f 4
cli 150 train --device cuda --preset kaggle --steps 100

echo "== torch reference"
PYTHONUNBUFFERED=1 timeout 120 $PY .gpu/torch_ref.py --md "$OUT/torch.md" || echo "torch reference failed"

{
    echo "# GPU results"
    echo
    echo "Produced by \`tools/gpu-check.sh\` on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null), $(date -u +%F)."
    echo
    echo "## Self-test, pool and embedding kernels (\`ember selftest --device cuda --bench\`)"
    echo
    cat "$OUT/selftest.md" 2>/dev/null || echo "(selftest produced no table; exit $st)"
    echo
    echo "## \`ember bench embedding --device cuda\`"
    echo
    echo '```'
    cat "$OUT/bench.txt"
    echo '```'
    echo
    echo "## CLI runs (\`ember train|bench --device cuda\`)"
    echo
    echo '```'
    cat "$OUT/cli.txt"
    echo '```'
    echo
    echo "## Torch reference (same GPU)"
    echo
    cat "$OUT/torch.md" 2>/dev/null || echo "(torch reference failed)"
    echo
    echo "## Calibrated machine file (\`ember simulate --calibrate FILE --calibrate-device cuda\`, docs/machine.md)"
    echo
    echo '```toml'
    cat "$OUT/machine-gpu.toml" 2>/dev/null || echo "# (calibration failed; see the CLI runs above)"
    echo '```'
} > "$OUT/gpu-results.md"
echo "== done; results in $OUT/gpu-results.md"
