//! Migrations of a fake VM over real loopback TCP: integrity, convergence,
//! auto-converge, the hard limit, cancel in every stage, a cut connection,
//! a corrupted stream, version and pre-check refusals, two at once, LZ4
//! compression.

mod common;

use common::*;
use migration::protocol::{caps, MessageType, PAGE_SIZE};
use migration::source::{AutoConverge, Error as SrcError};
use migration::target::{Error as TgtError, Received};
use migration::{
    CancelToken, Compression, Failed, Progress, SourceOptions, Stage, Summary, TargetOptions,
};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

type TargetResult = Result<Received, TgtError>;

fn target_opts() -> TargetOptions {
    TargetOptions {
        host: "host-b".into(),
        idle_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn spawn_target(
    mut host: FakeHost,
    opts: TargetOptions,
) -> (SocketAddr, JoinHandle<TargetResult>, Arc<Mutex<TargetSeen>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = host.seen.clone();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        migration::transport::tune_tcp(&s).unwrap();
        migration::receive(&mut host, s, &opts, &CancelToken::new()).map(|(_vm, r)| r)
    });
    (addr, h, seen)
}

fn source_opts() -> SourceOptions {
    SourceOptions {
        host: "host-a".into(),
        max_duration: Duration::from_secs(20),
        ack_timeout: Duration::from_secs(5),
        reply_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn run_source(
    vm: &mut FakeVm,
    addr: SocketAddr,
    opts: &SourceOptions,
    cancel_at: Option<Stage>,
) -> (Result<Summary, Failed>, Vec<Progress>) {
    let s = TcpStream::connect(addr).unwrap();
    migration::transport::tune_tcp(&s).unwrap();
    let cancel = CancelToken::new();
    let mut seen = Vec::new();
    let c = cancel.clone();
    let r = migration::migrate(vm, s, opts, &cancel, &mut |p: &Progress| {
        if Some(p.stage) == cancel_at {
            c.cancel();
        }
        seen.push(p.clone());
    });
    (r, seen)
}

/// The source runs as before: not paused, not throttled, not logging.
fn assert_source_running(vm: &FakeVm) {
    assert!(!vm.is_paused(), "source left paused");
    assert_eq!(vm.throttle(), 0, "source left throttled");
    assert!(!vm.is_logging(), "dirty log left on");
}

fn assert_not_started(seen: &Arc<Mutex<TargetSeen>>) {
    assert!(!seen.lock().unwrap().started, "target started the guest");
}

fn assert_intact(vm: &FakeVm, seen: &Arc<Mutex<TargetSeen>>) {
    let s = seen.lock().unwrap();
    assert!(s.started);
    let src = vm.memory_at_pause().expect("source never paused");
    let dst = s.memory.as_ref().expect("no target memory");
    if src != *dst {
        let bad = src
            .chunks(4096)
            .zip(dst.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        panic!("{bad} pages differ between source at pause and target");
    }
    assert_eq!(s.state.as_deref(), Some(&b"fake vcpu+device state"[..]));
}

fn idle(mib: u64) -> FakeVm {
    FakeVm::new(VmSpec {
        mib,
        rate: 0,
        hot_pages: 1,
    })
}

#[test]
fn idle_vm_migrates_intact() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = idle(16);
    let (r, progress) = run_source(&mut vm, addr, &source_opts(), None);
    let summary = r.unwrap_or_else(|e| panic!("{}", e.report()));
    let got = tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
    assert_eq!(summary.zero_pages, 2048, "half of 16 MiB is zero");
    assert_eq!(summary.data_pages, 2048);
    assert_eq!(got.zero_pages, 2048);
    let last = progress.last().unwrap();
    assert_eq!((last.stage, last.percent), (Stage::Done, 100));
    let mut pct = 0;
    for p in &progress {
        assert!(p.percent >= pct, "percent went back: {progress:?}");
        pct = p.percent;
    }
    println!("{summary:?}");
}

#[test]
fn busy_vm_converges_with_memory_equal_at_pause() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = FakeVm::new(VmSpec {
        mib: 32,
        rate: 20_000,
        hot_pages: 4096,
    });
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let summary = r.unwrap_or_else(|e| panic!("{}", e.report()));
    tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
    assert!(summary.rounds >= 2, "{summary:?}");
    assert!(vm.writes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    println!("{summary:?}");
}

#[test]
fn auto_converge_engages_when_guest_outruns_the_cap() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = FakeVm::new(VmSpec {
        mib: 8,
        rate: 100_000,
        hot_pages: 1024,
    });
    let opts = SourceOptions {
        bandwidth_cap: Some(16 << 20),
        auto_converge: AutoConverge {
            unproductive_rounds: 1,
            ..Default::default()
        },
        // The fake's pages are nearly all zero bytes: compressed, they
        // would fit the cap and nothing would need throttling.
        compress: Compression::Off,
        ..source_opts()
    };
    let (r, progress) = run_source(&mut vm, addr, &opts, None);
    let summary = r.unwrap_or_else(|e| panic!("{}", e.report()));
    tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
    assert!(summary.max_throttle >= 20, "{summary:?}");
    assert!(
        progress.iter().any(|p| p.throttle >= 20),
        "throttle never reported"
    );
    println!("{summary:?}");
}

#[test]
fn hard_limit_fails_cleanly_and_resumes_source() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = FakeVm::new(VmSpec {
        mib: 8,
        rate: 100_000,
        hot_pages: 1024,
    });
    let opts = SourceOptions {
        bandwidth_cap: Some(16 << 20),
        max_duration: Duration::from_secs(1),
        auto_converge: AutoConverge {
            enabled: false,
            ..Default::default()
        },
        // Compressed, the fake's pages would fit the cap.
        compress: Compression::Off,
        ..source_opts()
    };
    let (r, _) = run_source(&mut vm, addr, &opts, None);
    let f = r.unwrap_err();
    assert!(
        matches!(f.error, SrcError::Timeout { .. }),
        "{}",
        f.report()
    );
    assert!(matches!(f.stage, Stage::Precopy { .. }), "{}", f.report());
    assert_source_running(&vm);
    assert!(tgt.join().unwrap().is_err());
    assert_not_started(&seen);
}

