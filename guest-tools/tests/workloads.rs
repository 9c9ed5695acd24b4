//! Runs the real workloads on the host (they are ordinary Linux programs):
//! the disk journal on a file, the memory dirtier for a few passes, the
//! echo server on loopback, the counter.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vigil-tools");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn temp_disk(name: &str, bytes: u64) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vigil-tools-{name}-{}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(bytes).unwrap();
    p
}

#[test]
fn disk_journal_resumes_verifies_and_detects_damage() {
    let disk = temp_disk("journal", 64 * 1024);
    let dev = format!("dev={}", disk.display());
    let (rc, out) = run(&["disk-write", &format!("{dev},count=5,rate=0,tag=first")]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("VIGIL-DISK-RESUME pos=0 seq=1 tag=first"),
        "{out}"
    );
    assert!(out.contains("VIGIL-DISK-DONE seq=5"), "{out}");
    // A second writer (a restarted VM) resumes after the last record.
    let (rc, out) = run(&["disk-write", &format!("{dev},count=3,rate=0,tag=second")]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("VIGIL-DISK-RESUME pos=5 seq=6 tag=second"),
        "{out}"
    );
    let (rc, out) = run(&["disk-verify", &dev]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("VIGIL-DISK-VERIFY ok records=8 first_seq=1 last_seq=8 writers=2 gaps=0"),
        "{out}"
    );

    // The first writer comes back (split brain): interleaved.
    let (rc, _) = run(&["disk-write", &format!("{dev},count=1,rate=0,tag=first")]);
    assert_eq!(rc, 0);
    let (rc, out) = run(&["disk-verify", &dev]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("VIGIL-DISK-PROBLEM interleaved pos=8 seq=9"),
        "{out}"
    );

    // A flipped byte is a bad checksum.
    let mut data = std::fs::read(&disk).unwrap();
    data[2 * 512 + 100] ^= 0xff;
    std::fs::write(&disk, &data).unwrap();
    let (rc, out) = run(&["disk-verify", &dev]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("VIGIL-DISK-PROBLEM bad-checksum pos=2"),
        "{out}"
    );
    assert!(out.contains("bad=1"), "{out}");

    // A full disk ends the writer cleanly.
    let small = temp_disk("full", 4 * 512);
    let (rc, out) = run(&["disk-write", &format!("dev={},rate=0", small.display())]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("VIGIL-DISK-FULL seq=4"), "{out}");
    let _ = std::fs::remove_file(disk);
    let _ = std::fs::remove_file(small);
}

#[test]
fn dirtier_runs_passes_without_mismatch() {
    let (rc, out) = run(&["dirty", "mib=4,passes=50,report=1"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("VIGIL-DIRTY-READY mib=4 pages=1024"), "{out}");
    assert!(
        out.contains("VIGIL-DIRTY-DONE passes=50 mismatches=0"),
        "{out}"
    );
}

#[test]
fn dirtier_paces_its_writes() {
    // 4 MiB per pass at 8 MiB/s: 3 passes take about 1.5 s.
    let start = std::time::Instant::now();
    let (rc, out) = run(&["dirty", "mib=4,rate=8,passes=3"]);
    assert_eq!(rc, 0, "{out}");
    let t = start.elapsed();
    assert!(t >= Duration::from_millis(1200), "{t:?}");
    assert!(t < Duration::from_secs(10), "{t:?}");
}

#[test]
fn bad_options_are_refused() {
    for (cmd, opts) in [
        ("dirty", "mib=x"),
        ("disk-write", "speed=3"),
        ("echo", "port=70000"),
        ("counter", "every=0"),
        ("stop-tools", "after=soon"),
        ("stop-tools", "signal=hup"),
        ("app-heartbeat", "every=x"),
        ("app-heartbeat", "name=no spaces"),
    ] {
        let out = Command::new(BIN).args([cmd, opts]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd} {opts}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("bad option"));
    }
    assert_eq!(run(&["no-such-command"]).0, 2);
}

#[test]
fn echo_server_answers_udp_and_tcp_on_loopback() {
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut child = Command::new(BIN)
        .args(["echo", &format!("port={port}")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), format!("VIGIL-ECHO-READY port={port}"));

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp.send_to(b"ping-udp", ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 64];
    let n = udp.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping-udp");

    let mut a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    for s in [&mut a, &mut b] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    b.write_all(b"second").unwrap();
    a.write_all(b"first").unwrap();
    let mut got = [0u8; 6];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"second");
    let mut got = [0u8; 5];
    a.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"first");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn counter_counts_up() {
    let mut child = Command::new(BIN)
        .args(["counter", "every=1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f[0], "VIGIL-COUNTER", "{l}");
        assert!(f[2].starts_with("uptime_ms="), "{l}");
        seen.push(f[1].parse::<u64>().unwrap());
    }
    assert_eq!(seen, [1, 2]);
    let _ = child.kill();
    let _ = child.wait();
}
