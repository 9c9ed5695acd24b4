//! The source side: pre-copy live migration of a running VM (M2, M4, M7).
//!
//! # Algorithm
//!
//! 1. **Connect**: exchange `Hello`, pick the highest common protocol
//!    version, agree on capabilities (the page-checksum mode must be
//!    accepted by the target or the migration stops here).
//! 2. **Precheck**: send the VM's facts; the target answers with every
//!    failed check. Nothing else moves until it answers "ok".
//! 3. **Pre-copy round 0**: start the dirty log, then send all of guest
//!    memory; all-zero pages are announced without data.
//! 4. **Rounds 1..N**: take the dirty set, and if it can be sent within the
//!    downtime target at the measured bandwidth, go to 5, once the target
//!    has acknowledged every round sent so far (capability ROUND_ACK: until
//!    then the data is in flight or being written there, and pausing would
//!    add that to the downtime; the guest runs on meanwhile and what it
//!    dirties joins the set). Otherwise send it
//!    and repeat. When the guest dirties memory faster than the link carries
//!    it (more than `trigger_percent` of the pages moved in the same
//!    interval, counted as bytes of pages, for `unproductive_rounds` rounds
//!    in a row; the rule QEMU's
//!    auto-converge uses), throttle the vCPUs: `initial`%, then +`increment`
//!    per unproductive streak, up to `max`%. Past `max_duration` the
//!    migration fails cleanly.
//! 5. **Stun**: pause the vCPUs, quiesce devices, send the last dirty pages
//!    (at full speed: the bandwidth cap applies to pre-copy only, since
//!    from here every millisecond is downtime; QEMU does the same).
//!
//! **Compression** ([`Compression`], capability LZ4): data runs go as LZ4
//! blocks when that makes them at least an eighth smaller. `auto` (the
//! default) compresses the pre-copy rounds of a capped migration, where
//! the link is the bottleneck; the stunned round goes uncapped and
//! uncompressed, and the downtime estimate uses the wire's rate, as
//! without compression. `on` compresses every round, the stunned one too,
//! for links slower than LZ4 (a 1 Gb/s network), and the estimate then
//! uses the rate at which pages were moved.
//! 6. **Switchover**: send the state blob and `Complete`, wait for the
//!    target's `Resumed`. Only then is the migration a success; the caller
//!    destroys the source VM afterwards.
//!
//! Any failure or cancel before the ack: throttle removed, dirty log
//! stopped, the source VM resumed, `Abort`/`Cancel` sent to the target
//! (best effort), and a [`Failed`] naming the stage and the reason.
//!
//! # The window after `Complete`
//!
//! If the connection breaks after `Complete` is sent and before `Resumed`
//! arrives, the source cannot know whether the target started. It resumes
//! (no ack, no success), which is the rule M4 asks for; the target only
//! starts after a complete, intact stream, and will need the disk locks of
//! the shared datastore (to come with storage) to keep two copies from
//! both writing. A cancel that arrives after `Complete` is forwarded; if the
//! target has already resumed the migration reports success.

use crate::precheck::{Failure, Priority};
use crate::progress::{CancelToken, Progress, Stage, Summary};
use crate::protocol::{
    self, caps, Abort, Complete, Decoder, Encoder, Hello, Message, PagesFrame, ProtocolError,
    VersionMismatch, PAGE_SIZE,
};
use crate::transport::Channel;
use crate::vm::{DirtyBitmap, LeaseRace, MigratableVm, VmError};
use std::time::{Duration, Instant};

/// Auto-converge (vCPU throttling) settings. Defaults are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoConverge {
    /// Throttle at all.
    pub enabled: bool,
    /// First throttle, percent.
    pub initial: u8,
    /// Added per unproductive streak, percent.
    pub increment: u8,
    /// Ceiling, percent.
    pub max: u8,
    /// A round is unproductive when the guest dirtied more than this percent
    /// of the bytes sent in the same interval.
    pub trigger_percent: u8,
    /// Unproductive rounds in a row before raising the throttle.
    pub unproductive_rounds: u32,
}

impl Default for AutoConverge {
    fn default() -> Self {
        AutoConverge {
            enabled: true,
            initial: 20,
            increment: 10,
            max: 99,
            trigger_percent: 50,
            unproductive_rounds: 2,
        }
    }
}

impl AutoConverge {
    /// Whether an interval in which the guest dirtied `dirty_bytes` while we
    /// sent `sent_bytes` made no headway.
    pub fn is_unproductive(&self, dirty_bytes: u64, sent_bytes: u64) -> bool {
        self.enabled
            && u128::from(dirty_bytes) * 100
                > u128::from(self.trigger_percent) * u128::from(sent_bytes)
    }

    /// The throttle after one more unproductive streak.
    pub fn next_throttle(&self, current: u8) -> u8 {
        let next = if current == 0 {
            self.initial
        } else {
            current.saturating_add(self.increment)
        };
        next.min(self.max)
    }
}

