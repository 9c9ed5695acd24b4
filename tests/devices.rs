//! End-to-end tests of the virtio devices: the real `vigil` binary booting
//! the real guest from `guest-images/` with disks attached.
//!
//! Guest-booting tests hold [`GUEST_LOCK`] so this binary runs one guest at
//! a time (tests/boot.rs has its own lock; the two binaries may overlap,
//! which keeps it at two guests at most on a 2-core machine). The guest side
//! of each test is a test mode of the guest's /init
//! (`guest-images/init/init.c`: disk-write, disk-read, disk-ro, vsock, net).
//! The network test needs root (it creates a tap, 198.18.77.1/24, removed
//! even when the test fails) and only sends to 198.18.77.2, the guest: ICMP
//! echo both ways, then a TCP round trip with the guest's `echo` workload.

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::*;

/// Boots the default guest running test mode `test` with `extra` flags.
fn boot_guest(extra: &[&str], test: &str) -> Outcome {
    boot_guest_with(extra, test, "")
}

/// [`boot_guest`] with more kernel command-line keys (e.g. workloads).
fn boot_guest_with(extra: &[&str], test: &str, keys: &str) -> Outcome {
    let cfg = guest_config();
    let base = vmm::VmConfig::load(Some(&cfg), Default::default()).unwrap();
    let cmdline = format!("{} vigil.test={test} {keys}", base.cmdline);
    let _g = guest_lock();
    let mut args = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    vigil(&args, GUEST_TIMEOUT)
}

