#!/usr/bin/env python3
"""Live-migration benchmark: vigil against QEMU on the same guest, same run,
source and target processes on this host over loopback TCP.

Cases (the default guest; the `dirty` workload rewrites one word per page of
its buffer, flat out or at a set rate, and reports the longest gap its loop
saw, which is the guest-side stall meter):

- idle-256:    256 MiB guest otherwise idle, with a 1 MiB buffer rewritten
               flat out (so the stall meter runs all the time);
- dirty-256:   256 MiB guest rewriting a 64 MiB buffer as fast as it can;
- capped-256:  the same over a link capped at 128 MiB/s (QEMU's default
               cap), below the dirty rate: convergence needs throttling;
- idle-1024:   1 GiB guest, as idle-256;
- full-1024:   1 GiB guest in which a first dirtier wrote every page of
               384 MiB once and exited (the pages keep its stamps), then
               as idle-1024: the first pass carries 384 MiB of data, which
               measures the stream's throughput.

Each hypervisor boots the guest once per case, then migrates it back and
forth between two processes `--runs` times (the guest keeps running).
vigil runs with its defaults (100 ms downtime target, unlimited bandwidth
except in capped-256). QEMU runs twice per migration case: with its
defaults (300 ms downtime limit, 128 MiB/s cap, no auto-converge) and tuned
(downtime-limit 100 ms, bandwidth unlimited; in capped-256 the cap stays and
auto-converge is on). A QEMU migration that has not completed after
`--limit` seconds is cancelled and counted as not converged.

vigil also migrates over TLS 1.3 (mutual certificates), alternating with
plain TCP in the same boot, to show what encryption costs, and with the
other compression setting: by default vigil LZ4-compresses data pages only
while a bandwidth cap applies, so capped-256 also runs with `--compress
off`, the others with `--compress on`. The dirtier's pages hold one word in
4 KiB and shrink ~100x, far more than real memory; the other cases' MB sent
against MB of pages with `--compress on` show what the rest of the guest's
memory (kernel, initramfs) compresses to.

Per migration: total time and downtime as each side reports it (vigil's
summary, QEMU's query-migrate), bytes sent, rounds, and the guest's stall
meter from the first dirtier report after the switchover. vigil's downtime
runs from the pause to the target's acknowledgement that the guest runs
there; its summary also gives the pause to the last byte sent
(`downtime_sent_ms`), which is what QEMU's `downtime` covers (QEMU does
not wait for the target). Figures are
medians over the runs. Writes bench/results/migration.json and .md.
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
import boot  # noqa: E402

ROOT = boot.ROOT
PORTS = (47280, 47281)
QEMU_CAP = 128 << 20  # QEMU's default max-bandwidth, bytes/s

CASES = [
    # name, guest MiB, dirtier options, dirtier buffer MiB (rewritten flat
    # out), capped
    ("idle-256", 256, "mib=1,rate=0,report=1", 1, False),
    ("dirty-256", 256, "mib=64,rate=0,report=1", 64, False),
    ("capped-256", 256, "mib=64,rate=0,report=1", 64, True),
    ("idle-1024", 1024, "mib=1,rate=0,report=1", 1, False),
    ("full-1024", 1024, "mib=384,rate=0,passes=1,report=1+dirty:mib=1,rate=0,report=1", 1,
     False),
]

DIRTY_RE = re.compile(rb"VIGIL-DIRTY pass=(\d+) max_gap_ms=([\d.]+) max_gap_total_ms=[\d.]+ "
                      rb"mismatches=(\d+)")


def booted(buf, opts):
    """The guest is ready to migrate: the dirtier reported twice, and a
    one-pass filler (`passes=1`) finished."""
    return len(DIRTY_RE.findall(buf)) >= 2 and ("passes=1" not in opts
                                                 or b"VIGIL-DIRTY-DONE" in buf)


def workload(opts):
    return f" vigil.tools=off vigil.run=dirty:{opts}"


class Console:
    """A process's serial console on its stdout, read without blocking."""

    def __init__(self, proc):
        self.proc = proc
        self.buf = b""
        os.set_blocking(proc.stdout.fileno(), False)

    def poll(self):
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if chunk:
                self.buf += chunk
        except BlockingIOError:
            pass
        return self.buf

    def wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.poll()):
                return self.buf
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        sys.stderr.write(self.buf.decode(errors="replace")[-2000:])
        raise SystemExit(f"{what}: not seen within {timeout} s")

    def reports(self):
        return DIRTY_RE.findall(self.poll())


