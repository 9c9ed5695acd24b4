#!/usr/bin/env bash
# Builds Vigil's default guest from Debian packages:
#   out/vmlinux          uncompressed ELF kernel (PVH entry)
#   out/bzImage          the same kernel for the Linux boot protocol
#   out/initramfs.cpio   uncompressed initramfs: busybox-static, our /init and
#                        /bin/vigil-tools (the tools daemon and test workloads,
#                        built from ../guest-tools with cargo)
#
# Each part is cached outside the repository, keyed by a hash of its inputs
# (config fragment, patches, Debian package versions, compiler, sources and
# this script), so an unchanged tree never rebuilds the kernel. out/ holds
# symlinks into the cache.
#
# Usage: guest-images/build.sh [kernel|initramfs|all]
#   VIGIL_CACHE   cache directory (default: ~/.cache/vigil)
#   JOBS          parallel make jobs (default: nproc)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tools_src=$(cd "$here/../guest-tools" && pwd)
cache=${VIGIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vigil}
out=$here/out
jobs=${JOBS:-$(nproc)}
linux_pkg=linux-source-6.1
what=${1:-all}

die() { echo "guest-images: $*" >&2; exit 1; }
log() { echo "guest-images: $*" >&2; }

need_pkg() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed" ||
        die "Debian package $1 is missing: run 'make setup' (or apt-get install $1)"
}

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

# A hash of everything that decides a build's output.
key_of() {
    {
        for f in "$@"; do
            if [ -d "$f" ]; then
                find "$f" -type f | LC_ALL=C sort | xargs sha256sum
            else
                sha256sum "$f"
            fi
        done
    } | sed -e "s|$here/||" -e "s|$tools_src/|guest-tools/|" | sha256sum | cut -c1-16
}

