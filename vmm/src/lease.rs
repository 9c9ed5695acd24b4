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
//!   a renewal is only ever *issued* before the stop deadline below;
//! - a record naming another owner or generation means a peer took the lease
//!   over: this copy is stale and the process ends at once, without writing
//!   (exit status [`crate::control::EXIT_LEASE`]);
//! - when the last *successful* renewal was issued `stop_time` ago (reads and
//!   writes that take longer than `io_timeout` count as failed), the guest
//!   must stop touching its disks before any peer's takeover time can pass.
//!   What "stop" means is the spec's `on_loss`:
//!   - `power-off`: the process ends (`_exit`), the guest with it;
//!   - `pause` (what the HA agent asks for by default): the vCPUs are parked
//!     (the API pause mechanism), the write fence stays closed, and the VMM
//!     stays up, *lease-suspended* (`GET /vm` says `"state":
//!     "lease-suspended"`). It then re-acquires the lease exactly as a peer
//!     would: it reads the record every `renew_interval`, and once it has
//!     seen it unchanged, still naming this owner and generation G, for
//!     `takeover_time` on its own clock, it claims generation G+1 with an
//!     exclusive claim file and writes the record. If it wins, the fence
//!     reopens and the vCPUs resume (the guest saw a pause, nothing else).
//!     If the record names anybody else, or the claim for G+1 is someone
//!     else's, a peer took over: the process ends at once without a write
//!     (exit status 5), as above. A renewal issued before the deadline that
//!     still succeeds (a slow write) resumes the guest without a new
//!     generation: the deadline moves to that renewal's issue time plus
//!     `stop_time`, as it would have without the pause.
//!
//! The arithmetic is in `ha::lease` and docs/ARCHITECTURE.md ("No split
//! brain"): a paused owner issues no guest write and no renewal after its
//! deadline, so it is, for the safety argument, an owner that stopped; its
//! re-acquisition is one more contender of the same protocol.
//!
//! Guest disk writes also pass a fence ([`writes_allowed`]): once the
//! stop time has passed on this host's clock, a write fails with an I/O
//! error even if, after a freeze, the vCPUs and the event loop happen to run
//! before the deadline thread.
//!
//! When the guest stops on its own (power-off, crash, VMM error) the lease is
//! released (owner cleared) if the record still names this owner and
//! generation, so a peer need not wait.
//!
//! A live migration moves the lease with the VM (handoff): at switchover
//! the source stops renewing ([`handoff_stop`]) and sends generation G; the
//! target, started with `handoff = true`, claims G+1 through the same
//! exclusive claim file before its vCPUs run ([`take_over`]). After the
//! ack the source never writes the record again ([`handoff_done`]); after
//! a failure once the lease was sent it claims the same G+1
//! ([`handoff_race`]): one claim file, one winner, so at most one copy
//! runs the guest. An incoming VMM with `handoff = false` holds a lease the
//! agent acquired for it and renews it from the moment it listens.
//!
//! All times are `CLOCK_MONOTONIC` milliseconds, the clock the agent on the
//! same host uses too: the status file tells it when the last successful
//! renewal was issued, on a clock both processes share.
//!
//! The decisions live in [`Keeper`], which is driven with a clock value and a
//! [`LeaseIo`] (the real one reads and writes the datastore with timeouts;
//! the unit tests use a fake), so the state machine is tested without time
//! passing or a datastore.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
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
    /// What happens at the stop deadline: `power-off` (the default for a
    /// spec without this field) or `pause` (lease-suspended, then
    /// re-acquire; the HA agent's default).
    #[serde(default)]
    pub on_loss: LeaseLoss,
    /// The peers' takeover time: a lease-suspended VMM claims the next
    /// generation only after seeing the record unchanged this long. Needed
    /// (above `stop_time_ms`) with `on_loss = "pause"`.
    #[serde(default)]
    pub takeover_time_ms: u64,
    /// A live migration's target (`vigil run --incoming ... --lease`): hold
    /// no lease while memory arrives, then take over the lease the source
    /// hands over at switchover by claiming its generation + 1 (see
    /// [`take_over`]). `generation` and `acquired_mono_ms` are ignored;
    /// `file` must name the record the source holds.
    #[serde(default)]
    pub handoff: bool,
}

/// What a VMM does when it cannot renew its lease in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseLoss {
    /// End the process: the guest is gone (exit status 5).
    #[default]
    PowerOff,
    /// Park the vCPUs, keep the write fence closed, and re-acquire the
    /// lease as a peer would; power off only if a peer took it.
    Pause,
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
    /// "held", "suspended" (pause at the deadline, re-acquiring), "lost",
    /// "expired", "handoff" (a live migration's switchover: renewals
    /// stopped, the deadline stops nothing; then "held" again, possibly at
    /// the next generation, or "handed-over") or "handed-over" (the
    /// migration target holds the lease; this VMM is about to exit as
    /// migrated, without writing the record).
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
    /// `on_loss = "pause"` without a usable takeover time.
    #[error("lease spec: on_loss = \"pause\" needs takeover_time_ms above stop_time_ms ({stop_ms} ms), got {takeover_ms} ms")]
    NoTakeover {
        /// stop_time_ms.
        stop_ms: u64,
        /// takeover_time_ms.
        takeover_ms: u64,
    },
    /// The already-expired acquisition.
    #[error("lease {0} was acquired too long ago (stop time already passed)")]
    Expired(PathBuf),
    /// The renewal thread cannot start.
    #[error("cannot start the lease thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A handoff spec outside a live migration's target.
    #[error(
        "lease spec {0}: handoff = true only applies with --incoming (a live migration's target)"
    )]
    HandoffOnly(PathBuf),
    /// The target of a migration could not claim the handed-over lease.
    #[error("cannot take over lease {path} at generation {generation}: {reason}; the guest was not started here")]
    Takeover {
        /// The record.
        path: PathBuf,
        /// The generation claimed (the source's + 1).
        generation: u64,
        /// Why.
        reason: String,
    },
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
        if spec.on_loss == LeaseLoss::Pause && spec.takeover_time_ms <= spec.stop_time_ms {
            return Err(LeaseError::NoTakeover {
                stop_ms: spec.stop_time_ms,
                takeover_ms: spec.takeover_time_ms,
            });
        }
        Ok(spec)
    }

    fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }

    fn is_ours(&self, rec: &LeaseRecord) -> bool {
        self.is_ours_at(rec, self.generation)
    }

    fn is_ours_at(&self, rec: &LeaseRecord, generation: u64) -> bool {
        rec.owner.as_deref() == Some(self.owner.as_str()) && rec.generation == generation
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

/// Whether the lease holds the guest paused (lease-suspended). Set and
/// cleared only by the [`Keeper`] (under its lock).
static SUSPENDED: AtomicBool = AtomicBool::new(false);

/// Whether the VM is lease-suspended: its vCPUs stay parked and a resume
/// from anybody but the lease is refused.
pub fn is_suspended() -> bool {
    SUSPENDED.load(Ordering::SeqCst)
}

/// What the lease does to the running VM (implemented by the machine).
pub trait SuspendHook: Send + Sync {
    /// Parks the vCPUs and quiesces the devices; returns whether the VM was
    /// running (a VM the user had paused stays paused after the lease
    /// resumes it).
    fn suspend(&self) -> bool;
    /// Lets the VM run again.
    fn resume(&self);
}

struct HookSlot {
    hook: Option<Arc<dyn SuspendHook>>,
    /// The hook's VM was paused by the lease (and ran before).
    paused_by_lease: bool,
}

static HOOK: Mutex<HookSlot> = Mutex::new(HookSlot {
    hook: None,
    paused_by_lease: false,
});

fn hook_slot() -> MutexGuard<'static, HookSlot> {
    HOOK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs (or, with `None`, removes) the running VM's hook. A VM built
/// while the lease is suspended (a reset or reboot) is paused at once.
pub fn set_hook(hook: Option<Arc<dyn SuspendHook>>) {
    {
        let mut slot = hook_slot();
        slot.hook = hook;
        slot.paused_by_lease = false;
    }
    sync_hook();
}

/// Brings the VM in line with [`is_suspended`]: pauses it if the lease is
/// suspended, resumes it if the lease paused it and is held again. Called
/// after every change of [`SUSPENDED`]; serialised by the slot's lock, so a
/// slow pause and a resume cannot overtake each other.
fn sync_hook() {
    let mut slot = hook_slot();
    let Some(hook) = slot.hook.clone() else {
        return;
    };
    if is_suspended() {
        if !slot.paused_by_lease && hook.suspend() {
            slot.paused_by_lease = true;
        }
    } else if slot.paused_by_lease {
        slot.paused_by_lease = false;
        hook.resume();
    }
}

/// The lease as `GET /vm` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// "held" or "suspended".
    pub state: String,
    /// The record's file.
    pub file: PathBuf,
    /// The generation held (or being re-acquired).
    pub generation: u64,
    /// What happens at the stop deadline.
    pub on_loss: LeaseLoss,
    /// How long the guest has been lease-suspended, when it is.
    pub suspended_ms: Option<u64>,
    /// Times the lease was lost and got back (with or without a new
    /// generation) since the VMM started.
    pub resumptions: u64,
}

