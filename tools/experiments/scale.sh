#!/usr/bin/env bash
# The scale model's validation tables of docs/scale.md.
#
#   cargo build --release -p ember-tools        (or set EMBER to another ember binary)
#   tools/experiments/scale.sh here     predicted vs measured on this host, live: for each grid one
#                                       `ember simulate --json` and one measured `ember train --json`
#                                       (under `flock -x /work/.quiet.lock` when that file exists,
#                                       one grid per lock take, after the load falls below 1.5)
#   tools/experiments/scale.sh paper    the paper comparison on the datasheet H100 machine
#   tools/experiments/scale.sh plot     docs/img/scale-paper.svg
#
# MACHINE_THREADS / MACHINE_PROCS: the machine files of this host's in-process ranks and of its
# launched processes (default: the committed fixtures, calibrated by hand from microbenchmarks).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
E=${EMBER:-$ROOT/target/release/ember}
FX=$ROOT/engine/tests/fixtures
MT=${MACHINE_THREADS:-$FX/this-host-threads.toml}
MP=${MACHINE_PROCS:-$FX/this-host-procs.toml}
PAPER_MODEL=$ROOT/tools/experiments/scale/paper-1.7tb.toml
H100=$ROOT/tools/experiments/scale/h100-datasheet.toml
what=${1:-here}

quiet() {
  if [ -e /work/.quiet.lock ]; then
    flock -x /work/.quiet.lock bash -c 'for i in $(seq 60); do awk "BEGIN{exit !($(cut -d" " -f1 /proc/loadavg) < 1.5)}" && break; sleep 5; done; "$@"' _ "$@"
  else
    "$@"
  fi
}

here() {
  local model=(--preset bench --max-rows 100000 --batch-size 4096)
  printf '%-6s %-8s %12s %12s %8s   %s\n' grid ranks "pred ms" "meas ms" "error" "stages pred/meas ms: input_dist lookup output_dist dense backward sync"
  for spec in 1x8:threads 2x4:threads 4x2:threads 8x1:threads 1x2:procs 2x1:procs; do
    local g=${spec%%:*} kind=${spec##*:} mach=$MT launch=()
    if [ "$kind" = procs ]; then mach=$MP; launch=("$E" launch -n 2 --); fi
    local pred meas
    pred=$("$E" simulate "${model[@]}" --machine "$mach" --grid "$g" --json)
    meas=$(quiet "${launch[@]}" "$E" train "${model[@]}" --steps 20 --grid "$g" --json --quiet | grep '^{' | tail -1)
    python3 - "$g" "$kind" "$pred" "$meas" <<'EOF'
import json, sys
g, kind, p, m = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
keys = ["input_dist", "lookup", "output_dist", "dense", "backward", "sync"]
st = "  ".join(f"{p['stages'][k]:.1f}/{m['stages'][k]:.1f}" for k in keys)
err = (p["step_ms"] - m["step_ms_median"]) / m["step_ms_median"] * 100
print(f"{g:<6} {kind:<8} {p['step_ms']:12.1f} {m['step_ms_median']:12.1f} {err:+7.0f}%   {st}")
EOF
  done
}

paper() {
  local common=(--config "$PAPER_MODEL" --machine "$H100" --stats-samples 16384 --json)
  echo "# weak scaling, 1,024 samples per GPU; 2D keeps N = 64 (M = T/64)"
  printf '%6s %10s %14s %9s %9s %14s %9s %6s %14s %6s\n' T full "samples/s" "GiB" fits "2D K=1" "GiB" eff "2D K=8" eff
  local base1="" base8=""
  for t in 256 512 1024 2048 4096; do
    local b=$((t * 1024)) m=$((t / 64))
    local fs d1 d8
    fs=$("$E" simulate "${common[@]}" --grid 1x$t --batch-size $b)
    d1=$("$E" simulate "${common[@]}" --grid ${m}x64 --batch-size $b)
    d8=$("$E" simulate "${common[@]}" --grid ${m}x64 --batch-size $b --sync-every 8)
    python3 - "$t" "$fs" "$d1" "$d8" <<'EOF'
import json, sys
t = int(sys.argv[1]); fs, d1, d8 = (json.loads(x) for x in sys.argv[2:5])
g = lambda p: p["peak_bytes_per_rank"] / 2**30
f = lambda p: "yes" if p["fits"] else "OOM"
import os
state = "/tmp/ember-scale-paper-base"
if t == 256:
    open(state, "w").write(json.dumps([d1["samples_per_s"], d8["samples_per_s"]]))
b1, b8 = json.loads(open(state).read())
k = t / 256
print(f"{t:6d} {fs['grid']:>10} {fs['samples_per_s']:14.3e} {g(fs):9.1f} {f(fs):>9} {d1['samples_per_s']:14.3e} {g(d1):9.1f} {d1['samples_per_s']/(k*b1)*100:5.0f}% {d8['samples_per_s']:14.3e} {d8['samples_per_s']/(k*b8)*100:5.0f}%")
EOF
  done
  echo
  echo "# 256 GPUs, global batch 262,144: full sharding (1x256) against 2D with M = 4 (4x64)"
  local fs d
  fs=$("$E" simulate "${common[@]}" --grid 1x256 --batch-size 262144)
  d=$("$E" simulate "${common[@]}" --grid 4x64 --batch-size 262144)
  python3 - "$fs" "$d" <<'EOF'
import json, sys
fs, d = (json.loads(x) for x in sys.argv[1:3])
mem = lambda p: p["peak_bytes_per_rank"] / p["memory_per_rank"] * 100
print(f"{'':24} {'full sharding':>14} {'2D M=4':>14} {'paper full':>11} {'paper 2D':>9}")
print(f"{'samples/s':24} {fs['samples_per_s']:14.3e} {d['samples_per_s']:14.3e} {'1.53e6':>11} {'2.66e6':>9}")
print(f"{'2D / full sharding':24} {'':14} {d['samples_per_s']/fs['samples_per_s']:14.2f} {'':>11} {'1.74':>9}")
print(f"{'peak memory % of HBM':24} {mem(fs):14.1f} {mem(d):14.1f} {'72.4':>11} {'54.7':>9}")
print(f"{'imbalance (max/mean)':24} {fs['imbalance']:14.2f} {d['imbalance']:14.2f} {'5.70':>11} {'1.57':>9}")
EOF
}

plot() {
  "$E" simulate --config "$PAPER_MODEL" --machine "$H100" --stats-samples 16384 --sweep 256,512,1024,2048,4096 \
    --replicas 1,4,16,64 --per-rank-batch 1024 --plot "$ROOT/docs/img/scale-paper.svg"
}

case $what in
  here) here ;;
  paper) paper ;;
  plot) plot ;;
  *) echo "usage: $0 here|paper|plot" >&2; exit 2 ;;
esac