#[test]
fn cancel_in_each_stage_resumes_source() {
    let stages = [
        Stage::Connect,
        Stage::Precheck,
        Stage::Precopy { round: 0 },
        Stage::Precopy { round: 1 },
        Stage::Stun,
        Stage::Switchover,
    ];
    for stage in stages {
        let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
        let mut vm = FakeVm::new(VmSpec {
            mib: 16,
            rate: 20_000,
            hot_pages: 2048,
        });
        let opts = SourceOptions {
            bandwidth_cap: Some(64 << 20),
            // Uncompressed, so every stage lasts long enough to cancel in.
            compress: Compression::Off,
            ..source_opts()
        };
        let (r, progress) = run_source(&mut vm, addr, &opts, Some(stage));
        let f = r.expect_err(&format!("cancel at {stage} ignored"));
        assert!(
            matches!(f.error, SrcError::Cancelled),
            "{stage}: {}",
            f.report()
        );
        assert_eq!(f.stage, stage, "{}", f.report());
        assert_eq!(progress.last().unwrap().stage, Stage::Failed);
        assert_source_running(&vm);
        let t = tgt.join().unwrap();
        assert!(
            matches!(t, Err(TgtError::Cancelled)),
            "{stage}: target {t:?}"
        );
        assert_not_started(&seen);
    }
}

