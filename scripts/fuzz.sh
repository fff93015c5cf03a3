#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time (FUZZ_SECONDS each, default 20),
# starting from its seeds and the corpus kept under fuzz/corpus/. A crash fails the run and
# leaves the input in fuzz/artifacts/TARGET/. Longer runs: FUZZ_SECONDS=3600 scripts/fuzz.sh,
# or a number of executions per target: FUZZ_RUNS=10000000 scripts/fuzz.sh. Targets to run can
# be named: scripts/fuzz.sh blk_queue chain_walker.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-20}
# AddressSanitizer needs a nightly compiler (-Zsanitizer); without one, fuzz without it.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
    sanitizer=address
else
    fuzz=(cargo fuzz)
    sanitizer=none
fi
# Use-after-return detection puts every stack frame on the heap: it halves the speed of the
# targets that start threads, and the code under test returns no stack references.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0}
if [ -n "${FUZZ_RUNS:-}" ]; then
    bound=(-runs="$FUZZ_RUNS")
else
    bound=(-max_total_time="$seconds")
fi
if [ $# -gt 0 ]; then
    targets=$*
else
    targets=$("${fuzz[@]}" list)
fi
"${fuzz[@]}" build --sanitizer "$sanitizer"
for target in $targets; do
    mkdir -p "corpus/$target"
    echo "fuzz: $target, ${bound[*]} (sanitizer: $sanitizer)"
    "${fuzz[@]}" run --sanitizer "$sanitizer" "$target" "corpus/$target" "seeds/$target" -- \
        "${bound[@]}" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 2>&1 \
        | grep -E '^(Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY|.*deadly signal|.*panicked)' \
        || true
    if ls "artifacts/$target"/crash-* "artifacts/$target"/timeout-* "artifacts/$target"/leak-* >/dev/null 2>&1; then
        echo "fuzz: $target found a failing input: fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
