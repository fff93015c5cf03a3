#!/usr/bin/env bash
# Runs every check and test of the workspace. Needs root (network namespaces, taps) and the
# packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests start the real daemons: build them first.
cargo build --workspace --bins
# The Debian package tests/tests/deb.rs inspects, installs and purges (a release build).
cargo xtask deb
cargo test --workspace
# The benchmarks in their short mode: figures printed, no pass/fail on absolute numbers (a
# daemon that dies or returns wrong data fails it). Full runs: README, "Benchmarks".
cargo build --release --bins
target/release/vhost-user-bench all --quick
# Every fuzz target for a bounded time (FUZZ_SECONDS each; longer runs: README, "Fuzzing").
scripts/fuzz.sh
