#!/usr/bin/env bash
# Reproduces every number in docs/2d.md (2D sparse parallelism: model quality and speed).
#
#   CARGO_TARGET_DIR=/work/target-exp cargo build --release -p ember-tools
#   tools/experiments/2d.sh [quality|speed|bytes|sync|summary|all]   (default: all)
#
# Raw results go to $OUT (default /tmp/ember-2d) as JSON lines, one per run; `summary` prints
# the markdown tables of docs/2d.md from them. Quality numbers are deterministic (fixed seeds);
# speed numbers depend on the machine's load (recorded with each run from /proc/loadavg).
set -euo pipefail
E=${EMBER:-/work/target-exp/release/ember}
OUT=${OUT:-/tmp/ember-2d}
RUNS=${RUNS:-3}
mkdir -p "$OUT"
what=${1:-all}

# run TAG FILE ARGS...: one `ember train --json --quiet` run, its JSON line tagged and appended to FILE.
run() {
  local tag=$1 file=$2; shift 2
  local load line
  load=$(cut -d' ' -f1 /proc/loadavg)
  line=$("$E" train --json --quiet "$@" | tail -1)
  jq -c --arg tag "$tag" --arg load "$load" --arg args "$*" '. + {tag: $tag, load1: ($load|tonumber), args: $args}' <<<"$line" >>"$file"
  echo "  $tag: $(jq -r '"ne \(.ne)  samples/s \(.samples_per_s|floor)  a2a \(.a2a_bytes_per_rank|floor)  sync \(.sync_bytes_per_rank|floor)"' <<<"$line")" >&2
}

quality() {
  # Planted synthetic data, tiny preset, global batch 256, 600 steps, seeds 1..3.
  local f=$OUT/quality.jsonl; : >"$f"
  local common=(--preset tiny --steps 600 --batch-size 256)
  local fs=()
  if "$E" train --help | grep -q -- '--fully-sharded'; then fs=(1); fi
  for seed in 1 2 3; do
    run "1x1 (one process)"               "$f" "${common[@]}" --seed $seed --grid 1x1
    run "1x8 full sharding"               "$f" "${common[@]}" --seed $seed --grid 1x8
    run "4x2 c=M K=1 sparse"              "$f" "${common[@]}" --seed $seed --grid 4x2
    run "4x2 c=1 K=1 sparse"              "$f" "${common[@]}" --seed $seed --grid 4x2 --momentum-c 1
    run "4x2 c=M K=4 sparse"              "$f" "${common[@]}" --seed $seed --grid 4x2 --sync-every 4
    run "4x2 c=1 K=4 sparse"              "$f" "${common[@]}" --seed $seed --grid 4x2 --sync-every 4 --momentum-c 1
    run "4x2 c=M K=1 full"                "$f" "${common[@]}" --seed $seed --grid 4x2 --sync full
    run "4x2 c=M K=4 full"                "$f" "${common[@]}" --seed $seed --grid 4x2 --sync-every 4 --sync full
    run "4x2 c=sqrt(M)=2 K=1 sparse"      "$f" "${common[@]}" --seed $seed --grid 4x2 --momentum-c 2
    if [ ${#fs[@]} -gt 0 ]; then
      run "4x2 c=M fully sharded"         "$f" "${common[@]}" --seed $seed --grid 4x2 --fully-sharded
    fi
  done
}

speed() {
  # T = 8 in-process, bench model with rows capped at 100k (8 replicas fit), planner's choice.
  local f=$OUT/speed.jsonl; : >"$f"
  for i in $(seq "$RUNS"); do
    for g in 1x8 2x4 4x2 8x1; do
      run "$g" "$f" --preset bench --max-rows 100000 --batch-size 4096 --steps 20 --grid $g
    done
  done
}

bytes() {
  # Measured sparse-collective bytes per rank per step, one sharding type forced on every table;
  # bytes do not depend on the step count, so 3 steps suffice. Predictions from `ember plan`.
  local f=$OUT/bytes.jsonl p=$OUT/plan.jsonl; : >"$f"; : >"$p"
  for s in table row column table-row; do
    for g in 1x8 4x2; do
      run "$s $g" "$f" --preset bench --max-rows 100000 --batch-size 4096 --steps 3 --grid $g --sharding $s
      if "$E" plan --preset bench --max-rows 100000 --batch-size 4096 --grid $g --force ${s/-/_} --json >"$OUT/plan.tmp" 2>/dev/null; then
        tail -1 "$OUT/plan.tmp" | jq -c --arg tag "$s $g" '{tag: $tag, a2a_mean_bytes_per_rank, a2a_mean_total_bytes_per_rank}' >>"$p"
      fi
    done
  done
}

sync_bytes() {
  # Replica-sync bytes per rank per step, sparse vs whole-table, K = 1 and 4.
  local f=$OUT/sync.jsonl; : >"$f"
  for mode in sparse full; do
    for k in 1 4; do
      run "tiny 4x2 $mode K=$k"  "$f" --preset tiny --steps 600 --batch-size 256 --grid 4x2 --sync $mode --sync-every $k
      run "bench 4x2 $mode K=$k" "$f" --preset bench --max-rows 100000 --batch-size 4096 --steps 8 --grid 4x2 --sync $mode --sync-every $k
    done
  done
}

summary() { python3 "$(dirname "$0")/2d_summary.py" "$OUT"; }

case $what in
  quality) quality ;;
  speed) speed ;;
  bytes) bytes ;;
  sync) sync_bytes ;;
  summary) summary ;;
  all) quality; speed; bytes; sync_bytes; summary ;;
  *) echo "usage: $0 [quality|speed|bytes|sync|summary|all]" >&2; exit 2 ;;
esac
