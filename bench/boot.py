#!/usr/bin/env python3
"""Boot-time benchmark: vigil against QEMU on the same guest, same run.

Measures, for each hypervisor, the wall time from starting the process to the
guest's boot marker (`VIGIL-BOOT-OK`) on the serial console, over N runs, and
reports medians and the ratio vigil/QEMU. For vigil it also reads the VMM's
own start-up (process start to first KVM_RUN, from its log) and its resident
memory beyond guest memory (from /proc/PID/smaps while the guest runs).

Writes bench/results/boot.json and prints a short table.
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest-images", "out")
MARKER = b"VIGIL-BOOT-OK"


def default_cmdline():
    with open(os.path.join(ROOT, "guest-images", "default-vm.toml")) as f:
        m = re.search(r'^cmdline\s*=\s*"(.*)"', f.read(), re.M)
    return m.group(1)


def wait_marker(proc, timeout):
    """Reads proc's stdout until the marker; returns seconds or None."""
    start = time.monotonic()
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() - start < timeout:
        r, _, _ = select.select([fd], [], [], 1.0)
        if not r:
            if proc.poll() is not None:
                return None, buf
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, buf
        buf += chunk
        if MARKER in buf:
            return time.monotonic(), buf
    return None, buf


def smaps_overhead_mib(pid, guest_bytes):
    """RSS of the process minus the guest-memory mappings, in MiB."""
    total = 0
    current_size = 0
    skip = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                current_size = int(m.group(2), 16) - int(m.group(1), 16)
                # Guest RAM is one anonymous mapping per memory slot: the
                # largest ones; anything of at least 32 MiB here is guest RAM.
                skip = current_size >= min(guest_bytes, 32 << 20)
                continue
            if line.startswith("Rss:") and not skip:
                total += int(line.split()[1])
    return total / 1024.0


def run_vigil(vigil, memory_mib, cmdline, timeout):
    try:
        os.remove("/tmp/vigil-bench-boot.log")
    except FileNotFoundError:
        pass
    args = [vigil, "run", "--config", os.path.join(ROOT, "guest-images", "default-vm.toml"),
            "--memory", f"{memory_mib}M", "--cmdline", cmdline + " vigil.test=boot",
            "--console", "stdio", "--log-level", "info",
            "--log-file", "/tmp/vigil-bench-boot.log"]
    t0_ns = time.monotonic_ns()
    t0 = t0_ns / 1e9
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    t1, out = wait_marker(proc, timeout)
    overhead = None
    if t1 is not None:
        try:
            overhead = smaps_overhead_mib(proc.pid, memory_mib << 20)
        except OSError:
            pass
    proc.wait(timeout=120)
    start_ms = None
    try:
        with open("/tmp/vigil-bench-boot.log") as f:
            # The VMM logs CLOCK_MONOTONIC at its first KVM_RUN; so do we
            # just before spawning it.
            m = re.findall(r"monotonic_ns=(\d+)", f.read())
            if m:
                start_ms = (int(m[-1]) - t0_ns) / 1e6
    except OSError:
        pass
    if t1 is None:
        sys.stderr.write(out.decode(errors="replace")[-2000:])
        raise SystemExit("vigil: no boot marker")
    return t1 - t0, start_ms, overhead


def run_qemu(memory_mib, cmdline, timeout, acpi):
    args = ["qemu-system-x86_64", "-enable-kvm",
            "-M", f"microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi={acpi}",
            "-cpu", "host,-arch-capabilities", "-m", str(memory_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", os.path.join(GUEST, "vmlinux"),
            "-initrd", os.path.join(GUEST, "initramfs.cpio"),
            "-append", cmdline + " vigil.test=boot"]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t1, out = wait_marker(proc, timeout)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if t1 is None:
        sys.stderr.write(out.decode(errors="replace")[-2000:])
        raise SystemExit("qemu: no boot marker")
    return t1 - t0


def table(result):
    """The short table written beside the JSON and printed."""
    runs = result["runs"]
    return (
        f"Boot, {result['guest_memory_mib']} MiB guest, {result['qemu']}\n\n"
        "| metric | vigil | qemu | ratio |\n"
        "|---|---|---|---|\n"
        f"| boot to marker, median of {runs} (s) | {result['vigil_boot_median_s']} | "
        f"{result['qemu_boot_median_s']} (acpi=on {result['qemu_acpi_on_boot_median_s']}, "
        f"acpi=off {result['qemu_acpi_off_boot_median_s']}) | {result['ratio']} |\n"
        f"| VMM start to first KVM_RUN (ms) | {result['vmm_start_to_first_run_ms']} | | |\n"
        f"| VMM RSS beyond guest memory (MiB) | {result['vmm_overhead_rss_mib']} | | |\n"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--vigil", default=os.path.join(ROOT, "target", "release", "vigil"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "boot.json"))
    a = ap.parse_args()
    cmdline = default_cmdline()

    # QEMU twice: with ACPI (the same tables-based SMP and power-off vigil
    # gives the guest) and without (MP table; the guest cannot power off
    # there, which the marker does not need). The ratio is taken against the
    # faster of the two, so it never flatters vigil.
    vigil_s, qemu_acpi_s, qemu_noacpi_s, start_ms, rss = [], [], [], [], []
    for i in range(a.runs):
        # Interleave so all see the same machine conditions.
        t, s, r = run_vigil(a.vigil, a.memory_mib, cmdline, a.timeout)
        vigil_s.append(t)
        if s is not None:
            start_ms.append(s)
        if r is not None:
            rss.append(r)
        qa = run_qemu(a.memory_mib, cmdline, a.timeout, "on")
        qemu_acpi_s.append(qa)
        qn = run_qemu(a.memory_mib, cmdline, a.timeout, "off")
        qemu_noacpi_s.append(qn)
        print(f"run {i + 1}/{a.runs}: vigil {t:.2f} s, qemu acpi=on {qa:.2f} s, "
              f"qemu acpi=off {qn:.2f} s", flush=True)

    qemu_best = min(statistics.median(qemu_acpi_s), statistics.median(qemu_noacpi_s))
    result = {
        "guest_memory_mib": a.memory_mib,
        "runs": a.runs,
        "vigil_boot_median_s": round(statistics.median(vigil_s), 3),
        "qemu_boot_median_s": round(qemu_best, 3),
        "qemu_acpi_on_boot_median_s": round(statistics.median(qemu_acpi_s), 3),
        "qemu_acpi_off_boot_median_s": round(statistics.median(qemu_noacpi_s), 3),
        "ratio": round(statistics.median(vigil_s) / qemu_best, 3),
        "vmm_start_to_first_run_ms": round(statistics.median(start_ms), 3) if start_ms else None,
        "vmm_overhead_rss_mib": round(statistics.median(rss), 2) if rss else None,
        "vigil_boot_s": [round(x, 3) for x in vigil_s],
        "qemu_acpi_on_boot_s": [round(x, 3) for x in qemu_acpi_s],
        "qemu_acpi_off_boot_s": [round(x, 3) for x in qemu_noacpi_s],
        "qemu": subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                               text=True).stdout.splitlines()[0],
        "cmdline": cmdline,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    text = table(result)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(text)
    print()
    print(text, end="")

if __name__ == "__main__":
    main()