/// A scratch file removed when dropped (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, size: u64, fill: u8) -> Self {
        let p = std::env::temp_dir().join(format!("vigil-dev-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![fill; size as usize]).unwrap();
        Scratch(p)
    }

    fn disk_arg(&self, extra: &str) -> String {
        format!("path={}{extra}", self.0.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The bytes the guest's disk tests write at offset 4096 (see disk_pattern
/// in guest-images/init/init.c).
fn disk_pattern() -> Vec<u8> {
    let mut v: Vec<u8> = (0..4096u32).map(|i| ((i * 7 + 13) % 251) as u8).collect();
    v[..19].copy_from_slice(b"VIGIL-DISK-PATTERN\n");
    v
}

#[test]
fn linux_guest_writes_disk_and_reads_it_back_after_reboot() {
    let img = Scratch::new("rw.img", 8 << 20, 0);
    let disk = img.disk_arg(",id=test-disk-1");
    let o = boot_guest(&["--disk", &disk], "disk-write");
    assert!(o.stdout.contains("VIGIL-DISK-WRITE-OK"), "{o:?}");
    assert_eq!(o.code, Some(0), "{o:?}");
    let bytes = std::fs::read(&img.0).unwrap();
    assert_eq!(
        &bytes[4096..8192],
        &disk_pattern()[..],
        "pattern not on disk"
    );
    assert!(
        bytes[..4096].iter().all(|b| *b == 0),
        "bytes before the pattern changed"
    );
    assert!(
        bytes[8192..].iter().all(|b| *b == 0),
        "bytes after the pattern changed"
    );

    let o = boot_guest(&["--disk", &disk], "disk-read");
    assert!(o.stdout.contains("VIGIL-DISK-READ-OK"), "{o:?}");
    assert!(o.stdout.contains("VIGIL-DISK-SERIAL test-disk-1"), "{o:?}");
    assert_eq!(o.code, Some(0), "{o:?}");
}

#[test]
fn linux_guest_cannot_write_a_read_only_disk() {
    let img = Scratch::new("ro.img", 4 << 20, 0x5a);
    let o = boot_guest(&["--disk", &img.disk_arg(",ro")], "disk-ro");
    assert!(o.stdout.contains("VIGIL-DISK-RO-OK"), "{o:?}");
    assert_eq!(o.code, Some(0), "{o:?}");
    let bytes = std::fs::read(&img.0).unwrap();
    assert!(
        bytes.iter().all(|b| *b == 0x5a),
        "read-only image was modified"
    );
}

#[test]
fn bad_disk_arguments_are_precise_errors() {
    let cfg = repo().join("guest-images/default-vm.toml");
    let cfg = cfg.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--disk", "ro"], "has no path=IMG"),
        (&["--disk", "path=/x,bogus"], "`bogus`"),
        (
            &["--disk", "path=/nonexistent/vigil.img"],
            "cannot open disk image /nonexistent/vigil.img",
        ),
        (
            &["--disk", "path=/a,id=same", "--disk", "path=/b,id=same"],
            "`same` is used by two disks",
        ),
    ];
    for (args, needle) in cases {
        let mut a = vec!["run", "--config", cfg, "--console", "none"];
        a.extend_from_slice(args);
        let o = vigil(&a, QUICK_TIMEOUT);
        assert_eq!(o.code, Some(1), "{args:?}: {o:?}");
        assert!(
            o.stderr.contains(needle),
            "{args:?}: want {needle:?}\n{o:?}"
        );
    }
}

/// Reads one line from `s` (the newline excluded).
fn read_line(s: &mut std::os::unix::net::UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn linux_guest_vsock_both_directions() {
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};

    guest_config();
    let dir = std::env::temp_dir().join(format!("vigil-vsock-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let sock = dir.join("v.sock");
    let console = dir.join("console.log");
    std::fs::write(&console, b"").unwrap();
    // Guest -> host: the guest connects to port 7000, i.e. <sock>_7000.
    let listener = UnixListener::bind(format!("{}_7000", sock.display())).unwrap();

    let (sock2, console2) = (sock.clone(), console.clone());
    let host = std::thread::spawn(move || -> Result<(String, String, String), String> {
        let (mut c, _) = listener.accept().map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
        let from_guest = read_line(&mut c);
        c.write_all(b"HELLO-FROM-HOST\n")
            .map_err(|e| e.to_string())?;
        // Host -> guest, once the guest listens on port 7001.
        let start = Instant::now();
        while !std::fs::read_to_string(&console2)
            .unwrap_or_default()
            .contains("VIGIL-VSOCK-LISTENING")
        {
            if start.elapsed() > GUEST_TIMEOUT {
                return Err("guest never listened".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut s = UnixStream::connect(&sock2).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"CONNECT 7001\n").map_err(|e| e.to_string())?;
        let ok = read_line(&mut s);
        s.write_all(b"HOST-LINE\n").map_err(|e| e.to_string())?;
        let ack = read_line(&mut s);
        Ok((from_guest, ok, ack))
    });

    let vsock = format!("cid=3,socket={}", sock.display());
    let con = format!("file:{}", console.display());
    let o = boot_guest(&["--vsock", &vsock, "--console", &con], "vsock");
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    let (from_guest, ok, ack) = host
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{out}\n{o:?}"));
    assert_eq!(from_guest, "HELLO-FROM-GUEST", "{out}");
    assert!(
        out.contains("VIGIL-VSOCK-GOT HELLO-FROM-HOST"),
        "{out}\n{o:?}"
    );
    assert!(ok.starts_with("OK "), "{ok:?}");
    assert!(
        out.contains("VIGIL-VSOCK-HOST-SAID HOST-LINE"),
        "{out}\n{o:?}"
    );
    assert_eq!(ack, "GUEST-ACK");
    assert_eq!(o.code, Some(0), "{out}\n{o:?}");
}

/// A tap for one test, with a 198.18.77.1/24 address, removed on drop (also
/// when the test fails).
struct TestTap(String);

impl TestTap {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).status();
        let run = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().map(|s| s.success());
            assert!(
                matches!(ok, Ok(true)),
                "ip {args:?} failed (this test needs root)"
            );
        };
        let t = TestTap(name.to_string());
        run(&["tuntap", "add", "dev", name, "mode", "tap"]);
        run(&["addr", "add", "198.18.77.1/24", "dev", name]);
        run(&["link", "set", name, "up"]);
        t
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// Sends ICMP echo requests to `dst` (a 198.18.x.x test address) over a raw
/// socket until one is answered or `timeout` passes. The host may have no
/// `ping` binary, so this is done here.
fn icmp_ping(dst: [u8; 4], timeout: Duration) -> bool {
    fn checksum(b: &[u8]) -> u16 {
        let mut s: u32 = b
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
    assert_eq!(dst[..2], [198, 18], "tests only send to 198.18.0.0/15");
    // SAFETY: plain socket(2) call; the fd is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, passed with its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    let mut seq: u16 = 0;
    let mut answered = false;
    while !answered && start.elapsed() < timeout {
        seq += 1;
        let mut pkt = vec![8u8, 0, 0, 0, 0x56, 0x47, (seq >> 8) as u8, seq as u8];
        pkt.extend_from_slice(b"vigil-net-test");
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: the buffer and address are live locals with their sizes.
        unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let mut buf = [0u8; 1500];
        // SAFETY: recv into a live local buffer of the given size.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n >= 28 {
            let ihl = usize::from(buf[0] & 0xf) * 4;
            // Echo reply from dst with our identifier.
            answered = buf[12..16] == dst
                && buf.get(ihl) == Some(&0)
                && buf.get(ihl + 4..ihl + 6) == Some(&[0x56, 0x47]);
        }
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    answered
}

/// A TCP round trip with the guest's echo workload (198.18.x.x only).
fn tcp_echo(dst: [u8; 4], msg: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    use std::net::{SocketAddr, TcpStream};
    assert_eq!(dst[..2], [198, 18], "tests only send to 198.18.0.0/15");
    let addr = SocketAddr::from((dst, 7777));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).map_err(|e| e.to_string())?;
    Ok(got)
}

#[test]
fn linux_guest_network_ping_both_ways_and_tcp_echo() {
    guest_config();
    let tap = TestTap::new(&format!("vgt{}", std::process::id() % 100_000));
    let dir = std::env::temp_dir().join(format!("vigil-net-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let console = dir.join("console.log");
    std::fs::write(&console, b"").unwrap();
    let console2 = console.clone();
    let host = std::thread::spawn(move || -> (bool, Result<Vec<u8>, String>) {
        let start = Instant::now();
        let ready = |m: &str| {
            std::fs::read_to_string(&console2)
                .unwrap_or_default()
                .contains(m)
        };
        while !(ready("VIGIL-NET-READY") && ready("VIGIL-ECHO-READY")) {
            if start.elapsed() > GUEST_TIMEOUT {
                return (false, Err("the guest never got ready".into()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let pinged = icmp_ping([198, 18, 77, 2], Duration::from_secs(10));
        // The guest powers off 25 s after READY: a few tries fit.
        let mut echoed = Err("not tried".to_string());
        for _ in 0..3 {
            echoed = tcp_echo([198, 18, 77, 2], b"vigil-echo-over-tap\n");
            if echoed.is_ok() {
                break;
            }
        }
        (pinged, echoed)
    });
    let net = format!("tap={},mac=52:54:00:12:34:56,network=lab", tap.0);
    let con = format!("file:{}", console.display());
    let o = boot_guest_with(
        &["--net", &net, "--console", &con],
        "net",
        "vigil.run=echo:port=7777",
    );
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let (host_reached_guest, echoed) = host.join().unwrap();
    assert!(
        out.contains("VIGIL-NET-PING-OK"),
        "guest could not ping the host\n{out}\n{o:?}"
    );
    assert!(
        host_reached_guest,
        "host could not ping the guest\n{out}\n{o:?}"
    );
    assert_eq!(
        echoed.as_deref(),
        Ok(&b"vigil-echo-over-tap\n"[..]),
        "the guest's echo server did not answer over the tap\n{out}\n{o:?}"
    );
    assert_eq!(o.code, Some(0), "{out}\n{o:?}");
}
