//! The target side: receive a VM, check everything, start it only if the
//! whole stream arrived intact.
//!
//! The target answers `Hello` (or `Abort` with the version advice), runs the
//! pre-checks on the source's facts, creates a paused VM shell once the
//! layout arrives, and writes pages as they come. Before starting the guest
//! it insists on: every frame's CRC and sequence number (the decoder), page
//! runs inside the announced layout, rounds in order, every page of the
//! layout received at least once, a state blob, and a `Complete` whose
//! counts match what arrived. In checksum mode every data run is read back
//! from the VM's memory after writing and compared with the source's CRC.
//! On any failure it sends `Abort` with the reason and drops the VM (its
//! memory is freed; the guest never ran here).

use crate::precheck::{self, VmFacts};
use crate::progress::CancelToken;
use crate::protocol::{
    self, caps, Abort, Decoder, Encoder, Hello, Message, MessageType, ProtocolError, RawFrame,
    Region, VersionMismatch, PAGE_SIZE,
};
use crate::transport::Channel;
use crate::vm::{DirtyBitmap, IncomingVm, TargetHost, VmError};
use std::time::{Duration, Instant};

/// Target settings.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// This host's name (for messages).
    pub host: String,
    /// Capabilities this host accepts ([`caps::ALL`] by default).
    pub capabilities: u32,
    /// Give up if the source sends nothing for this long (default 30 s).
    pub idle_timeout: Duration,
    /// Protocol versions spoken (tests override it).
    pub versions: (u16, u16),
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            host: "localhost".into(),
            capabilities: caps::ALL,
            idle_timeout: Duration::from_secs(30),
            versions: (protocol::VERSION_MIN, protocol::VERSION_MAX),
        }
    }
}

/// Why receiving failed. The guest was not started in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream broke or was corrupted.
    #[error("migration stream failed")]
    Protocol(#[source] ProtocolError),
    /// No common version.
    #[error(transparent)]
    Version(VersionMismatch),
    /// Our pre-checks refused the VM.
    #[error("pre-checks failed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Precheck(Vec<precheck::Failure>),
    /// The source broke a protocol rule.
    #[error("source violated the protocol: {0}")]
    Violation(String),
    /// A page failed its end-to-end checksum.
    #[error("pages at {gpa:#x} (+{pages}) differ from the source after writing (checksum {found:#010x}, source {expected:#010x})")]
    PageChecksum {
        /// First page.
        gpa: u64,
        /// Pages in the run.
        pages: u32,
        /// What we read back.
        found: u32,
        /// What the source sent.
        expected: u32,
    },
    /// A VM operation failed.
    #[error("VM operation {op} failed")]
    Vm {
        /// Operation.
        op: &'static str,
        /// The VMM's error.
        #[source]
        source: VmError,
    },
    /// The source gave up.
    #[error("the source aborted ({stage}): {reason}")]
    SourceAborted {
        /// Its stage.
        stage: String,
        /// Its reason.
        reason: String,
    },
    /// The source's user cancelled.
    #[error("the source cancelled the migration")]
    Cancelled,
    /// Cancelled on this side.
    #[error("cancelled on the target")]
    LocalCancel,
    /// Nothing arrived for too long.
    #[error("no data from the source for {0:?}")]
    Idle(Duration),
}

/// What the target received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// VM name.
    pub name: String,
    /// Rounds, the stunned one included.
    pub rounds: u32,
    /// Pages written with data (all rounds).
    pub data_pages: u64,
    /// Pages zeroed by announcement.
    pub zero_pages: u64,
}

/// Receives one VM over `chan`, creating it through `host`. On success the
/// VM runs here and is returned with what arrived.
pub fn receive<H: TargetHost, C: Channel>(
    host: &mut H,
    chan: C,
    opts: &TargetOptions,
    cancel: &CancelToken,
) -> Result<(H::Vm, Received), Error> {
    let mut t = Target {
        chan,
        enc: Encoder::new(),
        dec: Decoder::new(),
        opts,
        cancel,
        stage: "connect",
    };
    match t.run(host) {
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::warn!(stage = t.stage, error = %e, "incoming migration failed; the guest was not started");
            let tell = !matches!(
                e,
                Error::SourceAborted { .. }
                    | Error::Cancelled
                    | Error::Protocol(ProtocolError::Io(_))
            );
            if tell || matches!(e, Error::Cancelled) {
                let _ = t.chan.set_read_timeout(Some(Duration::from_millis(100)));
                let _ = t.chan.set_write_timeout(Some(Duration::from_millis(500)));
                let _ = t.enc.send(
                    &mut t.chan,
                    &Message::Abort(Abort {
                        stage: t.stage.to_string(),
                        reason: crate::error_chain(&e),
                    }),
                );
            }
            t.chan.shutdown();
            Err(e)
        }
    }
}