static INFO: Mutex<Option<(LeaseInfo, Option<u64>)>> = Mutex::new(None);

/// The lease's state, if this VMM holds one.
pub fn info() -> Option<LeaseInfo> {
    let g = INFO.lock().unwrap_or_else(|p| p.into_inner());
    g.as_ref().map(|(i, since)| LeaseInfo {
        suspended_ms: since.map(|s| mono_ms().saturating_sub(s)),
        ..i.clone()
    })
}

fn publish_info(info: Option<(LeaseInfo, Option<u64>)>) {
    *INFO.lock().unwrap_or_else(|p| p.into_inner()) = info;
}

/// The datastore operations of the lease, each bounded by the I/O timeout
/// in the real implementation ([`FileIo`]).
pub trait LeaseIo {
    /// Reads the record. `Ok(None)`: no record in a reachable directory.
    /// An unreachable datastore is an error.
    fn read(&mut self) -> Result<Option<LeaseRecord>, String>;
    /// Replaces the record, unless `CLOCK_MONOTONIC` has reached
    /// `not_after` ms by the time the write is about to be issued (a renewal
    /// must not be issued after the deadline, even by a thread that was
    /// frozen between its read and its write).
    fn write(&mut self, rec: &LeaseRecord, not_after: u64) -> Result<(), String>;
    /// Creates the exclusive claim for `generation` (the same claim files
    /// the agents use). `Ok(true)`: this VMM holds it.
    fn claim(&mut self, generation: u64) -> Result<bool, String>;
}

/// The claim file of `generation` beside the record (`lease` ->
/// `lease.claim.N`, as the agents name it).
pub fn claim_path(record: &Path, generation: u64) -> PathBuf {
    let name = record
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    record.with_file_name(format!("{name}.claim.{generation}"))
}

/// Claims `generation` atomically with `token` as its content: the token
/// goes into a temporary file that is then hard-linked to the claim's name
/// (a link fails if the name exists). Claiming again with the same token
/// (after an answer lost to a timeout) finds the claim ours.
pub fn claim_file(record: &Path, generation: u64, token: &str) -> Result<bool, String> {
    let claim = claim_path(record, generation);
    let tmp = record.with_file_name(format!(".claim.{generation}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, token).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, &claim);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let held =
                std::fs::read_to_string(&claim).map_err(|e| format!("{}: {e}", claim.display()))?;
            Ok(held == token)
        }
        Err(e) => Err(format!("{}: {e}", claim.display())),
    }
}

/// The real datastore operations, each abandoned after the I/O timeout.
pub struct FileIo {
    file: PathBuf,
    timeout: Duration,
    token: String,
}

impl FileIo {
    /// Operations on `spec`'s record.
    pub fn new(spec: &LeaseSpec) -> Self {
        Self {
            file: spec.file.clone(),
            timeout: spec.io_timeout(),
            token: format!("{} vmm {}", spec.owner, std::process::id()),
        }
    }
}

impl LeaseIo for FileIo {
    fn read(&mut self) -> Result<Option<LeaseRecord>, String> {
        let p = self.file.clone();
        with_timeout(self.timeout, move || {
            let rec = read_record(&p)?;
            // No record and no directory: the datastore is out of reach,
            // which is a failed read, not a lost lease.
            if rec.is_none() && !p.parent().is_some_and(Path::exists) {
                return Err(format!("{} is unreachable", p.display()));
            }
            Ok(rec)
        })
    }

    fn write(&mut self, rec: &LeaseRecord, not_after: u64) -> Result<(), String> {
        let (p, rec) = (self.file.clone(), rec.clone());
        with_timeout(self.timeout, move || {
            if mono_ms() >= not_after {
                return Err("the lease deadline passed before the write was issued".into());
            }
            write_record(&p, &rec)
        })
    }

    fn claim(&mut self, generation: u64) -> Result<bool, String> {
        let (p, token) = (self.file.clone(), self.token.clone());
        with_timeout(self.timeout, move || claim_file(&p, generation, &token))
    }
}

/// What the driver of a [`Keeper`] must do after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Publish this status for the agent.
    Status(LeaseStatus),
    /// The deadline passed: park the guest (the fence is already closed).
    Suspend,
    /// The lease is held again: let the guest run.
    Resume,
    /// End the process: `state` ("lost" or "expired") and why.
    PowerOff {
        /// Status state.
        state: String,
        /// For the log and stderr.
        why: String,
    },
}

/// The datastore operation a step performs (planned under the keeper's
/// lock, performed without it, applied under it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read the record and, if ours, write it back renewed. Issued at `issued`.
    Renew {
        /// Issue time.
        issued: u64,
        /// The deadline when it was planned: no write at or after it.
        deadline: u64,
    },
    /// Read the record (lease-suspended, watching it).
    Observe,
    /// Claim `generation` and write the record naming us with it.
    Claim {
        /// The new generation.
        generation: u64,
        /// Issue time of the claim.
        issued: u64,
    },
}

/// What an [`Op`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// Renewed: the counter written.
    Renewed(u64),
    /// The record as read (not ours, or observed).
    Read(Option<LeaseRecord>),
    /// The claim is ours and the record was written (`Ok`) or not (`Err`).
    Claimed(Result<(), String>),
    /// Someone else holds the claim.
    ClaimTaken,
    /// The datastore did not answer in time, or failed.
    Failed(String),
}

/// Performs `op` (no lock held).
pub fn perform(op: Op, spec: &LeaseSpec, generation: u64, io: &mut dyn LeaseIo) -> OpResult {
    match op {
        Op::Renew { deadline, .. } => match io.read() {
            Ok(Some(r)) if spec.is_ours_at(&r, generation) => {
                let new = LeaseRecord {
                    counter: r.counter + 1,
                    ..r
                };
                match io.write(&new, deadline) {
                    Ok(()) => OpResult::Renewed(new.counter),
                    Err(e) => OpResult::Failed(e),
                }
            }
            Ok(other) => OpResult::Read(other),
            Err(e) => OpResult::Failed(e),
        },
        Op::Observe => match io.read() {
            Ok(r) => OpResult::Read(r),
            Err(e) => OpResult::Failed(e),
        },
        Op::Claim { generation, .. } => match io.claim(generation) {
            // Nobody else can hold this generation: no deadline.
            Ok(true) => OpResult::Claimed(io.write(
                &LeaseRecord {
                    owner: Some(spec.owner.clone()),
                    generation,
                    counter: 0,
                },
                u64::MAX,
            )),
            Ok(false) => OpResult::ClaimTaken,
            Err(e) => OpResult::Failed(e),
        },
    }
}

/// A lease-suspended VMM watching its record before re-acquiring.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Suspension {
    /// When the guest was paused.
    since: u64,
    /// The record last read and since when it has been seen unchanged.
    seen: Option<(LeaseRecord, u64)>,
    /// A claim for this generation is ours but the record write may not
    /// have landed: write it again (nobody else can hold that generation).
    claimed: Option<u64>,
}

