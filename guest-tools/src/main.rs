//! `vigil-tools`: Vigil's in-guest tools daemon and test workloads, one
//! static binary with busybox-style subcommands (see `usage`). No libc and
//! no allocator: on nested KVM every KiB of the initramfs costs boot time.
#![no_std]
#![no_main]

mod counter;
mod daemon;
mod dirty;
mod disk;
mod diskseq;
mod echo;
mod rt;
mod stoptools;
mod sys;

use rt::Args;
use vigil_tools::text::Line;

const USAGE: &str = "\
usage: vigil-tools COMMAND [OPTIONS]
  daemon [--connect vsock[:CID:PORT]|unix:PATH] [--app-socket @NAME|PATH]
         [--interval-ms N] [--dry-run-poweroff]
  app-heartbeat [--name NAME] [--every SECONDS] [--count N] [--socket @NAME|PATH]
  app-heartbeat name=NAME,every=SECONDS,count=N[,socket=...]   as a workload
  stop-tools [after=10,signal=kill]   kills the tools daemon after a delay
  poweroff --now|--dry-run   the daemon's clean power-off, run by hand
  dirty [mib=64,rate=0,report=10,stall=500,passes=0]
  disk-write [dev=/dev/vda,rate=10,count=0,tag=TEXT,report=10]
  disk-verify [dev=/dev/vda]
  disk-seq [dev=/dev/vda,mib=32,bs=1024]   sequential O_DIRECT write throughput
  echo [port=7777]
  counter [every=2]
Workload options are one key=value,... argument, as in vigil.run= on the
guest's kernel command line.
";

/// Entry point after `_start`; returns the exit status.
pub fn main(args: Args) -> i32 {
    let Some(cmd) = args.get(1) else {
        let _ = sys::write_all(2, USAGE.as_bytes());
        return 2;
    };
    // A workload's options are a single key=value,... argument.
    let opts = args.get(2).unwrap_or(b"");
    match cmd {
        b"daemon" => daemon::run(args),
        b"app-heartbeat" => daemon::app_heartbeat(args),
        // Spelled out, as on a host (as root) this kills every process.
        b"poweroff" if opts == b"--now" || opts == b"--dry-run" => {
            daemon::power_off_guest(opts == b"--dry-run")
        }
        b"dirty" => dirty::run(opts),
        b"disk-write" => disk::write(opts),
        b"disk-verify" => disk::verify(opts),
        b"disk-seq" => diskseq::run(opts),
        b"echo" => echo::run(opts),
        b"counter" => counter::run(opts),
        b"stop-tools" => stoptools::run(opts),
        b"help" | b"--help" | b"-h" => {
            let _ = sys::write_all(1, USAGE.as_bytes());
            0
        }
        _ => {
            let mut l = Line::new();
            l.s("unknown command '").printable(cmd).s("'");
            rt::warn(&l);
            let _ = sys::write_all(2, USAGE.as_bytes());
            2
        }
    }
}

/// Reports an option a workload does not know; returns the exit status 2.
pub fn bad_option(cmd: &str, key: &[u8], value: &[u8]) -> i32 {
    let mut l = Line::new();
    l.s(cmd)
        .s(": bad option '")
        .printable(key)
        .s("=")
        .printable(value)
        .s("'");
    rt::warn(&l);
    2
}

/// Reads a small file (e.g. /proc/sys/kernel/random/boot_id) into `buf`;
/// returns the bytes up to the first newline.
pub fn read_small<'a>(path: &[u8], buf: &'a mut [u8]) -> &'a [u8] {
    let Ok(fd) = sys::open(path, sys::O_RDONLY) else {
        return &[];
    };
    let n = sys::read(fd, buf).unwrap_or(0);
    sys::close(fd);
    let line = &buf[..n];
    let end = line.iter().position(|&c| c == b'\n').unwrap_or(n);
    &buf[..end]
}

/// The guest's boot id, or empty.
pub fn boot_id(buf: &mut [u8; 64]) -> &[u8] {
    read_small(b"/proc/sys/kernel/random/boot_id", buf)
}
