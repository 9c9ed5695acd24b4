//! The VM's disk lease, renewed by the VMM itself (H10).
//!
//! A VM started by the HA agent runs with `vigil run --lease SPEC.toml`. The
//! agent has already acquired the lease (a record on the VM's datastore naming
//! this host and a new generation); the VMM then keeps it, as the host running
//! a VM keeps its disk's `.lck` file:
//!
//! - every `renew_interval` it reads the record and, if it still names this
//!   owner and generation, writes it back with the counter bumped (a temporary
//!   file renamed over the record, so readers never see half a record);
//! - a record naming another owner or generation means a peer took the lease
//!   over: this copy is stale and the process ends at once, without writing;
//! - a watchdog thread ends the process when the last *successful* renewal
//!   was issued `stop_time` ago (reads and writes that take longer than
//!   `io_timeout` count as failed), so the guest is gone before any peer's
//!   takeover time can pass. The arithmetic is in `ha::lease` and
//!   docs/ARCHITECTURE.md.
//!
//! Guest disk writes also pass a fence ([`writes_allowed`]): once the
//! stop time has passed on this host's clock, a write fails with an I/O
//! error even if, after a freeze, the vCPUs and the event loop happen to run
//! before the deadline thread.
//!
//! Ending the process is the power-off: KVM tears the VM down with the
//! process, no vCPU runs and no disk request is issued after `_exit`. The exit
//! status is [`crate::control::EXIT_LEASE`].
//!
//! When the guest stops on its own (power-off, crash, VMM error) the lease is
//! released (owner cleared) if it is still ours, so a peer need not wait.
//!
//! All times are `CLOCK_MONOTONIC` milliseconds, the clock the agent on the
//! same host uses too: the status file tells it when the last successful
//! renewal was issued, on a clock both processes share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::EXIT_LEASE;

/// The write fence: guest disk writes are refused (I/O error to the guest)
/// from this `CLOCK_MONOTONIC` ms on. `u64::MAX` without a lease; the
/// renewal thread moves it to `last successful renewal + stop_time`, and to 0
/// when the lease is lost. It closes the gap the deadline thread leaves when
/// the whole process was frozen (SIGSTOP, a hung host) past its stop time
/// and resumes: whichever thread runs first, no write passes the fence.
static WRITE_FENCE_MS: AtomicU64 = AtomicU64::new(u64::MAX);

/// Whether a guest disk write may go to the disk now (see [`WRITE_FENCE_MS`]).
pub fn writes_allowed() -> bool {
    let fence = WRITE_FENCE_MS.load(Ordering::SeqCst);
    fence == u64::MAX || mono_ms() < fence
}

/// What `--lease FILE` contains (TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSpec {
    /// The lease record on the VM's datastore.
    pub file: PathBuf,
    /// This host's id, as written in the record.
    pub owner: String,
    /// The generation the agent acquired.
    pub generation: u64,
    /// `CLOCK_MONOTONIC` ms at which the acquiring write was issued: the
    /// first deadline counts from there.
    pub acquired_mono_ms: u64,
    /// Renewal period.
    pub renew_interval_ms: u64,
    /// A read or write not done by then has failed.
    pub io_timeout_ms: u64,
    /// The process ends when the last successful renewal was issued this long ago.
    pub stop_time_ms: u64,
    /// Where to publish the renewal status for the local agent (optional).
    #[serde(default)]
    pub status: Option<PathBuf>,
}

/// The record on the datastore (the same JSON as `ha::lease::LeaseRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder; `None` once released.
    pub owner: Option<String>,
    /// Bumped on every acquisition.
    pub generation: u64,
    /// Bumped on every renewal.
    pub counter: u64,
}

/// What the status file says (JSON), rewritten after every renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// "held", "lost" or "expired".
    pub state: String,
    /// Our generation.
    pub generation: u64,
    /// The counter last written.
    pub counter: u64,
    /// `CLOCK_MONOTONIC` ms at which the last successful renewal was issued.
    pub last_renewal_issued_mono_ms: u64,
}

