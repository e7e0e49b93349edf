#!/usr/bin/env bash
# The data-path figures of docs/data.md: ROUNDS rounds of `ember bench data` (every path once a
# round, so the paths interleave), medians over the rounds printed per path and cache.
# Usage: tools/bench-data.sh [ROUNDS] [SAMPLES]   (builds the release binary first)
# Environment: BENCH_LOCK=FILE runs each round under `flock -x FILE`; each round first waits
# (up to 5 minutes) for the 1-minute load average to fall below MAX_LOAD (default 1.5), and
# prints the load it started at.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
samples=${2:-500000}
max_load=${MAX_LOAD:-1.5}
cargo build --release -q -p ember-tools
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
round() {
  for _ in $(seq 300); do
    awk -v m="$max_load" '{exit !($1 < m)}' /proc/loadavg && break
    sleep 1
  done
  echo "# round $1: load $(cut -d' ' -f1 /proc/loadavg) at start" >&2
  ./target/release/ember bench data --samples "$samples" --grid 2x2 -n 1 --json --dir "$out" > "$out/round-$1.txt"
}
export -f round
export samples max_load out
for r in $(seq "$rounds"); do
  if [ -n "${BENCH_LOCK:-}" ]; then flock -x "$BENCH_LOCK" bash -c "round $r"; else round "$r"; fi
done
echo "# $(date -u +%F) $(nproc) cores; ember bench data --samples $samples --grid 2x2 -n 1, $rounds rounds; medians"
python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys, collections
d, rounds = sys.argv[1], int(sys.argv[2])
rows, extra = collections.OrderedDict(), []
for r in range(1, rounds + 1):
    for line in open(f"{d}/round-{r}.txt"):
        if not line.startswith("{"):
            continue
        v = json.loads(line)
        if "path" in v:
            rows.setdefault((v["path"], v["cache"]), []).append(v)
        else:
            extra.append(v)
med = lambda vs, k: statistics.median(x[k] for x in vs)
print(f"{'path':<38} {'cache':>5} {'M samples/s':>12} {'per CPU s':>10} {'GB/s':>8}")
for (p, c), vs in rows.items():
    print(f"{p:<38} {c:>5} {med(vs, 'samples_per_s') / 1e6:>12.3f} {med(vs, 'samples_per_cpu_s') / 1e6:>10.3f} {med(vs, 'gb_per_s'):>8.3f}")
parse, conv = rows[("text parse", "warm")], rows[("convert text -> binary", "warm")]
for k, what in [("samples_per_s", "wall clock"), ("samples_per_cpu_s", "per CPU second")]:
    ratios = [c[k] / p[k] for p, c in zip(parse, conv)]
    print(f"convert / text parse, {what}: median {100 * statistics.median(ratios):.0f} % (rounds: {', '.join(f'{100 * x:.0f}' for x in ratios)})")
rss = [e["convert_peak_rss_kib"] for e in extra]
ins = extra[0]["convert_inputs"]
print(f"ember convert peak RSS: median {statistics.median(r[0] for r in rss) / 1024:.1f} MiB for {ins[0]} samples, {statistics.median(r[1] for r in rss) / 1024:.1f} MiB for {ins[1]}")
print(f"bench dlrm --device cpu (batch 4096): median {statistics.median(e['dlrm_cpu_samples_per_s'] for e in extra) / 1e6:.4f} M samples/s")
EOF
