//! Fakes for migration tests: a source VM whose memory is a `Vec` of pages
//! dirtied by a thread at a set rate, a target host that keeps memory in a
//! `Vec`, and a proxy that cuts or corrupts the stream.

#![allow(dead_code)]

use migration::precheck::{Disk, DiskIdentity, HostFacts, HostLease, LeaseFacts, VmFacts};
use migration::protocol::{Decoder, MessageType, PAGE_SIZE};
use migration::vm::VmError;
use migration::vm::{LeaseHandoff, LeaseRace};
use migration::{DirtyBitmap, IncomingVm, MigratableVm, Region, TargetHost};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub const P: u64 = PAGE_SIZE as u64;

/// Where the fake VM's lease record lives.
pub const LEASE_FILE: &str = "/srv/ds1/fake.lease";

/// A datastore's lease record and claim files, shared by a fake source and
/// a fake target: the record (owner, generation) and who holds each
/// generation's claim.
#[derive(Default, Debug)]
pub struct FakeStore {
    pub record: Option<(String, u64)>,
    pub claims: std::collections::BTreeMap<u64, String>,
    pub unreachable: bool,
}

pub type Store = Arc<Mutex<FakeStore>>;

/// A record held by `owner` at `generation`.
pub fn store(owner: &str, generation: u64) -> Store {
    Arc::new(Mutex::new(FakeStore {
        record: Some((owner.into(), generation)),
        ..Default::default()
    }))
}

impl FakeStore {
    /// The exclusive claim of `generation`, then the record, as the VMM does.
    fn claim(&mut self, generation: u64, who: &str) -> Result<bool, String> {
        if self.unreachable {
            return Err("no answer within 500 ms".into());
        }
        let holder = self.claims.entry(generation).or_insert(who.into());
        if holder != who {
            return Ok(false);
        }
        self.record = Some((who.into(), generation));
        Ok(true)
    }
}

fn lease_facts(file: &str, generation: u64) -> LeaseFacts {
    let p = std::path::Path::new(file);
    LeaseFacts {
        file: p.into(),
        generation,
        dir: p.parent().map(Into::into),
        dir_id: None,
    }
}

/// The source's lease: the store, the generation held, and what the
/// engine did with it.
pub struct FakeLease {
    pub store: Store,
    pub generation: u64,
    pub renewing: bool,
    pub gone: bool,
}

struct Shared {
    mem: Vec<u8>,
    dirty: DirtyBitmap,
    logging: bool,
    paused: bool,
    at_pause: Option<Vec<u8>>,
    /// A counter read when the VM pauses (see [`FakeVm::probe_at_pause`]).
    probe: Option<(Arc<AtomicU64>, u64)>,
}

/// The source VM. Pages `[hot_start, hot_start + hot_pages)` are rewritten
/// at `rate` pages per second (scaled down by the throttle).
pub struct FakeVm {
    layout: Vec<Region>,
    shared: Arc<Mutex<Shared>>,
    throttle: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    pub writes: Arc<AtomicU64>,
    pub resumes: u32,
    pub max_throttle_seen: u8,
    pub fail_save: bool,
    /// An HA disk lease held on the source.
    pub lease: Option<FakeLease>,
    dirtier: Option<JoinHandle<()>>,
}

pub struct VmSpec {
    pub mib: u64,
    /// Pages per second the guest writes (0: idle).
    pub rate: u64,
    /// Pages in the hot set.
    pub hot_pages: u64,
}

