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
    self, caps, Abort, Decoder, Encoder, FrameHeader, Hello, Message, MessageType, ProtocolError,
    RawFrame, Region, StreamError, StreamedFrame, VersionMismatch, HEADER_LEN, PAGE_SIZE,
    RUN_HEADER_LEN,
};
use crate::transport::Channel;
use crate::vm::{DirtyBitmap, IncomingVm, TargetHost, VmError};
use std::io;
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
        caps: 0,
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
    /// Capabilities agreed on (ours, after the source's `Hello`).
    caps: u32,
}

fn vm_err(op: &'static str) -> impl FnOnce(VmError) -> Error {
    move |source| Error::Vm { op, source }
}

/// Bytes read at once when a run header is due: a frame of zero runs
/// (an idle guest's memory) is read a few hundred headers per call, and at
/// most this much of a data run goes through the decoder's buffer.
const RUN_AHEAD: usize = 4096;

/// What the target tracks across `Pages` frames.
struct PagesIn {
    /// Pages that arrived at least once.
    seen: DirtyBitmap,
    /// Fresh guest memory reads as zero (zero runs for pages never written
    /// need no work).
    fresh_zero: bool,
    /// End-to-end page checksums are on.
    checksums: bool,
    /// Runs received (the source counts them in `Complete`).
    runs: u64,
    /// Runs of the current frame to read back and compare once its CRC
    /// has been checked (checksum mode).
    to_verify: Vec<(u64, u32, u32)>,
    /// Buffer for a VM that cannot lend its memory
    /// ([`IncomingVm::pages_mut`]).
    data: Vec<u8>,
    /// An LZ4 block being received.
    block: Vec<u8>,
}

