#!/usr/bin/env bash
# Run every fuzz target (fuzz/src/bin/*.rs) for SECONDS each (default 60), or only the targets
# named after it: tools/fuzz.sh [SECONDS] [TARGET...]
#
# The targets are libFuzzer binaries (the libfuzzer-sys crate) built on stable Rust with the
# coverage instrumentation cargo-fuzz uses for `--sanitizer none`: SanitizerCoverage through
# `-Cpasses=sancov-module` (8-bit counters, PC table, comparison tracing, stack depth), plus
# debug assertions and overflow checks, so an arithmetic overflow is a crash. No sanitizer
# (those need nightly Rust). A target is one file, fuzz/src/bin/NAME.rs; its seed corpus is
# fuzz/corpus/NAME/ (optional). A target whose seeds come from the real encoders writes them
# itself: `EMBER_FUZZ_SEEDS=corpus/NAME target/<host>/release/NAME` (run in fuzz/ after a
# build) writes the seed files and exits. New inputs go to fuzz/target/corpus/NAME/ (not
# committed); crashes to fuzz/target/artifacts/NAME/, and the script fails if any target crashed.
# Environment: FUZZ_JOBS (parallel libFuzzer processes per target, default 1), FUZZ_ARGS (extra
# libFuzzer flags).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in src/bin/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the flags off build scripts and proc macros (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet --target "$host" $(printf -- '--bin %s ' "${targets[@]}")
bin="target/$host/release"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t" "target/artifacts/$t"
    seeds=()
    [ -d "corpus/$t" ] && seeds=("corpus/$t")
    log="target/$t.log"
    echo "fuzz: $t for ${secs}s"
    jobs=()
    if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
    if ! "$bin/$t" "target/corpus/$t" "${seeds[@]}" -max_total_time="$secs" -max_len=65536 \
        -timeout=10 -rss_limit_mb=2048 "${jobs[@]}" -artifact_prefix="target/artifacts/$t/" \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
        failed+=("$t")
        tail -n 40 "$log"
    fi
    # The closing statistics: executions, coverage, corpus size.
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+ *DONE' "$log" | tr '\n' ' '
    echo
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]} (inputs under fuzz/target/artifacts/)"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
