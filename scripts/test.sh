#!/usr/bin/env bash
# Runs every check and test of the workspace. Needs root (network namespaces, taps) and the
# packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything is built with the features the package has: vhost-user-blk's Ceph RBD support
# (librbd-dev), and the tests of it (a throwaway cluster: ceph-mon, ceph-osd, ceph-common).
features=(--features vhost-user-blk/rbd,vhost-user-tests/rbd)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
# The integration tests start the real daemons: build them first.
cargo build --workspace --bins "${features[@]}"
# The Debian package tests/tests/deb.rs inspects, installs and purges (a release build).
cargo xtask deb
cargo test --workspace "${features[@]}"
# The benchmarks in their short mode: figures printed, no pass/fail on absolute numbers (a
# daemon that dies or returns wrong data fails it). Full runs: README, "Benchmarks".
cargo build --release --bins "${features[@]}"
target/release/vhost-user-bench all --quick
# Every fuzz target for a bounded time (FUZZ_SECONDS each; longer runs: README, "Fuzzing").
scripts/fuzz.sh