impl<C: Channel> Target<'_, C> {
    fn send(&mut self, m: &Message) -> Result<(), Error> {
        self.enc
            .send(&mut self.chan, m)
            .map(|_| ())
            .map_err(Error::Protocol)
    }

    /// On a read that timed out (the channel reads with a 100 ms timeout):
    /// gives up if cancelled here or if nothing arrived for the idle
    /// timeout; any other error is the stream's.
    fn waited(&self, e: io::Error, last: Instant) -> Result<(), Error> {
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        ) {
            return Err(Error::Protocol(ProtocolError::Io(e)));
        }
        self.check_cancel()?;
        if last.elapsed() >= self.opts.idle_timeout {
            return Err(Error::Idle(self.opts.idle_timeout));
        }
        Ok(())
    }

    /// Reads from now on time out every 100 ms, so cancellation and the
    /// idle timeout are seen; returns when the wait began.
    fn start_waiting(&mut self) -> Result<Instant, Error> {
        self.chan
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| Error::Protocol(ProtocolError::Io(e)))?;
        Ok(Instant::now())
    }

    fn check_cancel(&self) -> Result<(), Error> {
        if self.cancel.is_cancelled() {
            return Err(Error::LocalCancel);
        }
        Ok(())
    }

    /// The next frame's header, checked (all but its CRC), reading no
    /// further into the stream than a `Pages` frame's first run header.
    fn next_header(&mut self) -> Result<FrameHeader, Error> {
        let mut last = self.start_waiting()?;
        loop {
            self.check_cancel()?;
            match self.dec.header() {
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => {
                    // As for a whole frame, the CRC speaks first: a
                    // corrupted type, flags or sequence field is
                    // corruption in transit. Read the frame to tell.
                    self.recv_frame()?;
                    return Err(Error::Protocol(e));
                }
            }
            match self
                .dec
                .fill_small(&mut self.chan, HEADER_LEN + 8 + RUN_HEADER_LEN)
            {
                Ok(0) => {
                    self.dec.finish().map_err(Error::Protocol)?;
                    return Err(Error::Protocol(ProtocolError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection",
                    ))));
                }
                Ok(_) => last = Instant::now(),
                Err(e) => self.waited(e, last)?,
            }
        }
    }

    /// Fills `dst` with the next bytes of frame `f` through the decoder's
    /// buffer (headers), reading up to `ahead` bytes at once.
    fn stream_small(
        &mut self,
        f: &mut StreamedFrame,
        dst: &mut [u8],
        ahead: usize,
    ) -> Result<(), Error> {
        let mut last = Instant::now();
        // Past the frame's end, the decoder names the overrun below.
        while dst.len() <= f.left() && self.dec.buffered() < dst.len() {
            match self
                .dec
                .stream_fill(&mut self.chan, f, ahead.max(dst.len()))
            {
                Ok(0) => return Err(Error::Protocol(self.dec.stream_truncated(f))),
                Ok(_) => last = Instant::now(),
                Err(e) => self.waited(e, last)?,
            }
        }
        let b = self
            .dec
            .stream_take(f, dst.len())
            .map_err(Error::Protocol)?;
        dst.copy_from_slice(b);
        Ok(())
    }

    /// Fills `dst` with the next bytes of frame `f`, straight from the
    /// stream once the decoder's buffer is drained.
    fn stream_data(&mut self, f: &mut StreamedFrame, dst: &mut [u8]) -> Result<(), Error> {
        let mut last = Instant::now();
        let mut at = 0;
        while at < dst.len() {
            match self.dec.stream_into(&mut self.chan, f, &mut dst[at..]) {
                Ok(0) => return Err(Error::Protocol(self.dec.stream_truncated(f))),
                Ok(n) => {
                    at += n;
                    last = Instant::now();
                }
                Err(StreamError::Io(e)) => self.waited(e, last)?,
                Err(StreamError::Protocol(e)) => return Err(Error::Protocol(e)),
            }
        }
        Ok(())
    }

    /// Receives a `Pages` frame whose header is `h`, writing each data run
    /// straight from the stream into guest memory: one copy (the kernel's)
    /// instead of two. The frame's CRC covers its whole payload, so it is
    /// known to be intact only at its end; a bad one fails the migration,
    /// and whatever was written meanwhile is in memory that no guest has
    /// run (the VM starts only after `Complete`). Run headers are checked
    /// before their data is written: the range must lie inside the
    /// announced memory.
    fn recv_pages<V: IncomingVm>(
        &mut self,
        vm: &mut V,
        h: &FrameHeader,
        p: &mut PagesIn,
        got: &mut Received,
    ) -> Result<(), Error> {
        let mut f = self.dec.stream_begin(h);
        match self.recv_runs(vm, h, &mut f, p, got) {
            Ok(()) => {}
            Err(e @ (Error::Violation(_) | Error::Protocol(ProtocolError::Malformed { .. }))) => {
                // A run breaking the rules may be a corrupted one: read the
                // rest of the frame and report corruption if its CRC says
                // so, rather than blame the source.
                if self.drain(&mut f).is_ok() {
                    if let Err(c @ ProtocolError::Checksum { .. }) = self.dec.stream_end(f) {
                        return Err(Error::Protocol(c));
                    }
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        self.dec.stream_end(f).map_err(Error::Protocol)?;
        for &(gpa, pages, checksum) in &p.to_verify {
            verify(vm, gpa, pages, checksum)?;
        }
        Ok(())
    }

    /// An LZ4 run (capability LZ4): its block's length, the block, then
    /// the block decompressed into guest memory. The block must decompress
    /// to exactly the run's pages: no more (the decoder stops at the
    /// slice's end), no fewer.
    fn recv_lz4<V: IncomingVm>(
        &mut self,
        vm: &mut V,
        h: &FrameHeader,
        f: &mut StreamedFrame,
        p: &mut PagesIn,
        r: &protocol::RunHeader,
        len: usize,
    ) -> Result<(), Error> {
        let bad = |what: String| {
            Error::Protocol(ProtocolError::Malformed {
                sequence: h.sequence,
                kind: MessageType::Pages,
                what: format!("LZ4 run at {:#x} (+{}): {what}", r.gpa, r.pages),
            })
        };
        if self.caps & caps::LZ4 == 0 {
            return Err(bad("compression was not agreed on".into()));
        }
        let mut n = [0u8; 4];
        self.stream_small(f, &mut n, 4)?;
        let n = u32::from_le_bytes(n) as usize;
        if n > f.left() {
            return Err(bad(format!(
                "a block of {n} bytes, the frame has {} left",
                f.left()
            )));
        }
        let mut block = std::mem::take(&mut p.block);
        block.resize(n, 0);
        self.stream_data(f, &mut block)?;
        let (out, buffered) = match vm.pages_mut(r.gpa, len) {
            Some(dst) => (lz4_flex::block::decompress_into(&block, dst), false),
            None => {
                p.data.resize(len, 0);
                (lz4_flex::block::decompress_into(&block, &mut p.data), true)
            }
        };
        p.block = block;
        match out {
            Ok(got) if got == len => {}
            Ok(got) => return Err(bad(format!("decompressed to {got} bytes, not {len}"))),
            Err(e) => return Err(bad(format!("not a valid block ({e})"))),
        }
        if buffered {
            vm.write_pages(r.gpa, &p.data)
                .map_err(vm_err("write_pages"))?;
        }
        Ok(())
    }

    /// Reads what is left of frame `f` and drops it (its CRC is computed
    /// on the way).
    fn drain(&mut self, f: &mut StreamedFrame) -> Result<(), Error> {
        let mut junk = vec![0u8; f.left().min(RUN_AHEAD * 16)];
        while f.left() > 0 {
            let n = f.left().min(junk.len());
            self.stream_data(f, &mut junk[..n])?;
        }
        Ok(())
    }

    /// The runs of `Pages` frame `h`, up to its end (see
    /// [`recv_pages`](Self::recv_pages)).
    fn recv_runs<V: IncomingVm>(
        &mut self,
        vm: &mut V,
        h: &FrameHeader,
        f: &mut StreamedFrame,
        p: &mut PagesIn,
        got: &mut Received,
    ) -> Result<(), Error> {
        let bad = |what: String| {
            Error::Protocol(ProtocolError::Malformed {
                sequence: h.sequence,
                kind: MessageType::Pages,
                what,
            })
        };
        let mut head = [0u8; 8];
        self.stream_small(f, &mut head, 8 + RUN_HEADER_LEN)?;
        let round = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let n = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
        if n > f.left() / RUN_HEADER_LEN {
            return Err(bad(format!(
                "{n} runs announced, room for {}",
                f.left() / RUN_HEADER_LEN
            )));
        }
        if round != got.rounds {
            return Err(Error::Violation(format!(
                "pages for round {round} while in round {}",
                got.rounds
            )));
        }
        p.runs += n as u64;
        p.to_verify.clear();
        for i in 0..n {
            let mut rh = [0u8; RUN_HEADER_LEN];
            // Zero runs come many to a frame: read a few at once.
            self.stream_small(f, &mut rh, RUN_AHEAD)?;
            let r = protocol::parse_run_header(h.sequence, i, &rh).map_err(Error::Protocol)?;
            // Fresh memory that never received a page is zero already.
            let untouched = p.fresh_zero && !p.seen.any_set(r.gpa, r.pages);
            if !p.seen.set_range(r.gpa, r.pages) {
                return Err(Error::Violation(format!(
                    "pages {:#x} (+{}) outside the announced memory",
                    r.gpa, r.pages
                )));
            }
            let Some(len) = r.data_len else {
                if !untouched {
                    vm.zero_pages(r.gpa, r.pages)
                        .map_err(vm_err("zero_pages"))?;
                }
                got.zero_pages += u64::from(r.pages);
                continue;
            };
            if !r.lz4 && len > f.left() {
                return Err(bad(format!(
                    "run {i} at {:#x}: {len} bytes of data, the frame has {} left",
                    r.gpa,
                    f.left()
                )));
            }
            if r.lz4 {
                self.recv_lz4(vm, h, f, p, &r, len)?;
            } else if let Some(dst) = vm.pages_mut(r.gpa, len) {
                self.stream_data(f, dst)?;
            } else {
                let mut data = std::mem::take(&mut p.data);
                data.resize(len, 0);
                self.stream_data(f, &mut data)?;
                vm.write_pages(r.gpa, &data)
                    .map_err(vm_err("write_pages"))?;
                p.data = data;
            }
            got.data_pages += u64::from(r.pages);
            if p.checksums {
                p.to_verify.push((r.gpa, r.pages, r.checksum));
            }
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Message, Error> {
        let frame = self.recv_frame()?;
        frame.decode().map_err(Error::Protocol)
    }

    /// The next frame, whole and checked, its payload still in the
    /// decoder (`Pages` frames are read by [`recv_pages`](Self::recv_pages)
    /// instead). An `Abort` or `Cancel` from the source becomes the error
    /// it means.
    fn recv_frame(&mut self) -> Result<RawFrame<'_>, Error> {
        let mut last = self.start_waiting()?;
        loop {
            self.check_cancel()?;
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
        self.caps = ours.capabilities;
        self.send(&Message::Hello(ours.clone()))?;
        protocol::negotiate(&ours, &theirs).map_err(Error::Version)?;

        self.stage = "precheck";
        let facts: VmFacts = match self.recv()? {
            Message::Precheck(f) => f,
            m => return Err(violation(&m, "Precheck")),
        };
        let host_facts = host.host_facts(&facts);
        // Whether the guest may run here only under the source's lease.
        let takes_lease = host_facts.lease.as_ref().is_some_and(|l| l.handoff);
        let failures = precheck::check_all(&facts, &host_facts);
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
        let mut got = Received {
            name: facts.name.clone(),
            rounds: 0,
            data_pages: 0,
            zero_pages: 0,
        };
        let mut pages = PagesIn {
            seen: DirtyBitmap::new(&layout),
            fresh_zero: vm.fresh_memory_is_zero(),
            checksums,
            runs: 0,
            to_verify: Vec::new(),
            data: Vec::new(),
            block: Vec::new(),
        };
        let mut state = None;
        let (cpu0, wall0) = (crate::thread_cpu(), Instant::now());
        let complete = loop {
            let header = self.next_header()?;
            if header.kind == MessageType::Pages {
                if state.is_some() {
                    return Err(Error::Violation(format!(
                        "pages after the state, in round {}",
                        got.rounds
                    )));
                }
                self.recv_pages(&mut vm, &header, &mut pages, &mut got)?;
                continue;
            }
            let frame = self.recv_frame()?;
            match frame.decode().map_err(Error::Protocol)? {
                Message::RoundEnd(0) if got.rounds == 0 && state.is_none() => {
                    got.rounds += 1;
                    if self.caps & caps::ROUND_ACK != 0 {
                        self.send(&Message::RoundDone(0))?;
                    }
                    tracing::info!(
                        bytes = self.dec.received(),
                        wall_ms = wall0.elapsed().as_millis() as u64,
                        cpu_ms = (crate::thread_cpu() - cpu0).as_millis() as u64,
                        "first pass received"
                    );
                }
                Message::RoundEnd(n) if n == got.rounds && state.is_none() => {
                    got.rounds += 1;
                    if self.caps & caps::ROUND_ACK != 0 {
                        self.send(&Message::RoundDone(n))?;
                    }
                }
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
        if pages.seen.count() != pages.seen.total_pages() {
            return Err(Error::Violation(format!(
                "only {} of {} pages arrived",
                pages.seen.count(),
                pages.seen.total_pages()
            )));
        }
        if complete.rounds != got.rounds || complete.runs != pages.runs {
            return Err(Error::Violation(format!(
                "source says {} rounds / {} runs, {} / {} arrived",
                complete.rounds, complete.runs, got.rounds, pages.runs
            )));
        }
        let t0 = Instant::now();
        vm.restore_state(&state).map_err(vm_err("restore_state"))?;
        match (&complete.lease, takes_lease) {
            // Claimed by `start`, before any vCPU runs.
            (Some(l), true) => vm.take_lease(l).map_err(vm_err("take_lease"))?,
            (None, false) => {}
            (None, true) => {
                return Err(Error::Violation(
                    "the source sent no lease; this target runs the guest only under the \
                     lease it takes over"
                        .into(),
                ))
            }
            (Some(l), false) => {
                return Err(Error::Violation(format!(
                    "the source sent its lease ({}, generation {}) to a target without a \
                     handoff lease spec",
                    l.file.display(),
                    l.generation
                )))
            }
        }
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
