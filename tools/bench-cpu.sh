#!/usr/bin/env bash
# The CPU benchmarks of docs/benchmarks.md, each repeated, medians printed.
# Usage: tools/bench-cpu.sh [REPEATS]   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
cargo build --release -q -p ember-tools
E=./target/release/ember
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }
echo "# $(date -u +%F) $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for args in "bench embedding" "bench embedding --zipf"; do
  v=$(for i in $(seq "$reps"); do $E $args --json | field steps_per_s; done | median)
  echo "ember $args: median steps/s $v"
done
v=$(for i in $(seq "$reps"); do $E bench dlrm --json | field samples_per_s; done | median)
echo "ember bench dlrm: median samples/s $v"
v=$(for i in $(seq "$reps"); do $E train --json --quiet | field samples_per_s; done | median)
echo "ember train (tiny): median samples/s $v"
$E bench mem --iters 5
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
