#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test Vigil.
# Only Debian packages through apt-get; the Rust toolchain (cargo) must
# already be installed.
set -euo pipefail

packages=(
    # guest kernel and initramfs (guest-images/build.sh)
    linux-source-6.1 build-essential flex bison bc libelf-dev lz4 busybox-static
    # reference hypervisor for `make bench`
    qemu-system-x86
    # test lab: network namespaces, bridges, taps
    iproute2
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "setup: cargo is missing: install the Rust toolchain (rustup)" >&2; exit 1; }

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing: load the kvm module (modprobe kvm_intel or kvm_amd) on a machine with virtualisation" >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is not accessible to $(id -un): add yourself to the kvm group or run as root" >&2
fi
echo "setup: done"
