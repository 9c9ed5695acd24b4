#!/usr/bin/env python3
"""HA failover benchmark: kill a host, time until its VM runs on a peer.

A lab of three hosts, each a network namespace running `vigil agent` with
the settings given (default: the agent's defaults, no overrides), sharing
two datastores (directories bind-mounted per host, as tests/ha_lab does).
host-9 wins the election (the lexically highest id) and has too little
memory for the VM, so the VM always runs on a slave and every trial kills a
slave (vSphere's case: a slave's death). One trial:

1. the VM runs on host X (its guest tools heartbeat reaches the VMM);
2. host X is killed: every process in its namespace gets SIGKILL and its
   interface goes down (a dead host answers no ping); t0 = CLOCK_MONOTONIC
   just before;
3. detect: the master's log line classifying X as failed (its wall-clock
   timestamp against the wall clock read at t0: same machine, same clock);
4. kill-to-running: the new VMM's control API answers on the peer (it
   starts answering after the vCPUs run);
5. kill-to-heartbeat: that VMM reports a connected guest tools daemon with
   a heartbeat;
6. host X boots again (interface up, agent started) and rejoins as a slave.

A split-brain check runs throughout: the VM's VMM must never run on two
hosts at once (sampled every 20 ms), and the guest's disk journal (the
disk-write workload, one tag per boot) must show no writer coming back
after another took over.

Writes bench/results/failover.json and failover.md.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
VIGIL = os.path.join(ROOT, "target/release/vigil")
PORT = 47300
HOSTS = ["host-1", "host-2", "host-9"]


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def api(sock, path, timeout=1.0):
    """GET path on a VMM's API socket; the JSON body or None."""
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n")[0]:
            return None
        return json.loads(body)
    except (OSError, ValueError):
        return None


class Lab:
    def __init__(self, timings):
        self.tag = f"vha{os.getpid()}xbench"
        self.root = tempfile.mkdtemp(prefix=self.tag + "-")
        self.agents = {}
        self.hosts = {}
        os.makedirs(f"{self.root}/store/ds1")
        os.makedirs(f"{self.root}/store/ds2")
        sw = f"{self.tag}-sw"
        sh("ip", "netns", "add", sw)
        sh("ip", "-n", sw, "link", "set", "lo", "up")
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "addr", "add", "198.19.77.1/24", "dev", "br0")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        cluster = ""
        for n, h in enumerate(HOSTS, start=1):
            ns = f"{self.tag}-{h}"
            ip = f"198.19.77.{10 + n}"
            d = f"{self.root}/{h}"
            os.makedirs(f"{d}/run")
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{n}", "netns", sw)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", "198.19.77.1")
            sh("ip", "-n", sw, "link", "set", f"p{n}", "master", "br0", "up")
            ds = ""
            for name in ("ds1", "ds2"):
                os.makedirs(f"{d}/ds/{name}")
                sh("mount", "--bind", f"{self.root}/store/{name}", f"{d}/ds/{name}")
                ds += f'{name} = "{d}/ds/{name}"\n'
            with open(f"{d}/host.toml", "w") as f:
                f.write(f'host = "{h}"\nsecret_file = "{self.root}/secret"\nrun_dir = "{d}/run"\n'
                        f'vigil = "{VIGIL}"\n[datastores]\n{ds}[timings]\n{timings}\n')
            mem = 64 if h == "host-9" else 1024
            cluster += (f'[hosts.{h}]\naddress = "{ip}"\nport = {PORT}\ncpu_mhz = 4000\n'
                        f'mem_mib = {mem}\ndatastores = ["ds1", "ds2"]\n')
            self.hosts[h] = {"ns": ns, "dir": d}
        with open(f"{self.root}/cluster.toml", "w") as f:
            f.write(cluster)
        sh(VIGIL, "cluster", "init", "--cluster", f"{self.root}/cluster.toml",
           "--datastore", f"{self.root}/store/ds1", "--secret", f"{self.root}/secret")

    def vigil(self, h, *args):
        return sh("nsenter", f"--net=/var/run/netns/{self.hosts[h]['ns']}", VIGIL, *args,
                  "--config", f"{self.hosts[h]['dir']}/host.toml", check=False)

    def start_agent(self, h):
        ns = self.hosts[h]["ns"]
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "replace", "default", "via", "198.19.77.1")
        self.agents[h] = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{ns}", VIGIL, "agent",
             "--log-file", f"{self.hosts[h]['dir']}/agent.log",
             "--config", f"{self.hosts[h]['dir']}/host.toml"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pids(self, h):
        r = sh("ip", "netns", "pids", self.hosts[h]["ns"], check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_host(self, h):
        for p in self.pids(h):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "-n", self.hosts[h]["ns"], "link", "set", "eth0", "down")
        if h in self.agents:
            self.agents.pop(h).wait()

    def status(self, h):
        r = self.vigil(h, "cluster", "status", "--json")
        try:
            return json.loads(r.stdout) if r.returncode == 0 else None
        except ValueError:
            return None

    def vmm_sock(self, h, vm):
        return f"{self.hosts[h]['dir']}/run/{vm}.sock"

    def vmm_running(self, h, vm):
        p = f"{self.hosts[h]['dir']}/run/{vm}.vm.json"
        try:
            pid = json.load(open(p))["pid"]
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            return st != "Z"
        except (OSError, ValueError, KeyError, IndexError):
            return False

    def cleanup(self):
        for h in self.hosts:
            for p in self.pids(h):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.3)
        for h, v in self.hosts.items():
            for name in ("ds1", "ds2"):
                sh("umount", f"{v['dir']}/ds/{name}", check=False)
            sh("ip", "netns", "del", v["ns"], check=False)
        sh("ip", "netns", "del", f"{self.tag}-sw", check=False)
        sh("rm", "-rf", self.root, check=False)


