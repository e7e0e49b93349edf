#!/usr/bin/env bash
# The scale model's validation tables of docs/scale.md.
#
#   cargo build --release -p ember-tools        (or set EMBER to another ember binary)
#   tools/experiments/scale.sh calibrate  this host's machine files from microbenchmarks only:
#                                         `ember simulate --calibrate` (in-process ranks) and,
#                                         for ranks as processes, `ember launch -n 2 -- ember bench
#                                         a2a|allreduce` (scale/procs_machine.py derives the file)
#   tools/experiments/scale.sh here       predicted vs measured on this host, live: for each grid
#                                         one `ember simulate --json` and one measured
#                                         `ember train --json`; RECORD=FILE.json also writes the
#                                         unit test's fixture (measured stages + calibration)
#   tools/experiments/scale.sh paper      the paper comparison on the h100-ib preset
#   tools/experiments/scale.sh plot       docs/img/scale-paper.svg
#
# Every measurement runs under /work/quiet when it exists (the machine's measurement lock; one
# command per lock take), else `flock -x /work/.quiet.lock` when that exists.
# MACHINE_THREADS / MACHINE_PROCS: the machine files of this host's in-process ranks and of its
# launched processes (default: the committed fixtures, written by `scale.sh calibrate`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
E=${EMBER:-$ROOT/target/release/ember}
FX=$ROOT/engine/tests/fixtures
MT=${MACHINE_THREADS:-$FX/this-host-threads.toml}
MP=${MACHINE_PROCS:-$FX/this-host-procs.toml}
PAPER_MODEL=$ROOT/tools/experiments/scale/paper-1.7tb.toml
H100=${MACHINE_PAPER:-h100-ib}
what=${1:-here}

quiet() {
  if [ -x /work/quiet ]; then
    # Inside the lock: give the watcher a moment to pause the others' compilers, then wait (at
    # most 20 s) until no more than this shell's own process is runnable.
    /work/quiet bash -c 'sleep 1.5; for i in $(seq 40); do [ "$(awk "/procs_running/{print \$2}" /proc/stat)" -le 2 ] && break; sleep 0.5; done; exec "$@"' _ "$@"
  elif [ -e /work/.quiet.lock ]; then
    flock -x /work/.quiet.lock bash -c 'for i in $(seq 60); do awk "BEGIN{exit !($(cut -d" " -f1 /proc/loadavg) < 1.5)}" && break; sleep 5; done; "$@"' _ "$@"
  else
    "$@"
  fi
}

calibrate() {
  local cmd="tools/experiments/scale.sh calibrate"
  quiet "$E" simulate --calibrate "$MT"
  # The sources name the command as run; the file is the repository's wherever it lives.
  sed -i "s|$ROOT/||g" "$MT"
  local tmp
  tmp=$(mktemp -d)
  quiet "$E" launch -n 2 -- "$E" bench a2a -b 256 -e 4M -f 4 -n 20 --json > "$tmp/a2a.jsonl"
  quiet "$E" launch -n 2 -- "$E" bench allreduce -b 1K -e 16M -f 4 -n 20 --json > "$tmp/ar.jsonl"
  (cd "$ROOT" && python3 tools/experiments/scale/procs_machine.py "$(realpath --relative-to="$ROOT" "$MT")" "$tmp/a2a.jsonl" "$tmp/ar.jsonl" "$cmd") > "$MP"
  "$E" simulate --preset bench --max-rows 100000 --batch-size 4096 --machine "$MP" --grid 1x2 > /dev/null
  rm -r "$tmp"
  echo "wrote $MT and $MP"
}

here() {
  local model=(--preset bench --max-rows 100000 --batch-size 4096)
  local rec
  rec=$(mktemp)
  printf '%-6s %-8s %12s %12s %8s   %s\n' grid ranks "pred ms" "meas ms" "error" "stages pred/meas ms (error): input_dist lookup output_dist dense backward sync"
  for spec in ${GRIDS:-1x8:threads 2x4:threads 4x2:threads 8x1:threads 1x2:procs 2x1:procs}; do
    local g=${spec%%:*} kind=${spec##*:} mach=$MT launch=()
    if [ "$kind" = procs ]; then mach=$MP; launch=("$E" launch -n 2 --); fi
    local pred meas
    pred=$("$E" simulate "${model[@]}" --stats-samples 16384 --machine "$mach" --grid "$g" --json)
    meas=$(quiet "${launch[@]}" "$E" train "${model[@]}" --steps 20 --grid "$g" --json --quiet | sed 's/^\[[0-9]*\] //' | grep '^{' | tail -1)
    python3 - "$g" "$kind" "$pred" "$meas" "$rec" "$(basename "$mach")" <<'EOF'
import json, sys
g, kind, p, m, rec, mach = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5], sys.argv[6]
keys = ["input_dist", "lookup", "output_dist", "dense", "backward", "sync"]
def e(a, b):
    return f"{(a - b) / b * 100:+.0f}%" if b > 0.05 else "-"
st = "  ".join(f"{p['stages'][k]:.1f}/{m['stages'][k]:.1f} ({e(p['stages'][k], m['stages'][k])})" for k in keys)
err = (p["step_ms"] - m["step_ms_median"]) / m["step_ms_median"] * 100
print(f"{g:<6} {kind:<8} {p['step_ms']:12.1f} {m['step_ms_median']:12.1f} {err:+7.0f}%   {st}", flush=True)
run = {"grid": g, "ranks": kind, "machine": mach, "step_ms_median": m["step_ms_median"], "samples_per_s": m["samples_per_s"], "stages": m["stages"], "imbalance": m.get("imbalance"), "predicted_step_ms": p["step_ms"]}
open(rec, "a").write(json.dumps(run) + "\n")
EOF
  done
  if [ -n "${RECORD:-}" ]; then
    python3 - "$rec" "$MT" "$RECORD" <<'EOF'
import json, sys, tomllib
rec, mt, out = sys.argv[1:4]
runs = [json.loads(l) for l in open(rec)]
m = tomllib.load(open(mt, "rb"))
fx = {
    "what": "Measured 2D steps of the bench model on this host (2 cores, no GPU) and the calibration the machine files hold (this-host-threads.toml: `ember simulate --calibrate`; this-host-procs.toml: derived by tools/experiments/scale/procs_machine.py); the scale model is checked against it (engine/src/simulate/measured_here.rs). Written by RECORD=FILE tools/experiments/scale.sh here.",
    "train_command": "ember train --preset bench --max-rows 100000 --batch-size 4096 --steps 20 --json --grid G   (threads: in-process; procs: ember launch -n 2 -- ember train ...), each under /work/quiet",
    "calibration": {
        "stream_bw": m["memory"]["stream_bw"],
        "gather_bw": m["memory"]["gather_bw"],
        "gemm_flops": m["compute"]["gemm_flops"],
        "emb_forward_eff": m["compute"]["emb_forward_eff"],
        "emb_backward_eff_rowwise": m["compute"]["emb_backward_eff"]["rowwise_adagrad"],
        "sources": m["sources"],
    },
    "runs": runs,
}
json.dump(fx, open(out, "w"), indent=1)
print(f"wrote {out}")
EOF
  fi
  rm -f "$rec"
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
  calibrate) calibrate ;;
  here) here ;;
  paper) paper ;;
  plot) plot ;;
  *) echo "usage: $0 calibrate|here|paper|plot" >&2; exit 2 ;;
esac