/// Source settings.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// This host's name (for messages).
    pub host: String,
    /// Longest acceptable pause of the guest (default 100 ms).
    pub downtime_target: Duration,
    /// Give up (cleanly) if not switched over by then (default 100 s).
    pub max_duration: Duration,
    /// Bytes per second, or unlimited.
    pub bandwidth_cap: Option<u64>,
    /// Throttling.
    pub auto_converge: AutoConverge,
    /// End-to-end per-run checksums (M8).
    pub page_checksum: bool,
    /// How long to wait for `Resumed` after `Complete` (default 30 s).
    pub ack_timeout: Duration,
    /// How long to wait for any other reply (default 30 s).
    pub reply_timeout: Duration,
    /// Longest a single write may block before the target counts as hung
    /// (default 10 s).
    pub write_timeout: Duration,
    /// Pages per `Pages` frame (default 256 = 1 MiB).
    pub pages_per_frame: u32,
    /// Protocol versions offered (tests override it).
    pub versions: (u16, u16),
    /// When data pages are LZ4-compressed (default: while a bandwidth cap
    /// applies).
    pub compress: Compression,
}

/// When the source compresses data pages (LZ4, if the target supports
/// it). Compression costs the source CPU time (a few hundred MB/s per core
/// on incompressible pages), so it only pays when the link is slower than
/// that: a capped migration, or a slow network (1 Gb/s carries ~117 MB/s).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// While a bandwidth cap applies (pre-copy rounds of a capped
    /// migration; the stunned round runs uncapped and uncompressed).
    #[default]
    Auto,
    /// Every round before the stun.
    On,
    /// Never.
    Off,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            host: "localhost".into(),
            downtime_target: Duration::from_millis(100),
            max_duration: Duration::from_secs(100),
            bandwidth_cap: None,
            auto_converge: AutoConverge::default(),
            page_checksum: false,
            ack_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            pages_per_frame: 256,
            versions: (protocol::VERSION_MIN, protocol::VERSION_MAX),
            compress: Compression::Auto,
        }
    }
}

/// Why a migration failed (the cause; [`Failed`] adds the stage).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target's pre-checks failed.
    #[error("pre-checks failed on the target: {}", join(.failures))]
    Precheck {
        /// Every failed check.
        failures: Vec<Failure>,
    },
    /// No common protocol version.
    #[error(transparent)]
    Version(VersionMismatch),
    /// The target refused a capability we require.
    #[error("the target does not accept {what}: enable it on the target or disable it here")]
    Capability {
        /// The capability.
        what: &'static str,
    },
    /// The stream broke or carried garbage.
    #[error("migration stream failed")]
    Protocol(#[source] ProtocolError),
    /// A VM operation failed.
    #[error("VM operation {op} failed")]
    Vm {
        /// The operation.
        op: &'static str,
        /// The VMM's error.
        #[source]
        source: VmError,
    },
    /// The target gave up.
    #[error("the target aborted ({stage}): {reason}")]
    TargetAborted {
        /// The target's stage.
        stage: String,
        /// Its reason.
        reason: String,
    },
    /// The user cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Not converged within the hard limit.
    #[error(
        "did not converge within {limit:?}: {remaining_pages} pages still dirty at throttle {throttle}%: \
         raise the limit, lower the guest's write rate or use a faster link"
    )]
    Timeout {
        /// The limit.
        limit: Duration,
        /// Pages still dirty.
        remaining_pages: u64,
        /// Throttle reached.
        throttle: u8,
    },
    /// The target did not answer in time.
    #[error("no {expected} from the target within {waited:?}")]
    NoReply {
        /// What we waited for.
        expected: &'static str,
        /// For how long.
        waited: Duration,
    },
    /// The target sent something out of place.
    #[error("the target sent {got} while we waited for {expected}")]
    Unexpected {
        /// What came.
        got: protocol::MessageType,
        /// What we waited for.
        expected: &'static str,
    },
}

fn join(f: &[Failure]) -> String {
    f.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A failed migration: the stage, the cause, and whether the source VM runs
/// again.
#[derive(Debug, thiserror::Error)]
#[error("migration failed at {stage}{}{}",
    .resume_error.as_ref().map(|e| format!(" and the source VM could not be resumed: {e}")).unwrap_or_default(),
    .lease.as_deref().map(ToString::to_string).unwrap_or_default())]
pub struct Failed {
    /// Stage the failure happened in.
    pub stage: Stage,
    /// The cause.
    #[source]
    pub error: Error,
    /// Set if resuming the source failed too (the VM is stopped).
    pub resume_error: Option<String>,
    /// What became of the VM's lease when it had been sent (`None`: the
    /// lease stays here, or there is none).
    pub lease: Option<Box<LeaseAfterFailure>>,
}

/// A lease sent to the target before the migration failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAfterFailure {
    /// The target won its next generation: the guest runs there (only the
    /// ack was lost). The source must stop without resuming or writing
    /// anything.
    TargetHolds(String),
    /// Its next generation could not be claimed either way: the source VM
    /// stays paused, lease-suspended.
    Suspended(String),
}