build_kernel() {
    for p in $linux_pkg build-essential flex bison bc libelf-dev lz4; do need_pkg "$p"; done
    local key
    # The kernel's inputs are its folder and the code of this function, not
    # the whole script, so that changing the initramfs does not rebuild it.
    key=$( (key_of "$here/kernel"; declare -f build_kernel key_of; pkg_version $linux_pkg
        gcc --version | head -1) |
        sha256sum | cut -c1-16)
    local dest=$cache/kernel-$key
    if [ -f "$dest/vmlinux" ] && [ -f "$dest/bzImage" ]; then
        log "kernel $key is cached in $dest"
    else
        log "building kernel $key (cold build: 4-8 minutes on 2 cores)"
        local start=$SECONDS
        local work=$cache/build-kernel-$key
        rm -rf "$work" && mkdir -p "$work"
        tar -C "$work" -xf /usr/src/$linux_pkg.tar.xz
        local src=$work/$linux_pkg
        for p in "$here"/kernel/patches/*.patch; do
            patch -d "$src" -p1 --quiet --forward <"$p" || die "patch $(basename "$p") does not apply"
        done
        # tinyconfig plus our fragment, with everything else off: allnoconfig
        # also switches off options that only become visible through ours
        # (merging into tinyconfig's .config would give them their defaults).
        cat "$src/kernel/configs/tiny.config" "$src/arch/x86/configs/tiny.config" \
            "$here/kernel/vigil.config" >"$work/allno.config"
        make -C "$src" -s KCONFIG_ALLCONFIG="$work/allno.config" allnoconfig
        # Every option of the fragment must have survived dependency resolution.
        local missing=0
        while IFS= read -r line; do
            case "$line" in CONFIG_*) grep -qx "$line" "$src/.config" || {
                log "config option not applied: $line"
                missing=1
            } ;;
            esac
        done <"$here/kernel/vigil.config"
        [ $missing = 0 ] || die "the config fragment does not apply cleanly to $linux_pkg"
        make -C "$src" -s -j"$jobs" vmlinux bzImage
        mkdir -p "$dest.tmp"
        cp "$src/vmlinux" "$dest.tmp/vmlinux"
        strip --strip-debug "$dest.tmp/vmlinux"
        cp "$src/arch/x86/boot/bzImage" "$src/System.map" "$src/.config" "$dest.tmp/"
        # gen_init_cpio builds the initramfs without needing root for device
        # nodes; nolibc builds a static /init of a few KiB.
        cp "$src/usr/gen_init_cpio" "$dest.tmp/"
        cp -r "$src/tools/include/nolibc" "$dest.tmp/nolibc"
        echo "$((SECONDS - start))" >"$dest.tmp/build-seconds"
        rm -rf "$dest" && mv "$dest.tmp" "$dest"
        rm -rf "$work"
        log "kernel built in $((SECONDS - start)) s"
    fi
    mkdir -p "$out"
    for f in vmlinux bzImage System.map; do ln -sfn "$dest/$f" "$out/$f"; done
    ln -sfn "$dest/.config" "$out/kernel.config"
    ln -sfn "$dest/gen_init_cpio" "$out/gen_init_cpio"
    ln -sfn "$dest/nolibc" "$out/nolibc"
}

build_initramfs() {
    need_pkg busybox-static
    [ -x "$out/gen_init_cpio" ] || die "build the kernel first (it provides gen_init_cpio)"
    local key
    key=$( (key_of "$here/init" "$here/build.sh" "$tools_src/src" "$tools_src/Cargo.toml" \
        "$tools_src/Cargo.lock" "$tools_src/build.rs"
        pkg_version busybox-static; pkg_version $linux_pkg
        gcc --version | head -1; rustc --version) |
        sha256sum | cut -c1-16)
    local dest=$cache/initramfs-$key
    if [ -f "$dest/initramfs.cpio" ]; then
        log "initramfs $key is cached in $dest"
    else
        log "building initramfs $key"
        local work
        work=$(mktemp -d)
        trap 'rm -rf "$work"' RETURN
        gcc -static -nostdlib -Os -fno-asynchronous-unwind-tables -fno-ident -Wall -Wextra -Werror \
            -include "$out/nolibc/nolibc.h" -o "$work/init" "$here/init/init.c" -lgcc
        strip "$work/init"
        # no_std, no libc, stripped: tens of KiB (see guest-tools/Cargo.toml).
        cargo build --quiet --locked --release --manifest-path "$tools_src/Cargo.toml" \
            --target-dir "$work/tools-target"
        cp "$work/tools-target/release/vigil-tools" "$work/vigil-tools"
        log "vigil-tools is $(stat -c %s "$work/vigil-tools") bytes"
        {
            echo "dir /bin 0755 0 0"
            echo "dir /sbin 0755 0 0"
            echo "dir /usr 0755 0 0"
            echo "dir /usr/bin 0755 0 0"
            echo "dir /usr/sbin 0755 0 0"
            echo "dir /dev 0755 0 0"
            echo "dir /etc 0755 0 0"
            echo "dir /proc 0755 0 0"
            echo "dir /sys 0755 0 0"
            echo "dir /tmp 1777 0 0"
            echo "dir /root 0700 0 0"
            echo "nod /dev/console 0600 0 0 c 5 1"
            echo "nod /dev/null 0666 0 0 c 1 3"
            echo "file /init $work/init 0755 0 0"
            echo "file /bin/busybox /bin/busybox 0755 0 0"
            echo "file /bin/vigil-tools $work/vigil-tools 0755 0 0"
            echo "file /etc/inittab $here/init/inittab 0644 0 0"
            echo "file /etc/profile $here/init/profile 0644 0 0"
            for applet in $(/bin/busybox --list-full); do
                [ "$applet" = bin/busybox ] || echo "slink /$applet /bin/busybox 0777 0 0"
            done
        } >"$work/list"
        mkdir -p "$dest.tmp"
        "$out/gen_init_cpio" "$work/list" >"$dest.tmp/initramfs.cpio"
        rm -rf "$dest" && mv "$dest.tmp" "$dest"
    fi
    ln -sfn "$dest/initramfs.cpio" "$out/initramfs.cpio"
}

case "$what" in
kernel) build_kernel ;;
initramfs) build_initramfs ;;
all)
    build_kernel
    build_initramfs
    ;;
*) die "unknown target '$what' (kernel, initramfs or all)" ;;
esac
