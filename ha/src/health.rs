//! The host health record (H16, seed 003's hourly `vmksummary`): one line at
//! a fixed interval with uptime, VMs running, the agent's and each VMM's
//! memory, swap used and the top memory consumers on the host, written to
//! the agent's log and to a rotating file, so a slow leak can be found after
//! the fact.
//!
//! The agent decides *when* (it emits `HaEvent::Summary` every
//! `Timings::summary_interval`, one hour by default); this module reads
//! `/proc` and formats and stores the line. How the runtime calls it:
//!
//! ```no_run
//! use ha::health::{HostSummary, ProcSource, SummaryLog};
//! # let (host, state, vms_running, vms_protected, uptime) =
//! #     ("host-1", "master", 2, Some(3), std::time::Duration::from_secs(3600));
//! let proc = ProcSource::system();
//! let vmms = vec![("vm-a".to_string(), 4242)]; // (VM, VMM pid) it runs
//! let mut log = SummaryLog::new("/var/lib/vigil/summary.log", 1 << 20, 5);
//! // On Action::Event(HaEvent::Summary { uptime, state, vms_running, vms_protected }):
//! let s = HostSummary::collect(&proc, host, std::process::id(), &vmms, ha::health::DEFAULT_TOP)?
//!     .with_agent_view(&state.to_string(), uptime, vms_running, vms_protected);
//! tracing::info!(summary = %s.line(), "host summary");
//! log.append(&s.line())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// How many of the largest processes a record lists, unless the caller
/// chooses otherwise.
pub const DEFAULT_TOP: usize = 10;

/// Reading `/proc` or writing the summary file failed.
#[derive(Debug, Error)]
pub enum HealthError {
    /// A `/proc` file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `/proc` file did not have the expected form.
    #[error("{path}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was missing or malformed.
        what: String,
    },
    /// The summary file could not be written or rotated.
    #[error("cannot write the summary file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Memory of one process, from `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMem {
    /// The process id.
    pub pid: u32,
    /// Its name (`Name:`, at most 15 characters, spaces replaced).
    pub name: String,
    /// Resident set size, KiB (`VmRSS:`).
    pub rss_kib: u64,
    /// Swapped out, KiB (`VmSwap:`).
    pub swap_kib: u64,
}

/// Host-wide memory figures from `/proc/meminfo`, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_kib: u64,
    /// `MemAvailable`.
    pub available_kib: u64,
    /// `SwapTotal`.
    pub swap_total_kib: u64,
    /// `SwapFree`.
    pub swap_free_kib: u64,
}

impl MemInfo {
    /// Swap in use, KiB.
    pub fn swap_used_kib(&self) -> u64 {
        self.swap_total_kib.saturating_sub(self.swap_free_kib)
    }
}

/// `Key:   123 kB` lines: the value of `key`, in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Parses `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    Some(MemInfo {
        total_kib: kib_field(text, "MemTotal")?,
        available_kib: kib_field(text, "MemAvailable")?,
        swap_total_kib: kib_field(text, "SwapTotal").unwrap_or(0),
        swap_free_kib: kib_field(text, "SwapFree").unwrap_or(0),
    })
}

/// Parses `/proc/PID/status`. `None` for a process without a user address
/// space (kernel threads have no `VmRSS`).
pub fn parse_status(pid: u32, text: &str) -> Option<ProcessMem> {
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("Name:"))?
        .trim()
        .replace(char::is_whitespace, "_");
    Some(ProcessMem {
        pid,
        name,
        rss_kib: kib_field(text, "VmRSS")?,
        swap_kib: kib_field(text, "VmSwap").unwrap_or(0),
    })
}

/// Parses `/proc/uptime`: seconds since boot.
pub fn parse_uptime(text: &str) -> Option<Duration> {
    let s: f64 = text.split_whitespace().next()?.parse().ok()?;
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s))
}

/// Where `/proc` is: the system's, or a directory of fixtures in tests.
#[derive(Debug, Clone)]
pub struct ProcSource {
    root: PathBuf,
}

impl ProcSource {
    /// The system's `/proc`.
    pub fn system() -> Self {
        Self::at("/proc")
    }