#[test]
fn connection_cut_mid_precopy_resumes_source() {
    let (tgt_addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let addr = proxy(tgt_addr, Fault::CutAt(MessageType::Pages, 3));
    // 32 MiB of data in round 0: more than the loopback socket buffers
    // hold after the cut, so the source is still in round 0 when its
    // writes fail.
    let mut vm = idle(64);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Precopy { round: 0 }, "{}", f.report());
    assert!(matches!(f.error, SrcError::Protocol(_)), "{}", f.report());
    assert_source_running(&vm);
    let t = tgt.join().unwrap();
    assert!(matches!(t, Err(TgtError::Protocol(_))), "{t:?}");
    assert_not_started(&seen);
}

#[test]
fn connection_cut_mid_switchover_resumes_source() {
    let (tgt_addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let addr = proxy(tgt_addr, Fault::CutAt(MessageType::State, 0));
    let mut vm = idle(8);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Switchover, "{}", f.report());
    assert_eq!(vm.resumes, 1, "paused source not resumed");
    assert_source_running(&vm);
    assert!(tgt.join().unwrap().is_err());
    assert_not_started(&seen);
}

/// Runs a migration of a 16 MiB fake through a proxy that corrupts the
/// stream with `fault`: the target must report corruption in transit
/// (the frame's CRC) in a `Pages` frame, not start the guest, and the
/// source must run on. Returns the source's report and the target's error.
fn corruption_is_reported(fault: Fault, opts: &SourceOptions) -> (String, String) {
    let (tgt_addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let addr = proxy(tgt_addr, fault);
    let mut vm = idle(16);
    let (r, _) = run_source(&mut vm, addr, opts, None);
    let f = r.unwrap_err();
    assert_source_running(&vm);
    let e = tgt.join().unwrap().unwrap_err();
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains("checksum mismatch") && chain.contains("Pages"),
        "{chain}"
    );
    assert_not_started(&seen);
    (f.report(), chain)
}

#[test]
fn corrupted_stream_target_refuses_to_start() {
    let (source, target) =
        corruption_is_reported(Fault::FlipAt(MessageType::Pages, 2), &source_opts());
    println!("source: {source}\ntarget: {target}");
}

/// The target writes page data straight from the stream and checks a
/// frame's CRC at its end: a corrupted run header (here the first run's
/// address, moved 1 TiB outside the guest's memory) is still reported as
/// corruption in transit, not as a protocol violation by the source, and
/// nothing is written outside the guest's memory.
#[test]
fn corrupted_run_header_is_reported_as_corruption() {
    // Payload: round (4), run count (4), then the first run's gpa (8):
    // byte 5 of the gpa is bit 40.
    corruption_is_reported(
        Fault::FlipByte(MessageType::Pages, 1, 8 + 5),
        &source_opts(),
    );
}

/// Migrates a 16 MiB fake intact with `opts` to a target accepting
/// `caps`; returns (bytes sent, bytes of the data pages moved).
fn intact_with(opts: &SourceOptions, capabilities: u32) -> (u64, u64) {
    let topts = TargetOptions {
        capabilities,
        ..target_opts()
    };
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), topts);
    let mut vm = idle(16);
    let (r, _) = run_source(&mut vm, addr, opts, None);
    let summary = r.unwrap_or_else(|e| panic!("{}", e.report()));
    tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
    (summary.bytes_sent, summary.data_pages * PAGE_SIZE as u64)
}

/// With compression on, data runs travel as LZ4 blocks: every page
/// arrives intact (checked end to end against the uncompressed pages) in
/// far fewer bytes than the pages hold (the fake's pages are one word and
/// one byte in 4 KiB).
#[test]
fn compressed_migration_is_intact_and_smaller() {
    let opts = SourceOptions {
        compress: Compression::On,
        page_checksum: true,
        ..source_opts()
    };
    let (sent, raw) = intact_with(&opts, caps::ALL);
    assert!(
        sent < raw / 10,
        "{sent} bytes sent for {raw} bytes of pages"
    );
}

