#!/usr/bin/env python3
"""virtio-blk benchmark: sequential write throughput from inside the guest,
vigil against QEMU on the same guest, same run.

Each run boots the default guest once in each hypervisor (interleaved),
same kernel, initramfs, command line and memory, each with a fresh sparse
raw image of the same size as its first virtio-mmio disk (QEMU: `-M
microvm`, `-device virtio-blk-device`, default cache=writeback, as vigil
goes through the host page cache too). The guest runs the `disk-seq`
workload of vigil-tools: MIB MiB written from offset 0 in BS KiB O_DIRECT
writes from one buffer filled once in user space, then `sync` (a flush,
which both VMMs turn into fdatasync). The guest times it with
CLOCK_MONOTONIC and prints `VIGIL-DISK-SEQ bytes= ms= kib_per_s=`.

On a host whose KVM emulates guest kernel code (see docs/ARCHITECTURE.md),
the guest's block layer and virtio driver run ~1000x slower than on bare
metal and dominate the figure; the ratio is what says something about the
device model.

Writes bench/results/blk.json and blk.md.
"""
import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boot  # noqa: E402  (shares the guest helpers)

ROOT = boot.ROOT
MARKER = re.compile(rb"VIGIL-DISK-SEQ bytes=(\d+) ms=(\d+) kib_per_s=(\d+)\r?\n")


def workload(mib, bs_kib):
    return f" vigil.tools=off vigil.run=disk-seq:mib={mib},bs={bs_kib} vigil.test=run"


def read_result(proc, timeout):
    """Reads the guest console until the workload's line; returns KiB/s."""
    start = time.monotonic()
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() - start < timeout:
        r, _, _ = select.select([fd], [], [], 1.0)
        if not r:
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        m = MARKER.search(buf)
        if m:
            return int(m.group(3)), int(m.group(2))
        if b"VIGIL-DISK-ERROR" in buf:
            break
    sys.stderr.write(buf.decode(errors="replace")[-2000:])
    return None


def fresh_image(work, name, size_mib):
    path = os.path.join(work, name)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    return path


def finish(proc, group):
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


def run_vigil(vigil, work, a, cmdline):
    img = fresh_image(work, "vigil.img", a.image_mib)
    args = [vigil, "run", "--config", os.path.join(ROOT, "guest-images", "default-vm.toml"),
            "--memory", f"{a.memory_mib}M", "--cmdline", cmdline + workload(a.mib, a.bs_kib),
            "--disk", f"path={img}", "--console", "stdio"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        r = read_result(proc, a.timeout)
    finally:
        finish(proc, False)
        os.remove(img)
    if r is None:
        raise SystemExit("vigil: no VIGIL-DISK-SEQ line")
    return r


def run_qemu(work, a, cmdline):
    img = fresh_image(work, "qemu.img", a.image_mib)
    args = ["qemu-system-x86_64", "-enable-kvm",
            "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=on",
            "-cpu", "host,-arch-capabilities", "-m", str(a.memory_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", os.path.join(boot.GUEST, "vmlinux"),
            "-initrd", os.path.join(boot.GUEST, "initramfs.cpio"),
            "-append", cmdline + workload(a.mib, a.bs_kib),
            "-drive", f"file={img},if=none,id=d0,format=raw",
            "-device", "virtio-blk-device,drive=d0"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        r = read_result(proc, a.timeout)
    finally:
        finish(proc, True)
        os.remove(img)
    if r is None:
        raise SystemExit("qemu: no VIGIL-DISK-SEQ line")
    return r


def table(r):
    return (
        f"virtio-blk sequential write from the guest ({r['mib']} MiB in {r['bs_kib']} KiB "
        f"O_DIRECT writes + sync, {r['image_mib']} MiB raw image, {r['guest_memory_mib']} MiB "
        f"guest), {r['qemu']}\n\n"
        "| metric | vigil | qemu | ratio |\n|---|---|---|---|\n"
        f"| throughput, median of {r['runs']} (MiB/s) | {r['vigil_median_mib_s']} | "
        f"{r['qemu_median_mib_s']} | {r['ratio']} |\n"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--bs-kib", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--vigil", default=os.path.join(ROOT, "target", "release", "vigil"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "blk.json"))
    a = ap.parse_args()
    # A killed benchmark still stops its VMs and removes its images.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmdline = boot.default_cmdline()
    work = tempfile.mkdtemp(prefix="vigil-bench-blk-")
    v, q = [], []
    try:
        for i in range(a.runs):
            v.append(run_vigil(a.vigil, work, a, cmdline))
            q.append(run_qemu(work, a, cmdline))
            print(f"run {i + 1}/{a.runs}: vigil {v[-1][0] / 1024:.2f} MiB/s ({v[-1][1]} ms), "
                  f"qemu {q[-1][0] / 1024:.2f} MiB/s ({q[-1][1]} ms)", flush=True)
    finally:
        for f in os.listdir(work):
            os.remove(os.path.join(work, f))
        os.rmdir(work)
    vm = statistics.median(x[0] for x in v) / 1024
    qm = statistics.median(x[0] for x in q) / 1024
    r = {
        "guest_memory_mib": a.memory_mib,
        "image_mib": a.image_mib,
        "mib": a.mib,
        "bs_kib": a.bs_kib,
        "runs": a.runs,
        "vigil_median_mib_s": round(vm, 2),
        "qemu_median_mib_s": round(qm, 2),
        # Throughput: above 1 means vigil is faster.
        "ratio": round(vm / qm, 3),
        "vigil_mib_s": [round(x[0] / 1024, 2) for x in v],
        "qemu_mib_s": [round(x[0] / 1024, 2) for x in q],
        "vigil_ms": [x[1] for x in v],
        "qemu_ms": [x[1] for x in q],
        "qemu": subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                               text=True).stdout.splitlines()[0],
        "cmdline": cmdline + workload(a.mib, a.bs_kib),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    text = table(r)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(text)
    print()
    print(text, end="")


if __name__ == "__main__":
    main()