    /// A `/proc`-shaped directory.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn read(&self, rel: &str) -> Result<String, HealthError> {
        let path = self.root.join(rel);
        fs::read_to_string(&path).map_err(|source| HealthError::Read { path, source })
    }

    fn parse_err(&self, rel: &str, what: &str) -> HealthError {
        HealthError::Parse {
            path: self.root.join(rel),
            what: what.to_string(),
        }
    }

    /// Host memory.
    pub fn meminfo(&self) -> Result<MemInfo, HealthError> {
        parse_meminfo(&self.read("meminfo")?)
            .ok_or_else(|| self.parse_err("meminfo", "no MemTotal or MemAvailable line"))
    }

    /// Host uptime.
    pub fn uptime(&self) -> Result<Duration, HealthError> {
        parse_uptime(&self.read("uptime")?)
            .ok_or_else(|| self.parse_err("uptime", "not a number of seconds"))
    }

    /// One process's memory; `Ok(None)` if it is gone or has no address
    /// space.
    pub fn process(&self, pid: u32) -> Result<Option<ProcessMem>, HealthError> {
        match self.read(&format!("{pid}/status")) {
            Ok(t) => Ok(parse_status(pid, &t)),
            Err(HealthError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The `n` processes with the largest resident set, largest first.
    /// Processes that vanish while being read are skipped.
    pub fn top_by_rss(&self, n: usize) -> Result<Vec<ProcessMem>, HealthError> {
        let dir = fs::read_dir(&self.root).map_err(|source| HealthError::Read {
            path: self.root.clone(),
            source,
        })?;
        let mut all: Vec<ProcessMem> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| self.process(pid).ok().flatten())
            .collect();
        all.sort_by(|a, b| b.rss_kib.cmp(&a.rss_kib).then(a.pid.cmp(&b.pid)));
        all.truncate(n);
        Ok(all)
    }
}

/// One health record.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSummary {
    /// The host.
    pub host: String,
    /// Since the host booted.
    pub host_uptime: Duration,
    /// The agent's view, when known: HA state, time since HA was enabled,
    /// VMs running here, VMs protected in the cluster (master only).
    pub agent_view: Option<(String, Duration, usize, Option<usize>)>,
    /// Host memory.
    pub mem: MemInfo,
    /// The agent process (`None` if it could not be read).
    pub agent: Option<ProcessMem>,
    /// Each VMM this agent runs: VM name and its process (`None`: gone).
    pub vmms: Vec<(String, Option<ProcessMem>)>,
    /// The top memory consumers on the host.
    pub top: Vec<ProcessMem>,
}

impl HostSummary {
    /// Reads everything from `proc`: the agent is `agent_pid`, the VMMs
    /// `(VM name, pid)`, and the `top` largest processes.
    pub fn collect(
        proc: &ProcSource,
        host: &str,
        agent_pid: u32,
        vmms: &[(String, u32)],
        top: usize,
    ) -> Result<Self, HealthError> {
        Ok(Self {
            host: host.to_string(),
            host_uptime: proc.uptime()?,
            agent_view: None,
            mem: proc.meminfo()?,
            agent: proc.process(agent_pid)?,
            vmms: vmms
                .iter()
                .map(|(vm, pid)| Ok((vm.clone(), proc.process(*pid)?)))
                .collect::<Result<_, HealthError>>()?,
            top: proc.top_by_rss(top)?,
        })
    }

    /// Adds the agent's own figures (from `HaEvent::Summary`).
    pub fn with_agent_view(
        mut self,
        state: &str,
        ha_uptime: Duration,
        vms_running: usize,
        vms_protected: Option<usize>,
    ) -> Self {
        self.agent_view = Some((state.to_string(), ha_uptime, vms_running, vms_protected));
        self
    }

    /// The record as one `key=value` line (no spaces inside values), easy
    /// to grep and to compare across hours.
    pub fn line(&self) -> String {
        let mut f = vec![
            format!("host={}", self.host),
            format!("host_uptime_s={}", self.host_uptime.as_secs()),
        ];
        if let Some((state, up, running, protected)) = &self.agent_view {
            f.push(format!("state={state}"));
            f.push(format!("ha_uptime_s={}", up.as_secs()));
            f.push(format!("vms_running={running}"));
            if let Some(p) = protected {
                f.push(format!("vms_protected={p}"));
            }
        }
        f.push(format!("mem_total_mib={}", self.mem.total_kib / 1024));
        f.push(format!(
            "mem_available_mib={}",
            self.mem.available_kib / 1024
        ));
        f.push(format!("swap_used_mib={}", self.mem.swap_used_kib() / 1024));
        match &self.agent {
            Some(a) => f.push(format!(
                "agent_rss_kib={} agent_swap_kib={}",
                a.rss_kib, a.swap_kib
            )),
            None => f.push("agent_rss_kib=?".to_string()),
        }
        f.push(format!("vmms={}", self.vmms.len()));
        for (vm, p) in &self.vmms {
            let vm = vm.replace(char::is_whitespace, "_");
            match p {
                Some(p) => f.push(format!(
                    "vmm[{vm}]=pid:{},rss_kib:{},swap_kib:{}",
                    p.pid, p.rss_kib, p.swap_kib
                )),
                None => f.push(format!("vmm[{vm}]=gone")),
            }
        }
        let top: Vec<String> = self
            .top
            .iter()
            .map(|p| format!("{}:{}:{}", p.name, p.pid, p.rss_kib))
            .collect();
        f.push(format!("top_rss_kib={}", top.join(",")));
        f.join(" ")
    }
}