impl FakeVm {
    /// Two regions around a hole, like the VMM's RAM split; half the pages
    /// hold data, half are zero.
    pub fn new(spec: VmSpec) -> Self {
        let total = spec.mib << 20;
        let layout = vec![
            Region {
                gpa: 0,
                size: total / 2,
            },
            Region {
                gpa: 1 << 32,
                size: total / 2,
            },
        ];
        let mut mem = vec![0u8; total as usize];
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 2 == 0 {
                page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                page[PAGE_SIZE - 1] = 0xa5;
            }
        }
        let shared = Arc::new(Mutex::new(Shared {
            mem,
            dirty: DirtyBitmap::new(&layout),
            logging: false,
            paused: false,
            at_pause: None,
            probe: None,
        }));
        let throttle = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let dirtier = (spec.rate > 0).then(|| {
            let (shared, throttle, stop, writes, layout) = (
                shared.clone(),
                throttle.clone(),
                stop.clone(),
                writes.clone(),
                layout.clone(),
            );
            let hot = spec.hot_pages.max(1);
            std::thread::spawn(move || {
                let mut counter = 0u64;
                let mut credit = 0.0f64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    let t = f64::from(throttle.load(Ordering::Relaxed));
                    credit += spec.rate as f64 / 1000.0 * (100.0 - t) / 100.0;
                    let mut s = shared.lock().unwrap();
                    if s.paused {
                        continue;
                    }
                    while credit >= 1.0 {
                        credit -= 1.0;
                        counter += 1;
                        let idx = (counter.wrapping_mul(2_654_435_761)) % hot;
                        let gpa = index_to_gpa(&layout, idx);
                        let off = gpa_to_offset(&layout, gpa);
                        s.mem[off..off + 8].copy_from_slice(&counter.to_le_bytes());
                        if s.logging {
                            s.dirty.set_range(gpa, 1);
                        }
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });
        FakeVm {
            layout,
            shared,
            throttle,
            stop,
            writes,
            resumes: 0,
            max_throttle_seen: 0,
            fail_save: false,
            lease: None,
            dirtier,
        }
    }

    pub fn is_paused(&self) -> bool {
        self.shared.lock().unwrap().paused
    }
    pub fn is_logging(&self) -> bool {
        self.shared.lock().unwrap().logging
    }
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }
    pub fn memory_at_pause(&self) -> Option<Vec<u8>> {
        self.shared.lock().unwrap().at_pause.clone()
    }
    /// Reads `counter` when the VM pauses; [`probed`](Self::probed) tells
    /// what it held then.
    pub fn probe_at_pause(&mut self, counter: Arc<AtomicU64>) {
        self.shared.lock().unwrap().probe = Some((counter, 0));
    }
    pub fn probed(&self) -> Option<u64> {
        self.shared.lock().unwrap().probe.as_ref().map(|p| p.1)
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.dirtier.take() {
            let _ = h.join();
        }
    }
}

fn index_to_gpa(layout: &[Region], mut idx: u64) -> u64 {
    for r in layout {
        let n = r.size / P;
        if idx < n {
            return r.gpa + idx * P;
        }
        idx -= n;
    }
    layout[0].gpa
}

/// Offset of `gpa` in a flat buffer holding the regions back to back.
pub fn gpa_to_offset(layout: &[Region], gpa: u64) -> usize {
    let mut base = 0;
    for r in layout {
        if gpa >= r.gpa && gpa < r.gpa + r.size {
            return (base + gpa - r.gpa) as usize;
        }
        base += r.size;
    }
    panic!("gpa {gpa:#x} outside the layout")
}

fn range(layout: &[Region], gpa: u64, len: usize) -> Result<std::ops::Range<usize>, VmError> {
    let r = layout
        .iter()
        .find(|r| gpa >= r.gpa && gpa + len as u64 <= r.gpa + r.size)
        .ok_or_else(|| format!("{gpa:#x} (+{len}) outside guest memory"))?;
    let mut base = 0;
    for x in layout {
        if x == r {
            break;
        }
        base += x.size;
    }
    let off = (base + gpa - r.gpa) as usize;
    Ok(off..off + len)
}

impl MigratableVm for FakeVm {
    fn facts(&self) -> VmFacts {
        VmFacts {
            name: "fake".into(),
            cpu_template: "baseline".into(),
            cpu_features: ["sse2".to_string()].into(),
            memory_mib: self.layout.iter().map(|r| r.size).sum::<u64>() >> 20,
            vcpus: 1,
            disks: vec![Disk {
                path: "/srv/ds1/fake.img".into(),
                identity: Some(DiskIdentity {
                    datastore: "ds-uuid".into(),
                    relative: "fake.img".into(),
                }),
                host_device: false,
            }],
            networks: vec!["Prod".into()],
            host_local_devices: vec![],
            lease: self
                .lease
                .as_ref()
                .map(|l| lease_facts(LEASE_FILE, l.generation)),
            ..Default::default()
        }
    }
    fn stop_lease(&mut self) -> Result<Option<LeaseHandoff>, VmError> {
        Ok(self.lease.as_mut().map(|l| {
            l.renewing = false;
            LeaseHandoff {
                file: LEASE_FILE.into(),
                owner: "host-a".into(),
                generation: l.generation,
            }
        }))
    }
    fn keep_lease(&mut self) {
        if let Some(l) = self.lease.as_mut() {
            l.renewing = true;
        }
    }
    fn lease_gone(&mut self) {
        if let Some(l) = self.lease.as_mut() {
            l.gone = true;
        }
    }
    fn race_lease(&mut self) -> LeaseRace {
        let Some(l) = self.lease.as_mut() else {
            return LeaseRace::Won;
        };
        let next = l.generation + 1;
        match l.store.lock().unwrap().claim(next, "host-a") {
            Ok(true) => {
                l.generation = next;
                l.renewing = true;
                LeaseRace::Won
            }
            Ok(false) => {
                l.gone = true;
                LeaseRace::Lost(format!("generation {next} claimed by the target"))
            }
            Err(e) => LeaseRace::Unknown(e),
        }
    }
    fn memory_layout(&self) -> Vec<Region> {
        self.layout.clone()
    }
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let r = range(&self.layout, gpa, buf.len())?;
        buf.copy_from_slice(&self.shared.lock().unwrap().mem[r]);
        Ok(())
    }
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        let mut s = self.shared.lock().unwrap();
        s.logging = true;
        s.dirty = DirtyBitmap::new(&self.layout);
        Ok(())
    }
    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError> {
        let mut s = self.shared.lock().unwrap();
        Ok(std::mem::replace(
            &mut s.dirty,
            DirtyBitmap::new(&self.layout),
        ))
    }
    fn stop_dirty_log(&mut self) {
        self.shared.lock().unwrap().logging = false;
    }
    fn set_throttle(&mut self, percent: u8) {
        self.max_throttle_seen = self.max_throttle_seen.max(percent);
        self.throttle.store(percent, Ordering::Relaxed);
    }
    fn pause(&mut self) -> Result<(), VmError> {
        let mut s = self.shared.lock().unwrap();
        s.paused = true;
        s.at_pause = Some(s.mem.clone());
        if let Some((c, v)) = s.probe.as_mut() {
            *v = c.load(Ordering::SeqCst);
        }
        Ok(())
    }
    fn quiesce_devices(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        if self.fail_save {
            return Err("vCPU 0: KVM_GET_REGS failed".into());
        }
        Ok(b"fake vcpu+device state".to_vec())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.shared.lock().unwrap().paused = false;
        self.resumes += 1;
        Ok(())
    }
}