impl std::fmt::Display for LeaseAfterFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseAfterFailure::TargetHolds(w) => {
                write!(f, " but the guest runs on the target ({w})")
            }
            LeaseAfterFailure::Suspended(e) => write!(
                f,
                " and the lease's next holder is undecided ({e}): the VM stays paused here, \
                 lease-suspended"
            ),
        }
    }
}

impl Failed {
    /// The whole chain on one line, for logs and CLIs.
    pub fn report(&self) -> String {
        format!("{self}: {}", crate::error_chain(&self.error))
    }

    /// Why the target holds the lease, if it won it (the guest runs there).
    pub fn target_holds_lease(&self) -> Option<&str> {
        match self.lease.as_deref() {
            Some(LeaseAfterFailure::TargetHolds(w)) => Some(w),
            _ => None,
        }
    }

    /// Why the lease's next holder is undecided, if it is (the VM stays
    /// paused here, lease-suspended).
    pub fn lease_suspended(&self) -> Option<&str> {
        match self.lease.as_deref() {
            Some(LeaseAfterFailure::Suspended(e)) => Some(e),
            _ => None,
        }
    }
}

/// Migrates `vm` over `chan` to a target running [`crate::target::receive`].
/// Calls `progress` at each step. On success the target runs the guest and
/// the caller should destroy the source VM; on failure the source VM runs.
pub fn migrate<V: MigratableVm, C: Channel>(
    vm: &mut V,
    chan: C,
    opts: &SourceOptions,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary, Failed> {
    let mut s = Source {
        vm,
        chan,
        enc: Encoder::new(),
        dec: Decoder::new(),
        opts,
        cancel,
        progress,
        stage: Stage::Connect,
        percent: 0,
        start: Instant::now(),
        bytes: 0,
        paced: Instant::now(),
        paced_bytes: 0,
        throttle: 0,
        max_throttle: 0,
        paused: false,
        logging: false,
        caps: 0,
        data_pages: 0,
        zero_pages: 0,
        runs: 0,
        dirty_rate: 0.0,
        bandwidth: 0.0,
        acked: None,
        remaining: 0,
        expected: Duration::ZERO,
        last_report: None,
        scratch: Vec::new(),
        frame: PagesFrame::new(),
        lease: LeaseStep::None,
    };
    match s.run() {
        Ok(summary) => Ok(summary),
        Err(error) => Err(s.fail(error)),
    }
}

struct Source<'a, V, C> {
    vm: &'a mut V,
    chan: C,
    enc: Encoder,
    dec: Decoder,
    opts: &'a SourceOptions,
    cancel: &'a CancelToken,
    progress: &'a mut dyn FnMut(&Progress),
    stage: Stage,
    percent: u8,
    start: Instant,
    bytes: u64,
    paced: Instant,
    paced_bytes: u64,
    throttle: u8,
    max_throttle: u8,
    paused: bool,
    logging: bool,
    caps: u32,
    data_pages: u64,
    zero_pages: u64,
    runs: u64,
    dirty_rate: f64,
    bandwidth: f64,
    /// Highest round the target acknowledged (capability ROUND_ACK).
    acked: Option<u32>,
    remaining: u64,
    expected: Duration,
    last_report: Option<Instant>,
    /// Pages read from the VM, reused from run to run.
    scratch: Vec<u8>,
    /// The `Pages` frame being built, reused from frame to frame.
    frame: PagesFrame,
    /// Where the VM's lease handoff stands.
    lease: LeaseStep,
}

/// The source's side of a lease handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseStep {
    /// Renewing as usual (or no lease).
    None,
    /// Renewals stopped for the switchover; not sent yet.
    Stopped,
    /// Sent with the final state: only the claim of G+1 decides.
    Sent,
}

fn vm_err(op: &'static str) -> impl FnOnce(VmError) -> Error {
    move |source| Error::Vm { op, source }
}

