//! The HA test lab: N simulated hosts on this machine, each a network
//! namespace running its own `vigil agent`, sharing datastore directories.
//!
//! ```text
//!   netns TAG-h1 (host-1)           netns TAG-sw0 (switch)            netns TAG-sw1, TAG-sw2
//!   eth0 198.19.77.11/24  <-veth->  p1 ─┐                             (spare switches for
//!   netns TAG-h2 (host-2)               ├─ br0 198.19.77.1/24         partitions, each with its
//!   eth0 198.19.77.12/24  <-veth->  p2 ─┘  (the isolation address)    own br0 198.19.77.1/24)
//! ```
//!
//! - kill a host: SIGKILL every process in its namespace (agent and VMMs);
//!   freeze/thaw: SIGSTOP/SIGCONT them (a host that hangs, then returns);
//! - cut its management network: detach its port from the switch (it
//!   reaches nobody, not even the isolation address); heal: reattach;
//! - partition: move ports to separate switches (each side keeps a
//!   reachable 198.19.77.1, as a real partition keeps its gateway); heal:
//!   back to switch 0;
//! - cut its datastore access: each host sees the shared datastores through
//!   its own bind mounts (`hosts/host-N/ds/NAME`); a cut mounts an empty
//!   read-only tmpfs over them, so that host's reads find nothing and its
//!   writes fail (EROFS) while the other hosts see the datastore unchanged.
//!   Heal: unmount the tmpfs. (Files the host already has open, such as a
//!   VMM's disk image, stay reachable through their descriptors, unlike on
//!   a real NFS cut; the lease still stops such a VMM in time.)
//!
//! Agents and CLI calls enter only the host's network namespace (nsenter
//! --net), so they share the root mount namespace and see the cuts at once.
//! Everything the lab made (processes, namespaces, mounts, files) goes in
//! `Drop`, also when the test panics; labs left by a killed test run are
//! removed by the next one (their owner's pid is in the names).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs a command, panicking with its output on failure.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One simulated host.
pub struct LabHost {
    /// host-N
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its management address.
    pub ip: String,
    /// Its directory (config, run dir, logs, datastore mounts).
    pub dir: PathBuf,
    /// Its host.toml.
    pub config: PathBuf,
    /// Its run directory.
    pub run_dir: PathBuf,
    /// Which switch its port is on (None: cut).
    pub switch: Option<usize>,
    /// Datastore access cut.
    pub storage_cut: bool,
    /// Killed (interface down) until its agent starts again.
    pub dead: bool,
    agent: Option<Child>,
}

/// The lab.
pub struct Lab {
    /// Prefix of every namespace name.
    pub tag: String,
    /// Root directory.
    pub root: PathBuf,
    /// The hosts, host-1 first.
    pub hosts: Vec<LabHost>,
    /// Datastore names.
    pub datastores: Vec<String>,
    switches: usize,
}

const SWITCHES: usize = 3;
/// The agent port (the lab's namespaces each have their own stack).
pub const PORT: u16 = 47300;

/// Fast agent timings for the lab's tests (validated by the agent like any
/// other).
pub const FAST_TIMINGS: &str = "heartbeat_interval_ms = 200\nhost_timeout_ms = 1000\n\
    election_window_ms = 1000\nisolation_detect_ms = 2000\nping_timeout_ms = 500\n\
    ds_heartbeat_interval_ms = 300\nds_liveness_timeout_ms = 1500\n\
    restart_retry_base_ms = 1000\nshutdown_timeout_ms = 5000\n\
    lease_renew_interval_ms = 500\nlease_io_timeout_ms = 500\nlease_kill_time_ms = 500\n\
    lease_stop_time_ms = 2000\nlease_takeover_time_ms = 3000";

fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

/// Removes labs whose test process is gone (a killed run cannot clean up).
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns.strip_prefix("vha") else {
            continue;
        };
        let pid: Option<u32> = rest.split(['-', 'x']).next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid {
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            kill_ns(ns, libc::SIGKILL);
            sh_quiet(&["ip", "netns", "del", ns]);
        }
    }
}

fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_ns(ns: &str, sig: i32) {
    for pid in ns_pids(ns) {
        // SAFETY: kill(2) on processes of the lab's own namespace.
        unsafe { libc::kill(pid, sig) };
    }
}