struct Target<'a, C> {
    chan: C,
    enc: Encoder,
    dec: Decoder,
    opts: &'a TargetOptions,
    cancel: &'a CancelToken,
    stage: &'static str,
}

fn vm_err(op: &'static str) -> impl FnOnce(VmError) -> Error {
    move |source| Error::Vm { op, source }
}

impl<C: Channel> Target<'_, C> {
    fn send(&mut self, m: &Message) -> Result<(), Error> {
        self.enc
            .send(&mut self.chan, m)
            .map(|_| ())
            .map_err(Error::Protocol)
    }

    fn recv(&mut self) -> Result<Message, Error> {
        let frame = self.recv_frame()?;
        frame.decode().map_err(Error::Protocol)
    }

    /// The next frame, checked, its payload still in the decoder (a
    /// `Pages` frame is written to guest memory from there). An `Abort` or
    /// `Cancel` from the source becomes the error it means.
    fn recv_frame(&mut self) -> Result<RawFrame<'_>, Error> {
        self.chan
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| Error::Protocol(ProtocolError::Io(e)))?;
        let mut last = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return Err(Error::LocalCancel);
            }
            let before = self.dec.received();
            if protocol::poll_frame(&mut self.chan, &mut self.dec).map_err(Error::Protocol)? {
                break;
            }
            if self.dec.received() != before {
                last = Instant::now();
            } else if last.elapsed() >= self.opts.idle_timeout {
                return Err(Error::Idle(self.opts.idle_timeout));
            }
        }
        let frame = self
            .dec
            .next_frame()
            .map_err(Error::Protocol)?
            .ok_or_else(|| Error::Violation("a whole frame vanished from the buffer".into()))?;
        match frame.kind {
            MessageType::Abort | MessageType::Cancel => match frame.decode() {
                Ok(Message::Abort(Abort { stage, reason })) => {
                    Err(Error::SourceAborted { stage, reason })
                }
                Ok(_) => Err(Error::Cancelled),
                Err(e) => Err(Error::Protocol(e)),
            },
            _ => Ok(frame),
        }
    }

    fn run<H: TargetHost>(&mut self, host: &mut H) -> Result<(H::Vm, Received), Error> {
        let theirs = match self.recv()? {
            Message::Hello(h) => h,
            m => return Err(violation(&m, "Hello")),
        };
        let mut ours = Hello::ours(
            &self.opts.host,
            self.opts.capabilities & theirs.capabilities,
        );
        (ours.version_min, ours.version_max) = self.opts.versions;
        // Our hello goes out even when the versions do not meet, so the
        // source can tell its user which side to upgrade.
        let checksums = ours.capabilities & caps::PAGE_CHECKSUM != 0;
        self.send(&Message::Hello(ours.clone()))?;
        protocol::negotiate(&ours, &theirs).map_err(Error::Version)?;

        self.stage = "precheck";
        let facts: VmFacts = match self.recv()? {
            Message::Precheck(f) => f,
            m => return Err(violation(&m, "Precheck")),
        };
        let failures = precheck::check_all(&facts, &host.host_facts(&facts));
        self.send(&Message::PrecheckResult(failures.clone()))?;
        if !failures.is_empty() {
            return Err(Error::Precheck(failures));
        }

        let layout = match self.recv()? {
            Message::MemoryLayout(l) => l,
            m => return Err(violation(&m, "MemoryLayout")),
        };
        check_layout(&layout, facts.memory_mib)?;
        let mut vm = host
            .create_vm(&facts, &layout)
            .map_err(vm_err("create_vm"))?;
        tracing::info!(vm = %facts.name, "receiving memory");

        self.stage = "precopy";
        let mut seen = DirtyBitmap::new(&layout);
        let fresh_zero = vm.fresh_memory_is_zero();
        let mut got = Received {
            name: facts.name.clone(),
            rounds: 0,
            data_pages: 0,
            zero_pages: 0,
        };
        let mut runs = 0u64;
        let mut state = None;
        let complete = loop {
            let frame = self.recv_frame()?;
            if frame.kind == MessageType::Pages {
                let (round, rs) = protocol::parse_pages(frame.sequence, frame.payload)
                    .map_err(Error::Protocol)?;
                if round != got.rounds || state.is_some() {
                    return Err(Error::Violation(format!(
                        "pages for round {round} while in round {}",
                        got.rounds
                    )));
                }
                runs += rs.len() as u64;
                for r in rs {
                    // Fresh memory that never received a page is zero
                    // already.
                    let untouched = fresh_zero && !seen.any_set(r.gpa, r.pages);
                    if !seen.set_range(r.gpa, r.pages) {
                        return Err(Error::Violation(format!(
                            "pages {:#x} (+{}) outside the announced memory",
                            r.gpa, r.pages
                        )));
                    }
                    match r.data {
                        None => {
                            if !untouched {
                                vm.zero_pages(r.gpa, r.pages)
                                    .map_err(vm_err("zero_pages"))?;
                            }
                            got.zero_pages += u64::from(r.pages);
                        }
                        Some(d) => {
                            vm.write_pages(r.gpa, d).map_err(vm_err("write_pages"))?;
                            got.data_pages += u64::from(r.pages);
                            if checksums {
                                verify(&vm, r.gpa, r.pages, r.checksum)?;
                            }
                        }
                    }
                }
                continue;
            }
            match frame.decode().map_err(Error::Protocol)? {
                Message::RoundEnd(n) if n == got.rounds && state.is_none() => got.rounds += 1,
                Message::State(s) if state.is_none() => {
                    self.stage = "switchover";
                    state = Some(s);
                }
                Message::Complete(c) => break c,
                m => return Err(violation(&m, "Pages, RoundEnd, State or Complete")),
            }
        };
        let Some(state) = state else {
            return Err(Error::Violation("Complete without a State".into()));
        };
        if seen.count() != seen.total_pages() {
            return Err(Error::Violation(format!(
                "only {} of {} pages arrived",
                seen.count(),
                seen.total_pages()
            )));
        }
        if complete.rounds != got.rounds || complete.runs != runs {
            return Err(Error::Violation(format!(
                "source says {} rounds / {} runs, {} / {} arrived",
                complete.rounds, complete.runs, got.rounds, runs
            )));
        }
        let t0 = Instant::now();
        vm.restore_state(&state).map_err(vm_err("restore_state"))?;
        let t_parsed = t0.elapsed();
        vm.start().map_err(vm_err("start"))?;
        tracing::info!(
            state_parsed_us = t_parsed.as_micros() as u64,
            started_us = t0.elapsed().as_micros() as u64,
            "switchover timing (from Complete)"
        );
        self.stage = "resumed";
        // The guest runs here now; a lost ack leaves the source to resume
        // (see the source module's note on this window).
        if let Err(e) = self.send(&Message::Resumed) {
            tracing::error!(error = %e, "guest started but the source did not get the ack");
        }
        tracing::info!(vm = %got.name, rounds = got.rounds, "incoming migration done, guest running");
        Ok((vm, got))
    }
}