impl<V: MigratableVm, C: Channel> Source<'_, V, C> {
    fn report(&mut self, force: bool) {
        let now = Instant::now();
        if !force
            && self
                .last_report
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last_report = Some(now);
        let p = Progress {
            stage: self.stage,
            percent: self.percent,
            bytes_sent: self.bytes,
            dirty_pages_per_sec: self.dirty_rate,
            bandwidth: self.bandwidth,
            remaining_pages: self.remaining,
            expected_downtime: self.expected,
            throttle: self.throttle,
        };
        (self.progress)(&p);
    }

    fn enter(&mut self, stage: Stage, percent: u8) -> Result<(), Error> {
        self.stage = stage;
        self.percent = percent;
        tracing::info!(stage = %stage, percent, "migration stage");
        self.report(true);
        self.check_cancel()
    }

    fn check_cancel(&self) -> Result<(), Error> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    fn send(&mut self, msg: &Message) -> Result<(), Error> {
        let r = self.enc.send(&mut self.chan, msg);
        self.sent(r)
    }

    /// Accounts for a frame written (and paces), or turns a failed write
    /// into the target's reason if it sent one.
    fn sent(&mut self, r: Result<usize, ProtocolError>) -> Result<(), Error> {
        match r {
            Ok(n) => {
                self.bytes += n as u64;
                self.pace(n as u64)
            }
            // The target may have closed after telling us why.
            Err(e @ ProtocolError::Io(_)) => match self.recv(Duration::from_millis(200)) {
                Err(abort @ Error::TargetAborted { .. }) => Err(abort),
                _ => Err(Error::Protocol(e)),
            },
            Err(e) => Err(Error::Protocol(e)),
        }
    }

    fn pace(&mut self, n: u64) -> Result<(), Error> {
        // Once the guest is paused the cap no longer applies: every
        // millisecond of the last round is downtime (QEMU lifts its rate
        // limit at the same point).
        if self.paused {
            return Ok(());
        }
        let Some(cap) = self.opts.bandwidth_cap.filter(|c| *c > 0) else {
            return Ok(());
        };
        self.paced_bytes += n;
        let due = Duration::from_secs_f64(self.paced_bytes as f64 / cap as f64);
        while self.paced.elapsed() < due {
            self.check_cancel()?;
            std::thread::sleep((due - self.paced.elapsed()).min(Duration::from_millis(20)));
        }
        Ok(())
    }

    /// The next message within `wait`, `Ok(None)` on timeout. An `Abort`
    /// from the target becomes [`Error::TargetAborted`].
    fn recv(&mut self, wait: Duration) -> Result<Option<Message>, Error> {
        let t = wait.clamp(Duration::from_millis(1), Duration::from_millis(50));
        self.chan
            .set_read_timeout(Some(t))
            .map_err(|e| Error::Protocol(ProtocolError::Io(e)))?;
        let deadline = Instant::now() + wait;
        loop {
            match protocol::read_message(&mut self.chan, &mut self.dec).map_err(Error::Protocol)? {
                Some(Message::Abort(Abort { stage, reason })) => {
                    return Err(Error::TargetAborted { stage, reason })
                }
                Some(m) => return Ok(Some(m)),
                None if Instant::now() >= deadline => return Ok(None),
                None => {}
            }
        }
    }

    /// Waits for a reply, honouring cancel.
    fn reply(&mut self, expected: &'static str) -> Result<Message, Error> {
        let deadline = Instant::now() + self.opts.reply_timeout;
        loop {
            self.check_cancel()?;
            if let Some(m) = self.recv(Duration::from_millis(50))? {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(Error::NoReply {
                    expected,
                    waited: self.opts.reply_timeout,
                });
            }
        }
    }

    fn run(&mut self) -> Result<Summary, Error> {
        let facts = self.vm.facts();
        if facts.priority == Priority::High {
            // Reserve first (M6): the buffers this side needs are
            // allocated and written before anything is sent, so a host
            // short of memory fails here, not mid-stream.
            let pages = self.opts.pages_per_frame.max(1);
            self.scratch.resize(pages as usize * PAGE_SIZE, 0);
            // Frames carry up to two frames' worth of data pages (see
            // `send_round`).
            self.frame.commit(pages * 2);
        }
        self.enter(Stage::Connect, 0)?;
        self.chan
            .set_write_timeout(Some(self.opts.write_timeout))
            .map_err(|e| Error::Protocol(ProtocolError::Io(e)))?;
        let mut wanted = caps::ZERO_PAGES | caps::ROUND_ACK;
        if self.opts.compress != Compression::Off {
            wanted |= caps::LZ4;
        }
        if self.opts.page_checksum {
            wanted |= caps::PAGE_CHECKSUM;
        }
        if facts.lease.is_some() {
            wanted |= caps::LEASE_HANDOFF;
        }
        let mut ours = Hello::ours(&self.opts.host, wanted);
        (ours.version_min, ours.version_max) = self.opts.versions;
        self.send(&Message::Hello(ours.clone()))?;
        let theirs = match self.reply("Hello")? {
            Message::Hello(h) => h,
            m => return Err(unexpected(&m, "Hello")),
        };
        let version = protocol::negotiate(&ours, &theirs).map_err(Error::Version)?;
        self.caps = wanted & theirs.capabilities;
        if self.opts.page_checksum && self.caps & caps::PAGE_CHECKSUM == 0 {
            return Err(Error::Capability {
                what: "end-to-end page checksums",
            });
        }
        tracing::info!(version, peer = %theirs.host, "migration connected");

        self.enter(Stage::Precheck, 5)?;
        if let Some(l) = &facts.lease {
            if self.caps & caps::LEASE_HANDOFF == 0 {
                // A target that cannot take the lease over never sees it.
                return Err(Error::Precheck {
                    failures: vec![crate::precheck::lease_refusal(&facts, l, &theirs.host)],
                });
            }
        }
        self.send(&Message::Precheck(facts))?;
        match self.reply("PrecheckResult")? {
            Message::PrecheckResult(f) if f.is_empty() => {}
            Message::PrecheckResult(failures) => return Err(Error::Precheck { failures }),
            m => return Err(unexpected(&m, "PrecheckResult")),
        }
        let layout = self.vm.memory_layout();
        self.send(&Message::MemoryLayout(layout.clone()))?;

        self.enter(Stage::Precopy { round: 0 }, 10)?;
        self.vm
            .start_dirty_log()
            .map_err(vm_err("start_dirty_log"))?;
        self.logging = true;
        let mut all = DirtyBitmap::new(&layout);
        for r in &layout {
            all.set_range(r.gpa, (r.size / PAGE_SIZE as u64) as u32);
        }
        let total_pages = all.total_pages().max(1);
        let mut taken = Instant::now();
        let cpu0 = crate::thread_cpu();
        let pages0 = self.data_pages;
        let mut moved_since = self.data_pages + self.zero_pages;
        let (mut last_bytes, mut last_time) = self.send_round(&all, 0, Some(total_pages))?;
        // Bytes of data pages moved, whatever they cost on the wire.
        let mut last_raw = (self.data_pages - pages0) * PAGE_SIZE as u64;
        let mut all_raw = last_raw;
        tracing::info!(
            bytes = last_bytes,
            wall_ms = last_time.as_millis() as u64,
            cpu_ms = (crate::thread_cpu() - cpu0).as_millis() as u64,
            "first pass sent"
        );
        let (mut all_bytes, mut all_time) = (last_bytes, last_time);
        let (first_pass_bytes, first_pass) = (last_bytes, last_time);

        let mut round = 0;
        let mut unproductive = 0;
        let mut carried: Option<DirtyBitmap> = None;
        let pending = loop {
            round += 1;
            let mut dirty = self.vm.take_dirty().map_err(vm_err("take_dirty"))?;
            if let Some(c) = carried.take() {
                dirty.merge(&c);
            }
            let n = dirty.count();
            let interval = taken.elapsed().as_secs_f64().max(1e-6);
            taken = Instant::now();
            let moved = self.data_pages + self.zero_pages;
            let interval_moved = (moved - moved_since) * PAGE_SIZE as u64;
            moved_since = moved;
            // How fast the stunned round will go: at the wire's rate, or,
            // if it is compressed too, at the rate pages were moved. The
            // last round is the best estimate unless it was too small to
            // measure; then the whole pre-copy so far.
            let (last_b, all_b) = if self.stun_compressed() {
                (last_raw, all_raw)
            } else {
                (last_bytes, all_bytes)
            };
            self.bandwidth = if last_b >= 1 << 20 {
                last_b as f64 / last_time.as_secs_f64().max(1e-6)
            } else {
                all_b as f64 / all_time.as_secs_f64().max(1e-6)
            };
            self.dirty_rate = n as f64 / interval;
            self.remaining = n;
            let dirty_bytes = n * PAGE_SIZE as u64;
            self.expected = Duration::from_secs_f64(dirty_bytes as f64 / self.bandwidth.max(1.0));
            if self.expected <= self.opts.downtime_target {
                if !self.caught_up(round - 1) {
                    // What was sent is still in flight or being written on
                    // the target: stunning now would make that downtime.
                    // Wait with the guest running, then look again at what
                    // it dirtied meanwhile (this round is not sent yet).
                    self.wait_caught_up(round - 1)?;
                    carried = Some(dirty);
                    round -= 1;
                    continue;
                }
                break dirty;
            }
            if self.start.elapsed() > self.opts.max_duration {
                return Err(self.timeout());
            }
            self.enter(Stage::Precopy { round }, (70 + 2 * round.min(9)) as u8)?;
            let ac = &self.opts.auto_converge;
            // Pages dirtied against pages moved, as bytes of pages (the
            // wire's bytes would make compressed and zero pages look like
            // no progress).
            if ac.is_unproductive(dirty_bytes, interval_moved) {
                unproductive += 1;
                if unproductive >= ac.unproductive_rounds {
                    unproductive = 0;
                    let next = ac.next_throttle(self.throttle);
                    self.set_throttle(next);
                }
            } else {
                unproductive = 0;
            }
            let pages0 = self.data_pages;
            (last_bytes, last_time) = self.send_round(&dirty, round, None)?;
            last_raw = (self.data_pages - pages0) * PAGE_SIZE as u64;
            all_raw += last_raw;
            all_bytes += last_bytes;
            all_time += last_time;
            self.poll_target()?;
        };

        self.enter(Stage::Stun, 90)?;
        let stunned = Instant::now();
        self.vm.pause().map_err(vm_err("pause"))?;
        self.paused = true;
        self.vm
            .quiesce_devices()
            .map_err(vm_err("quiesce_devices"))?;
        // No guest disk write can be issued now: the lease's renewals stop
        // here and the lease goes to the target with the final state.
        self.lease = LeaseStep::Stopped;
        let lease = self.vm.stop_lease().map_err(vm_err("stop_lease"))?;
        if lease.is_none() {
            self.lease = LeaseStep::None;
        }
        let mut last = pending;
        last.merge(&self.vm.take_dirty().map_err(vm_err("take_dirty"))?);
        let last_round_pages = last.count();
        let t_paused = stunned.elapsed();
        // `round` is the round whose dirty set was taken but not yet sent.
        self.send_round(&last, round, None)?;
        let t_sent = stunned.elapsed();

        self.enter(Stage::Switchover, 95)?;
        let state = self.vm.save_state().map_err(vm_err("save_state"))?;
        let t_state = stunned.elapsed();
        let state_len = state.len();
        self.send(&Message::State(state))?;
        self.check_cancel()?;
        if lease.is_some() {
            // From the first byte of `Complete` on, the target may hold it.
            self.vm.lease_sent();
            self.lease = LeaseStep::Sent;
        }
        self.send(&Message::Complete(Complete {
            rounds: round + 1,
            runs: self.runs,
            lease,
        }))?;
        let t_complete = stunned.elapsed();
        self.wait_resumed()?;
        if self.lease == LeaseStep::Sent {
            self.vm.lease_gone();
            self.lease = LeaseStep::None;
        }
        let downtime = stunned.elapsed();
        tracing::info!(
            paused_us = t_paused.as_micros() as u64,
            last_round_sent_us = t_sent.as_micros() as u64,
            state_captured_us = t_state.as_micros() as u64,
            complete_sent_us = t_complete.as_micros() as u64,
            resumed_us = downtime.as_micros() as u64,
            last_round_pages,
            state_len,
            "switchover timing (from the pause)"
        );
        self.vm.stop_dirty_log();
        self.logging = false;
        self.percent = 100;
        self.stage = Stage::Done;
        self.remaining = 0;
        self.report(true);
        let summary = Summary {
            total: self.start.elapsed(),
            downtime,
            downtime_sent: t_complete,
            bytes_sent: self.bytes,
            rounds: round + 1,
            data_pages: self.data_pages,
            zero_pages: self.zero_pages,
            max_throttle: self.max_throttle,
            last_round_pages,
            first_pass_bytes,
            first_pass,
        };
        tracing::info!(?summary, "migration done");
        Ok(summary)
    }

    fn timeout(&self) -> Error {
        Error::Timeout {
            limit: self.opts.max_duration,
            remaining_pages: self.remaining,
            throttle: self.throttle,
        }
    }

    fn set_throttle(&mut self, percent: u8) {
        if percent != self.throttle {
            tracing::info!(throttle = percent, "auto-converge: throttling vCPUs");
            self.vm.set_throttle(percent);
            self.throttle = percent;
            self.max_throttle = self.max_throttle.max(percent);
        }
    }

    /// Picks up an `Abort` the target sent while we were streaming.
    fn poll_target(&mut self) -> Result<(), Error> {
        while let Some(m) = self.recv(Duration::from_millis(1))? {
            match m {
                Message::RoundDone(n) => self.note_done(n),
                m => return Err(unexpected(&m, "RoundDone during pre-copy")),
            }
        }
        Ok(())
    }

    fn note_done(&mut self, n: u32) {
        self.acked = Some(self.acked.map_or(n, |a| a.max(n)));
    }

    /// Whether the target has round `n` in guest memory (always, if it
    /// does not acknowledge rounds).
    fn caught_up(&self, n: u32) -> bool {
        self.caps & caps::ROUND_ACK == 0 || self.acked.is_some_and(|a| a >= n)
    }

    /// Waits, the guest running, until the target acknowledges round `n`.
    fn wait_caught_up(&mut self, n: u32) -> Result<(), Error> {
        let t0 = Instant::now();
        while !self.caught_up(n) {
            self.check_cancel()?;
            if self.start.elapsed() > self.opts.max_duration {
                return Err(self.timeout());
            }
            match self.recv(Duration::from_millis(20))? {
                Some(Message::RoundDone(d)) => self.note_done(d),
                Some(m) => return Err(unexpected(&m, "RoundDone")),
                None => {}
            }
        }
        tracing::debug!(
            round = n,
            waited_us = t0.elapsed().as_micros() as u64,
            "target caught up"
        );
        Ok(())
    }

    /// After `Complete`: `Resumed` is success. A cancel now is forwarded;
    /// if the target already started, it still answers `Resumed`.
    fn wait_resumed(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + self.opts.ack_timeout;
        let mut cancel_sent = false;
        loop {
            if self.cancel.is_cancelled() && !cancel_sent {
                self.send(&Message::Cancel)?;
                cancel_sent = true;
            }
            match self.recv(Duration::from_millis(50)) {
                Ok(Some(Message::Resumed)) => return Ok(()),
                // The stunned round's acknowledgement.
                Ok(Some(Message::RoundDone(_))) => {}
                Ok(Some(m)) => return Err(unexpected(&m, "Resumed")),
                Ok(None) if Instant::now() >= deadline => {
                    return Err(Error::NoReply {
                        expected: "Resumed",
                        waited: self.opts.ack_timeout,
                    })
                }
                Ok(None) => {}
                Err(Error::TargetAborted { .. }) if cancel_sent => return Err(Error::Cancelled),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends every page marked in `pages`; returns bytes sent and time
    /// taken. `full` is the page total when this round's progress is the
    /// percentage shown (round 0).
    ///
    /// Pages are read in runs of up to `pages_per_frame` into one scratch
    /// buffer (pages the VM knows are zero are not read at all), and data
    /// runs are copied once more, into the frame, which is built in place
    /// ([`PagesFrame`]). A frame carries up to `pages_per_frame` pages of
    /// data and any number of zero runs (up to [`MAX_RUNS_PER_FRAME`]), so
    /// an idle guest's untouched memory costs a few frames, not one per
    /// MiB.
    fn send_round(
        &mut self,
        pages: &DirtyBitmap,
        round: u32,
        full: Option<u64>,
    ) -> Result<(u64, Duration), Error> {
        let t0 = Instant::now();
        let b0 = self.bytes;
        let max = self.opts.pages_per_frame.max(1);
        let zero_ok = self.caps & caps::ZERO_PAGES != 0;
        let checksums = self.caps & caps::PAGE_CHECKSUM != 0;
        let lz4 = self.compressing();
        // Pages are read into the frame itself, or, to be compressed, into
        // a scratch buffer first.
        let mut scratch = std::mem::take(&mut self.scratch);
        if lz4 {
            scratch.resize(max as usize * PAGE_SIZE, 0);
        }
        let mut zero = vec![false; max as usize];
        let mut frame = std::mem::take(&mut self.frame);
        frame.begin(round);
        let mut done = 0u64;
        for (gpa, n) in pages.runs(max) {
            let n_us = n as usize;
            if !lz4 {
                // Read straight into the frame. A frame holds up to
                // `max` data pages before this read, 2 x `max` after it.
                if frame.data_pages() >= max || frame.runs() + n > MAX_RUNS_PER_FRAME {
                    self.flush(&mut frame, round)?;
                }
                let bytes = frame.read_area(n_us);
                self.vm
                    .read_pages_sparse(gpa, bytes, &mut zero[..n_us])
                    .map_err(vm_err("read_pages"))?;
                mark_zero(&mut zero[..n_us], bytes, zero_ok);
                let (d, z, r) = frame.finish_read(gpa, &zero[..n_us], checksums);
                self.data_pages += u64::from(d);
                self.zero_pages += u64::from(z);
                self.runs += u64::from(r);
                done += u64::from(n);
                if let Some(total) = full {
                    self.percent = (10 + done * 60 / total) as u8;
                    self.remaining = total - done;
                }
                continue;
            }
            let bytes = &mut scratch[..n_us * PAGE_SIZE];
            self.vm
                .read_pages_sparse(gpa, bytes, &mut zero[..n_us])
                .map_err(vm_err("read_pages"))?;
            mark_zero(&mut zero[..n_us], bytes, zero_ok);
            let mut i = 0;
            while i < n_us {
                let z = zero[i];
                let mut j = i + 1;
                while j < n_us && zero[j] == z {
                    j += 1;
                }
                let count = (j - i) as u32;
                let at = gpa + (i * PAGE_SIZE) as u64;
                if frame.runs() >= MAX_RUNS_PER_FRAME || (!z && frame.data_pages() + count > max) {
                    self.flush(&mut frame, round)?;
                }
                if z {
                    self.zero_pages += u64::from(count);
                    frame.push_zero(at, count);
                } else {
                    let data = &bytes[i * PAGE_SIZE..j * PAGE_SIZE];
                    let checksum = if checksums { crc32c::crc32c(data) } else { 0 };
                    self.data_pages += u64::from(count);
                    frame.push_data_lz4(at, data, checksum);
                }
                self.runs += 1;
                i = j;
            }
            done += u64::from(n);
            if let Some(total) = full {
                self.percent = (10 + done * 60 / total) as u8;
                self.remaining = total - done;
            }
        }
        self.flush(&mut frame, round)?;
        self.scratch = scratch;
        self.frame = frame;
        self.send(&Message::RoundEnd(round))?;
        Ok((self.bytes - b0, t0.elapsed()))
    }

    /// Whether data pages go out compressed now: the target must support
    /// it, and the guest must still run (the stunned round is sent at full
    /// speed, where compressing would only lengthen the downtime).
    fn compressing(&self) -> bool {
        if self.caps & caps::LZ4 == 0 {
            return false;
        }
        match self.opts.compress {
            Compression::Auto => !self.paused && self.opts.bandwidth_cap.is_some_and(|c| c > 0),
            Compression::On => true,
            Compression::Off => false,
        }
    }

    /// Whether the stunned round is compressed too (`on`: the user says
    /// the link is slow, so compressing shortens the downtime as well).
    fn stun_compressed(&self) -> bool {
        self.caps & caps::LZ4 != 0 && self.opts.compress == Compression::On
    }

    /// Sends `frame` if it holds any run, and starts the next one.
    fn flush(&mut self, frame: &mut PagesFrame, round: u32) -> Result<(), Error> {
        if frame.runs() == 0 {
            return Ok(());
        }
        self.check_cancel()?;
        if self.start.elapsed() > self.opts.max_duration {
            return Err(self.timeout());
        }
        let r = self.enc.send_pages(&mut self.chan, frame);
        self.sent(r)?;
        frame.begin(round);
        self.report(false);
        Ok(())
    }

    /// Undo everything so the guest runs on the source as before.
    fn fail(&mut self, error: Error) -> Failed {
        let stage = self.stage;
        tracing::warn!(stage = %stage, error = %error, "migration failed, resuming the source");
        // Tell the target, briefly: it may be gone or not reading.
        let _ = self.chan.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = self
            .chan
            .set_write_timeout(Some(Duration::from_millis(500)));
        let note = match &error {
            Error::Cancelled => Some(Message::Cancel),
            Error::Protocol(ProtocolError::Io(_)) | Error::TargetAborted { .. } => None,
            e => Some(Message::Abort(Abort {
                stage: stage.to_string(),
                reason: crate::error_chain(e),
            })),
        };
        if let Some(m) = note {
            let _ = self.enc.send(&mut self.chan, &m);
        }
        self.chan.shutdown();
        if self.throttle != 0 {
            self.vm.set_throttle(0);
            self.throttle = 0;
        }
        if self.logging {
            self.vm.stop_dirty_log();
            self.logging = false;
        }
        // The lease first: whether the guest may run here again.
        let mut lease_after = None;
        match self.lease {
            LeaseStep::None => {}
            LeaseStep::Stopped => self.vm.keep_lease(),
            LeaseStep::Sent => match self.vm.race_lease() {
                LeaseRace::Won => {
                    tracing::warn!("the lease's next generation is ours: the guest resumes here");
                }
                LeaseRace::Lost(why) => {
                    tracing::warn!(%why, "the target holds the lease: the guest runs there; not resuming here");
                    lease_after = Some(LeaseAfterFailure::TargetHolds(why));
                }
                LeaseRace::Unknown(e) => {
                    tracing::error!(error = %e, "cannot claim the lease's next generation: the guest stays paused, lease-suspended");
                    lease_after = Some(LeaseAfterFailure::Suspended(e));
                }
            },
        }
        self.lease = LeaseStep::None;
        let mut resume_error = None;
        if self.paused && lease_after.is_none() {
            match self.vm.resume() {
                Ok(()) => self.paused = false,
                Err(e) => resume_error = Some(e.to_string()),
            }
        }
        self.stage = Stage::Failed;
        self.report(true);
        let f = Failed {
            stage,
            error,
            resume_error,
            lease: lease_after.map(Box::new),
        };
        tracing::warn!(report = %f.report(), "migration failed");
        f
    }
}

fn unexpected(m: &Message, expected: &'static str) -> Error {
    Error::Unexpected {
        got: m.kind(),
        expected,
    }
}

/// Whether a page is all zero. Each 64-byte block is OR-ed as eight words
/// (which the compiler vectorises) before the test, so a zero page costs
/// 64 branches rather than 512.
/// Completes the zero flags of pages just read (`zero` comes set for pages
/// never touched, left unread): a page read as all zero is one too. If the
/// target does not take zero announcements, unread pages are zero-filled
/// and sent as data instead.
fn mark_zero(zero: &mut [bool], bytes: &mut [u8], zero_ok: bool) {
    for (z, page) in zero.iter_mut().zip(bytes.chunks_exact_mut(PAGE_SIZE)) {
        if zero_ok {
            *z = *z || is_zero(page);
        } else if *z {
            page.fill(0);
            *z = false;
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks(64).all(|block| {
        block
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .fold(0, |acc, w| acc | w)
            == 0
    })
}

/// Runs (zero or data) in one `Pages` frame at most: bounds the frame of an
/// idle guest's memory, whose runs carry no data (20 bytes each).
const MAX_RUNS_PER_FRAME: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_like_qemu() {
        let ac = AutoConverge::default();
        let mut t = 0;
        let mut steps = Vec::new();
        for _ in 0..10 {
            t = ac.next_throttle(t);
            steps.push(t);
        }
        assert_eq!(steps, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
    }

    #[test]
    fn unproductive_when_dirtying_over_half_of_what_was_sent() {
        let ac = AutoConverge::default();
        assert!(!ac.is_unproductive(50, 100));
        assert!(ac.is_unproductive(51, 100));
        assert!(ac.is_unproductive(1, 0));
        assert!(ac.is_unproductive(u64::MAX, u64::MAX), "no overflow");
        assert!(!ac.is_unproductive(u64::MAX / 2, u64::MAX), "no overflow");
        let off = AutoConverge {
            enabled: false,
            ..ac
        };
        assert!(!off.is_unproductive(1000, 1));
    }
}