/// What the fake target saw, shared with the test.
#[derive(Default)]
pub struct TargetSeen {
    pub memory: Option<Vec<u8>>,
    pub state: Option<Vec<u8>>,
    pub started: bool,
}

pub struct FakeHost {
    pub facts: HostFacts,
    pub seen: Arc<Mutex<TargetSeen>>,
    pub fail_restore: bool,
    /// How long each page write takes (a slow target).
    pub write_delay: Duration,
    /// Pages written so far.
    pub written: Arc<AtomicU64>,
    /// Started with a handoff lease spec naming this store's record.
    pub lease: Option<Store>,
    /// The lease spec names another record.
    pub lease_file: String,
    /// Dies (the thread panics, dropping the connection) right after the
    /// claim of the lease's next generation.
    pub crash_after_claim: bool,
}

impl FakeHost {
    pub fn new() -> Self {
        FakeHost {
            facts: HostFacts {
                host: "host-b".into(),
                cpu_features: ["sse2".to_string(), "avx2".to_string()].into(),
                reservable_mib: 1 << 20,
                disks: vec![],
                networks: ["Prod".to_string()].into(),
                ..Default::default()
            },
            seen: Arc::default(),
            fail_restore: false,
            write_delay: Duration::ZERO,
            written: Arc::default(),
            lease: None,
            lease_file: LEASE_FILE.into(),
            crash_after_claim: false,
        }
    }
}

pub struct FakeIncoming {
    layout: Vec<Region>,
    mem: Vec<u8>,
    state: Option<Vec<u8>>,
    seen: Arc<Mutex<TargetSeen>>,
    fail_restore: bool,
    write_delay: Duration,
    written: Arc<AtomicU64>,
    store: Option<Store>,
    lease: Option<LeaseHandoff>,
    crash_after_claim: bool,
}

impl TargetHost for FakeHost {
    type Vm = FakeIncoming;
    fn host_facts(&self, vm: &VmFacts) -> HostFacts {
        let mut f = self.facts.clone();
        // The shared datastore is mounted at the same path here.
        f.disks = vm
            .disks
            .iter()
            .map(|d| {
                (
                    d.path.clone(),
                    d.identity.clone().ok_or_else(|| "none".to_string()),
                )
            })
            .collect();
        f.lease = self.lease.as_ref().map(|_| HostLease {
            record: lease_facts(&self.lease_file, 0),
            handoff: true,
        });
        f
    }
    fn create_vm(&mut self, _vm: &VmFacts, layout: &[Region]) -> Result<FakeIncoming, VmError> {
        Ok(FakeIncoming {
            layout: layout.to_vec(),
            mem: vec![0x77; layout.iter().map(|r| r.size as usize).sum()],
            state: None,
            seen: self.seen.clone(),
            fail_restore: self.fail_restore,
            write_delay: self.write_delay,
            written: self.written.clone(),
            store: self.lease.clone(),
            lease: None,
            crash_after_claim: self.crash_after_claim,
        })
    }
}

