//! `stop-tools`: kills the guest's tools daemon after a delay, as a crash
//! or an operator's `kill -9` would: the daemon process really dies and the
//! host stops receiving its heartbeats. VM monitoring tests start it with
//! `vigil.run=stop-tools:after=N`, so that it runs again in every boot.
//!
//! Options: `after=SECONDS` (default 10) after its own start,
//! `signal=kill|term` (default kill). The daemon is found through /proc:
//! every process whose command line is `.../vigil-tools daemon ...`.
//! Prints `VIGIL-TOOLS-KILLED pid=<pid>` for each one it signalled, or
//! `VIGIL-TOOLS-KILL-NONE` if it found none within a minute (exit 1).

use crate::{rt, sys};
use vigil_tools::args::{parse_u64, KeyValues};
use vigil_tools::text::Line;

pub fn run(opts: &[u8]) -> i32 {
    let mut after = 10u64;
    let mut signal = sys::SIGKILL;
    for (k, v) in KeyValues::new(opts) {
        match (k, v) {
            (b"after", _) if parse_u64(v).is_some() => after = parse_u64(v).unwrap_or(10),
            (b"signal", b"kill") => signal = sys::SIGKILL,
            (b"signal", b"term") => signal = sys::SIGTERM,
            _ => return crate::bad_option("stop-tools", k, v),
        }
    }
    sys::sleep_ns(after * 1_000_000_000);
    // The daemon may still be starting on a slow guest: look again for a
    // while before giving up.
    for _ in 0..60 {
        let killed = kill_daemons(signal);
        if killed > 0 {
            return 0;
        }
        sys::sleep_ns(1_000_000_000);
    }
    rt::out(Line::new().s("VIGIL-TOOLS-KILL-NONE").nl());
    1
}

/// Signals every tools daemon; returns how many.
fn kill_daemons(signal: usize) -> u32 {
    let Ok(dir) = sys::open(b"/proc", sys::O_RDONLY | sys::O_DIRECTORY) else {
        rt::warn(Line::new().s("stop-tools: cannot open /proc"));
        return 0;
    };
    let me = sys::getpid();
    let mut killed = 0;
    let mut buf = [0u8; 4096];
    while let Ok(n) = sys::getdents64(dir, &mut buf) {
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off + 19 < n {
            // d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name.
            let reclen = usize::from(u16::from_le_bytes([buf[off + 16], buf[off + 17]]));
            if reclen == 0 || off + reclen > n {
                break;
            }
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            off += reclen;
            let Some(pid) = parse_u64(name).and_then(|p| i32::try_from(p).ok()) else {
                continue;
            };
            if pid != me && is_daemon(name) && sys::kill(pid, signal).is_ok() {
                let mut l = Line::new();
                l.s("VIGIL-TOOLS-KILLED pid=").u(pid as u64).nl();
                rt::out(&l);
                killed += 1;
            }
        }
    }
    sys::close(dir);
    killed
}

/// Whether /proc/PID/cmdline is `.../vigil-tools daemon ...`.
fn is_daemon(pid: &[u8]) -> bool {
    let mut path = [0u8; 64];
    let parts: [&[u8]; 3] = [b"/proc/", pid, b"/cmdline"];
    let mut len = 0;
    for p in parts {
        if len + p.len() > path.len() {
            return false;
        }
        path[len..len + p.len()].copy_from_slice(p);
        len += p.len();
    }
    let mut cmd = [0u8; 128];
    let Ok(fd) = sys::open(&path[..len], sys::O_RDONLY) else {
        return false;
    };
    let n = sys::read(fd, &mut cmd).unwrap_or(0);
    sys::close(fd);
    let mut args = cmd[..n].split(|&c| c == 0);
    let prog = args.next().unwrap_or(&[]);
    prog.ends_with(b"vigil-tools") && args.next() == Some(&b"daemon"[..])
}