/// Auto compresses only while a bandwidth cap applies.
#[test]
fn auto_compression_follows_the_bandwidth_cap() {
    for cap in [None, Some(1 << 30)] {
        let opts = SourceOptions {
            bandwidth_cap: cap,
            ..source_opts()
        };
        let (sent, raw) = intact_with(&opts, caps::ALL);
        assert_eq!(
            sent < raw / 10,
            cap.is_some(),
            "cap {cap:?}: {sent} of {raw}"
        );
    }
}

/// A target that does not offer LZ4 gets the pages as they are.
#[test]
fn target_without_lz4_gets_raw_pages() {
    let opts = SourceOptions {
        compress: Compression::On,
        ..source_opts()
    };
    let (sent, raw) = intact_with(&opts, caps::ZERO_PAGES | caps::PAGE_CHECKSUM);
    assert!(sent > raw, "{sent} bytes sent for {raw} bytes of pages");
}

/// A flipped bit in a frame's flags field (header byte 6) is corruption
/// found by the CRC too, not a frame with unknown flags, although the
/// target reads `Pages` headers before their payload.
#[test]
fn corrupted_header_field_is_reported_as_corruption() {
    corruption_is_reported(Fault::FlipHeader(MessageType::Pages, 1, 6), &source_opts());
}

#[test]
fn corrupted_lz4_block_is_reported_as_corruption() {
    // Payload: round (4), count (4), the first run's header (20: a data
    // run, page 0 holds data), the block's length (4), then the block.
    let opts = SourceOptions {
        compress: Compression::On,
        ..source_opts()
    };
    corruption_is_reported(
        Fault::FlipByte(MessageType::Pages, 0, 8 + 20 + 4 + 2),
        &opts,
    );
}

/// A target slower than the link (each page takes 200 us to write, so
/// round 0 lags by about 0.4 s): the source pauses the guest only once the
/// target acknowledged every round it sent, so the lag is not downtime.
/// Without the acknowledgement (a target that does not offer it) the
/// source would pause as soon as its own estimate allowed.
#[test]
fn source_stuns_only_once_the_target_has_caught_up() {
    let mut host = FakeHost::new();
    host.write_delay = Duration::from_micros(200);
    let written = host.written.clone();
    let (addr, tgt, seen) = spawn_target(host, target_opts());
    let mut vm = idle(16);
    vm.probe_at_pause(written.clone());
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let summary = r.unwrap_or_else(|e| panic!("{}", e.report()));
    tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
    // Everything but the stunned round was written before the pause (the
    // fake writes zero runs too).
    let at_pause = vm.probed().unwrap();
    assert_eq!(
        at_pause,
        summary.data_pages + summary.zero_pages - summary.last_round_pages,
        "pages written on the target when the source paused"
    );
}

#[test]
fn version_mismatch_says_which_host_to_upgrade() {
    let (addr, tgt, seen) = spawn_target(
        FakeHost::new(),
        TargetOptions {
            versions: (3, 4),
            ..target_opts()
        },
    );
    let mut vm = idle(8);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Connect);
    let msg = f.report();
    assert!(
        msg.contains("speaks migration protocol 3..4") && msg.contains("upgrade vigil on host-a"),
        "{msg}"
    );
    assert!(matches!(tgt.join().unwrap(), Err(TgtError::Version(_))));
    assert_not_started(&seen);
}

#[test]
fn precheck_failure_names_check_and_both_sides() {
    let mut host = FakeHost::new();
    host.facts.networks = ["prod".to_string()].into();
    let (addr, tgt, seen) = spawn_target(host, target_opts());
    let mut vm = idle(8);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Precheck);
    let SrcError::Precheck { failures } = &f.error else {
        panic!("{}", f.report())
    };
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].check, "network");
    assert!(
        failures[0].target.contains("case-sensitive"),
        "{}",
        failures[0]
    );
    assert_source_running(&vm);
    assert!(matches!(tgt.join().unwrap(), Err(TgtError::Precheck(_))));
    assert_not_started(&seen);
}

