#!/usr/bin/env python3
"""Snapshot-restore benchmark: vigil against QEMU on the same guest, same run.

Boots the default guest (256 MiB, the counter workload) once in each
hypervisor, saves it (vigil: `vigil snapshot --stop`; QEMU: `migrate
exec:cat > FILE`, QEMU's migrate-to-file), then restores it N times
and measures from spawning the restoring process to the guest running again:

- vigil: the VMM logs CLOCK_MONOTONIC when the boot vCPU first enters
  KVM_RUN after restoring (`monotonic_ns=`), compared with CLOCK_MONOTONIC
  read just before spawning it;
- QEMU (`-incoming exec:cat FILE`): QMP `query-status` polled every 2 ms
  until it says `running`.

With --with-disk both VMs also get a virtio-blk disk (a sparse 64 MiB raw
image; QEMU: `-device virtio-blk-device` on the microvm's virtio-mmio), so
the restore reopens it and restores the device's queue state too.

Writes bench/results/snapshot.json and snapshot.md (or --out).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boot  # noqa: E402  (shares the guest and marker helpers)

ROOT = boot.ROOT
WORKLOAD = " vigil.tools=off vigil.run=counter:every=1 vigil.test=run"
# Set by --with-disk: the image both hypervisors attach.
DISK = None


def wait_line(proc, needle, timeout):
    start = time.monotonic()
    buf = b""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while time.monotonic() - start < timeout:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            if needle in buf:
                return buf
        elif chunk == b"" or proc.poll() is not None:
            break
        time.sleep(0.05)
    sys.stderr.write(buf.decode(errors="replace")[-2000:])
    raise SystemExit(f"no {needle!r} within {timeout} s")


def vigil_save(vigil, work, memory_mib, cmdline):
    api = os.path.join(work, "vigil.sock")
    snap = os.path.join(work, "vigil-snap")
    proc = subprocess.Popen(
        [vigil, "run", "--config", os.path.join(ROOT, "guest-images", "default-vm.toml"),
         "--memory", f"{memory_mib}M", "--cmdline", cmdline + WORKLOAD,
         "--console", "stdio", "--api-socket", api]
        + (["--disk", f"path={DISK}"] if DISK else []),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_line(proc, b"VIGIL-COUNTER 2", 300)
        subprocess.run([vigil, "snapshot", "--api-socket", api, "--to", snap, "--stop"],
                       check=True, capture_output=True)
        proc.wait(timeout=60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return snap


def vigil_restore_once(vigil, snap, work):
    log = os.path.join(work, "restore.log")
    api = os.path.join(work, "restore.sock")
    for p in (log, api):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.monotonic_ns()
    proc = subprocess.Popen(
        [vigil, "run", "--restore", snap, "--console", "none", "--api-socket", api,
         "--log-level", "info", "--log-file", log],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ns = None
    deadline = time.monotonic() + 60
    while ns is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with open(log) as f:
                m = re.findall(r"monotonic_ns=(\d+)", f.read())
            if m:
                ns = int(m[-1])
        except OSError:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if ns is None:
        raise SystemExit("vigil restore: no first KVM_RUN in its log")
    return (ns - t0) / 1e9


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        self.f = self.s.makefile("rwb")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "return" in reply or "error" in reply:
                return reply


def qemu_args(memory_mib, cmdline, qmp):
    return ["qemu-system-x86_64", "-enable-kvm",
            "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=on",
            "-cpu", "host,-arch-capabilities", "-m", str(memory_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", os.path.join(boot.GUEST, "vmlinux"),
            "-initrd", os.path.join(boot.GUEST, "initramfs.cpio"),
            "-append", cmdline + WORKLOAD, "-qmp", f"unix:{qmp},server,nowait"] + (
                ["-drive", f"file={DISK},if=none,id=d0,format=raw",
                 "-device", "virtio-blk-device,drive=d0"] if DISK else [])


def qemu_save(work, memory_mib, cmdline):
    qmp_path = os.path.join(work, "qemu.qmp")
    state = os.path.join(work, "qemu-state")
    proc = subprocess.Popen(qemu_args(memory_mib, cmdline, qmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return qemu_save_running(proc, qmp_path, state)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def qemu_save_running(proc, qmp_path, state):
    wait_line(proc, b"VIGIL-COUNTER 2", 300)
    q = Qmp(qmp_path)
    # No `stop` first: QEMU records the run state in the stream, and a guest
    # saved paused would stay paused on restore. Migrating to the file stops
    # the guest at the end on its own.
    q.cmd("migrate", uri=f"exec:cat > {state}")
    while q.cmd("query-migrate")["return"].get("status") not in ("completed", "failed"):
        time.sleep(0.05)
    q.cmd("quit")
    proc.wait(timeout=60)
    return state


def qemu_restore_once(work, state, memory_mib, cmdline):
    qmp_path = os.path.join(work, "qemu-restore.qmp")
    if os.path.exists(qmp_path):
        os.remove(qmp_path)
    args = qemu_args(memory_mib, cmdline, qmp_path) + ["-incoming", f"exec:cat {state}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        q = Qmp(qmp_path)
        while q.cmd("query-status")["return"].get("status") != "running":
            if time.monotonic() - t0 > 60:
                raise SystemExit("qemu restore: not running after 60 s")
            time.sleep(0.002)
        return time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def table(r):
    return (
        f"Snapshot restore, {r['guest_memory_mib']} MiB guest"
        f"{', with a virtio-blk disk' if r.get('with_disk') else ''}, {r['qemu']}\n\n"
        "| metric | vigil | qemu | ratio |\n|---|---|---|---|\n"
        f"| restore to guest running, median of {r['runs']} (ms) | "
        f"{r['vigil_restore_median_ms']} | {r['qemu_restore_median_ms']} | {r['ratio']} |\n"
        f"| saved state on disk (MiB) | {r['vigil_snapshot_mib']} | {r['qemu_state_mib']} | |\n"
    )


def du_mib(path):
    total = 0
    for dirpath, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for f in files:
            total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
    return round(total / (1 << 20), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--vigil", default=os.path.join(ROOT, "target", "release", "vigil"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "snapshot.json"))
    ap.add_argument("--with-disk", action="store_true")
    a = ap.parse_args()
    cmdline = boot.default_cmdline()
    work = tempfile.mkdtemp(prefix="vigil-bench-snap-")
    global DISK
    if a.with_disk:
        DISK = os.path.join(work, "disk.img")
        with open(DISK, "wb") as f:
            f.truncate(64 << 20)
    try:
        snap = vigil_save(a.vigil, work, a.memory_mib, cmdline)
        state = qemu_save(work, a.memory_mib, cmdline)
        v, q = [], []
        for i in range(a.runs):
            v.append(vigil_restore_once(a.vigil, snap, work))
            q.append(qemu_restore_once(work, state, a.memory_mib, cmdline))
            print(f"run {i + 1}/{a.runs}: vigil {v[-1] * 1e3:.1f} ms, qemu {q[-1] * 1e3:.1f} ms",
                  flush=True)
        r = {
            "guest_memory_mib": a.memory_mib,
            "with_disk": a.with_disk,
            "runs": a.runs,
            "vigil_restore_median_ms": round(statistics.median(v) * 1e3, 1),
            "qemu_restore_median_ms": round(statistics.median(q) * 1e3, 1),
            "ratio": round(statistics.median(v) / statistics.median(q), 3),
            "vigil_restore_ms": [round(x * 1e3, 1) for x in v],
            "qemu_restore_ms": [round(x * 1e3, 1) for x in q],
            "vigil_snapshot_mib": du_mib(snap),
            "qemu_state_mib": du_mib(state),
            "qemu": subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
