#!/usr/bin/env bash
# Ember's transports against Open MPI, side by side, interleaved rounds (docs/transport.md):
# all-to-all (1 KiB .. 16 MiB per peer), all-reduce (f32 sum, 4 B .. 64 MiB) and, with 2
# processes, a ping-pong between ranks 0 and 1 (8 B .. 16 MiB, half the round trip), each timed
# back-to-back and per operation after a barrier, on shared memory with 2 and 4 processes
# (4 on 2 cores: --oversubscribe) and on TCP loopback with 2 (Open MPI restricted to
# `--mca btl tcp,self`). Both sides pin one process per core and print the same JSON rows.
#
#   cargo build --release -p ember-tools
#   tools/experiments/transport_vs_mpi.sh [ROUNDS] [OUTDIR]      (default 5, /tmp/ember-vs-mpi)
#   tools/experiments/transport_vs_mpi.sh 0 OUTDIR --build-only  (only build OUTDIR/mpi_coll)
#   python3 tools/experiments/transport_vs_mpi_summary.py OUTDIR  (the ratio table)
#
# Environment: EMBER (the binary), EMBER_BASE (optional: a second ember binary, e.g. a build of
# the main branch, run as side "base" in every round beside the other two), SIZES (a2a: "MIN MAX",
# bytes per peer; allreduce: ALLREDUCE_SIZES; pingpong: PINGPONG_SIZES), FACTOR (default 2),
# CASES (subset, e.g. "shm2 tcp2"), COLLS ("a2a allreduce pingpong"),
# METHODS ("b2b per-op"), ITERS/WARMUP (default 50/5), QUIET_LOAD (default 1.5: each run waits,
# at most 10 minutes, for the 1-minute load average to drop below it; the load is recorded).
# Without Open MPI (mpicc, mpirun) it says so and exits 0.
set -uo pipefail
rounds=${1:-5}; out=${2:-/tmp/ember-vs-mpi}
root=$(cd "$(dirname "$0")/../.." && pwd)
E=${EMBER:-$root/target/release/ember}
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
  echo "transport_vs_mpi: Open MPI (mpicc, mpirun) not found; skipped (apt install openmpi-bin libopenmpi-dev)"
  exit 0
fi
[ -x "$E" ] || { echo "transport_vs_mpi: no ember binary at $E (cargo build --release -p ember-tools)" >&2; exit 1; }
mkdir -p "$out"
MPI=$out/mpi_coll
# Built once per OUTDIR (build it before a measurement that pauses compilers: `--build-only`).
[ "$MPI" -nt "$root/transport/bench/mpi_coll.c" ] || mpicc -O2 -o "$MPI" "$root/transport/bench/mpi_coll.c" || exit 1
[ "${3:-}" = --build-only ] && exit 0
# overload-allowed: 4 processes on 2 cores (shm4) are refused a core binding without it.
MPIRUN=(mpirun --oversubscribe --bind-to core:overload-allowed)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
iters=${ITERS:-50}; warm=${WARMUP:-5}

quiet() {
  local i
  for i in $(seq 120); do
    awk -v q="${QUIET_LOAD:-1.5}" '{exit !($1 < q)}' /proc/loadavg && return 0
    sleep 5
  done
}

# range COLL: "MIN MAX" bytes.
range() {
  case $1 in
    a2a) echo "${SIZES:-1024 16777216}" ;;
    pingpong) echo "${PINGPONG_SIZES:-8 16777216}" ;;
    *) echo "${ALLREDUCE_SIZES:-4 67108864}" ;;
  esac
}
fac=${FACTOR:-2}

# ember_run CASE COLL METHOD FILE / mpi_run CASE COLL METHOD FILE: one sweep, JSON rows tagged.
# A sweep's output goes to a file and is tagged after the run: a filter started beside the
# ranks (jq, python) takes these cores from them for its first ~100 ms, which made the first
# sizes of a sweep up to 100x slower (4 processes on 2 cores) when it was piped.
tag() { jq -c --arg side "$1" --arg case "$2" --arg load "$4" --argjson round "$3" \
  '. + {side: $side, case: $case, load1: ($load|tonumber), round: $round}'; }
raw=$out/.sweep.raw
ember_run() {
  local c=$1 coll=$2 m=$3 f=$4 np=${1: -1} t=shm r bin=${5:-$E} side=${6:-ember}
  [[ $c == tcp* ]] && t=tcp
  read -r lo hi <<<"$(range "$coll")"
  local po=(); [ "$m" = per-op ] && po=(--per-op)
  local load; load=$(cut -d' ' -f1 /proc/loadavg)
  "$bin" launch -n "$np" --transport "$t" -- "$bin" bench "$coll" -b "$lo" -e "$hi" -f "$fac" -n "$iters" -w "$warm" -c 1 --json "${po[@]}" >"$raw"
  sed -n 's/^\[0\] {/{/p' "$raw" | tag "$side" "$c" "$round" "$load" >>"$f"
}
# (A base binary without the collective, e.g. one from before `bench pingpong`, is skipped.)
base_run() {
  [ -n "${EMBER_BASE:-}" ] && "$EMBER_BASE" bench "$2" --help >/dev/null 2>&1 && { quiet; ember_run "$@" "$EMBER_BASE" base; }
  return 0
}
mpi_run() {
  local c=$1 coll=$2 m=$3 f=$4 np=${1: -1} btl=()
  [[ $c == tcp* ]] && btl=(--mca btl tcp,self)
  read -r lo hi <<<"$(range "$coll")"
  local po=(); [ "$m" = per-op ] && po=(per-op)
  local load; load=$(cut -d' ' -f1 /proc/loadavg)
  "${MPIRUN[@]}" "${btl[@]}" -np "$np" "$MPI" "$coll" "$lo" "$hi" "$fac" "$iters" "$warm" "${po[@]}" >"$raw"
  tag openmpi "$c" "$round" "$load" <"$raw" >>"$f"
}

for round in $(seq "$rounds"); do
  for c in ${CASES:-shm2 shm4 tcp2}; do
    for coll in ${COLLS:-a2a allreduce pingpong}; do
      # The ping-pong runs between two processes only.
      [ "$coll" = pingpong ] && [ "${c: -1}" != 2 ] && continue
      for m in ${METHODS:-b2b per-op}; do
        f=$out/$c.$coll.$m.jsonl
        [ "$round" = 1 ] && : >"$f"
        # Alternate which side goes first.
        if [ $((round % 2)) = 1 ]; then quiet; ember_run "$c" "$coll" "$m" "$f"; base_run "$c" "$coll" "$m" "$f"; quiet; mpi_run "$c" "$coll" "$m" "$f"
        else quiet; mpi_run "$c" "$coll" "$m" "$f"; base_run "$c" "$coll" "$m" "$f"; quiet; ember_run "$c" "$coll" "$m" "$f"; fi
        echo "round $round $c $coll $m done (load $(cut -d' ' -f1 /proc/loadavg))" >&2
      done
    done
  done
done
rm -f "$raw"
python3 "$root/tools/experiments/transport_vs_mpi_summary.py" "$out"