#[test]
fn target_restore_failure_resumes_source_with_reason() {
    let mut host = FakeHost::new();
    host.fail_restore = true;
    let (addr, tgt, seen) = spawn_target(host, target_opts());
    let mut vm = idle(8);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Switchover);
    let SrcError::TargetAborted { reason, .. } = &f.error else {
        panic!("{}", f.report())
    };
    assert!(reason.contains("restore_state"), "{reason}");
    assert_eq!(vm.resumes, 1);
    assert_source_running(&vm);
    assert!(tgt.join().unwrap().is_err());
    assert_not_started(&seen);
}

#[test]
fn source_save_failure_resumes_source() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = idle(8);
    vm.fail_save = true;
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Switchover);
    assert!(f.report().contains("KVM_GET_REGS"), "{}", f.report());
    assert_source_running(&vm);
    assert!(matches!(
        tgt.join().unwrap(),
        Err(TgtError::SourceAborted { .. })
    ));
    assert_not_started(&seen);
}

#[test]
fn page_checksum_mode_migrates_intact() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = FakeVm::new(VmSpec {
        mib: 16,
        rate: 5_000,
        hot_pages: 1024,
    });
    let opts = SourceOptions {
        page_checksum: true,
        ..source_opts()
    };
    let (r, _) = run_source(&mut vm, addr, &opts, None);
    r.unwrap_or_else(|e| panic!("{}", e.report()));
    tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
}

#[test]
fn checksum_mode_refused_by_target_fails_at_connect() {
    let (addr, tgt, _seen) = spawn_target(
        FakeHost::new(),
        TargetOptions {
            capabilities: migration::protocol::caps::ZERO_PAGES,
            ..target_opts()
        },
    );
    let mut vm = idle(8);
    let opts = SourceOptions {
        page_checksum: true,
        ..source_opts()
    };
    let (r, _) = run_source(&mut vm, addr, &opts, None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Connect);
    assert!(
        matches!(f.error, SrcError::Capability { .. }),
        "{}",
        f.report()
    );
    assert!(tgt.join().unwrap().is_err());
}

#[test]
fn two_migrations_at_once() {
    let handles: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
                let mut vm = FakeVm::new(VmSpec {
                    mib: 16,
                    rate: 10_000 * (i + 1),
                    hot_pages: 2048,
                });
                let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
                r.unwrap_or_else(|e| panic!("{}", e.report()));
                tgt.join().unwrap().unwrap();
                assert_intact(&vm, &seen);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn target_that_stops_reading_fails_by_write_timeout() {
    use migration::protocol::{read_message, Decoder, Encoder, Hello, Message};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // A target that answers the hello and the pre-checks, then hangs.
    let hung = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let (mut dec, mut enc) = (Decoder::new(), Encoder::new());
        let hello = read_message(&mut s, &mut dec).unwrap().unwrap();
        assert!(matches!(hello, Message::Hello(_)));
        enc.send(&mut s, &Message::Hello(Hello::ours("host-b", 1)))
            .unwrap();
        let pre = read_message(&mut s, &mut dec).unwrap().unwrap();
        assert!(matches!(pre, Message::Precheck(_)));
        enc.send(&mut s, &Message::PrecheckResult(vec![])).unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let mut vm = idle(64);
    let opts = SourceOptions {
        write_timeout: Duration::from_millis(300),
        ..source_opts()
    };
    let t0 = std::time::Instant::now();
    let (r, _) = run_source(&mut vm, addr, &opts, None);
    let f = r.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "source hung with the target"
    );
    assert_eq!(f.stage, Stage::Precopy { round: 0 }, "{}", f.report());
    assert_source_running(&vm);
    hung.join().unwrap();
}

