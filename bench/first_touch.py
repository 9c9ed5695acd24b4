#!/usr/bin/env python3
"""What a first write to fresh anonymous memory costs on this host, per
4 KiB page: the floor under any migration target, which must fault in
every page it receives (and under QEMU's the same). Maps `--mib` MiB,
writes one byte per page, unmaps; three times. The first mapping gets pages
the kernel may not have used for a while; the next ones mostly get the
pages just freed.

On a nested host whose memory balloon has free page reporting (virtio
feature bit 5), pages the kernel freed a while ago have been handed back
to the outer hypervisor, and touching one again costs an exit to it: that
is the difference between the first and the later rounds here.

Usage: python3 bench/first_touch.py [--mib 2048]
"""
import argparse
import mmap
import time


def touch(mib):
    m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages = (mib << 20) // 4096
    t = time.perf_counter()
    for i in range(pages):
        m[i * 4096] = 1
    d = time.perf_counter() - t
    m.close()
    return d / pages * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=2048)
    a = ap.parse_args()
    # The loop's own cost, on pages already present.
    m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range((64 << 20) // 4096):
        m[i * 4096] = 1
    t = time.perf_counter()
    for i in range((64 << 20) // 4096):
        m[i * 4096] = 2
    loop_us = (time.perf_counter() - t) / ((64 << 20) // 4096) * 1e6
    m.close()
    for r in range(3):
        us = touch(a.mib) - loop_us
        print(f"round {r + 1}: {a.mib} MiB, {us:.2f} us per 4 KiB page first touched "
              f"(at most {4096 / us / 1e3:.2f} GB/s for one thread)")


if __name__ == "__main__":
    main()