/// An append-only summary file rotated by size: `FILE` grows to `max_bytes`,
/// then becomes `FILE.1` (`FILE.1` becomes `FILE.2`, ...), keeping `keep`
/// old files. Each line is prefixed with the wall-clock time (UTC seconds
/// since the epoch).
#[derive(Debug, Clone)]
pub struct SummaryLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
}

impl SummaryLog {
    /// A log at `path`.
    pub fn new(path: impl Into<PathBuf>, max_bytes: u64, keep: u32) -> Self {
        Self {
            path: path.into(),
            max_bytes,
            keep,
        }
    }

    /// The current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `i`-th old file (`FILE.i`).
    pub fn rotated(&self, i: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    /// Appends one line (rotating first if the file is full) and syncs it,
    /// so the record survives the host crashing right after.
    pub fn append(&mut self, line: &str) -> Result<(), HealthError> {
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HealthError::Write { path, source }
        };
        let size = fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size > 0 && size + line.len() as u64 + 32 > self.max_bytes {
            self.rotate().map_err(werr(&self.path))?;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(werr(&self.path))?;
        writeln!(f, "t={ts} {line}").map_err(werr(&self.path))?;
        f.sync_data().map_err(werr(&self.path))
    }

    fn rotate(&self) -> std::io::Result<()> {
        if self.keep == 0 {
            return fs::remove_file(&self.path);
        }
        let _ = fs::remove_file(self.rotated(self.keep));
        for i in (1..self.keep).rev() {
            let from = self.rotated(i);
            if from.exists() {
                fs::rename(&from, self.rotated(i + 1))?;
            }
        }
        fs::rename(&self.path, self.rotated(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24593304 kB\nMemFree:         1034088 kB\n\
        MemAvailable:   20123456 kB\nBuffers:          123 kB\nSwapTotal:       2097148 kB\n\
        SwapFree:        1048574 kB\n";

    fn status(name: &str, rss: Option<u64>, swap: u64) -> String {
        let mut s = format!("Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\n");
        if let Some(r) = rss {
            s.push_str(&format!(
                "VmPeak:\t  999999 kB\nVmRSS:\t{r:>8} kB\nVmSwap:\t{swap:>8} kB\n"
            ));
        }
        s.push_str("Threads:\t3\n");
        s
    }

    fn fixture(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("meminfo"), MEMINFO).unwrap();
        fs::write(dir.join("uptime"), "7261.53 14000.10\n").unwrap();
        for (pid, name, rss, swap) in [
            (1, "systemd", Some(12_000), 0),
            (2, "kthreadd", None, 0),
            (100, "vigil", Some(9_000), 12),
            (200, "vigil", Some(270_000), 0),
            (201, "vigil", Some(140_000), 1_024),
            (300, "Web Content", Some(500_000), 0),
        ] {
            fs::create_dir_all(dir.join(pid.to_string())).unwrap();
            fs::write(dir.join(format!("{pid}/status")), status(name, rss, swap)).unwrap();
        }
        // Not a process directory.
        fs::create_dir_all(dir.join("sys")).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vhp-health-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn parses_proc_files() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total_kib, 24_593_304);
        assert_eq!(m.available_kib, 20_123_456);
        assert_eq!(m.swap_used_kib(), 1_048_574);
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        let p = parse_status(7, &status("vigil", Some(1234), 56)).unwrap();
        assert_eq!(
            p,
            ProcessMem {
                pid: 7,
                name: "vigil".into(),
                rss_kib: 1234,
                swap_kib: 56
            }
        );
        assert_eq!(parse_status(2, &status("kthreadd", None, 0)), None);
        assert_eq!(
            parse_uptime("7261.53 14000.10\n"),
            Some(Duration::from_secs_f64(7261.53))
        );
        assert_eq!(parse_uptime("x"), None);
    }

    #[test]
    fn summary_from_fixture_proc() {
        let d = tmp("fixture");
        fixture(&d);
        let proc = ProcSource::at(&d);
        let vmms = vec![
            ("vm-a".to_string(), 200),
            ("vm-b".to_string(), 201),
            ("vm-gone".to_string(), 999),
        ];
        let s = HostSummary::collect(&proc, "host-1", 100, &vmms, 3)
            .unwrap()
            .with_agent_view("master", Duration::from_secs(3600), 2, Some(5));
        assert_eq!(
            s.line(),
            "host=host-1 host_uptime_s=7261 state=master ha_uptime_s=3600 vms_running=2 \
             vms_protected=5 mem_total_mib=24016 mem_available_mib=19651 swap_used_mib=1023 \
             agent_rss_kib=9000 agent_swap_kib=12 vmms=3 vmm[vm-a]=pid:200,rss_kib:270000,swap_kib:0 \
             vmm[vm-b]=pid:201,rss_kib:140000,swap_kib:1024 vmm[vm-gone]=gone \
             top_rss_kib=Web_Content:300:500000,vigil:200:270000,vigil:201:140000"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn broken_proc_is_a_precise_error() {
        let d = tmp("broken");
        fixture(&d);
        fs::write(d.join("meminfo"), "nonsense\n").unwrap();
        let e = HostSummary::collect(&ProcSource::at(&d), "h", 100, &[], 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: no MemTotal or MemAvailable line",
                d.join("meminfo").display()
            )
        );
        fs::remove_file(d.join("uptime")).unwrap();
        let e = HostSummary::collect(&ProcSource::at(&d), "h", 100, &[], 3).unwrap_err();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    /// Against this machine's /proc: this test process is found with a
    /// non-zero resident set, and the largest processes come sorted.
    #[test]
    fn summary_of_this_machine() {
        let proc = ProcSource::system();
        let me = std::process::id();
        let s = HostSummary::collect(&proc, "this-host", me, &[("self".into(), me)], 5).unwrap();
        let agent = s.agent.clone().expect("this process is in /proc");
        assert!(agent.rss_kib > 0, "{agent:?}");
        assert!(s.mem.total_kib > s.mem.available_kib, "{:?}", s.mem);
        assert!(s.host_uptime > Duration::ZERO);
        assert!(!s.top.is_empty() && s.top.len() <= 5);
        assert!(s.top.windows(2).all(|w| w[0].rss_kib >= w[1].rss_kib));
        assert!(s.top[0].rss_kib >= agent.rss_kib);
        let line = s.line();
        assert!(
            line.contains(&format!("vmm[self]=pid:{me},rss_kib:")),
            "{line}"
        );
    }

    #[test]
    fn summary_file_rotates_and_keeps_n() {
        let d = tmp("rotate");
        fs::create_dir_all(&d).unwrap();
        let mut log = SummaryLog::new(d.join("summary.log"), 200, 2);
        for i in 0..20 {
            log.append(&format!("record {i:02} {}", "x".repeat(40)))
                .unwrap();
        }
        let cur = fs::read_to_string(log.path()).unwrap();
        let one = fs::read_to_string(log.rotated(1)).unwrap();
        let two = fs::read_to_string(log.rotated(2)).unwrap();
        assert!(!log.rotated(3).exists());
        assert!(cur.len() <= 200 && one.len() <= 200, "{cur}\n{one}");
        assert!(cur.contains("record 19"), "{cur}");
        // The newest old records are in .1, older ones in .2.
        let last = |s: &str| s.lines().last().unwrap().to_string();
        let num = |s: &str| -> u32 { s.split("record ").nth(1).unwrap()[..2].parse().unwrap() };
        assert!(num(&last(&two)) < num(&last(&one)));
        assert!(num(&last(&one)) < num(&last(&cur)));
        assert!(cur.lines().all(|l| l.starts_with("t=")), "{cur}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn unwritable_summary_file_is_an_error() {
        let mut log = SummaryLog::new("/nonexistent-vhp/summary.log", 100, 1);
        let e = log.append("x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot write the summary file /nonexistent-vhp/summary.log"
        );
    }
}
