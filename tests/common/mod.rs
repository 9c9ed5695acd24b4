//! Helpers shared by the end-to-end test binaries: where the guest image is,
//! running the real `vigil` binary with a timeout, and the lock that keeps
//! each binary to one guest at a time (two binaries may overlap, which keeps
//! a 2-core machine at two guests at most).
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// A real guest boot may take a few minutes on an emulated-KVM host.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Tiny guests and bad-input runs end at once; this only catches hangs.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(60);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn require_kvm() {
    let p = Path::new("/dev/kvm");
    assert!(
        p.exists(),
        "/dev/kvm is missing: this test needs KVM (load the kvm module; check that the machine \
         supports virtualisation)"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(p) {
        panic!("/dev/kvm cannot be opened ({e}): this test needs KVM access (group kvm or root)");
    }
}

/// The guest's VM config: `guest-images/default-vm.toml`, or the file named
/// by `VIGIL_TEST_GUEST_CONFIG` (to try another guest build). Fails, saying
/// what to do, if KVM, the config or the images it names are missing.
pub fn guest_config() -> PathBuf {
    require_kvm();
    let cfg = std::env::var_os("VIGIL_TEST_GUEST_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("guest-images/default-vm.toml"));
    assert!(
        cfg.exists(),
        "{} is missing: run `make guest-image` first",
        cfg.display()
    );
    let vm = vmm::VmConfig::load(Some(&cfg), Default::default())
        .unwrap_or_else(|e| panic!("{} is not a valid VM config: {e}", cfg.display()));
    let mut images = vec![vm.kernel.clone(), bzimage_for(&vm.kernel)];
    images.extend(vm.initrd.clone());
    for f in images {
        assert!(
            f.exists(),
            "guest image {} is missing: run `make guest-image` first",
            f.display()
        );
    }
    cfg
}

/// The bzImage built next to the guest's vmlinux.
pub fn bzimage_for(vmlinux: &Path) -> PathBuf {
    vmlinux.with_file_name("bzImage")
}

/// The default guest's command line (from its config file) plus `extra`.
pub fn guest_cmdline(extra: &str) -> String {
    let cfg = vmm::VmConfig::load(Some(&guest_config()), Default::default())
        .expect("guest-images/default-vm.toml must be a valid VM config");
    format!("{} {extra}", cfg.cmdline)
}

/// How a `vigil` run ended.
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn reader(
    mut r: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let t = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, t)
}

/// Runs `vigil` with `args`; kills it and fails the test after `timeout`.
pub fn vigil(args: &[&str], timeout: Duration) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the vigil binary");
    let (out, t_out) = reader(child.stdout.take().unwrap());
    let (err, t_err) = reader(child.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = t_out.join();
    let _ = t_err.join();
    let o = Outcome {
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&out.lock().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err.lock().unwrap()).into_owned(),
    };
    assert!(
        status.is_some(),
        "vigil {args:?} did not stop within {timeout:?} and was killed\n{o:?}"
    );
    o
}

/// A `vigil run` whose console is on piped stdio: what it printed (the
/// guest's console and the VMM's log, interleaved) and its stdin, to type
/// into the guest's shell. Killed when dropped.
pub struct Console {
    pub child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    /// Spawns `cmd` (a `vigil run ... --console stdio`) with piped stdio.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the vigil binary");
        let out = Arc::new(Mutex::new(Vec::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let c = out.clone();
            std::thread::spawn(move || {
                let mut r = r;
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    c.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        Console { child, stdin, out }
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Types `line` and Enter into the guest's console.
    pub fn type_line(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for `needle` after byte `from`; returns the offset just past
    /// it. Fails the test after `timeout`, or if the output runs away.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let o = self.text();
            if let Some(i) = o.get(from..).and_then(|s| s.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} within {timeout:?}:\n{o}"
            );
            assert!(o.len() < 4 << 20, "runaway output:\n{}", &o[..4096]);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the VMM (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `disk-write` workload's journal on a guest disk: (writer tags in
/// order, records, last seq).
/// Panics if sequence numbers go backwards or a writer comes back.
pub fn journal(disk: &Path) -> (Vec<[u8; 16]>, usize, u64) {
    let data = std::fs::read(disk).unwrap();
    let mut writers: Vec<[u8; 16]> = Vec::new();
    let (mut records, mut last) = (0, 0u64);
    for (k, rec) in data.chunks(512).enumerate() {
        if rec.len() < 512 || &rec[0..8] != b"VIGILJ01" {
            break;
        }
        let tag: [u8; 16] = rec[8..24].try_into().unwrap();
        let seq = u64::from_le_bytes(rec[24..32].try_into().unwrap());
        assert!(
            records == 0 || seq > last,
            "split brain or corruption: record {k} has seq {seq} after {last}"
        );
        match writers.iter().position(|w| *w == tag) {
            Some(p) => assert_eq!(
                p + 1,
                writers.len(),
                "split brain: writer {p} wrote record {k} after a later writer"
            ),
            None => writers.push(tag),
        }
        last = seq;
        records += 1;
    }
    (writers, records, last)
}

/// Writes a 4 MiB disk in `dir` (a VM's directory on a datastore) and
/// returns the config of a 128 MiB guest named `name` whose `disk-write`
/// workload journals to it (20 records a second).
pub fn disk_writer_vm(dir: &Path, name: &str) -> String {
    let out = guest_config().parent().unwrap().join("out");
    std::fs::create_dir_all(dir).unwrap();
    let disk = std::fs::File::create(dir.join("disk.img")).unwrap();
    disk.set_len(4 << 20).unwrap();
    format!(
        "name = {name:?}\nvcpus = 1\nmemory = \"128M\"\nkernel = {:?}\ninitrd = {:?}\n\
         cmdline = {:?}\n[[disks]]\npath = \"disk.img\"\n",
        out.join("vmlinux"),
        out.join("initramfs.cpio"),
        guest_cmdline("vigil.run=disk-write:dev=/dev/vda,rate=20,report=60"),
    )
}
