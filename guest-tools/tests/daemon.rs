//! Runs the real `vigil-tools daemon` on the host against a unix-socket
//! stand-in for the VMM's end of the tools channel (PROTOCOL.md): HELLO,
//! heartbeats, PING, application heartbeats, reconnection, SHUTDOWN.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vigil-tools");

/// Kills the daemon if a test fails half-way.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn accept(l: &UnixListener, within: Duration) -> BufReader<UnixStream> {
    l.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                return BufReader::new(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < within, "the daemon did not connect");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn line(r: &mut BufReader<UnixStream>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("a line from the daemon");
    assert!(s.ends_with('\n'), "incomplete line {s:?}");
    s.trim_end().to_string()
}

/// Reads lines until one that is not a heartbeat; returns it and the
/// heartbeat sequence numbers seen on the way.
fn next_non_hb(r: &mut BufReader<UnixStream>, hbs: &mut Vec<u64>) -> String {
    loop {
        let l = line(r);
        match l.strip_prefix("HB ") {
            Some(rest) => {
                let f: Vec<&str> = rest.split(' ').collect();
                assert_eq!(f.len(), 2, "{l}");
                hbs.push(f[0].parse().unwrap());
                let _uptime_ms: u64 = f[1].parse().unwrap();
            }
            None => return l,
        }
    }
}

fn send(r: &mut BufReader<UnixStream>, s: &str) {
    r.get_mut().write_all(s.as_bytes()).unwrap();
}

fn app_heartbeat(socket: &str, name: &str) {
    let st = Command::new(BIN)
        .args(["app-heartbeat", "--name", name, "--socket", socket])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn daemon_speaks_the_tools_protocol() {
    let dir = std::env::temp_dir().join(format!("vigil-tools-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let app_socket = format!("@vigil-tools-test-{}", std::process::id());

    let mut d = Daemon(
        Command::new(BIN)
            .args([
                "daemon",
                "--connect",
                &format!("unix:{}", path.display()),
                "--app-socket",
                &app_socket,
                "--interval-ms",
                "100",
                "--dry-run-poweroff",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );

    // HELLO, then heartbeats counting from 1.
    let mut r = accept(&listener, Duration::from_secs(5));
    let hello = line(&mut r);
    let f: Vec<&str> = hello.split(' ').collect();
    assert_eq!(
        &f[..3],
        ["HELLO", "vigil-tools", env!("CARGO_PKG_VERSION")],
        "{hello}"
    );
    assert_eq!(f.len(), 4, "{hello}");
    let mut hbs = Vec::new();
    send(&mut r, "PING\n");
    assert_eq!(next_non_hb(&mut r, &mut hbs), "PONG");
    send(&mut r, "REBOOT\n");
    assert_eq!(next_non_hb(&mut r, &mut hbs), "ERR unknown-command");

    // Application heartbeats are relayed with a per-name count.
    app_heartbeat(&app_socket, "web");
    assert_eq!(next_non_hb(&mut r, &mut hbs), "APP web 1");
    app_heartbeat(&app_socket, "web");
    assert_eq!(next_non_hb(&mut r, &mut hbs), "APP web 2");
    app_heartbeat(&app_socket, "db");
    assert_eq!(next_non_hb(&mut r, &mut hbs), "APP db 1");

    // A dropped connection (migration, restore) is re-established, and the
    // heartbeat sequence goes on.
    while hbs.len() < 3 {
        send(&mut r, "PING\n");
        assert_eq!(next_non_hb(&mut r, &mut hbs), "PONG");
    }
    assert_eq!(hbs[0], 1);
    assert!(hbs.windows(2).all(|w| w[1] == w[0] + 1), "{hbs:?}");
    drop(r);
    let mut r = accept(&listener, Duration::from_secs(5));
    assert_eq!(line(&mut r), hello, "same boot, same HELLO");
    let mut after = Vec::new();
    send(&mut r, "PING\n");
    assert_eq!(next_non_hb(&mut r, &mut after), "PONG");
    let last = *hbs.last().unwrap();
    assert!(after.iter().all(|&s| s > last), "{hbs:?} then {after:?}");

    // SHUTDOWN is acknowledged, then (dry run) the daemon exits.
    send(&mut r, "SHUTDOWN\n");
    assert_eq!(next_non_hb(&mut r, &mut after), "ACK SHUTDOWN");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = d.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "daemon still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(d.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(out.contains("VIGIL-TOOLS-UP"), "{out}");
    assert!(out.contains("VIGIL-TOOLS-CONNECTED"), "{out}");
    assert!(out.contains("VIGIL-TOOLS-SHUTDOWN dry-run"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_waits_for_a_host_that_is_not_there_yet() {
    let dir = std::env::temp_dir().join(format!("vigil-tools-late-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host.sock");
    let _ = std::fs::remove_file(&path);
    let _d = Daemon(
        Command::new(BIN)
            .args([
                "daemon",
                "--connect",
                &format!("unix:{}", path.display()),
                "--app-socket",
                &format!("@vigil-tools-late-{}", std::process::id()),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(600));
    let listener = UnixListener::bind(&path).unwrap();
    // Back-off is at most 5 s between attempts.
    let mut r = accept(&listener, Duration::from_secs(7));
    assert!(line(&mut r).starts_with("HELLO vigil-tools "));
    assert!(line(&mut r).starts_with("HB 1 "));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn app_heartbeat_without_a_daemon_fails_clearly() {
    let out = Command::new(BIN)
        .args(["app-heartbeat", "--socket", "@vigil-tools-nobody-listens"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not listening"));
    let bad = Command::new(BIN)
        .args(["app-heartbeat", "--name", "no spaces"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn poweroff_by_hand_must_be_spelled_out() {
    let out = Command::new(BIN)
        .args(["poweroff", "--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "VIGIL-TOOLS-SHUTDOWN dry-run\n"
    );
    let out = Command::new(BIN).arg("poweroff").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn app_heartbeat_as_a_workload_beats_count_times_then_says_so() {
    let dir = std::env::temp_dir().join(format!("vigil-tools-appwl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = Command::new(BIN)
        .args([
            "app-heartbeat",
            &format!("name=web,every=1,count=2,socket={}", path.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("VIGIL-APP-HEARTBEAT-DONE sent=2"),
        "{stdout}"
    );
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"HB web\n");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