#[test]
fn cancel_from_another_thread_mid_round() {
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = idle(32);
    // 16 MiB of data at 8 MiB/s: round 0 would take 2 s (uncompressed).
    let opts = SourceOptions {
        bandwidth_cap: Some(8 << 20),
        compress: Compression::Off,
        ..source_opts()
    };
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.cancel();
    });
    let t0 = std::time::Instant::now();
    let s = TcpStream::connect(addr).unwrap();
    let r = migration::migrate(&mut vm, s, &opts, &cancel, &mut |_| {});
    let f = r.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "cancel took {:?}",
        t0.elapsed()
    );
    assert!(matches!(f.error, SrcError::Cancelled), "{}", f.report());
    assert_eq!(f.stage, Stage::Precopy { round: 0 });
    assert_source_running(&vm);
    assert!(matches!(tgt.join().unwrap(), Err(TgtError::Cancelled)));
    assert_not_started(&seen);
    canceller.join().unwrap();
}

/// An idle source holding generation 3 of the lease in `store`.
fn leased(store: &Store) -> FakeVm {
    let mut vm = idle(8);
    vm.lease = Some(FakeLease {
        store: store.clone(),
        generation: 3,
        renewing: true,
        gone: false,
    });
    vm
}

fn leased_host(store: &Store) -> FakeHost {
    let mut host = FakeHost::new();
    host.lease = Some(store.clone());
    host
}

fn record(store: &Store) -> Option<(String, u64)> {
    store.lock().unwrap().record.clone()
}

#[test]
fn lease_is_handed_over_with_the_final_state() {
    let store = store("host-a", 3);
    let (addr, tgt, seen) = spawn_target(leased_host(&store), target_opts());
    let mut vm = leased(&store);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    r.unwrap();
    tgt.join().unwrap().unwrap();
    assert_intact(&vm, &seen);
    // The target claimed generation 4 before it ran the guest; the source
    // neither renews nor resumes.
    assert_eq!(record(&store), Some(("host-b".into(), 4)));
    assert_eq!(
        store.lock().unwrap().claims.get(&4).map(String::as_str),
        Some("host-b")
    );
    let l = vm.lease.as_ref().unwrap();
    assert!(l.gone && !l.renewing);
    assert_eq!(vm.resumes, 0);
}

#[test]
fn target_killed_after_claiming_leaves_the_source_stopped() {
    let store = store("host-a", 3);
    let mut host = leased_host(&store);
    host.crash_after_claim = true;
    let (addr, tgt, _seen) = spawn_target(host, target_opts());
    let mut vm = leased(&store);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    // The source raced for generation 4 and lost: the guest is the
    // target's (it died, but it held the lease), never resumed here.
    assert!(
        f.target_holds_lease()
            .is_some_and(|w| w.contains("generation 4")),
        "{}",
        f.report()
    );
    assert!(
        f.report().contains("the guest runs on the target"),
        "{}",
        f.report()
    );
    assert_eq!(vm.resumes, 0);
    assert!(vm.is_paused());
    assert!(vm.lease.as_ref().unwrap().gone);
    assert_eq!(record(&store), Some(("host-b".into(), 4)));
    assert!(tgt.join().is_err(), "the target thread died");
}

#[test]
fn source_wins_the_race_when_the_target_never_claimed() {
    let store = store("host-a", 3);
    let mut host = leased_host(&store);
    host.fail_restore = true;
    let (addr, tgt, seen) = spawn_target(host, target_opts());
    let mut vm = leased(&store);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Switchover);
    assert!(f.lease.is_none(), "{}", f.report());
    // The lease had been sent: the source claimed generation 4 itself and
    // runs the guest again under it.
    assert_eq!(record(&store), Some(("host-a".into(), 4)));
    let l = vm.lease.as_ref().unwrap();
    assert_eq!(l.generation, 4);
    assert!(l.renewing && !l.gone);
    assert_eq!(vm.resumes, 1);
    assert_source_running(&vm);
    assert!(tgt.join().unwrap().is_err());
    assert_not_started(&seen);
}