/// Lease problems that keep the VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The spec file cannot be read.
    #[error("cannot read lease spec {path}: {source}")]
    ReadSpec {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The spec file does not parse.
    #[error("invalid lease spec {path}: {source}")]
    ParseSpec {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: toml::de::Error,
    },
    /// The timings would stop a healthy guest.
    #[error("lease timings would stop healthy guests: renew interval {renew_ms} ms + I/O timeout {io_ms} ms must be below stop time {stop_ms} ms")]
    Timings {
        /// renew_interval_ms.
        renew_ms: u64,
        /// io_timeout_ms.
        io_ms: u64,
        /// stop_time_ms.
        stop_ms: u64,
    },
    /// The record cannot be read.
    #[error("cannot read lease record {path}: {reason}")]
    Read {
        /// The record.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The record names someone else.
    #[error("lease {path} is not held by {owner} generation {generation} (it names {found:?} generation {found_generation}): refusing to run a second copy of the VM")]
    NotHeld {
        /// The record.
        path: PathBuf,
        /// Us.
        owner: String,
        /// Our generation.
        generation: u64,
        /// Who the record names.
        found: Option<String>,
        /// Its generation.
        found_generation: u64,
    },
    /// The already-expired acquisition.
    #[error("lease {0} was acquired too long ago (stop time already passed)")]
    Expired(PathBuf),
    /// The renewal thread cannot start.
    #[error("cannot start the lease thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// `CLOCK_MONOTONIC` in milliseconds.
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

impl LeaseSpec {
    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<Self, LeaseError> {
        let text = std::fs::read_to_string(path).map_err(|source| LeaseError::ReadSpec {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: LeaseSpec = toml::from_str(&text).map_err(|source| LeaseError::ParseSpec {
            path: path.to_path_buf(),
            source,
        })?;
        if spec.renew_interval_ms + spec.io_timeout_ms >= spec.stop_time_ms {
            return Err(LeaseError::Timings {
                renew_ms: spec.renew_interval_ms,
                io_ms: spec.io_timeout_ms,
                stop_ms: spec.stop_time_ms,
            });
        }
        Ok(spec)
    }

    fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }

    fn is_ours(&self, rec: &LeaseRecord) -> bool {
        rec.owner.as_deref() == Some(self.owner.as_str()) && rec.generation == self.generation
    }
}

/// Reads a record (`Ok(None)`: no record yet).
pub fn read_record(path: &Path) -> Result<Option<LeaseRecord>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("corrupt lease record: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Replaces a record atomically: a temporary file beside it, renamed over it.
pub fn write_record(path: &Path, rec: &LeaseRecord) -> Result<(), String> {
    write_atomic(path, &serde_json::to_vec(rec).map_err(|e| e.to_string())?)
}

/// Writes `bytes` to a unique temporary file beside `path`, fsyncs it and
/// renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
    f.write_all(bytes).map_err(|e| e.to_string())?;
    f.sync_data().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.to_string()
    })
}

/// Runs `f` on its own thread and waits at most `timeout`: a datastore that
/// hangs must not hold up the deadline checks. A timed-out call is abandoned
/// (its thread is left to finish or hang on its own).
fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("lease-io".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| e.to_string())?;
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// The running lease: renewal and deadline threads. Dropping it stops them
/// and releases the lease if it is still ours.
pub struct LeaseGuard {
    spec: LeaseSpec,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Checks the record names us, then starts renewing.
pub fn start(spec: LeaseSpec) -> Result<LeaseGuard, LeaseError> {
    let path = spec.file.clone();
    let read = {
        let p = path.clone();
        with_timeout(spec.io_timeout(), move || read_record(&p))
    };
    let rec = read.map_err(|reason| LeaseError::Read {
        path: path.clone(),
        reason,
    })?;
    match rec {
        Some(r) if spec.is_ours(&r) => {}
        other => {
            let (found, found_generation) = other.map_or((None, 0), |r| (r.owner, r.generation));
            return Err(LeaseError::NotHeld {
                path,
                owner: spec.owner.clone(),
                generation: spec.generation,
                found,
                found_generation,
            });
        }
    }
    if mono_ms().saturating_sub(spec.acquired_mono_ms) >= spec.stop_time_ms {
        return Err(LeaseError::Expired(path));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(spec.acquired_mono_ms));
    WRITE_FENCE_MS.store(spec.acquired_mono_ms + spec.stop_time_ms, Ordering::SeqCst);
    let renewer = {
        let (spec, stop, last) = (spec.clone(), stop.clone(), last.clone());
        std::thread::Builder::new()
            .name("lease-renew".into())
            .spawn(move || renew_loop(&spec, &stop, &last))
            .map_err(LeaseError::Thread)?
    };
    let deadline = {
        let (spec, stop, last) = (spec.clone(), stop.clone(), last.clone());
        std::thread::Builder::new()
            .name("lease-deadline".into())
            .spawn(move || deadline_loop(&spec, &stop, &last))
            .map_err(LeaseError::Thread)?
    };
    tracing::info!(lease = %spec.file.display(), generation = spec.generation, "lease held; renewing");
    Ok(LeaseGuard {
        spec,
        stop,
        threads: vec![renewer, deadline],
    })
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // The guest has stopped; no lease, no fence.
        WRITE_FENCE_MS.store(u64::MAX, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let spec = self.spec.clone();
        let res = with_timeout(spec.io_timeout(), move || match read_record(&spec.file)? {
            Some(r) if spec.is_ours(&r) => {
                write_record(&spec.file, &LeaseRecord { owner: None, ..r })
            }
            _ => Ok(()),
        });
        match res {
            Ok(()) => tracing::info!(lease = %self.spec.file.display(), "lease released"),
            Err(e) => {
                tracing::warn!(lease = %self.spec.file.display(), error = %e, "cannot release the lease")
            }
        }
    }
}

/// Ends the process now: the guest is gone with it.
fn die(spec: &LeaseSpec, state: &str, last: u64, why: &str) -> ! {
    WRITE_FENCE_MS.store(0, Ordering::SeqCst);
    tracing::error!(lease = %spec.file.display(), state, "{why}: stopping the guest");
    if let Some(p) = &spec.status {
        let st = LeaseStatus {
            state: state.into(),
            generation: spec.generation,
            counter: 0,
            last_renewal_issued_mono_ms: last,
        };
        if let Ok(bytes) = serde_json::to_vec(&st) {
            let _ = write_atomic(p, &bytes);
        }
    }
    eprintln!("vigil: lease {}: {why}; guest stopped", spec.file.display());
    crate::console::restore_terminal();
    // SAFETY: _exit ends the process at once; nothing after it runs, which
    // is the point (no further guest execution or disk write).
    unsafe { libc::_exit(EXIT_LEASE) }
}

fn deadline_loop(spec: &LeaseSpec, stop: &AtomicBool, last: &AtomicU64) {
    while !stop.load(Ordering::SeqCst) {
        let l = last.load(Ordering::SeqCst);
        if mono_ms().saturating_sub(l) >= spec.stop_time_ms {
            die(
                spec,
                "expired",
                l,
                &format!("not renewed for {} ms", spec.stop_time_ms),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn renew_loop(spec: &LeaseSpec, stop: &AtomicBool, last: &AtomicU64) {
    let mut next = spec.acquired_mono_ms + spec.renew_interval_ms;
    while !stop.load(Ordering::SeqCst) {
        if mono_ms() < next {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let issued = mono_ms();
        next = issued + spec.renew_interval_ms;
        match renew_once(spec) {
            Ok(Renewal::Renewed(counter)) => {
                last.fetch_max(issued, Ordering::SeqCst);
                WRITE_FENCE_MS.fetch_max(issued + spec.stop_time_ms, Ordering::SeqCst);
                if let Some(p) = &spec.status {
                    let st = LeaseStatus {
                        state: "held".into(),
                        generation: spec.generation,
                        counter,
                        last_renewal_issued_mono_ms: issued,
                    };
                    if let Ok(bytes) = serde_json::to_vec(&st) {
                        if let Err(e) = write_atomic(p, &bytes) {
                            tracing::warn!(status = %p.display(), error = %e, "cannot write lease status");
                        }
                    }
                }
            }
            Ok(Renewal::Lost(rec)) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let why = match rec {
                    Some(r) => format!(
                        "lease taken by {} generation {}",
                        r.owner.as_deref().unwrap_or("nobody (released)"),
                        r.generation
                    ),
                    None => "lease record gone".to_string(),
                };
                die(spec, "lost", last.load(Ordering::SeqCst), &why);
            }
            Err(e) => {
                tracing::warn!(lease = %spec.file.display(), error = %e, "lease renewal failed");
            }
        }
    }
}

enum Renewal {
    Renewed(u64),
    Lost(Option<LeaseRecord>),
}

fn renew_once(spec: &LeaseSpec) -> Result<Renewal, String> {
    let p = spec.file.clone();
    let rec = with_timeout(spec.io_timeout(), move || read_record(&p))?;
    let rec = match rec {
        Some(r) if spec.is_ours(&r) => r,
        // No record and no directory: the datastore is out of reach, which
        // is a failed renewal (stop at the stop time), not a lost lease.
        None if !spec.file.parent().is_some_and(Path::exists) => {
            return Err(format!("{} is unreachable", spec.file.display()))
        }
        other => return Ok(Renewal::Lost(other)),
    };
    let new = LeaseRecord {
        counter: rec.counter + 1,
        ..rec
    };
    let counter = new.counter;
    let p = spec.file.clone();
    with_timeout(spec.io_timeout(), move || write_record(&p, &new))?;
    Ok(Renewal::Renewed(counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> LeaseSpec {
        LeaseSpec {
            file: dir.join("lease"),
            owner: "host-a".into(),
            generation: 2,
            acquired_mono_ms: mono_ms(),
            renew_interval_ms: 100,
            io_timeout_ms: 200,
            stop_time_ms: 1000,
            status: Some(dir.join("status")),
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vigil-lease-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn renews_and_releases() {
        let d = tmpdir("renew");
        let s = spec(&d);
        let rec = LeaseRecord {
            owner: Some("host-a".into()),
            generation: 2,
            counter: 0,
        };
        write_record(&s.file, &rec).unwrap();
        let g = start(s.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(450));
        let now = read_record(&s.file).unwrap().unwrap();
        assert!(now.counter >= 2, "{now:?}");
        let st: LeaseStatus =
            serde_json::from_slice(&std::fs::read(d.join("status")).unwrap()).unwrap();
        assert_eq!(st.state, "held");
        assert!(mono_ms() - st.last_renewal_issued_mono_ms < 300);
        drop(g);
        let after = read_record(&s.file).unwrap().unwrap();
        assert_eq!(after.owner, None);
        assert_eq!(after.generation, 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_a_lease_held_by_another() {
        let d = tmpdir("other");
        let s = spec(&d);
        let rec = LeaseRecord {
            owner: Some("host-b".into()),
            generation: 3,
            counter: 9,
        };
        write_record(&s.file, &rec).unwrap();
        let e = start(s.clone()).err().unwrap().to_string();
        assert!(e.contains("host-b") && e.contains("second copy"), "{e}");
        // Refusing writes nothing.
        assert_eq!(read_record(&s.file).unwrap().unwrap(), rec);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn release_leaves_a_taken_lease_alone() {
        let d = tmpdir("taken");
        let s = LeaseSpec {
            renew_interval_ms: 10_000,
            stop_time_ms: 20_000,
            ..spec(&d)
        };
        let rec = LeaseRecord {
            owner: Some("host-a".into()),
            generation: 2,
            counter: 0,
        };
        write_record(&s.file, &rec).unwrap();
        let g = start(s.clone()).unwrap();
        let theirs = LeaseRecord {
            owner: Some("host-b".into()),
            generation: 3,
            counter: 0,
        };
        write_record(&s.file, &theirs).unwrap();
        drop(g);
        assert_eq!(read_record(&s.file).unwrap().unwrap(), theirs);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn spec_timings_checked() {
        let d = tmpdir("spec");
        let p = d.join("spec.toml");
        std::fs::write(
            &p,
            "file = \"/x\"\nowner = \"a\"\ngeneration = 1\nacquired_mono_ms = 0\n\
             renew_interval_ms = 2000\nio_timeout_ms = 3000\nstop_time_ms = 4000\n",
        )
        .unwrap();
        let e = LeaseSpec::load(&p).unwrap_err().to_string();
        assert!(e.contains("3000 ms must be below stop time 4000 ms"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