def first_report_after(console, n_before, timeout=60):
    """The stall meter of the first dirtier report printed by `console`
    after it had `n_before` reports; checks that no page mismatched."""
    console.wait(lambda b: len(DIRTY_RE.findall(b)) > n_before, timeout, "dirtier report")
    reports = console.reports()
    if b"VIGIL-DIRTY-MISMATCH" in console.buf or any(int(r[2]) for r in reports):
        raise SystemExit("the dirtier found a stale page after migrating")
    return float(reports[n_before][1])


def kill(proc):
    if proc and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ---------------------------------------------------------------- vigil

def vigil_proc(vigil, work, name, args):
    api = os.path.join(work, f"{name}.sock")
    if os.path.exists(api):
        os.remove(api)
    proc = subprocess.Popen([vigil, "run", "--console", "stdio", "--api-socket", api] + args,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    return proc, api


def make_tls(work):
    """A cluster CA and one host certificate (name vmg-host) with openssl;
    returns the flags both sides take."""
    d = os.path.join(work, "tls")
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt",
        "-subj", "/CN=vmg-bench-ca", "-days", "2")
    run("openssl", "req", *ec, "-keyout", f"{d}/host.key", "-out", f"{d}/host.csr",
        "-subj", "/CN=vmg-host")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=DNS:vmg-host\n")
    run("openssl", "x509", "-req", "-in", f"{d}/host.csr", "-CA", f"{d}/ca.crt",
        "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/host.crt", "-days", "2",
        "-extfile", f"{d}/ext")
    return ["--tls-cert", f"{d}/host.crt", "--tls-key", f"{d}/host.key",
            "--tls-ca", f"{d}/ca.crt"]