/// The lease state machine of one VMM; see the module documentation.
#[derive(Debug, Clone)]
pub struct Keeper {
    spec: LeaseSpec,
    generation: u64,
    /// Issue time of the last successful renewal or acquisition.
    last: u64,
    /// Next renewal or observation.
    next: u64,
    counter: u64,
    suspended: Option<Suspension>,
    resumptions: u64,
    /// Where a live migration's lease handoff stands.
    handoff: Handoff,
    /// A planned operation has not been applied yet.
    in_flight: bool,
    /// The deadline is at most this (a lease sent to a migration target
    /// whose fate is unknown: generation G is not ours to renew any more).
    cut: u64,
}

/// A live migration's lease handoff, as the source's keeper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// No handoff: renew as usual.
    None,
    /// The guest is paused for the switchover: no renewal is issued and the
    /// deadline stops nothing (the guest cannot write; the fence still
    /// closes at the deadline).
    Stopped,
    /// The lease went to the target with the final state: generation G is
    /// no longer ours to renew; only the claim of G+1 decides.
    Sent,
    /// The target holds the lease: never renew, release or write it again.
    Gone,
}

/// How the source's race for generation G+1 after a failed switchover
/// ended (see [`Keeper::apply_race`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Race {
    /// The claim is ours and the record names us at G+1: the guest may run
    /// here again.
    Won,
    /// Someone else (the target) holds G+1: the guest runs there; this copy
    /// must never run it or write anything again.
    Lost(String),
    /// The claim could not be decided (datastore I/O): the guest stays
    /// paused, lease-suspended, and the keeper re-acquires as a peer would.
    Unknown(String),
}

impl Keeper {
    /// The keeper right after the agent's acquisition.
    pub fn new(spec: LeaseSpec) -> Self {
        Self {
            generation: spec.generation,
            last: spec.acquired_mono_ms,
            next: spec.acquired_mono_ms + spec.renew_interval_ms,
            counter: 0,
            suspended: None,
            resumptions: 0,
            handoff: Handoff::None,
            in_flight: false,
            cut: u64::MAX,
            spec,
        }
    }

    /// Where a lease handoff stands.
    pub fn handoff(&self) -> Handoff {
        self.handoff
    }

    /// Whether a planned operation is still being performed.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Switchover: issue no renewal from now on (one in flight may still
    /// land; see [`in_flight`](Self::in_flight)). The deadline stops
    /// nothing while handing off: the guest is paused and drained.
    pub fn stop_renewals(&mut self) {
        if self.handoff == Handoff::None {
            self.handoff = Handoff::Stopped;
        }
    }

    /// Once nothing is in flight: the generation to hand over, if the lease
    /// is still valid at `now`.
    pub fn handoff_ready(&self, now: u64) -> Result<u64, String> {
        if self.handoff != Handoff::Stopped {
            return Err(format!("lease handoff in state {:?}", self.handoff));
        }
        if self.suspended.is_some() {
            return Err("the VM is lease-suspended".into());
        }
        if now >= self.deadline() {
            return Err(format!(
                "the lease was not renewed for {} ms (stop time passed)",
                self.spec.stop_time_ms
            ));
        }
        Ok(self.generation)
    }

    /// The lease went out with the final state.
    pub fn mark_sent(&mut self) {
        if self.handoff == Handoff::Stopped {
            self.handoff = Handoff::Sent;
        }
    }

    /// The target acknowledged (or won the race): it holds the lease.
    pub fn mark_gone(&mut self) {
        self.handoff = Handoff::Gone;
    }

    /// A migration failed before the lease was sent: renew again. Returns
    /// the deadline step if the stop time passed meanwhile (the usual
    /// lease-suspended path, or power-off).
    pub fn resume_renewals(&mut self, now: u64) -> Option<Step> {
        if self.handoff != Handoff::Stopped {
            return None;
        }
        self.handoff = Handoff::None;
        self.next = self.next.min(now);
        self.check_deadline(now)
    }

    /// The claim of G+1 a source makes after a failure once the lease was
    /// sent (planned under the lock, performed with [`perform`]).
    pub fn race_op(&self, now: u64) -> Option<Op> {
        (self.handoff == Handoff::Sent).then_some(Op::Claim {
            generation: self.generation + 1,
            issued: now,
        })
    }

    /// Applies the race's claim: won (G+1 is ours, renewals go on at G+1),
    /// lost (the target holds it) or unknown (lease-suspended: the fence
    /// closes now and the keeper re-acquires as a peer would, claiming G+1
    /// only after seeing the record unchanged for the takeover time).
    pub fn apply_race(&mut self, now: u64, op: Op, res: OpResult) -> (Race, Vec<Step>) {
        let Op::Claim { generation, issued } = op else {
            return (Race::Unknown(format!("not a claim: {op:?}")), Vec::new());
        };
        match res {
            OpResult::Claimed(Ok(())) => {
                self.handoff = Handoff::None;
                self.cut = u64::MAX;
                self.generation = generation;
                self.last = issued;
                self.counter = 0;
                self.next = issued + self.spec.renew_interval_ms;
                tracing::warn!(lease = %self.spec.file.display(), generation,
                    "migration failed after the lease was sent: lease claimed back at the next generation");
                (Race::Won, vec![Step::Status(self.status("held"))])
            }
            OpResult::ClaimTaken => {
                self.handoff = Handoff::Gone;
                let why = format!(
                    "lease generation {generation} of {} is claimed by the target: the guest runs there",
                    self.spec.file.display()
                );
                (Race::Lost(why), Vec::new())
            }
            res @ (OpResult::Claimed(Err(_)) | OpResult::Failed(_)) => {
                // A claim that is ours with the record unwritten is retried
                // by the suspended keeper (nobody else can hold it).
                let (e, claimed) = match res {
                    OpResult::Claimed(Err(e)) => (e, Some(generation)),
                    OpResult::Failed(e) => (e, None),
                    _ => unreachable!(),
                };
                self.handoff = Handoff::None;
                // Generation G is no longer ours to renew: the deadline is
                // now, so only a re-acquisition resumes the guest.
                self.cut = now;
                self.suspended = Some(Suspension {
                    since: now,
                    seen: None,
                    claimed,
                });
                self.next = now;
                let st = self.status("suspended");
                (Race::Unknown(e), vec![Step::Status(st)])
            }
            other => (
                Race::Unknown(format!("unexpected claim result {other:?}")),
                Vec::new(),
            ),
        }
    }

