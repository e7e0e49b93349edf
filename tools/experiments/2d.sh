#!/usr/bin/env bash
# Reproduces every number in docs/2d.md (2D sparse parallelism: model quality and speed).
#
#   cargo build --release -p ember-tools        (or set EMBER to another ember binary)
#   tools/experiments/2d.sh [quality|lr|fully-sharded|speed|bytes|plan|sync|summary|all]   (default: all)
#
# Raw results go to $OUT (default /tmp/ember-2d) as JSON lines, one per run; `summary` prints
# the markdown tables of docs/2d.md from them. Quality numbers are deterministic (fixed seeds);
# speed numbers depend on the machine's load (recorded with each run from /proc/loadavg).
set -euo pipefail
E=${EMBER:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/ember}
OUT=${OUT:-/tmp/ember-2d}
RUNS=${RUNS:-3}
mkdir -p "$OUT"
what=${1:-all}

# quiet: wait (at most 10 minutes) until the 1-minute load average is below 1.5 (QUIET_LOAD), so every
# timed round starts on a quiet machine (the wait is logged; a run after a timeout records its load).
quiet() {
  local i
  for i in $(seq 120); do
    awk -v q="${QUIET_LOAD:-1.5}" '{exit !($1 < q)}' /proc/loadavg && return 0
    [ "$i" = 1 ] && echo "  waiting for load < 1.5 ($(cut -d' ' -f1 /proc/loadavg))" >&2
    sleep 5
  done
  echo "  load still $(cut -d' ' -f1 /proc/loadavg) after 10 minutes; running anyway" >&2
}

# run TAG FILE ARGS...: one `ember train --json --quiet` run, its JSON line tagged and appended to FILE.
run() {
  local tag=$1 file=$2; shift 2
  local load line
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [ -n "${LAUNCH:-}" ]; then
    line=$("$E" launch -n "$LAUNCH" -- "$E" train --json --quiet "$@" | sed -n 's/^\[0\] {/{/p' | tail -1)
  else
    line=$("$E" train --json --quiet "$@" | tail -1)
  fi
  jq -c --arg tag "$tag" --arg load "$load" --arg args "$*" '. + {tag: $tag, load1: ($load|tonumber), args: $args}' <<<"$line" >>"$file"
  echo "  $tag: $(jq -r '"ne \(.ne)  samples/s \(.samples_per_s|floor)  a2a \((.a2a_bytes_per_rank // 0)|floor)  sync \((.sync_bytes_per_rank // 0)|floor)"' <<<"$line")" >&2
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
      run "4x2 c=M^2 fully sharded"       "$f" "${common[@]}" --seed $seed --grid 4x2 --fully-sharded
      run "4x2 c=M fully sharded"         "$f" "${common[@]}" --seed $seed --grid 4x2 --fully-sharded --momentum-c 4
    fi
  done
}

speed() {
  # T = 8 in-process, bench model with rows capped at 100k (8 replicas fit), planner's choice;
  # then T = 2 as two processes (`ember launch -n 2`, shared memory). With EMBER_BASE set (another ember binary, e.g. the previous main)
  # every run is made with both binaries in alternating order, the base tagged "G base".
  # Each round also measures the replica group's all-reduce (4 MiB, the sync's chunk size) with
  # all T ranks busy (`bench allreduce --split MxN`): the sync's floor is its bytes at that rate.
  # A round starts on a quiet machine (QUIET=run: before every run instead).
  local f=$OUT/speed.jsonl fl=$OUT/floor.jsonl; : >"$f"; : >"$fl"
  local args=(--preset bench --max-rows 100000 --batch-size 4096 --steps 20)
  local bins=("$E") tags=("")
  [ -n "${EMBER_BASE:-}" ] && bins+=("$EMBER_BASE") && tags+=(" base")
  for i in $(seq "$RUNS"); do
    quiet
    for g in ${GRIDS:-1x8 2x4 4x2 8x1 p1x2 p2x1}; do
      local order=(0 1); [ $((i % 2)) = 0 ] && order=(1 0)
      for j in "${order[@]}"; do
        [ "$j" -ge ${#bins[@]} ] && continue
        local E0=$E; E=${bins[$j]}
        [ "${QUIET:-round}" = run ] && quiet
        case $g in
          p*) LAUNCH=2 run "${g#p} (2 processes)${tags[$j]}" "$f" "${args[@]}" --grid "${g#p}" ;;
          *) run "$g${tags[$j]}" "$f" "${args[@]}" --grid "$g" ;;
        esac
        E=$E0
      done
      case $g in
        1x8|p*) ;;
        *) [ "${QUIET:-round}" = run ] && quiet
           "$E" bench allreduce --ranks 8 --split "$g" -b 4M -e 4M -n 10 --json 2>/dev/null \
             | jq -c --arg tag "$g" 'select(.group == "replica") | {tag: $tag, ranks, size, time_us, algbw}' >>"$fl" ;;
      esac
    done
  done
}