fn violation(m: &Message, expected: &str) -> Error {
    Error::Violation(format!("got {} while waiting for {expected}", m.kind()))
}

/// Layout sanity: page aligned, sorted, non-overlapping, and the size the
/// pre-checks reserved.
fn check_layout(layout: &[Region], memory_mib: u64) -> Result<(), Error> {
    let page = PAGE_SIZE as u64;
    let mut end = 0u64;
    let mut total = 0u64;
    for r in layout {
        let bad =
            |why: &str| Error::Violation(format!("region {:#x} (+{:#x}): {why}", r.gpa, r.size));
        if r.gpa % page != 0 || r.size % page != 0 || r.size == 0 {
            return Err(bad("not page aligned or empty"));
        }
        if r.gpa < end {
            return Err(bad("overlaps or is out of order"));
        }
        end = r.gpa.checked_add(r.size).ok_or_else(|| bad("wraps"))?;
        total += r.size;
    }
    if total != memory_mib << 20 {
        return Err(Error::Violation(format!(
            "layout holds {total} bytes, the VM has {memory_mib} MiB"
        )));
    }
    Ok(())
}

fn verify<V: IncomingVm>(vm: &V, gpa: u64, pages: u32, expected: u32) -> Result<(), Error> {
    let mut back = vec![0u8; pages as usize * PAGE_SIZE];
    vm.read_pages(gpa, &mut back)
        .map_err(vm_err("read_pages"))?;
    let found = crc32c::crc32c(&back);
    if found != expected {
        return Err(Error::PageChecksum {
            gpa,
            pages,
            found,
            expected,
        });
    }
    Ok(())
}