def vigil_case(vigil, work, mib, opts, capped, runs, cmdline, tls=None):
    """Migrates back and forth `runs` times with the defaults, alternating
    (same boot) with TLS (if `tls`) and with the other compression setting
    (`--compress off` on a capped link, where the default compresses;
    `--compress on` otherwise). Returns (defaults, tls, other) runs."""
    cfg = os.path.join(ROOT, "guest-images", "default-vm.toml")
    src, api = vigil_proc(vigil, work, "v0", ["--config", cfg, "--memory", f"{mib}M",
                                              "--cmdline", cmdline + workload(opts)])
    procs = [src]
    out, out_tls, out_raw = [], [], []
    variants = ["plain"] + (["tls"] if tls else []) + ["other"]
    try:
        con = Console(src)
        con.wait(lambda b: booted(b, opts), 600, "vigil boot")
        for i in range(runs * len(variants)):
            port = PORTS[i % 2]
            variant = variants[i % len(variants)]
            use_tls = variant == "tls"
            res = {"plain": out, "tls": out_tls, "other": out_raw}[variant]
            tgt, tapi = vigil_proc(vigil, work, f"v{i + 1}",
                                   ["--incoming", f"tcp:127.0.0.1:{port}"]
                                   + (tls if use_tls else []))
            procs.append(tgt)
            # The target says on stderr when it listens.
            while b"waiting for an incoming migration" not in tgt.stderr.readline():
                if tgt.poll() is not None:
                    raise SystemExit("vigil target exited before listening")
            cmd = [vigil, "migrate", "--json", "--api-socket", api, "--to", f"127.0.0.1:{port}"]
            if capped:
                cmd += ["--bandwidth", str(QEMU_CAP // 1_000_000)]
            if use_tls:
                cmd += tls + ["--tls-name", "vmg-host"]
            if variant == "other":
                cmd += ["--compress", "off" if capped else "on"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            last = lines[-1] if lines else {}
            if r.returncode != 0 or last.get("state") != "succeeded":
                res.append({"converged": False, "error": r.stderr.strip()[-300:]})
                # The guest stays on the source; drop the target and go on.
                kill(tgt)
                continue
            s = last["summary"]
            src.wait(timeout=30)
            tcon = Console(tgt)
            stall = first_report_after(tcon, 0)
            res.append({"converged": True, "total_s": s["total_s"],
                        "downtime_ms": s["downtime_ms"],
                        "downtime_sent_ms": s.get("downtime_sent_ms"), "guest_stall_ms": stall,
                        "bytes": s["bytes_sent"], "rounds": s["rounds"],
                        "page_bytes": s["data_pages"] * 4096,
                        "max_throttle": s["max_throttle"],
                        "first_pass_gb_s": s["first_pass_bytes"] / max(s["first_pass_s"], 1e-9) / 1e9})
            src, api, con = tgt, tapi, tcon
            print(f"  vigil-{variant} run {i + 1}: {res[-1]}", flush=True)
    finally:
        for p in procs:
            kill(p)
    return out, out_tls, out_raw


# ----------------------------------------------------------------- QEMU

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
                time.sleep(0.01)
        self.f = self.s.makefile("rwb")
        self.f.readline()
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


def qemu_proc(work, name, mib, cmdline, incoming=None):
    qmp = os.path.join(work, f"{name}.qmp")
    if os.path.exists(qmp):
        os.remove(qmp)
    args = ["qemu-system-x86_64", "-enable-kvm",
            "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=on",
            "-cpu", "host,-arch-capabilities", "-m", str(mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", os.path.join(boot.GUEST, "vmlinux"),
            "-initrd", os.path.join(boot.GUEST, "initramfs.cpio"),
            "-append", cmdline, "-qmp", f"unix:{qmp},server,nowait"]
    if incoming:
        args += ["-incoming", incoming]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, qmp


def qemu_case(work, mib, opts, capped, tuned, runs, cmdline, limit):
    full = cmdline + workload(opts)
    src, qmp_path = qemu_proc(work, "q0", mib, full)
    procs = [src]
    out = []
    try:
        con = Console(src)
        con.wait(lambda b: booted(b, opts), 600, "qemu boot")
        q = Qmp(qmp_path)
        for i in range(runs):
            port = PORTS[i % 2]
            tgt, tqmp = qemu_proc(work, f"q{i + 1}", mib, full, f"tcp:127.0.0.1:{port}")
            procs.append(tgt)
            tq = Qmp(tqmp)
            if tuned:
                params = {"downtime-limit": 100}
                if not capped:
                    params["max-bandwidth"] = 1 << 40
                q.cmd("migrate-set-parameters", **params)
                if capped:
                    q.cmd("migrate-set-capabilities",
                          capabilities=[{"capability": "auto-converge", "state": True}])
            q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            t0 = time.monotonic()
            while True:
                st = q.cmd("query-migrate")["return"]
                if st.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > limit:
                    q.cmd("migrate_cancel")
                    time.sleep(0.5)
                    st = {"status": "timeout"}
                    break
                time.sleep(0.01)
            if st.get("status") != "completed":
                out.append({"converged": False, "error": st.get("status")})
                kill(tgt)
                q.cmd("cont")
                print(f"  qemu run {i + 1}: {out[-1]}", flush=True)
                continue
            ram = st.get("ram", {})
            tcon = Console(tgt)
            # Wait until the target runs, then take the stall meter.
            while tq.cmd("query-status")["return"].get("status") != "running":
                time.sleep(0.01)
            stall = first_report_after(tcon, 0)
            out.append({"converged": True, "total_s": st.get("total-time", 0) / 1e3,
                        "downtime_ms": st.get("downtime", 0), "guest_stall_ms": stall,
                        "bytes": ram.get("transferred", 0),
                        "rounds": ram.get("dirty-sync-count", 0),
                        "stream_gb_s": ram.get("mbps", 0) / 8e3})
            print(f"  qemu{'-tuned' if tuned else ''} run {i + 1}: {out[-1]}", flush=True)
            q.cmd("quit")
            src.wait(timeout=30)
            src, q, con = tgt, tq, tcon
    finally:
        for p in procs:
            kill(p)
    return out


# -------------------------------------------------------------- summary

def med(runs, key):
    vals = [r[key] for r in runs if r.get("converged")]
    return round(statistics.median(vals), 4) if vals else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=60, help="QEMU give-up time, s")
    ap.add_argument("--vigil-only", action="store_true",
                    help="skip QEMU (for trying a change; ratios need QEMU in the same run)")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--vigil", default=os.path.join(ROOT, "target", "release", "vigil"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "migration.json"))
    a = ap.parse_args()
    cmdline = boot.default_cmdline()
    wanted = a.cases.split(",")
    work = tempfile.mkdtemp(prefix="vmg-bench-")
    records = []
    try:
        tls = make_tls(work)
        for name, mib, opts, buffer_mib, capped in CASES:
            if name not in wanted:
                continue
            print(f"{name}:", flush=True)
            v, vt, vr = vigil_case(a.vigil, work, mib, opts, capped, a.runs, cmdline, tls)
            qd, qt = [], []
            if not a.vigil_only:
                qd = qemu_case(work, mib, opts, capped, False, a.runs, cmdline, a.limit)
                qt = qemu_case(work, mib, opts, capped, True, a.runs, cmdline, a.limit)
            best = qt if (med(qt, "total_s") or 1e9) <= (med(qd, "total_s") or 1e9) else qd
            rec = {
                "case": name, "guest_mib": mib, "dirty_mib_s": "max", "dirty_buffer_mib": buffer_mib,
                "link": "128 MiB/s" if capped else "unlimited",
                "vigil_total_s": med(v, "total_s"),
                "vigil_downtime_ms": med(v, "downtime_ms"),
                "vigil_downtime_sent_ms": med(v, "downtime_sent_ms"),
                "vigil_guest_stall_ms": med(v, "guest_stall_ms"),
                "vigil_bytes": med(v, "bytes"), "vigil_rounds": med(v, "rounds"),
                "vigil_max_throttle": med(v, "max_throttle"),
                "vigil_first_pass_gb_s": med(v, "first_pass_gb_s"),
                "qemu_config": "tuned" if best is qt else "defaults",
                "qemu_total_s": med(best, "total_s"),
                "qemu_downtime_ms": med(best, "downtime_ms"),
                "qemu_guest_stall_ms": med(best, "guest_stall_ms"),
                "qemu_bytes": med(best, "bytes"), "qemu_rounds": med(best, "rounds"),
                "qemu_stream_gb_s": med(best, "stream_gb_s"),
                "qemu_defaults_total_s": med(qd, "total_s"),
                "qemu_defaults_downtime_ms": med(qd, "downtime_ms"),
                "converged": all(r["converged"] for r in v),
                "vigil_converged_runs": sum(r["converged"] for r in v),
                "qemu_defaults_converged_runs": sum(r["converged"] for r in qd),
                "qemu_tuned_converged_runs": sum(r["converged"] for r in qt),
                "vigil_tls_total_s": med(vt, "total_s"),
                "vigil_tls_downtime_ms": med(vt, "downtime_ms"),
                "vigil_tls_converged_runs": sum(r["converged"] for r in vt),
                "vigil_page_bytes": med(v, "page_bytes"),
                "vigil_other_compress": "off" if capped else "on",
                "vigil_other_total_s": med(vr, "total_s"),
                "vigil_other_downtime_ms": med(vr, "downtime_ms"),
                "vigil_other_bytes": med(vr, "bytes"),
                "vigil_other_page_bytes": med(vr, "page_bytes"),
                "runs": a.runs,
                "vigil_runs": v, "vigil_tls_runs": vt, "vigil_other_compress_runs": vr, "qemu_defaults_runs": qd, "qemu_tuned_runs": qt,
            }
            rec["total_ratio"] = ratio(rec["vigil_total_s"], rec["qemu_total_s"])
            rec["downtime_ratio"] = ratio(rec["vigil_downtime_ms"], rec["qemu_downtime_ms"])
            if rec["vigil_total_s"] and rec["vigil_bytes"]:
                rec["vigil_stream_gb_s"] = round(rec["vigil_bytes"] / rec["vigil_total_s"] / 1e9, 3)
            rec["tls_total_ratio"] = ratio(rec["vigil_tls_total_s"], rec["vigil_total_s"])
            records.append(rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    with open(a.out, "w") as f:
        json.dump({"qemu": qemu, "cases": records}, f, indent=2)
        f.write("\n")
    text = table(records, qemu, a.runs)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(text)
    print()
    print(text, end="")


def fmt(v, unit=""):
    return "-" if v is None else f"{v}{unit}"


def table(records, qemu, runs):
    t = (f"Live migration over loopback, medians of {runs} runs per case; {qemu}.\n"
         "QEMU column: its better configuration per case (defaults, or tuned: downtime-limit "
         "100 ms, bandwidth unlimited / auto-converge when capped).\n\n"
         "| case | guest MiB | vigil total s | qemu total s | ratio | vigil downtime ms "
         "(to the target's ack / to the last byte sent) | "
         "qemu downtime ms | vigil guest stall ms | qemu guest stall ms | vigil MB sent | "
         "qemu MB sent | vigil rounds | throttle % | converged (vigil / qemu defaults / "
         "qemu tuned) | vigil TLS total s (ratio to plain) | stream GB/s (vigil first pass / "
         "qemu) | vigil with the other --compress: total s / MB sent / MB of pages |\n|"
         + "---|" * 18 + "\n")
    for r in records:
        mb = lambda b: None if b is None else round(b / 1e6, 1)  # noqa: E731
        t += (f"| {r['case']} | {r['guest_mib']} | {fmt(r['vigil_total_s'])} | "
              f"{fmt(r['qemu_total_s'])} | {fmt(r['total_ratio'])} | "
              f"{fmt(r['vigil_downtime_ms'])} / {fmt(r['vigil_downtime_sent_ms'])} | "
              f"{fmt(r['qemu_downtime_ms'])} | "
              f"{fmt(r['vigil_guest_stall_ms'])} | {fmt(r['qemu_guest_stall_ms'])} | "
              f"{fmt(mb(r['vigil_bytes']))} | {fmt(mb(r['qemu_bytes']))} | "
              f"{fmt(r['vigil_rounds'])} | {fmt(r['vigil_max_throttle'])} | "
              f"{r['vigil_converged_runs']}/{runs} / {r['qemu_defaults_converged_runs']}/{runs} / "
              f"{r['qemu_tuned_converged_runs']}/{runs} | "
              f"{fmt(r['vigil_tls_total_s'])} ({fmt(r['tls_total_ratio'])}) | "
              f"{fmt(r.get('vigil_first_pass_gb_s'))} / {fmt(r.get('qemu_stream_gb_s'))} | "
              f"{r['vigil_other_compress']}: {fmt(r['vigil_other_total_s'])} / "
              f"{fmt(mb(r['vigil_other_bytes']))} / {fmt(mb(r['vigil_other_page_bytes']))} |\n")
    return t


if __name__ == "__main__":
    main()