    /// The generation held (or being re-acquired).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the guest is lease-suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended.is_some()
    }

    /// The write fence: writes allowed before this time (the deadline).
    pub fn fence(&self) -> u64 {
        self.deadline()
    }

    fn deadline(&self) -> u64 {
        (self.last + self.spec.stop_time_ms).min(self.cut)
    }

    /// How long before the deadline a pausing VMM parks the guest, so that
    /// no guest write meets the closed fence (an I/O error the guest would
    /// see): 250 ms, or less when the timings leave less room above a slow
    /// renewal (`stop - renew - io`).
    pub fn pause_lead(&self) -> u64 {
        let s = &self.spec;
        let room = s
            .stop_time_ms
            .saturating_sub(s.renew_interval_ms + s.io_timeout_ms);
        (room / 2).min(250)
    }

    fn status(&self, state: &str) -> LeaseStatus {
        LeaseStatus {
            state: state.into(),
            generation: self.generation,
            counter: self.counter,
            last_renewal_issued_mono_ms: self.last,
        }
    }

    fn publish(&self) {
        SUSPENDED.store(self.suspended.is_some(), Ordering::SeqCst);
        WRITE_FENCE_MS.store(self.fence(), Ordering::SeqCst);
        publish_info(Some((
            LeaseInfo {
                state: if self.suspended.is_some() {
                    "suspended".into()
                } else {
                    "held".into()
                },
                file: self.spec.file.clone(),
                generation: self.generation,
                on_loss: self.spec.on_loss,
                suspended_ms: None,
                resumptions: self.resumptions,
            },
            self.suspended.as_ref().map(|s| s.since),
        )));
    }

    /// The deadline check (every few ms, from its own thread: it never waits
    /// for the datastore).
    pub fn check_deadline(&mut self, now: u64) -> Option<Step> {
        if self.suspended.is_some() || self.handoff != Handoff::None {
            return None;
        }
        match self.spec.on_loss {
            LeaseLoss::PowerOff if now >= self.deadline() => Some(Step::PowerOff {
                state: "expired".into(),
                why: format!("not renewed for {} ms", self.spec.stop_time_ms),
            }),
            LeaseLoss::PowerOff => None,
            LeaseLoss::Pause if now + self.pause_lead() < self.deadline() => None,
            LeaseLoss::Pause => {
                self.suspended = Some(Suspension {
                    since: now,
                    seen: None,
                    claimed: None,
                });
                // Past the deadline, watch the record.
                self.next = self.next.min(self.deadline());
                Some(Step::Suspend)
            }
        }
    }

    /// The datastore operation due at `now`, if any.
    pub fn plan(&mut self, now: u64) -> Option<Op> {
        let op = self.plan_op(now);
        self.in_flight = op.is_some();
        op
    }

    fn plan_op(&mut self, now: u64) -> Option<Op> {
        if now < self.next || self.handoff != Handoff::None {
            return None;
        }
        self.next = now + self.spec.renew_interval_ms;
        // A renewal is issued only while the lease is valid (also in the
        // last moments, with the guest already parked): one issued after the
        // deadline could land after a peer's takeover.
        if now < self.deadline() {
            return Some(Op::Renew {
                issued: now,
                deadline: self.deadline(),
            });
        }
        match &self.suspended {
            None => None,
            Some(s) => {
                if let Some(generation) = s.claimed {
                    return Some(Op::Claim {
                        generation,
                        issued: now,
                    });
                }
                match &s.seen {
                    Some((r, since))
                        if now.saturating_sub(*since) >= self.spec.takeover_time_ms
                            && self.spec.is_ours_at(r, self.generation) =>
                    {
                        Some(Op::Claim {
                            generation: self.generation + 1,
                            issued: now,
                        })
                    }
                    _ => Some(Op::Observe),
                }
            }
        }
    }

    fn lost(rec: &Option<LeaseRecord>) -> Step {
        let why = match rec {
            Some(r) => format!(
                "lease taken by {} generation {}",
                r.owner.as_deref().unwrap_or("nobody (released)"),
                r.generation
            ),
            None => "lease record gone".to_string(),
        };
        Step::PowerOff {
            state: "lost".into(),
            why,
        }
    }

    /// Applies what `op` found; `now` is the time the result came back.
    pub fn apply(&mut self, now: u64, op: Op, res: OpResult) -> Vec<Step> {
        self.in_flight = false;
        if self.handoff == Handoff::Gone {
            // The lease is the target's: whatever a late answer says.
            return Vec::new();
        }
        match (op, res) {
            (Op::Renew { issued, .. }, OpResult::Renewed(counter)) => {
                self.last = self.last.max(issued);
                self.counter = counter;
                let mut steps = Vec::new();
                if self.suspended.is_some() && now + self.pause_lead() < self.deadline() {
                    // A renewal issued before the deadline landed: the lease
                    // was never lost, only late.
                    let since = self.suspended.take().map_or(now, |s| s.since);
                    self.resumptions += 1;
                    tracing::warn!(lease = %self.spec.file.display(), paused_ms = now - since,
                        "late lease renewal succeeded: guest resumed");
                    steps.push(Step::Resume);
                }
                if self.suspended.is_none() {
                    steps.push(Step::Status(self.status("held")));
                }
                steps
            }
            (Op::Renew { .. }, OpResult::Read(rec)) => vec![Self::lost(&rec)],
            (Op::Observe, OpResult::Read(rec)) => {
                let Some(s) = self.suspended.as_mut() else {
                    return Vec::new();
                };
                match &rec {
                    Some(r) if self.spec.is_ours_at(r, self.generation) => {
                        if s.seen.as_ref().map(|(seen, _)| seen) != Some(r) {
                            s.seen = Some((r.clone(), now));
                        }
                        Vec::new()
                    }
                    // Our own claimed generation landed after all: watch it
                    // as ours (a peer may take it over once it is unchanged
                    // for its takeover time, so we must too).
                    Some(r)
                        if s.claimed == Some(r.generation)
                            && r.owner.as_deref() == Some(self.spec.owner.as_str()) =>
                    {
                        self.generation = r.generation;
                        s.claimed = None;
                        s.seen = Some((r.clone(), now));
                        Vec::new()
                    }
                    _ => vec![Self::lost(&rec)],
                }
            }
            (Op::Claim { generation, issued }, OpResult::Claimed(Ok(()))) => {
                let since = self.suspended.take().map_or(now, |s| s.since);
                self.cut = u64::MAX;
                self.generation = generation;
                self.last = issued;
                self.counter = 0;
                self.next = issued + self.spec.renew_interval_ms;
                self.resumptions += 1;
                tracing::warn!(lease = %self.spec.file.display(), generation, paused_ms = now - since,
                    "lease re-acquired: guest resumed");
                vec![Step::Resume, Step::Status(self.status("held"))]
            }
            (Op::Claim { generation, .. }, OpResult::Claimed(Err(e))) => {
                tracing::warn!(lease = %self.spec.file.display(), generation, error = %e,
                    "claimed the lease but could not write the record; retrying");
                if let Some(s) = self.suspended.as_mut() {
                    s.claimed = Some(generation);
                }
                Vec::new()
            }
            (Op::Claim { generation, .. }, OpResult::ClaimTaken) => vec![Step::PowerOff {
                state: "lost".into(),
                why: format!("lease generation {generation} claimed by another host"),
            }],
            (_, OpResult::Failed(e)) => {
                tracing::warn!(lease = %self.spec.file.display(), error = %e, "lease I/O failed");
                if let Some(s) = self.suspended.as_mut() {
                    // The record could have changed unseen: count afresh.
                    s.seen = None;
                }
                Vec::new()
            }
            (op, res) => {
                tracing::error!(?op, ?res, "unexpected lease I/O result");
                Vec::new()
            }
        }
    }

    /// One full step with no other thread involved (tests, and a summary
    /// of what the threads do).
    pub fn tick(&mut self, now: u64, io: &mut dyn LeaseIo) -> Vec<Step> {
        let mut steps: Vec<Step> = self.check_deadline(now).into_iter().collect();
        if let Some(op) = self.plan(now) {
            let res = perform(op, &self.spec, self.generation, io);
            steps.extend(self.apply(now, op, res));
        }
        steps
    }
}

/// The running lease: renewal and deadline threads. Dropping it stops them
/// and releases the lease if it is still ours.
pub struct LeaseGuard {
    spec: LeaseSpec,
    keeper: Arc<Mutex<Keeper>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn lock(k: &Mutex<Keeper>) -> MutexGuard<'_, Keeper> {
    k.lock().unwrap_or_else(|p| p.into_inner())
}

/// The lease this process holds, for a live migration's pre-checks and
/// handoff (set while a [`LeaseGuard`] lives).
struct Active {
    spec: LeaseSpec,
    keeper: Arc<Mutex<Keeper>>,
}

static ACTIVE: Mutex<Option<Active>> = Mutex::new(None);

fn active() -> MutexGuard<'static, Option<Active>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether this process holds a lease (a [`LeaseGuard`] is alive).
pub fn is_active() -> bool {
    active().is_some()
}

/// A lease as a live migration hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    /// The record.
    pub file: PathBuf,
    /// Its holder (this host).
    pub owner: String,
    /// The generation held.
    pub generation: u64,
}

