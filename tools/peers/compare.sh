#!/usr/bin/env bash
# One round of the side-by-side comparison of docs/benchmarks.md: for uniform and Zipf(1.05)
# ids, `ember bench embedding` (each binary given), PyTorch's EmbeddingBag and FBGEMM's CPU TBE
# on the same workload, and `ember bench mem`'s 2-thread 256-byte gather rate (the floor's
# denominator, also handed to the peers); then `ember bench dlrm` beside TorchRec's DLRM of the
# same model (tools/peers/dlrm.py) as 1 rank x 2 threads and 2 ranks x 1 thread. Appends one
# JSON line per run to OUT; summarize.py prints the medians over rounds.
#
#   tools/peers/compare.sh OUT.jsonl [NAME=EMBER_BINARY ...]
#   (default binary: new=target/release/ember; PARTS="embedding dlrm" by default, or one of them)
#
# The peers skip cleanly (a note, no rows) when their venv cannot be made (tools/peers/setup.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: compare.sh OUT.jsonl [NAME=BINARY ...]}
shift
bins=("$@")
[[ ${#bins[@]} -eq 0 ]] && bins=(new=target/release/ember)
py=$(bash tools/peers/setup.sh 2>/dev/null | tail -n1) || py=""
[[ -x "$py" ]] || echo "# peers: skipped (tools/peers/setup.sh could not make the venv)" >&2
load() { cut -d' ' -f1 /proc/loadavg; }
tag() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d.update(json.loads(sys.argv[1])); print(json.dumps(d))" "$1"; }
parts=${PARTS:-embedding dlrm}
for ids in uniform zipf; do
  [[ " $parts " == *" embedding "* ]] || break
  z=(); [[ $ids == zipf ]] && z=(--zipf)
  for nb in "${bins[@]}"; do
    name=${nb%%=*}; bin=${nb#*=}
    l=$(load)
    "$bin" bench embedding "${z[@]}" --json | tag "{\"who\":\"ember-$name\",\"ids\":\"$ids\",\"load\":$l}" >> "$out"
  done
  # The gather rate of this round's last Ember run that measured one (older builds print none).
  g=$(python3 -c "
import json, sys
g = [d.get('gather_gb_per_s') for d in map(json.loads, open(sys.argv[1])) if d.get('ids') == sys.argv[2]]
g = [x for x in g if x]
print(g[-1] if g else '')" "$out" "$ids")
  if [[ -x "$py" ]]; then
    for impl in torch fbgemm; do
      l=$(load)
      "$py" tools/peers/embedding.py --impl "$impl" "${z[@]}" ${g:+--gather-gb-per-s "$g"} --json \
        | tag "{\"who\":\"$impl\",\"ids\":\"$ids\",\"load\":$l}" >> "$out"
    done
  fi
done
# DLRM: `ember bench dlrm` (global batch 4096) beside TorchRec's DLRM of the same model
# (tools/peers/dlrm.py), as 1 rank x 2 threads and as 2 ranks x 1 thread (torch.distributed.run).
if [[ " $parts " == *" dlrm "* ]]; then
  for nb in "${bins[@]}"; do
    name=${nb%%=*}; bin=${nb#*=}
    l=$(load)
    "$bin" bench dlrm --json | tag "{\"who\":\"ember-$name\",\"ids\":\"dlrm\",\"load\":$l}" >> "$out"
  done
  if [[ -x "$py" ]]; then
    l=$(load)
    "$py" tools/peers/dlrm.py --threads 2 --json 2>/dev/null \
      | tag "{\"who\":\"torchrec 1 rank x 2 threads\",\"ids\":\"dlrm\",\"load\":$l}" >> "$out"
    l=$(load)
    "$py" -m torch.distributed.run --nproc-per-node 2 --master-port 29533 tools/peers/dlrm.py --threads 1 --json 2>/dev/null \
      | tag "{\"who\":\"torchrec 2 ranks x 1 thread\",\"ids\":\"dlrm\",\"load\":$l}" >> "$out"
  fi
fi
tail -n +1 "$out" | wc -l | xargs echo "# $out: lines"
