#!/usr/bin/env bash
# Interleaved A/B of the shm all-to-all (2 processes pinned to 2 cores) against its memcpy
# ceiling and Open MPI's MPI_Alltoall (docs/transport.md, Results).
# Usage: shm_vs_mpi.sh ROUNDS OUTDIR BIN_A [BIN_B ...]   (env ARGS overrides the size range)
# Each round runs every binary (and each with EMBER_SHM_DIRECT=0 when DIRECT_OFF=1), then
# mpirun, in that order; every run's `uptime` goes to OUTDIR/log.
set -u
rounds=$1; out=$2; shift 2
ARGS=${ARGS:-"-b 1K -e 16M -f 4 -n 50 -w 10"}
read -r -a A <<< "$ARGS"
b=$(sed -E 's/.*-b ([^ ]+).*/\1/' <<< "$ARGS"); e=$(sed -E 's/.*-e ([^ ]+).*/\1/' <<< "$ARGS")
bytes() { numfmt --from=iec "$1"; }
f=$(sed -E 's/.*-f ([^ ]+).*/\1/' <<< "$ARGS"); n=$(sed -E 's/.*-n ([^ ]+).*/\1/' <<< "$ARGS"); w=$(sed -E 's/.*-w ([^ ]+).*/\1/' <<< "$ARGS")
MPI=${MPI:-/tmp/mpi_alltoall}
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  i=0
  for E in "$@"; do
    i=$((i+1))
    echo "round $r bin$i $(uptime)" >> "$out/log"
    "$E" launch -n 2 -- "$E" bench a2a --transport shm "${A[@]}" --baseline memcpy --json > "$out/r$r.bin$i.json" 2>&1
    if [ "${DIRECT_OFF:-0}" = 1 ]; then
      echo "round $r bin$i-nodirect $(uptime)" >> "$out/log"
      EMBER_SHM_DIRECT=0 "$E" launch -n 2 -- "$E" bench a2a --transport shm "${A[@]}" --baseline memcpy --json > "$out/r$r.bin$i-nodirect.json" 2>&1
    fi
  done
  echo "round $r mpi $(uptime)" >> "$out/log"
  mpirun --allow-run-as-root --oversubscribe --bind-to core -np 2 "$MPI" "$(bytes "$b")" "$(bytes "$e")" "$f" "$n" "$w" > "$out/r$r.mpi.txt" 2>&1
done