impl Lab {
    /// Builds `n` hosts, two datastores, the cluster file and secret.
    /// `timings` is the `[timings]` table of every host.toml.
    pub fn new(name: &str, n: usize, timings: &str) -> Lab {
        reap_stale();
        let tag = format!("vha{}x{name}", std::process::id());
        let root = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("store")).unwrap();
        let datastores = vec!["ds1".to_string(), "ds2".to_string()];
        let mut lab = Lab {
            tag: tag.clone(),
            root: root.clone(),
            hosts: Vec::new(),
            datastores: datastores.clone(),
            switches: SWITCHES,
        };
        for s in 0..SWITCHES {
            let ns = format!("{tag}-sw{s}");
            sh(&["ip", "netns", "add", &ns]);
            let ex = |args: &[&str]| {
                let mut v = vec!["ip", "-n", ns.as_str()];
                v.extend_from_slice(args);
                sh(&v);
            };
            ex(&["link", "set", "lo", "up"]);
            ex(&["link", "add", "br0", "type", "bridge"]);
            ex(&["addr", "add", "198.19.77.1/24", "dev", "br0"]);
            ex(&["link", "set", "br0", "up"]);
        }
        for ds in &datastores {
            std::fs::create_dir_all(root.join("store").join(ds)).unwrap();
        }
        let mut cluster = String::new();
        for i in 1..=n {
            let name = format!("host-{i}");
            let ns = format!("{tag}-h{i}");
            let ip = format!("198.19.77.{}", 10 + i);
            let dir = root.join(&name);
            let run_dir = dir.join("run");
            std::fs::create_dir_all(&run_dir).unwrap();
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let sw = format!("{tag}-sw0");
            let port = format!("p{i}");
            sh(&[
                "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                "198.19.77.1",
            ]);
            sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            let mut ds_lines = String::new();
            for ds in &datastores {
                let mnt = dir.join("ds").join(ds);
                std::fs::create_dir_all(&mnt).unwrap();
                let src = root.join("store").join(ds);
                sh(&[
                    "mount",
                    "--bind",
                    src.to_str().unwrap(),
                    mnt.to_str().unwrap(),
                ]);
                ds_lines.push_str(&format!("{ds} = {:?}\n", mnt));
            }
            let config = dir.join("host.toml");
            std::fs::write(
                &config,
                format!(
                    "host = {name:?}\nsecret_file = {:?}\nrun_dir = {:?}\n\
                     vigil = {:?}\n[datastores]\n{ds_lines}[timings]\n{timings}\n",
                    root.join("secret"),
                    run_dir,
                    env!("CARGO_BIN_EXE_vigil"),
                ),
            )
            .unwrap();
            cluster.push_str(&format!(
                "[hosts.{name}]\naddress = {ip:?}\nport = {PORT}\ncpu_mhz = 4000\nmem_mib = 1024\n\
                 datastores = [\"ds1\", \"ds2\"]\n"
            ));
            lab.hosts.push(LabHost {
                name,
                ns,
                ip,
                dir,
                config,
                run_dir,
                switch: Some(0),
                storage_cut: false,
                dead: false,
                agent: None,
            });
        }
        let cf = root.join("cluster.toml");
        std::fs::write(&cf, cluster).unwrap();
        let ds1 = root.join("store/ds1");
        let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["cluster", "init", "--cluster"])
            .arg(&cf)
            .arg("--datastore")
            .arg(&ds1)
            .arg("--secret")
            .arg(root.join("secret"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn h(&self, i: usize) -> &LabHost {
        &self.hosts[i - 1]
    }

    /// The datastore directory as every host sees it (the real store).
    pub fn store(&self, ds: &str) -> PathBuf {
        self.root.join("store").join(ds)
    }

    /// Starts host `i`'s agent (logs in its directory).
    pub fn start_agent(&mut self, i: usize) {
        if self.hosts[i - 1].dead {
            let ns = self.h(i).ns.clone();
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "route",
                "replace",
                "default",
                "via",
                "198.19.77.1",
            ]);
            self.hosts[i - 1].dead = false;
        }
        let h = &self.hosts[i - 1];
        let log = h.dir.join("agent.log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&h.ns)))
            .arg(env!("CARGO_BIN_EXE_vigil"))
            .args(["agent", "--log-file"])
            .arg(&log)
            .arg("--config")
            .arg(&h.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start an agent");
        self.hosts[i - 1].agent = Some(child);
    }

    /// Starts every agent.
    pub fn start_all(&mut self) {
        for i in 1..=self.hosts.len() {
            self.start_agent(i);
        }
    }

    /// SIGKILLs host `i`'s agent only (its VMMs keep running).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i - 1].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs every process of host `i` (agent and VMMs) and takes its
    /// interface down: the host died (a dead host answers no ping either).
    /// [`Lab::start_agent`] boots it again.
    pub fn kill_host(&mut self, i: usize) {
        let ns = self.h(i).ns.clone();
        kill_ns(&ns, libc::SIGKILL);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "down"]);
        self.hosts[i - 1].dead = true;
        if let Some(mut c) = self.hosts[i - 1].agent.take() {
            let _ = c.wait();
        }
    }

    /// Freezes every process of host `i` (SIGSTOP).
    pub fn freeze_host(&self, i: usize) {
        kill_ns(&self.h(i).ns, libc::SIGSTOP);
    }

    /// Thaws host `i` (SIGCONT).
    pub fn thaw_host(&self, i: usize) {
        kill_ns(&self.h(i).ns, libc::SIGCONT);
    }

    fn attach(&mut self, i: usize, switch: Option<usize>) {
        let tag = self.tag.clone();
        let h = &mut self.hosts[i - 1];
        let port = format!("p{i}");
        if h.switch == switch {
            return;
        }
        if let Some(from) = h.switch {
            let sw = format!("{tag}-sw{from}");
            if let Some(to) = switch {
                let dst = format!("{tag}-sw{to}");
                sh(&["ip", "-n", &sw, "link", "set", &port, "netns", &dst]);
            } else {
                sh(&["ip", "-n", &sw, "link", "set", &port, "nomaster"]);
                sh(&["ip", "-n", &sw, "link", "set", &port, "down"]);
                h.switch = None;
                return;
            }
        } else if let Some(to) = switch {
            // A cut port sits, down, on the switch it was cut from: find it.
            for s in 0..SWITCHES {
                let sw = format!("{tag}-sw{s}");
                if sh_quiet(&["ip", "-n", &sw, "link", "show", &port]) && s != to {
                    let dst = format!("{tag}-sw{to}");
                    sh(&["ip", "-n", &sw, "link", "set", &port, "netns", &dst]);
                }
            }
        }
        let to = switch.expect("attach to a switch");
        let sw = format!("{tag}-sw{to}");
        sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        h.switch = Some(to);
    }

    /// Cuts host `i` off the management network.
    pub fn cut_network(&mut self, i: usize) {
        self.attach(i, None);
    }

    /// Puts host `i` back on switch 0.
    pub fn heal_network(&mut self, i: usize) {
        self.attach(i, Some(0));
    }

    /// Partitions the hosts: group g goes to switch g (at most 3 groups).
    pub fn partition(&mut self, groups: &[&[usize]]) {
        assert!(groups.len() <= SWITCHES);
        for (g, hosts) in groups.iter().enumerate() {
            for &i in *hosts {
                self.attach(i, Some(g));
            }
        }
    }

    /// Every host back on switch 0.
    pub fn heal_all(&mut self) {
        for i in 1..=self.hosts.len() {
            self.attach(i, Some(0));
        }
    }

    /// Cuts host `i`'s datastore access (reads find nothing, writes fail).
    pub fn cut_storage(&mut self, i: usize) {
        let h = &mut self.hosts[i - 1];
        if h.storage_cut {
            return;
        }
        for ds in &self.datastores {
            let mnt = h.dir.join("ds").join(ds);
            sh(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "ro,size=64k",
                "vha-cut",
                mnt.to_str().unwrap(),
            ]);
        }
        h.storage_cut = true;
    }

    /// Restores host `i`'s datastore access.
    pub fn heal_storage(&mut self, i: usize) {
        let h = &mut self.hosts[i - 1];
        if !h.storage_cut {
            return;
        }
        for ds in &self.datastores {
            let mnt = h.dir.join("ds").join(ds);
            sh(&["umount", mnt.to_str().unwrap()]);
        }
        h.storage_cut = false;
    }

    /// Runs `vigil ARGS --config host.toml` in host `i`'s network namespace.
    pub fn vigil(&self, i: usize, args: &[&str]) -> (bool, String, String) {
        let h = self.h(i);
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&h.ns)))
            .arg(env!("CARGO_BIN_EXE_vigil"))
            .args(args)
            .arg("--config")
            .arg(&h.config)
            .output()
            .expect("cannot run vigil");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `vigil cluster status --json` asked at host `i` (None on failure).
    pub fn status(&self, i: usize) -> Option<Value> {
        let (ok, out, _) = self.vigil(i, &["cluster", "status", "--json"]);
        if ok {
            serde_json::from_str(&out).ok()
        } else {
            None
        }
    }

    /// Polls `f` every 250 ms until it returns Some, or panics after `timeout`
    /// saying what was awaited (with the agents' last log lines).
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Lab) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The tail of every agent log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.hosts {
            let log = std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            s.push_str(&format!("--- {} ---\n", h.name));
            for l in &lines[lines.len().saturating_sub(15)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// The pid of the VMM running `vm` on host `i`, if its record says so
    /// and the process lives.
    pub fn vmm_pid(&self, i: usize, vm: &str) -> Option<i32> {
        let rec = std::fs::read(self.h(i).run_dir.join(format!("{vm}.vm.json"))).ok()?;
        let v: Value = serde_json::from_slice(&rec).ok()?;
        let pid = v["pid"].as_i64()? as i32;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
        (state != 'Z').then_some(pid)
    }

    /// Hosts where a VMM for `vm` runs right now.
    pub fn running_on(&self, vm: &str) -> Vec<usize> {
        (1..=self.hosts.len())
            .filter(|&i| self.vmm_pid(i, vm).is_some())
            .collect()
    }

    /// Registers a VM from `vm_toml` text on ds1 (written to the datastore
    /// first, as an operator would copy it there), with extra flags.
    pub fn register(&self, name: &str, vm_toml: &str, flags: &[&str]) {
        let src = self.root.join(format!("{name}.toml"));
        std::fs::write(&src, vm_toml).unwrap();
        let mut args = vec!["vm", "register", "ds1", src.to_str().unwrap()];
        args.extend_from_slice(flags);
        let (ok, out, err) = self.vigil(1, &args);
        assert!(ok, "register {name}: {out}{err}");
    }
}

impl Lab {
    /// Sets one key of the cluster file the agents read at start (what
    /// `cluster init` would have copied from cluster.toml): call it before
    /// [`Lab::start_all`].
    pub fn set_cluster_key(&self, key: &str, value: Value) {
        let f = self.store("ds1").join(".vigil/cluster.json");
        let mut c: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        c[key] = value;
        std::fs::write(&f, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    }

    /// The serial console output of `vm` on host `i` so far.
    pub fn console(&self, i: usize, vm: &str) -> String {
        std::fs::read_to_string(self.h(i).run_dir.join(format!("{vm}.console"))).unwrap_or_default()
    }

    /// The API socket of `vm`'s VMM on host `i`.
    pub fn api_socket(&self, i: usize, vm: &str) -> PathBuf {
        self.h(i).run_dir.join(format!("{vm}.sock"))
    }

    /// Host `i`'s whole agent log.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.h(i).dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_ns(&h.ns, libc::SIGCONT);
            kill_ns(&h.ns, libc::SIGKILL);
        }
        for h in &mut self.hosts {
            if let Some(mut c) = h.agent.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for h in &self.hosts {
            for ds in &self.datastores {
                let mnt = h.dir.join("ds").join(ds);
                // The cut tmpfs (if any), then the bind mount.
                while sh_quiet(&["umount", mnt.to_str().unwrap_or("")]) {}
            }
            sh_quiet(&["ip", "netns", "del", &h.ns]);
        }
        for s in 0..self.switches {
            sh_quiet(&["ip", "netns", "del", &format!("{}-sw{s}", self.tag)]);
        }
        if std::env::var_os("VHA_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
