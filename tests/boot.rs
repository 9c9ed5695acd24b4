//! End-to-end tests of `vigil run`: the real binary, real KVM.
//!
//! Three groups:
//! - bad input: precise message and status 1 (or 2 for usage errors); most
//!   need neither KVM nor a guest image;
//! - tiny hand-made PVH guests (a few instructions, generated here) that
//!   print, power off, reset or triple-fault: they check the VMM's exit
//!   plumbing in milliseconds and need only /dev/kvm;
//! - the real guest from `guest-images/` (vmlinux via PVH and bzImage),
//!   which takes tens of seconds per boot on emulated-KVM hosts.
//!
//! Tests that boot a guest hold [`GUEST_LOCK`] so at most one guest runs at
//! a time (machines have 2 cores and a guest kernel keeps one busy). If
//! /dev/kvm is missing, KVM tests fail saying so; if the guest image is
//! missing, guest tests fail saying to run `make guest-image`. No assertion
//! is about speed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

// ---------------------------------------------------------------------------
// Tiny PVH guests.

/// Builds a minimal ELF64 with one PT_LOAD at 1 MiB holding `code` and a
/// PT_NOTE with the PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) pointing at it.
fn tiny_pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let phoff = 64u64;
    let note_off = phoff + 2 * 56;
    let note: Vec<u8> = [
        4u32.to_le_bytes(),
        4u32.to_le_bytes(),
        18u32.to_le_bytes(),
        *b"Xen\0",
        (LOAD as u32).to_le_bytes(),
    ]
    .concat();
    let code_off = note_off + note.len() as u64;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes()); // vaddr
        f.extend_from_slice(&addr.to_le_bytes()); // paddr
        f.extend_from_slice(&size.to_le_bytes()); // filesz
        f.extend_from_slice(&size.to_le_bytes()); // memsz
        f.extend_from_slice(&4u64.to_le_bytes());
    };
    phdr(&mut f, 1, code_off, LOAD, code.len() as u64);
    phdr(&mut f, 4, note_off, 0, note.len() as u64);
    f.extend_from_slice(&note);
    f.extend_from_slice(code);
    f
}