def wait(what, timeout, f, interval=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = f()
        if v:
            return v
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def log_time(path, pattern, after_wall):
    """Wall-clock time (s) of the first log line matching pattern after after_wall."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    for line in lines:
        if pattern not in line:
            continue
        stamp = line.split(" ", 1)[0]
        try:
            t = datetime.strptime(stamp.rstrip("Z")[:26], "%Y-%m-%dT%H:%M:%S.%f")
        except ValueError:
            continue
        t = t.replace(tzinfo=timezone.utc).timestamp()
        if t >= after_wall:
            return t
    return None


def agent_timings(path):
    """The timings the agent logged at start (Debug of ha::config::Timings)."""
    try:
        for line in open(path):
            if "agent timings" in line:
                m = re.search(r"timings=(Timings \{.*\})", line)
                if m:
                    return m.group(1)
    except OSError:
        pass
    return None


def check_journal(path):
    data = open(path, "rb").read()
    writers, last = [], None
    for k in range(0, len(data) - 511, 512):
        rec = data[k:k + 512]
        if rec[:8] != b"VIGILJ01":
            break
        tag, seq = rec[8:24], int.from_bytes(rec[24:32], "little")
        if last is not None and seq <= last:
            return writers, f"seq {seq} after {last} at record {k // 512}"
        if tag in writers and tag != writers[-1]:
            return writers, f"writer {writers.index(tag)} came back at record {k // 512}"
        if tag not in writers:
            writers.append(tag)
        last = seq
    return writers, None


def settings_text(s):
    return s if isinstance(s, str) else ", ".join(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--timings", default="", help="host.toml [timings] lines (default: none)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/failover"))
    args = ap.parse_args()
    if not os.path.exists(VIGIL):
        raise SystemExit("build first: make build")
    out = os.path.join(ROOT, "guest-images/out")
    default_cmdline = re.search(r'^cmdline = "(.*)"', open(os.path.join(ROOT, "guest-images/default-vm.toml")).read(), re.M).group(1)
    timings = args.timings.replace("\\n", "\n")
    lab = Lab(timings)
    results = []
    split_brain = 0
    try:
        for h in HOSTS:
            lab.start_agent(h)
        wait("host-9 master", 120, lambda: (lab.status("host-1") or {}).get("host") == "host-9", 0.5)
        vmdir = f"{lab.root}/store/ds1/vms/vm1"
        os.makedirs(vmdir)
        with open(f"{vmdir}/disk.img", "wb") as f:
            f.truncate(64 << 20)
        with open(f"{lab.root}/vm1.toml", "w") as f:
            f.write(f'name = "vm1"\nvcpus = 1\nmemory = "128M"\nkernel = "{out}/vmlinux"\n'
                    f'initrd = "{out}/initramfs.cpio"\n'
                    f'cmdline = "{default_cmdline} vigil.run=disk-write:dev=/dev/vda,rate=20,report=60"\n'
                    f'[[disks]]\npath = "disk.img"\n[vsock]\ncid = 3\nsocket = "unused"\n')
        r = lab.vigil("host-1", "vm", "register", "ds1", f"{lab.root}/vm1.toml")
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        for _ in range(40):
            r = lab.vigil("host-1", "vm", "start", "vm1", "--host", "host-1")
            if r.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise SystemExit(r.stderr)
        on = "host-1"
        for trial in range(args.trials):
            sock = lab.vmm_sock(on, "vm1")
            wait(f"tools heartbeat on {on}", 600,
                 lambda: (api(sock, "/vm/heartbeat") or {}).get("connected"), 0.2)
            peer = "host-2" if on == "host-1" else "host-1"
            wall0, t0 = time.time(), time.monotonic()
            lab.kill_host(on)
            running = heartbeat = None
            psock = lab.vmm_sock(peer, "vm1")
            end = t0 + 600
            while time.monotonic() < end and heartbeat is None:
                if lab.vmm_running(on, "vm1") and lab.vmm_running(peer, "vm1"):
                    split_brain += 1
                if running is None and api(psock, "/vm", 0.2) is not None:
                    running = time.monotonic() - t0
                if running is not None:
                    hb = api(psock, "/vm/heartbeat", 0.2) or {}
                    if hb.get("connected") and hb.get("ms_since_tools_heartbeat") is not None:
                        heartbeat = time.monotonic() - t0
                time.sleep(0.02)
            if heartbeat is None:
                raise SystemExit(f"trial {trial}: VM not running with tools on {peer}")
            det = log_time(f"{lab.hosts['host-9']['dir']}/agent.log",
                           f'HostClassified {{ host: HostId("{on}"), state: Failed', wall0)
            detect = det - wall0 if det else None
            results.append({"trial": trial, "killed": on, "restarted_on": peer,
                            "detect_s": detect, "kill_to_running_s": running,
                            "kill_to_heartbeat_s": heartbeat})
            print(f"trial {trial}: killed {on}; detect {detect and round(detect, 2)} s, "
                  f"running on {peer} after {running:.2f} s, tools heartbeat after {heartbeat:.2f} s",
                  flush=True)
            lab.start_agent(on)
            wait(f"{on} back", 120,
                 lambda: ((lab.status("host-9") or {}).get("hosts") or {}).get(on) == "slave", 0.5)
            on = peer
        lab.kill_host(on)
        effective = agent_timings(f"{lab.hosts['host-9']['dir']}/agent.log")
        writers, problem = check_journal(f"{lab.root}/store/ds1/vms/vm1/disk.img")
        if problem:
            split_brain += 1
    finally:
        lab.cleanup()
    med = lambda k: statistics.median([r[k] for r in results if r[k] is not None])
    summary = {
        "trials": len(results),
        "median_kill_to_running_s": round(med("kill_to_running_s"), 3),
        "median_kill_to_heartbeat_s": round(med("kill_to_heartbeat_s"), 3),
        "median_detect_s": round(med("detect_s"), 3),
        "split_brain_events": split_brain,
        "journal_writers": len(writers),
        "settings": [t.strip() for t in timings.splitlines() if t.strip()]
        or "agent defaults (ha::config::Timings::default())",
        "effective_timings": effective,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("# HA failover (bench/failover.py)\n\n"
                f"Settings: {settings_text(summary['settings'])}"
                f" (effective: `{summary['effective_timings']}`). Three hosts (network namespaces), one VM "
                "(128 MiB, disk-write workload, guest tools); each trial kills the slave running it.\n\n"
                "| trials | median detect (s) | median kill-to-running (s) | median kill-to-tools-heartbeat (s) | split-brain events |\n"
                "|---|---|---|---|---|\n"
                f"| {summary['trials']} | {summary['median_detect_s']} | {summary['median_kill_to_running_s']} "
                f"| {summary['median_kill_to_heartbeat_s']} | {split_brain} |\n\n"
                "Anchors: vSphere HA declares a slave dead after about 15-18 s and restarts after that; "
                "Proxmox VE documents about 2 minutes.\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
