#!/usr/bin/env bash
# One-command demo, as root on Debian 12: installs what is missing, builds the daemons, and
# runs a QEMU guest (TCG, no KVM needed) with a vhost-user-blk disk and a vhost-user-net NIC.
# The guest runs fio and iperf3; the demo prints the results and the exact daemon and QEMU
# command lines, and removes what it created (processes, network namespace) when it ends,
# Ctrl-C included.
#
#   scripts/demo.sh               Debian 12's QEMU 7.2
#   scripts/demo.sh --qemu 11     the newest QEMU in Debian (11.x from trixie-backports), run from
#                                 a Debian 13 root built once with debootstrap (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: run as root (sudo $0): it creates a network namespace and a tap" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

packages=()
# QEMU and its firmware; fio, iperf3 and ethtool are copied into the guest with busybox; cpio,
# xz-utils and iproute2 build the guest and the network namespace.
# debootstrap: `scripts/demo.sh --qemu 11` runs the newest QEMU in Debian from a Debian 13 root.
for p in qemu-system-x86 ipxe-qemu seabios fio iperf3 ethtool busybox-static cpio xz-utils iproute2 debootstrap; do
    installed "$p" || packages+=("$p")
done
if ! command -v cargo >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    # rustup needs curl; the Rust linker needs a C toolchain.
    for p in curl ca-certificates build-essential; do
        installed "$p" || packages+=("$p")
    done
fi
# The guest kernel comes from `apt-get download linux-image-amd64`: the index must know it.
if [ ${#packages[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    echo "==> apt-get install ${packages[*]:-(nothing; refreshing the index)}"
    apt-get update -qq
    if [ ${#packages[@]} -gt 0 ]; then
        apt-get install -y -qq --no-install-recommends "${packages[@]}"
    fi
fi

if ! command -v cargo >/dev/null; then
    if [ ! -x "$HOME/.cargo/bin/cargo" ]; then
        echo "==> Installing Rust with rustup (https://rustup.rs)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    fi
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

echo "==> cargo build --release"
cargo build --release
exec "${CARGO_TARGET_DIR:-target}/release/vhost-user-demo" "$@"
