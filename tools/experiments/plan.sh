#!/usr/bin/env bash
# Reproduces the planned-vs-measured tables of docs/plan.md: the `bench` model (tables capped at
# ROWS rows) on the grids 1x8, 2x4, 4x2 and 8x1, every sharding type and the planner's choice,
# one rank per process under `ember launch`, each counting its heap (--measure-memory).
#
#   cargo build -p ember-tools && tools/experiments/plan.sh
#
# Prints one markdown row per run: heap peak measured and planned (the largest rank of each),
# the smallest and largest planned/measured ratio over the 8 ranks, the planned peak phase, and
# rank 0's bytes per step (sparse collectives; replica sync) planned with the run's ids and
# measured.
set -euo pipefail
E=${EMBER:-target/debug/ember}
ROWS=${ROWS:-250000}
STEPS=${STEPS:-4}
echo "| grid | sharding | measured MiB (max rank) | planned MiB (max rank) | planned/measured min–max | planned peak phase | sparse bytes/step rank 0 planned / measured | sync bytes/step rank 0 planned / measured |"
echo "|---|---|---|---|---|---|---|---|"
for grid in 1x8 2x4 4x2 8x1; do
  for sharding in auto table row column table-row; do
    extra=(); [ "$sharding" != auto ] && extra=(--sharding "$sharding")
    "$E" launch -n 8 --timeout-ms 120000 -- "$E" train --preset bench --max-rows "$ROWS" --steps "$STEPS" --grid "$grid" \
      "${extra[@]}" --measure-memory --json --quiet | grep '^\[0\] {' | sed 's/^\[0\] //' |
      jq -r --arg g "$grid" --arg s "$sharding" '
        .memory as $m | .bytes_per_step as $b | $m.planned_bytes_per_step as $p
        | ["input_a2a","output_a2a","output_reduce_scatter","output_trw_reduce","output_trw_owners","grad_a2a","grad_all_gather","grad_trw_owners","grad_trw_gather","grad_col_sq"] as $sparse
        | [range(0; $m.measured|length) | $m.planned[.] / $m.measured[.]] as $r
        | "| \($g) | \($s) | \(($m.measured|max)/1048576*10|round/10) | \(($m.planned|max)/1048576*10|round/10) | \($r|min*10000|round/10000)–\($r|max*10000|round/10000) | \($m.planned_peak_phase|unique|join(", ")) | \([$sparse[] as $k | $p[$k]]|add|round) / \([$sparse[] as $k | $b[$k]]|add) | \(($p.sync_index + $p.sync_values)|round) / \($b.sync_index + $b.sync_values) |"'
  done
done