/// The lease this process holds, if any.
pub fn held() -> Option<HeldLease> {
    let g = active();
    let a = g.as_ref()?;
    let generation = lock(&a.keeper).generation();
    Some(HeldLease {
        file: a.spec.file.clone(),
        owner: a.spec.owner.clone(),
        generation,
    })
}

fn active_keeper() -> Option<(LeaseSpec, Arc<Mutex<Keeper>>)> {
    active()
        .as_ref()
        .map(|a| (a.spec.clone(), a.keeper.clone()))
}

/// Switchover of a live migration (the guest is paused and its devices
/// drained): stops renewals, waits for one in flight to land, and returns
/// the lease to send to the target (`None` without a lease). An error
/// (lease-suspended, stop time passed) means it cannot be handed over; the
/// caller then calls [`handoff_abort`].
pub fn handoff_stop() -> Result<Option<HeldLease>, String> {
    let Some((spec, keeper)) = active_keeper() else {
        return Ok(None);
    };
    lock(&keeper).stop_renewals();
    // A renewal in flight is bounded by two I/O timeouts (read, write).
    let give_up = mono_ms() + 2 * spec.io_timeout_ms + 500;
    loop {
        let k = lock(&keeper);
        if !k.in_flight() {
            let generation = k.handoff_ready(mono_ms())?;
            tracing::info!(lease = %spec.file.display(), generation,
                "lease renewals stopped for the switchover");
            write_status(&spec, &k.status("handoff"));
            return Ok(Some(HeldLease {
                file: spec.file.clone(),
                owner: spec.owner.clone(),
                generation,
            }));
        }
        drop(k);
        if mono_ms() > give_up {
            return Err("a lease renewal is still in flight".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The lease goes out with the final state: from now on only the claim of
/// the next generation decides who holds it.
pub fn handoff_sent() {
    if let Some((_, keeper)) = active_keeper() {
        lock(&keeper).mark_sent();
    }
}

/// The migration failed before the lease was sent: renewals resume. If the
/// stop time passed meanwhile, the usual deadline path applies (with
/// `pause`, the guest stays lease-suspended until the lease is
/// re-acquired; the caller's resume is then refused).
pub fn handoff_abort() {
    let Some((spec, keeper)) = active_keeper() else {
        return;
    };
    let step = {
        let mut k = lock(&keeper);
        let s = k.resume_renewals(mono_ms());
        k.publish();
        s
    };
    tracing::info!(lease = %spec.file.display(), "lease renewals resumed: the migration failed before the lease was sent");
    if let Some(step) = step {
        let suspend = step == Step::Suspend;
        run_steps(&spec, &keeper, vec![step]);
        if suspend {
            // The migration paused the guest, which ran before: the
            // re-acquisition resumes it.
            hook_slot().paused_by_lease = true;
        }
    }
}

/// The target acknowledged: the lease is its own now. This process never
/// renews, releases or writes it again.
pub fn handoff_done() {
    if let Some((spec, keeper)) = active_keeper() {
        let st = {
            let mut k = lock(&keeper);
            k.mark_gone();
            k.status("handed-over")
        };
        tracing::info!(lease = %spec.file.display(), "lease handed over to the migration target");
        write_status(&spec, &st);
    }
}

/// The migration failed after the lease was sent (no ack, cut, target
/// died): claim the next generation exactly as the target would. See
/// [`Race`]. With [`Race::Unknown`] the guest is lease-suspended (keep it
/// paused: the keeper resumes it if it re-acquires the lease, or ends the
/// process with status 5 if someone else holds it).
pub fn handoff_race() -> Race {
    let Some((spec, keeper)) = active_keeper() else {
        return Race::Won;
    };
    let planned = {
        let k = lock(&keeper);
        k.race_op(mono_ms()).map(|op| (op, k.generation()))
    };
    let Some((op, generation)) = planned else {
        return Race::Won;
    };
    let mut io = FileIo::new(&spec);
    let res = perform(op, &spec, generation, &mut io);
    let (race, steps) = {
        let mut k = lock(&keeper);
        let r = k.apply_race(mono_ms(), op, res);
        k.publish();
        r
    };
    if let Race::Lost(why) = &race {
        tracing::warn!(lease = %spec.file.display(), %why, "the migration target holds the lease");
        write_status(&spec, &lock(&keeper).status("handed-over"));
    }
    if let Race::Unknown(e) = &race {
        tracing::warn!(lease = %spec.file.display(), error = %e,
            "cannot tell who holds the lease after the failed switchover: guest kept paused (lease-suspended), re-acquiring");
        let mut slot = hook_slot();
        slot.paused_by_lease = true;
    }
    run_steps(&spec, &keeper, steps);
    race
}

/// A live migration's target takes over the lease the source handed over
/// (generation `from`): claims `from + 1` with the exclusive claim file,
/// writes the record naming this host at that generation, and starts
/// renewing it (the deadline counts from when the claim was issued). Call
/// once the guest's state is restored and before its vCPUs run: if the
/// claim is someone else's (the source reclaimed it after a failure), the
/// guest must not run here.
pub fn take_over(spec: &LeaseSpec, from: u64) -> Result<LeaseGuard, LeaseError> {
    let mut io = FileIo::new(spec);
    let issued = mono_ms();
    let generation = claim_next(spec, from, issued, &mut io)?;
    tracing::info!(lease = %spec.file.display(), generation, "lease taken over from the migration source");
    start(LeaseSpec {
        generation,
        acquired_mono_ms: issued,
        handoff: false,
        ..spec.clone()
    })
}

/// The claim and record write of [`take_over`], on any [`LeaseIo`].
pub fn claim_next(
    spec: &LeaseSpec,
    from: u64,
    issued: u64,
    io: &mut dyn LeaseIo,
) -> Result<u64, LeaseError> {
    let generation = from + 1;
    let err = |reason: String| LeaseError::Takeover {
        path: spec.file.clone(),
        generation,
        reason,
    };
    let op = Op::Claim { generation, issued };
    let mut res = perform(op, spec, generation, io);
    // The claim is ours: nobody else can write this generation, so a
    // failed record write is retried a few times.
    for _ in 0..3 {
        match &res {
            OpResult::Claimed(Err(_)) => {
                std::thread::sleep(Duration::from_millis(spec.io_timeout_ms.min(200)));
                res = perform(op, spec, generation, io);
            }
            _ => break,
        }
    }
    match res {
        OpResult::Claimed(Ok(())) => Ok(generation),
        OpResult::Claimed(Err(e)) => Err(err(format!(
            "the claim is ours but the record cannot be written: {e}"
        ))),
        OpResult::ClaimTaken => Err(err(format!(
            "generation {generation} is already claimed by another holder"
        ))),
        OpResult::Failed(e) => Err(err(e)),
        other => Err(err(format!("unexpected result {other:?}"))),
    }
}

/// Checks the record names us, then starts renewing.
pub fn start(spec: LeaseSpec) -> Result<LeaseGuard, LeaseError> {
    if spec.handoff {
        return Err(LeaseError::HandoffOnly(spec.file.clone()));
    }
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
    let keeper = Keeper::new(spec.clone());
    keeper.publish();
    let keeper = Arc::new(Mutex::new(keeper));
    let renewer = {
        let (spec, stop, keeper) = (spec.clone(), stop.clone(), keeper.clone());
        std::thread::Builder::new()
            .name("lease-renew".into())
            .spawn(move || renew_loop(&spec, &stop, &keeper))
            .map_err(LeaseError::Thread)?
    };
    let deadline = {
        let (spec, stop, keeper) = (spec.clone(), stop.clone(), keeper.clone());
        std::thread::Builder::new()
            .name("lease-deadline".into())
            .spawn(move || deadline_loop(&spec, &stop, &keeper))
            .map_err(LeaseError::Thread)?
    };
    tracing::info!(lease = %spec.file.display(), generation = spec.generation,
        on_loss = ?spec.on_loss, "lease held; renewing");
    *active() = Some(Active {
        spec: spec.clone(),
        keeper: keeper.clone(),
    });
    Ok(LeaseGuard {
        spec,
        keeper,
        stop,
        threads: vec![renewer, deadline],
    })
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let (generation, suspended, handoff) = {
            let k = lock(&self.keeper);
            (k.generation(), k.is_suspended(), k.handoff())
        };
        {
            let mut a = active();
            if a.as_ref()
                .is_some_and(|a| Arc::ptr_eq(&a.keeper, &self.keeper))
            {
                *a = None;
            }
        }
        // The guest has stopped; no lease, no fence.
        WRITE_FENCE_MS.store(u64::MAX, Ordering::SeqCst);
        SUSPENDED.store(false, Ordering::SeqCst);
        publish_info(None);
        if handoff != Handoff::None {
            // Handed over (or being handed over): the record is the
            // migration target's, or the claim of the next generation
            // decides whose it is; never write it from here.
            tracing::info!(lease = %self.spec.file.display(), ?handoff, "VM migrated away; lease left to the target");
            return;
        }
        if suspended {
            // Not ours to release: a peer may be taking it over.
            tracing::info!(lease = %self.spec.file.display(), "guest stopped while lease-suspended; lease left alone");
            return;
        }
        let spec = self.spec.clone();
        let res = with_timeout(spec.io_timeout(), move || match read_record(&spec.file)? {
            Some(r) if spec.is_ours_at(&r, generation) => {
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

fn write_status(spec: &LeaseSpec, st: &LeaseStatus) {
    if let Some(p) = &spec.status {
        if let Ok(bytes) = serde_json::to_vec(st) {
            if let Err(e) = write_atomic(p, &bytes) {
                tracing::warn!(status = %p.display(), error = %e, "cannot write lease status");
            }
        }
    }
}

/// Ends the process now: the guest is gone with it.
fn die(spec: &LeaseSpec, status: LeaseStatus, why: &str) -> ! {
    WRITE_FENCE_MS.store(0, Ordering::SeqCst);
    tracing::error!(lease = %spec.file.display(), state = %status.state, "{why}: stopping the guest");
    write_status(spec, &status);
    eprintln!("vigil: lease {}: {why}; guest stopped", spec.file.display());
    crate::console::restore_terminal();
    // SAFETY: _exit ends the process at once; nothing after it runs, which
    // is the point (no further guest execution or disk write).
    unsafe { libc::_exit(EXIT_LEASE) }
}

/// Carries out steps (no keeper lock held).
fn run_steps(spec: &LeaseSpec, keeper: &Mutex<Keeper>, steps: Vec<Step>) {
    for step in steps {
        match step {
            Step::Status(st) => write_status(spec, &st),
            Step::Suspend => {
                let st = lock(keeper).status("suspended");
                tracing::warn!(lease = %spec.file.display(), stop_ms = spec.stop_time_ms,
                    "lease not renewed in time: guest paused (lease-suspended), re-acquiring");
                write_status(spec, &st);
                sync_hook();
            }
            Step::Resume => sync_hook(),
            Step::PowerOff { state, why } => {
                let st = LeaseStatus {
                    state,
                    ..lock(keeper).status("")
                };
                die(spec, st, &why)
            }
        }
    }
}

fn deadline_loop(spec: &LeaseSpec, stop: &AtomicBool, keeper: &Mutex<Keeper>) {
    while !stop.load(Ordering::SeqCst) {
        let step = {
            let mut k = lock(keeper);
            let s = k.check_deadline(mono_ms());
            if s.is_some() {
                k.publish();
            }
            s
        };
        if let Some(s) = step {
            run_steps(spec, keeper, vec![s]);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn renew_loop(spec: &LeaseSpec, stop: &AtomicBool, keeper: &Mutex<Keeper>) {
    let mut io = FileIo::new(spec);
    while !stop.load(Ordering::SeqCst) {
        let planned = {
            let mut k = lock(keeper);
            k.plan(mono_ms()).map(|op| (op, k.generation()))
        };
        let Some((op, generation)) = planned else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let res = perform(op, spec, generation, &mut io);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let steps = {
            let mut k = lock(keeper);
            let steps = k.apply(mono_ms(), op, res);
            k.publish();
            steps
        };
        run_steps(spec, keeper, steps);
    }
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
            on_loss: LeaseLoss::PowerOff,
            takeover_time_ms: 0,
            handoff: false,
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

    /// A datastore in memory: the record, whether it answers, the claims,
    /// and every write in order.
    struct Fake {
        rec: Option<LeaseRecord>,
        reachable: bool,
        claims: std::collections::BTreeMap<u64, String>,
        writes: Vec<LeaseRecord>,
        me: String,
    }

    impl Fake {
        fn holding(owner: &str, generation: u64) -> Self {
            Self {
                rec: Some(LeaseRecord {
                    owner: Some(owner.into()),
                    generation,
                    counter: 0,
                }),
                reachable: true,
                claims: Default::default(),
                writes: Vec::new(),
                me: "host-a vmm".into(),
            }
        }
    }

    impl LeaseIo for Fake {
        fn read(&mut self) -> Result<Option<LeaseRecord>, String> {
            if !self.reachable {
                return Err("no answer within 500 ms".into());
            }
            Ok(self.rec.clone())
        }
        fn write(&mut self, rec: &LeaseRecord, _not_after: u64) -> Result<(), String> {
            if !self.reachable {
                return Err("read-only file system".into());
            }
            self.writes.push(rec.clone());
            self.rec = Some(rec.clone());
            Ok(())
        }
        fn claim(&mut self, generation: u64) -> Result<bool, String> {
            if !self.reachable {
                return Err("read-only file system".into());
            }
            let holder = self.claims.entry(generation).or_insert(self.me.clone());
            Ok(*holder == self.me)
        }
    }

    /// Renew 500, I/O 500, stop 2000, takeover 3200; acquired at t=0.
    fn keeper(on_loss: LeaseLoss) -> Keeper {
        Keeper::new(LeaseSpec {
            file: "/ds/vms/vm/lease".into(),
            owner: "host-a".into(),
            generation: 4,
            acquired_mono_ms: 0,
            renew_interval_ms: 500,
            io_timeout_ms: 500,
            stop_time_ms: 2000,
            status: None,
            on_loss,
            takeover_time_ms: 3200,
            handoff: false,
        })
    }

    /// Ticks every 10 ms over [from, to) and returns the steps with their times.
    fn run(k: &mut Keeper, io: &mut Fake, from: u64, to: u64) -> Vec<(u64, Step)> {
        let mut out = Vec::new();
        for now in (from..to).step_by(10) {
            for s in k.tick(now, io) {
                let end = matches!(s, Step::PowerOff { .. });
                out.push((now, s));
                if end {
                    // The process would be gone.
                    return out;
                }
            }
        }
        out
    }

    fn kinds(steps: &[(u64, Step)]) -> Vec<(u64, &'static str)> {
        steps
            .iter()
            .filter_map(|(t, s)| match s {
                Step::Status(_) => None,
                Step::Suspend => Some((*t, "suspend")),
                Step::Resume => Some((*t, "resume")),
                Step::PowerOff { .. } => Some((*t, "power-off")),
            })
            .collect()
    }

    #[test]
    fn stall_pauses_at_the_deadline_then_reacquires_like_a_peer() {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        // Healthy: renewals every 500 ms, the fence follows them.
        let steps = run(&mut k, &mut io, 0, 3000);
        assert!(kinds(&steps).is_empty(), "{steps:?}");
        assert_eq!(io.writes.len(), 5);
        assert_eq!(io.writes.last().unwrap().counter, 5);
        assert_eq!(k.fence(), 2500 + 2000);
        // The datastore stops answering at 3000; the last renewal was issued
        // at 2500, so the guest pauses at 4500 and the fence is shut.
        io.reachable = false;
        let steps = run(&mut k, &mut io, 3000, 6000);
        // Parked 250 ms ahead of the deadline (4500), so that no guest
        // write meets the fence, which closes at the deadline.
        assert_eq!(kinds(&steps), vec![(4250, "suspend")]);
        assert!(k.is_suspended());
        assert_eq!(k.fence(), 4500);
        // Storage returns at 6000: the record still names us. The keeper
        // watches it unchanged for the takeover time (3200 ms from its first
        // read at 6000), writing nothing meanwhile, then claims generation 5.
        io.reachable = true;
        let writes_before = io.writes.len();
        let steps = run(&mut k, &mut io, 6000, 12_000);
        let k2 = kinds(&steps);
        assert_eq!(k2.len(), 1, "{steps:?}");
        let (resumed_at, what) = k2[0];
        assert_eq!(what, "resume");
        assert!(
            (9200..9200 + 500 + 10).contains(&resumed_at),
            "resumed at {resumed_at}"
        );
        // The first write after the deadline is the new generation's.
        assert_eq!(
            io.writes[writes_before],
            LeaseRecord {
                owner: Some("host-a".into()),
                generation: 5,
                counter: 0
            }
        );
        assert_eq!(io.claims.get(&5).map(String::as_str), Some("host-a vmm"));
        assert_eq!(k.generation(), 5);
        assert!(!k.is_suspended());
        assert!(k.fence() > 12_000);
        assert!(io.writes.last().unwrap().counter >= 4);
    }

    #[test]
    fn no_renewal_is_issued_at_or_after_the_deadline() {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        io.reachable = false;
        let mut ops = Vec::new();
        for now in (0..8000).step_by(10) {
            let _ = k.check_deadline(now);
            if let Some(op) = k.plan(now) {
                ops.push((now, op));
                let res = perform(op, &k.spec.clone(), k.generation(), &mut io);
                k.apply(now, op, res);
            }
        }
        for (now, op) in &ops {
            if let Op::Renew { issued, deadline } = op {
                assert!(*issued < 2000 && *now < 2000, "renewal at {now}");
                assert_eq!(*deadline, 2000);
            }
        }
        assert!(ops.iter().any(|(_, op)| *op == Op::Observe));
    }

    #[test]
    fn a_late_renewal_issued_before_the_deadline_resumes_without_a_new_generation() {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        // Renewals at 500..1500 fail; the one issued at 1500 takes long and
        // succeeds after the deadline (2000) has paused the guest.
        io.reachable = false;
        run(&mut k, &mut io, 0, 1500);
        let op = k.plan(1500).unwrap();
        assert_eq!(
            op,
            Op::Renew {
                issued: 1500,
                deadline: 2000
            }
        );
        assert_eq!(k.check_deadline(2000), Some(Step::Suspend));
        io.reachable = true;
        let res = perform(op, &k.spec.clone(), 4, &mut io);
        let steps = k.apply(2300, op, res);
        assert_eq!(steps[0], Step::Resume);
        assert_eq!(k.generation(), 4);
        assert_eq!(k.fence(), 1500 + 2000);
        // Had it come back at or after 3500 (its own deadline), it would
        // not count: the keeper stays suspended.
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        let op = k.plan(500).unwrap();
        assert_eq!(k.check_deadline(2000), Some(Step::Suspend));
        let res = perform(op, &k.spec.clone(), 4, &mut io);
        assert!(k.apply(2600, op, res).is_empty());
        assert!(k.is_suspended());
    }

    #[test]
    fn a_peer_that_took_over_meanwhile_gets_the_stale_copy_powered_off_without_a_write() {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        run(&mut k, &mut io, 0, 1000);
        io.reachable = false;
        let steps = run(&mut k, &mut io, 1000, 5000);
        assert_eq!(kinds(&steps), vec![(2250, "suspend")]);
        // A peer watched the record for its takeover time and took it.
        io.claims.insert(5, "host-b".into());
        io.rec = Some(LeaseRecord {
            owner: Some("host-b".into()),
            generation: 5,
            counter: 3,
        });
        io.reachable = true;
        let writes = io.writes.len();
        let steps = run(&mut k, &mut io, 5000, 6000);
        match &steps[..] {
            [(_, Step::PowerOff { state, why })] => {
                assert_eq!(state, "lost");
                assert!(why.contains("lease taken by host-b generation 5"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(io.writes.len(), writes);
    }

    #[test]
    fn a_claim_won_by_a_peer_first_powers_the_stale_copy_off() {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        io.reachable = false;
        run(&mut k, &mut io, 0, 2500);
        io.reachable = true;
        // The peer created the claim for generation 5 but has not written
        // the record yet when our takeover time is up.
        io.claims.insert(5, "host-b".into());
        let writes = io.writes.len();
        let steps = run(&mut k, &mut io, 2500, 8000);
        let powered: Vec<_> = kinds(&steps);
        assert_eq!(powered.len(), 1, "{steps:?}");
        assert_eq!(powered[0].1, "power-off");
        assert!(powered[0].0 >= 2500 + 3200);
        assert_eq!(io.writes.len(), writes);
    }

    #[test]
    fn a_record_that_moves_restarts_the_takeover_count() {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        io.reachable = false;
        run(&mut k, &mut io, 0, 2500);
        io.reachable = true;
        run(&mut k, &mut io, 2500, 4000);
        // An abandoned write of ours lands late: the record changed, so the
        // count starts again from when it was seen.
        io.rec = Some(LeaseRecord {
            owner: Some("host-a".into()),
            generation: 4,
            counter: 9,
        });
        let steps = run(&mut k, &mut io, 4000, 10_000);
        let resumed = kinds(&steps);
        assert_eq!(resumed.len(), 1);
        assert!(resumed[0].0 >= 4000 + 3200, "{resumed:?}");
    }

    #[test]
    fn power_off_mode_ends_at_the_deadline() {
        let mut k = keeper(LeaseLoss::PowerOff);
        let mut io = Fake::holding("host-a", 4);
        run(&mut k, &mut io, 0, 1000);
        io.reachable = false;
        let steps = run(&mut k, &mut io, 1000, 4000);
        let first = steps
            .iter()
            .find(|(_, s)| matches!(s, Step::PowerOff { .. }))
            .unwrap();
        assert_eq!(first.0, 2500);
        assert!(matches!(&first.1, Step::PowerOff { state, .. } if state == "expired"));
    }

    #[test]
    fn claim_files_admit_one_claimant_and_recognise_their_own() {
        let d = tmpdir("claim");
        let rec = d.join("lease");
        assert!(claim_file(&rec, 7, "host-a vmm 1").unwrap());
        assert!(claim_file(&rec, 7, "host-a vmm 1").unwrap());
        assert!(!claim_file(&rec, 7, "host-b vmm 2").unwrap());
        assert_eq!(
            std::fs::read_to_string(d.join("lease.claim.7")).unwrap(),
            "host-a vmm 1"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_renewal_write_is_not_issued_past_its_deadline() {
        let d = tmpdir("notafter");
        let s = spec(&d);
        let rec = LeaseRecord {
            owner: Some("host-a".into()),
            generation: 2,
            counter: 0,
        };
        write_record(&s.file, &rec).unwrap();
        let mut io = FileIo::new(&s);
        let late = LeaseRecord {
            counter: 1,
            ..rec.clone()
        };
        let e = io.write(&late, mono_ms()).unwrap_err();
        assert!(e.contains("deadline passed"), "{e}");
        assert_eq!(read_record(&s.file).unwrap().unwrap(), rec);
        io.write(&late, mono_ms() + 60_000).unwrap();
        assert_eq!(read_record(&s.file).unwrap().unwrap(), late);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pause_needs_a_takeover_time() {
        let d = tmpdir("pausespec");
        let p = d.join("spec.toml");
        std::fs::write(
            &p,
            "file = \"/x\"\nowner = \"a\"\ngeneration = 1\nacquired_mono_ms = 0\n\
             renew_interval_ms = 500\nio_timeout_ms = 500\nstop_time_ms = 2000\n\
             on_loss = \"pause\"\n",
        )
        .unwrap();
        let e = LeaseSpec::load(&p).unwrap_err().to_string();
        assert!(e.contains("needs takeover_time_ms"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_handoff_stops_renewals_and_the_deadline_until_it_is_aborted() {
        let mut k = keeper(LeaseLoss::PowerOff);
        let mut io = Fake::holding("host-a", 4);
        run(&mut k, &mut io, 0, 1000);
        let writes = io.writes.len();
        // A renewal is in flight when the switchover begins: it may land.
        let op = k.plan(1000).unwrap();
        assert!(k.in_flight());
        k.stop_renewals();
        let res = perform(op, &k.spec.clone(), 4, &mut io);
        k.apply(1010, op, res);
        assert!(!k.in_flight());
        assert_eq!(k.handoff_ready(1020), Ok(4));
        // Nothing more is issued, and the deadline (3000) powers nothing
        // off while the guest is paused for the switchover.
        let steps = run(&mut k, &mut io, 1020, 5000);
        assert!(kinds(&steps).is_empty(), "{steps:?}");
        assert_eq!(io.writes.len(), writes + 1);
        assert_eq!(k.fence(), 1000 + 2000, "the fence still closes");
        // Too late to hand over now.
        assert!(k
            .handoff_ready(5000)
            .unwrap_err()
            .contains("stop time passed"));
        // Aborted before the lease was sent, past the deadline: the usual
        // deadline path (here power-off).
        assert!(matches!(
            k.resume_renewals(5000),
            Some(Step::PowerOff { .. })
        ));
        // Aborted in time: renewals go on in the same generation.
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        run(&mut k, &mut io, 0, 1000);
        k.stop_renewals();
        run(&mut k, &mut io, 1000, 1400);
        assert_eq!(k.resume_renewals(1400), None);
        let steps = run(&mut k, &mut io, 1400, 4000);
        assert!(kinds(&steps).is_empty(), "{steps:?}");
        assert_eq!(k.generation(), 4);
        assert!(k.fence() > 5000);
    }

    fn target_spec() -> LeaseSpec {
        LeaseSpec {
            owner: "host-b".into(),
            handoff: true,
            generation: 0,
            ..keeper(LeaseLoss::Pause).spec
        }
    }

    #[test]
    fn the_target_claims_the_next_generation_or_does_not_start() {
        let mut io = Fake::holding("host-a", 4);
        io.me = "host-b vmm".into();
        assert_eq!(claim_next(&target_spec(), 4, 77, &mut io).unwrap(), 5);
        assert_eq!(
            io.rec,
            Some(LeaseRecord {
                owner: Some("host-b".into()),
                generation: 5,
                counter: 0
            })
        );
        // The source reclaimed generation 5 first: no write, an error.
        let mut io = Fake::holding("host-a", 4);
        io.me = "host-b vmm".into();
        io.claims.insert(5, "host-a vmm".into());
        let e = claim_next(&target_spec(), 4, 77, &mut io).unwrap_err();
        assert!(e.to_string().contains("already claimed"), "{e}");
        assert!(io.writes.is_empty());
        // Unreachable datastore: not taken over either.
        let mut io = Fake::holding("host-a", 4);
        io.reachable = false;
        assert!(claim_next(&target_spec(), 4, 77, &mut io).is_err());
    }

    /// A keeper that sent generation 4 to the target at t=1000.
    fn sent() -> (Keeper, Fake) {
        let mut k = keeper(LeaseLoss::Pause);
        let mut io = Fake::holding("host-a", 4);
        run(&mut k, &mut io, 0, 1000);
        k.stop_renewals();
        assert_eq!(k.handoff_ready(1000), Ok(4));
        k.mark_sent();
        (k, io)
    }

    fn race(k: &mut Keeper, io: &mut Fake, now: u64) -> (Race, Vec<Step>) {
        let op = k.race_op(now).unwrap();
        let res = perform(op, &k.spec.clone(), k.generation(), io);
        k.apply_race(now, op, res)
    }

    #[test]
    fn the_source_wins_the_race_when_the_target_never_claimed() {
        let (mut k, mut io) = sent();
        // Nothing is renewed while the lease is out.
        assert!(kinds(&run(&mut k, &mut io, 1000, 1500)).is_empty());
        let writes = io.writes.len();
        let (r, _) = race(&mut k, &mut io, 1500);
        assert_eq!(r, Race::Won);
        assert_eq!(k.generation(), 5);
        assert_eq!(k.handoff(), Handoff::None);
        assert_eq!(
            io.writes[writes],
            LeaseRecord {
                owner: Some("host-a".into()),
                generation: 5,
                counter: 0
            }
        );
        // Renewals go on at generation 5, deadline from the claim.
        assert_eq!(k.fence(), 1500 + 2000);
        let steps = run(&mut k, &mut io, 1500, 6000);
        assert!(kinds(&steps).is_empty(), "{steps:?}");
        assert_eq!(io.rec.as_ref().unwrap().generation, 5);
        assert!(io.rec.as_ref().unwrap().counter >= 8);
    }

    #[test]
    fn the_source_loses_the_race_to_a_target_that_runs_the_guest() {
        let (mut k, mut io) = sent();
        // The target claimed 5 and wrote the record; only its ack was lost.
        io.claims.insert(5, "host-b vmm".into());
        io.rec = Some(LeaseRecord {
            owner: Some("host-b".into()),
            generation: 5,
            counter: 0,
        });
        let writes = io.writes.len();
        let (r, steps) = race(&mut k, &mut io, 1500);
        assert!(
            matches!(&r, Race::Lost(why) if why.contains("claimed by the target")),
            "{r:?}"
        );
        assert!(steps.is_empty());
        assert_eq!(k.handoff(), Handoff::Gone);
        // Never a write again, whatever happens next.
        let steps = run(&mut k, &mut io, 1500, 8000);
        assert!(kinds(&steps).is_empty(), "{steps:?}");
        assert_eq!(io.writes.len(), writes);
    }

    #[test]
    fn a_race_that_cannot_be_decided_keeps_the_guest_paused_and_reacquires_like_a_peer() {
        let (mut k, mut io) = sent();
        io.reachable = false;
        let (r, _) = race(&mut k, &mut io, 1500);
        assert!(matches!(r, Race::Unknown(_)), "{r:?}");
        assert!(k.is_suspended());
        assert!(k.fence() <= 1500, "fence closed at once");
        let writes = io.writes.len();
        // Storage back at 2000; nobody claimed 5: after the takeover time
        // of an unchanged record, the keeper claims 5 and resumes.
        io.reachable = true;
        let steps = run(&mut k, &mut io, 2000, 6000);
        let k2 = kinds(&steps);
        assert_eq!(k2.len(), 1, "{steps:?}");
        assert_eq!(k2[0].1, "resume");
        assert!(k2[0].0 >= 2000 + 3200, "{k2:?}");
        assert_eq!(k.generation(), 5);
        assert_eq!(io.writes[writes].generation, 5);
        // Had the target claimed 5 meanwhile, the copy here powers off
        // without a write.
        let (mut k, mut io) = sent();
        io.reachable = false;
        race(&mut k, &mut io, 1500);
        io.reachable = true;
        io.claims.insert(5, "host-b vmm".into());
        let writes = io.writes.len();
        let steps = run(&mut k, &mut io, 2000, 8000);
        assert_eq!(kinds(&steps).last().unwrap().1, "power-off");
        assert_eq!(io.writes.len(), writes);
    }

    #[test]
    fn handoff_spec_field_defaults_off_and_start_refuses_it() {
        let d = tmpdir("handoffspec");
        let p = d.join("spec.toml");
        let base = "file = \"/x\"\nowner = \"a\"\ngeneration = 1\nacquired_mono_ms = 0\n\
             renew_interval_ms = 500\nio_timeout_ms = 500\nstop_time_ms = 2000\n";
        std::fs::write(&p, base).unwrap();
        assert!(!LeaseSpec::load(&p).unwrap().handoff);
        std::fs::write(&p, format!("{base}handoff = true\n")).unwrap();
        let s = LeaseSpec::load(&p).unwrap();
        assert!(s.handoff);
        let e = start(s).err().unwrap().to_string();
        assert!(e.contains("only applies with --incoming"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