/// 32-bit code: `out` each byte of `s` to COM1.
fn print_code(s: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in s.bytes() {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// Polls the UART and echoes each received byte until it sees `q`:
/// `loop: in LSR; test DR; jz loop; in RBR; out THR; cmp 'q'; jne loop`.
const ECHO_UNTIL_Q: [u8; 19] = [
    0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd
    0xec, // in al, dx
    0xa8, 0x01, // test al, 1
    0x74, 0xf7, // jz loop
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xec, // in al, dx
    0xee, // out dx, al
    0x3c, b'q', // cmp al, 'q'
    0x75, 0xed, // jne loop
];

const HALT_FOREVER: [u8; 3] = [0xf4, 0xeb, 0xfd]; // hlt; jmp hlt
/// SLP_TYP=5 | SLP_EN to the ACPI sleep control port 0x600.
const ACPI_POWEROFF: [u8; 7] = [0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee];
/// 0xFE to the i8042 command port.
const I8042_RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
/// ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
const UD2: [u8; 2] = [0x0f, 0x0b];

fn tiny_guest(name: &str, parts: &[&[u8]]) -> tempfile_lite::TempFile {
    let code = parts.concat();
    tempfile_lite::TempFile::with_bytes(name, &tiny_pvh_elf(&code))
}

fn run_tiny(kernel: &Path, extra: &[&str]) -> Outcome {
    require_kvm();
    let _g = guest_lock();
    let k = kernel.to_str().unwrap();
    let mut args = vec!["run", "--kernel", k, "--memory", "32M"];
    args.extend_from_slice(extra);
    vigil(&args, QUICK_TIMEOUT)
}

#[test]
fn tiny_guest_console_and_poweroff() {
    let k = tiny_guest(
        "poweroff",
        &[&print_code("HELLO-VIGIL\n"), &ACPI_POWEROFF, &HALT_FOREVER],
    );
    let o = run_tiny(k.path(), &[]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("HELLO-VIGIL"), "{o:?}");
    assert!(
        o.stderr.is_empty(),
        "nothing on stderr at the default log level\n{o:?}"
    );
}

#[test]
fn tiny_guest_reads_stdin() {
    use std::io::Write;
    let k = tiny_guest("echo", &[&ECHO_UNTIL_Q, &ACPI_POWEROFF, &HALT_FOREVER]);
    require_kvm();
    let _g = guest_lock();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "run",
            "--kernel",
            k.path().to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, t_out) = reader(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    // Fewer bytes than the UART FIFO holds, so none can be dropped.
    stdin.write_all(b"ping-from-stdin q").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > QUICK_TIMEOUT {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let _ = t_out.join();
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stdout: {text}");
    assert!(text.contains("ping-from-stdin q"), "stdout: {text}");
}

#[test]
fn tiny_guest_smp_poweroff() {
    let k = tiny_guest("poweroff-smp", &[&ACPI_POWEROFF, &HALT_FOREVER]);
    let o = run_tiny(k.path(), &["--cpus", "2"]);
    assert_eq!(o.code, Some(0), "{o:?}");
}

#[test]
fn tiny_guest_console_to_file() {
    let k = tiny_guest(
        "file",
        &[&print_code("TO-FILE\n"), &ACPI_POWEROFF, &HALT_FOREVER],
    );
    let out = tempfile_lite::TempFile::with_bytes("console", b"");
    let console = format!("file:{}", out.path().display());
    let o = run_tiny(k.path(), &["--console", &console]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(!o.stdout.contains("TO-FILE"), "{o:?}");
    let text = std::fs::read_to_string(out.path()).unwrap();
    assert!(text.contains("TO-FILE"), "console file: {text:?}");
    let o = run_tiny(k.path(), &["--console", "none"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(!o.stdout.contains("TO-FILE"), "{o:?}");
}

#[test]
fn tiny_guest_i8042_reset_is_reboot() {
    let k = tiny_guest("reset", &[&I8042_RESET, &HALT_FOREVER]);
    let o = run_tiny(k.path(), &[]);
    assert_eq!(o.code, Some(3), "{o:?}");
}

#[test]
fn tiny_guest_restart_on_reboot() {
    // The guest prints and resets, every boot. With --on-reboot restart the
    // VMM must rebuild and boot it again and again in the same process:
    // seeing the marker three times while vigil is still running shows that.
    let k = tiny_guest(
        "restart",
        &[&print_code("BOOT\n"), &I8042_RESET, &HALT_FOREVER],
    );
    require_kvm();
    let _g = guest_lock();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args([
            "run",
            "--kernel",
            k.path().to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .args(["--on-reboot", "restart"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (out, _t) = reader(child.stdout.take().unwrap());
    let start = Instant::now();
    let mut boots = 0;
    while start.elapsed() < QUICK_TIMEOUT {
        boots = String::from_utf8_lossy(&out.lock().unwrap())
            .matches("BOOT")
            .count();
        if boots >= 3 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        still_running,
        "vigil exited instead of restarting the guest"
    );
    assert!(boots >= 3, "expected repeated boots, saw {boots}");
}

#[test]
fn tiny_guest_triple_fault_is_crash() {
    let k = tiny_guest("crash", &[&print_code("X"), &UD2]);
    let o = run_tiny(k.path(), &[]);
    assert_eq!(o.code, Some(4), "{o:?}");
    assert!(o.stderr.contains("triple fault"), "{o:?}");
    assert!(
        o.stderr.contains("rip=") && o.stderr.contains("cr0="),
        "{o:?}"
    );
}

// ---------------------------------------------------------------------------
// Bad input.

fn expect_error(args: &[&str], needles: &[&str]) {
    let o = vigil(args, QUICK_TIMEOUT);
    assert_eq!(o.code, Some(1), "{args:?}\n{o:?}");
    for n in needles {
        assert!(
            o.stderr.contains(n),
            "{args:?}: stderr should mention {n:?}\n{o:?}"
        );
    }
    assert!(!o.stderr.contains("panicked"), "{o:?}");
    // One message (a TOML error may quote the offending line under it).
    assert!(o.stderr.starts_with("vigil: "), "{o:?}");
    assert_eq!(o.stderr.matches("vigil: ").count(), 1, "one message\n{o:?}");
}

#[test]
fn missing_kernel() {
    expect_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        &["kernel", "/nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn kernel_is_a_directory() {
    expect_error(&["run", "--kernel", "/tmp"], &["kernel", "/tmp"]);
}

#[test]
fn not_a_kernel() {
    let f = tempfile_lite::TempFile::with_bytes("notakernel", b"#!/bin/sh\necho hi\n");
    let p = f.path().to_str().unwrap().to_string();
    expect_error(&["run", "--kernel", &p], &[&p, "not a bootable kernel"]);
}

#[test]
fn elf_without_pvh_note() {
    let mut elf = tiny_pvh_elf(&UD2);
    // Turn the PT_NOTE into PT_NULL.
    elf[64 + 56..64 + 56 + 4].copy_from_slice(&0u32.to_le_bytes());
    let f = tempfile_lite::TempFile::with_bytes("nonote", &elf);
    let p = f.path().to_str().unwrap().to_string();
    expect_error(&["run", "--kernel", &p], &[&p, "PVH"]);
}

#[test]
fn missing_initrd() {
    let k = tiny_guest("k-initrd", &[&UD2]);
    expect_error(
        &[
            "run",
            "--kernel",
            k.path().to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        &["initrd", "/nonexistent/initrd", "No such file"],
    );
}

#[test]
fn bad_vcpu_counts() {
    let k = tiny_guest("k-cpus", &[&UD2]);
    let kp = k.path().to_str().unwrap();
    expect_error(
        &["run", "--kernel", kp, "--cpus", "0"],
        &["vcpus", "--cpus", "0"],
    );
    expect_error(
        &["run", "--kernel", kp, "--cpus", "100000"],
        &["--cpus", "100000"],
    );
}

#[test]
fn bad_memory_sizes() {
    let k = tiny_guest("k-mem", &[&UD2]);
    let kp = k.path().to_str().unwrap();
    expect_error(
        &["run", "--kernel", kp, "--memory", "12X"],
        &["memory", "12X"],
    );
    expect_error(
        &["run", "--kernel", kp, "--memory", "4M"],
        &["memory", "too small"],
    );
    // Within the VMM's limit but more than any test machine has.
    expect_error(
        &["run", "--kernel", kp, "--memory", "900G"],
        &["921600 MiB", "MemAvailable", "host"],
    );
}

#[test]
fn memory_too_small_for_kernel() {
    let vm = vmm::VmConfig::load(Some(&guest_config()), Default::default()).unwrap();
    let vmlinux = vm.kernel;
    let initrd = vm.initrd.expect("the guest config names an initrd");
    require_kvm();
    expect_error(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "16M",
        ],
        &["16 MiB is too small", "need at least"],
    );
}

#[test]
fn bad_config_file() {
    let f = tempfile_lite::TempFile::with_bytes("vm.toml", b"kernel = \"k\"\nvcpu = 2\n");
    let p = f.path().to_str().unwrap().to_string();
    expect_error(&["run", "--config", &p], &[&p, "unknown field `vcpu`"]);
    expect_error(
        &["run", "--config", "/nonexistent/vm.toml"],
        &["/nonexistent/vm.toml"],
    );
}

#[test]
fn config_relative_paths_are_relative_to_the_file() {
    // kernel = "missing-kernel" in a config in /tmp/... must be looked up
    // next to the config file, and the message must say where.
    let f = tempfile_lite::TempFile::with_bytes("rel.toml", b"kernel = \"missing-kernel\"\n");
    let expected = f.path().parent().unwrap().join("missing-kernel");
    expect_error(
        &["run", "--config", f.path().to_str().unwrap()],
        &[expected.to_str().unwrap()],
    );
}

#[test]
fn usage_errors_are_status_2() {
    let o = vigil(&["run", "--no-such-flag"], QUICK_TIMEOUT);
    assert_eq!(o.code, Some(2), "{o:?}");
    let o = vigil(&["run", "--cpus", "two", "--kernel", "k"], QUICK_TIMEOUT);
    assert_eq!(o.code, Some(2), "{o:?}");
    let o = vigil(&["frobnicate"], QUICK_TIMEOUT);
    assert_eq!(o.code, Some(2), "{o:?}");
}

#[test]
fn run_help_documents_exit_statuses() {
    let o = vigil(&["run", "--help"], QUICK_TIMEOUT);
    assert_eq!(o.code, Some(0), "{o:?}");
    for s in ["Exit status", "powered off", "reboot", "crashed", "usage"] {
        assert!(o.stdout.contains(s), "{s:?} missing from help\n{o:?}");
    }
}

// ---------------------------------------------------------------------------
// The real guest.

fn boot_guest(extra_args: &[&str], test: &str) -> Outcome {
    let cfg = guest_config();
    require_kvm();
    let cmdline = guest_cmdline(test);
    let _g = guest_lock();
    let mut args = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra_args);
    vigil(&args, GUEST_TIMEOUT)
}

fn marker_value(out: &str, key: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn linux_guest_pvh_boots_and_powers_off() {
    let o = boot_guest(&[], "vigil.test=sysinfo");
    assert!(o.stdout.contains("VIGIL-BOOT-OK"), "{o:?}");
    assert_eq!(marker_value(&o.stdout, "VIGIL-CPUS"), Some(1), "{o:?}");
    assert_eq!(o.code, Some(0), "{o:?}");
}

#[test]
fn linux_guest_two_cpus_one_gib() {
    let o = boot_guest(&["--cpus", "2", "--memory", "1G"], "vigil.test=sysinfo");
    assert!(o.stdout.contains("VIGIL-BOOT-OK"), "{o:?}");
    assert_eq!(marker_value(&o.stdout, "VIGIL-CPUS"), Some(2), "{o:?}");
    let kb = marker_value(&o.stdout, "VIGIL-MEMTOTAL-KB").expect("VIGIL-MEMTOTAL-KB marker");
    // MemTotal excludes the kernel image and reserved memory.
    assert!(
        (800 * 1024..=1024 * 1024).contains(&kb),
        "MemTotal {kb} kB\n{o:?}"
    );
    assert_eq!(o.code, Some(0), "{o:?}");
}

#[test]
fn linux_guest_bzimage_boots() {
    let vm = vmm::VmConfig::load(Some(&guest_config()), Default::default()).unwrap();
    let bz = bzimage_for(&vm.kernel);
    let o = boot_guest(&["--kernel", bz.to_str().unwrap()], "vigil.test=sysinfo");
    assert!(o.stdout.contains("VIGIL-BOOT-OK"), "{o:?}");
    assert_eq!(o.code, Some(0), "{o:?}");
}

#[test]
fn linux_guest_reboot_is_status_3() {
    let o = boot_guest(&[], "vigil.test=reboot");
    assert!(o.stdout.contains("VIGIL-BOOT-OK"), "{o:?}");
    assert_eq!(o.code, Some(3), "{o:?}");
}

/// A tiny self-deleting temporary file (no extra dev-dependency).
mod tempfile_lite {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct TempFile(PathBuf);

    impl TempFile {
        pub fn with_bytes(name: &str, bytes: &[u8]) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "vigil-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            TempFile(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(d) = self.0.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}