#[test]
fn an_undecided_race_keeps_the_source_paused() {
    let store = store("host-a", 3);
    let mut host = leased_host(&store);
    host.fail_restore = true;
    store.lock().unwrap().unreachable = true;
    let (addr, tgt, _seen) = spawn_target(host, target_opts());
    let mut vm = leased(&store);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert!(f.lease_suspended().is_some(), "{}", f.report());
    assert!(f.report().contains("lease-suspended"), "{}", f.report());
    assert_eq!(vm.resumes, 0);
    assert!(vm.is_paused());
    assert!(tgt.join().unwrap().is_err());
}

#[test]
fn a_failure_before_the_lease_was_sent_keeps_it_renewed_here() {
    let store = store("host-a", 3);
    let (addr, tgt, seen) = spawn_target(leased_host(&store), target_opts());
    let mut vm = leased(&store);
    vm.fail_save = true;
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert!(f.lease.is_none());
    let l = vm.lease.as_ref().unwrap();
    assert!(l.renewing && !l.gone && l.generation == 3);
    assert!(store.lock().unwrap().claims.is_empty());
    assert_source_running(&vm);
    assert!(tgt.join().unwrap().is_err());
    assert_not_started(&seen);
}

#[test]
fn lease_prechecks_refuse_before_any_memory_moves() {
    // A source with a lease, a target without a handoff spec.
    let store = store("host-a", 3);
    let (addr, tgt, seen) = spawn_target(FakeHost::new(), target_opts());
    let mut vm = leased(&store);
    let (r, progress) = run_source(&mut vm, addr, &source_opts(), None);
    let e = r.unwrap_err().report();
    assert!(
        e.contains(
            "the VM holds an HA disk lease (/srv/ds1/fake.lease, generation 3); the target has \
             none: migrate HA-protected VMs with `vigil vm migrate fake --host host-b`, or start \
             the target with --lease and handoff = true"
        ),
        "{e}"
    );
    assert!(progress.iter().all(|p| p.bytes_sent < 1 << 20));
    assert_source_running(&vm);
    assert!(vm.lease.as_ref().unwrap().renewing);
    assert!(tgt.join().unwrap().is_err());
    assert_not_started(&seen);
    // A target with a handoff spec, a source without a lease.
    let (addr, tgt, _) = spawn_target(leased_host(&store), target_opts());
    let mut vm = idle(8);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let e = r.unwrap_err().report();
    assert!(
        e.contains("the VM holds no HA disk lease") && e.contains("handoff = true"),
        "{e}"
    );
    assert!(tgt.join().unwrap().is_err());
    // Two different records.
    let mut host = leased_host(&store);
    host.lease_file = "/srv/ds2/fake.lease".into();
    let (addr, tgt, _) = spawn_target(host, target_opts());
    let mut vm = leased(&store);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let e = r.unwrap_err().report();
    assert!(
        e.contains("/srv/ds1/fake.lease") && e.contains("/srv/ds2/fake.lease"),
        "{e}"
    );
    assert!(tgt.join().unwrap().is_err());
    assert_eq!(record(&store), Some(("host-a".into(), 3)));
    assert!(store.lock().unwrap().claims.is_empty());
}

#[test]
fn a_target_without_lease_handoff_never_gets_the_lease() {
    let store = store("host-a", 3);
    let opts = TargetOptions {
        capabilities: caps::ALL & !caps::LEASE_HANDOFF,
        ..target_opts()
    };
    let (addr, tgt, seen) = spawn_target(leased_host(&store), opts);
    let mut vm = leased(&store);
    let (r, _) = run_source(&mut vm, addr, &source_opts(), None);
    let f = r.unwrap_err();
    assert_eq!(f.stage, Stage::Precheck);
    assert!(f.report().contains("the target has none"), "{}", f.report());
    assert_source_running(&vm);
    let _ = tgt.join();
    assert_not_started(&seen);
}
