#!/usr/bin/env bash
# Runs every check and test of the workspace. Needs root (network namespaces, taps) and the
# packages .ci/run installs (iproute2, dpdk-dev for dpdk-testpmd).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests start the real daemons: build them first.
cargo build --workspace --bins
cargo test --workspace