impl IncomingVm for FakeIncoming {
    fn write_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        let r = range(&self.layout, gpa, data.len())?;
        self.mem[r].copy_from_slice(data);
        let pages = (data.len() / PAGE_SIZE) as u64;
        std::thread::sleep(self.write_delay * pages as u32);
        self.written.fetch_add(pages, Ordering::SeqCst);
        Ok(())
    }
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        let r = range(&self.layout, gpa, buf.len())?;
        buf.copy_from_slice(&self.mem[r]);
        Ok(())
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        if self.fail_restore {
            return Err("restore: unknown device version".into());
        }
        self.state = Some(state.to_vec());
        Ok(())
    }
    fn take_lease(&mut self, lease: &LeaseHandoff) -> Result<(), VmError> {
        if self.store.is_none() {
            return Err("no handoff lease spec".into());
        }
        self.lease = Some(lease.clone());
        Ok(())
    }
    fn start(&mut self) -> Result<(), VmError> {
        if let (Some(store), Some(l)) = (&self.store, &self.lease) {
            let next = l.generation + 1;
            match store.lock().unwrap().claim(next, "host-b") {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!("lease generation {next} is claimed by another").into())
                }
                Err(e) => return Err(e.into()),
            }
            assert!(!self.crash_after_claim, "target killed after claiming");
        }
        let mut s = self.seen.lock().unwrap();
        s.memory = Some(self.mem.clone());
        s.state = self.state.clone();
        s.started = true;
        Ok(())
    }
}

/// What the proxy does to the source-to-target direction.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Cut both directions when the `nth` (0-based) frame of `kind` arrives,
    /// before forwarding it.
    CutAt(MessageType, usize),
    /// Flip one bit in the payload of the `nth` frame of `kind`.
    FlipAt(MessageType, usize),
    /// Flip bit 0 of payload byte `offset` of the `nth` frame of `kind`.
    FlipByte(MessageType, usize, usize),
    /// Flip bit 0 of header byte `offset` of the `nth` frame of `kind`.
    FlipHeader(MessageType, usize, usize),
}

/// A loopback proxy in front of `target`; returns the address to connect to.
pub fn proxy(target: std::net::SocketAddr, fault: Fault) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut from_src, _) = l.accept().unwrap();
        let mut to_tgt = TcpStream::connect(target).unwrap();
        let (mut back_tgt, mut back_src) =
            (to_tgt.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_tgt, &mut back_src);
            let _ = back_src.shutdown(Shutdown::Write);
        });
        let mut dec = Decoder::new();
        let mut seq = 0u32;
        let mut counts = std::collections::HashMap::new();
        let mut buf = [0u8; 65536];
        'outer: loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            dec.push(&buf[..n]);
            // Frames are forwarded as they are, not decoded (a `Pages`
            // frame with LZ4 runs is only ever read by the target).
            while let Ok(Some(f)) = dec.next_frame() {
                let k = f.kind;
                let c = counts.entry(k as u16).or_insert(0usize);
                let nth = *c;
                *c += 1;
                let mut frame = migration::protocol::encode_raw(k, seq, f.payload).unwrap();
                seq += 1;
                match fault {
                    Fault::CutAt(kind, i) if kind == k && i == nth => {
                        let _ = from_src.shutdown(Shutdown::Both);
                        let _ = to_tgt.shutdown(Shutdown::Both);
                        break 'outer;
                    }
                    Fault::FlipAt(kind, i) if kind == k && i == nth => {
                        let at = frame.len() - 1;
                        frame[at] ^= 0x10;
                    }
                    Fault::FlipByte(kind, i, offset) if kind == k && i == nth => {
                        frame[migration::protocol::HEADER_LEN + offset] ^= 0x01;
                    }
                    Fault::FlipHeader(kind, i, offset) if kind == k && i == nth => {
                        frame[offset] ^= 0x01;
                    }
                    _ => {}
                }
                if to_tgt.write_all(&frame).is_err() {
                    break 'outer;
                }
            }
        }
        let _ = to_tgt.shutdown(Shutdown::Write);
    });
    addr
}