bytes() {
  # Measured sparse-collective bytes per rank per step, one sharding type forced on every table.
  # a2a_bytes_per_rank counts the training steps only (the final evaluation's forward passes are
  # not counted), divided by the step count, so each run gives bytes per step directly; the 2- and
  # 4-step runs differ only by their random ids (the summary also prints (4·a(4) − 2·a(2)) / 2, the
  # per-step bytes of steps 3 and 4). Predictions from `ember plan --json` of the same model.
  local f=$OUT/bytes.jsonl p=$OUT/plan.jsonl; : >"$f"; : >"$p"
  for s in table row column table-row; do
    for g in 1x8 4x2; do
      for n in 2 4; do
        run "$s $g steps=$n" "$f" --preset bench --max-rows 100000 --batch-size 4096 --steps $n --grid $g --sharding $s
      done
      if "$E" plan --preset bench --max-rows 100000 --batch-size 4096 --grid $g --sharding $s --json >"$OUT/plan.tmp" 2>/dev/null; then
        tail -1 "$OUT/plan.tmp" | jq -c --arg tag "$s $g" '{tag: $tag, a2a_mean_bytes_per_rank, a2a_mean_total_bytes_per_rank}' >>"$p"
      fi
    done
  done
}

sync_bytes() {
  # Replica-sync bytes per rank per step, sparse vs whole-table, K = 1 and 4, on the bench
  # model (the tiny-preset sync bytes come from the quality runs).
  local f=$OUT/sync.jsonl; : >"$f"
  for mode in sparse full; do
    for k in 1 4; do
      run "bench 4x2 $mode K=$k" "$f" --preset bench --max-rows 100000 --batch-size 4096 --steps 8 --grid 4x2 --sync $mode --sync-every $k
    done
  done
}

lr_control() {
  # Control: is the 2D-vs-full-sharding NE gap an embedding learning-rate effect? The tiny preset
  # written as a config file with the embedding lr as a parameter (lr 0.05 = the preset itself).
  local f=$OUT/lr.jsonl; : >"$f"
  for lr in 0.05 0.025 0.0125; do
    tiny_config "$lr" >"$OUT/tiny-lr$lr.toml"
    for seed in 1 2 3; do
      run "1x8 full sharding, emb lr $lr" "$f" --config "$OUT/tiny-lr$lr.toml" --seed $seed --grid 1x8
      run "4x2 c=M K=1, emb lr $lr"       "$f" --config "$OUT/tiny-lr$lr.toml" --seed $seed --grid 4x2
    done
  done
}

# The `tiny` preset (engine/src/config.rs) as TOML, embedding lr $1.
tiny_config() {
  printf 'batch_size = 256\nsteps = 600\nseed = 1\neval_every = 0\n\n[model]\nnum_dense = 13\n'
  printf 'bottom_mlp = [64, 32, 16]\ntop_mlp = [64, 32, 1]\ninteraction = { kind = "dot" }\n'
  local i=0
  for rows in 1000 5000 20000 300 100000 50 7000 40000; do
    local pool=sum; [ $((i % 3)) -eq 2 ] && pool=mean
    printf '\n[[model.tables]]\nrows = %d\ndim = 16\npooling = "%s"\nbag_size = %d\n' $rows $pool $((1 + i % 3))
    i=$((i + 1))
  done
  printf '\n[optim]\nembedding = { kind = "row_wise_adagrad", lr = %s, eps = 1e-8 }\n' "$1"
  printf 'dense = { kind = "adagrad", lr = 0.02, eps = 1e-8 }\nweight_decay = { kind = "none" }\n'
  printf '\n[synthetic]\nzipf = 1.05\nsignal = 1.0\neval_samples = 16384\n'
}

fully_sharded() {
  # Only the fully-sharded 2D rows, appended to quality.jsonl (the quality section runs them too):
  # the default c = M^2 and the c = M of plain 2D.
  for seed in 1 2 3; do
    run "4x2 c=M^2 fully sharded" "$OUT/quality.jsonl" --preset tiny --steps 600 --batch-size 256 --seed $seed --grid 4x2 --fully-sharded
    run "4x2 c=M fully sharded" "$OUT/quality.jsonl" --preset tiny --steps 600 --batch-size 256 --seed $seed --grid 4x2 --fully-sharded --momentum-c 4
  done
}

plan_only() {
  local p=$OUT/plan.jsonl; : >"$p"
  for s in table row column table-row; do
    for g in 1x8 4x2; do
      "$E" plan --preset bench --max-rows 100000 --batch-size 4096 --grid $g --sharding $s --json | tail -1 \
        | jq -c --arg tag "$s $g" '{tag: $tag, a2a_mean_bytes_per_rank, a2a_mean_total_bytes_per_rank}' >>"$p"
    done
  done
}

summary() { python3 "$(dirname "$0")/2d_summary.py" "$OUT"; }

case $what in
  quality) quality ;;
  speed) speed ;;
  bytes) bytes ;;
  sync) sync_bytes ;;
  lr) lr_control ;;
  fully-sharded) fully_sharded ;;
  plan) plan_only ;;
  summary) summary ;;
  all) quality; lr_control; speed; bytes; sync_bytes; summary ;;
  *) echo "usage: $0 [quality|lr|fully-sharded|speed|bytes|plan|sync|summary|all]" >&2; exit 2 ;;
esac
