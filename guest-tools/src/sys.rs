//! Raw Linux x86-64 system calls: the binary has no libc. Each wrapper
//! takes Rust slices and returns `Err(errno)` for the kernel's -4095..-1.
//! On nested KVM every system call costs about a millisecond of emulated
//! guest kernel time, so callers batch and avoid them in hot loops.

use core::arch::asm;

/// A failed system call's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// Result of a system call.
pub type Res = Result<usize, Errno>;

pub const EINTR: i32 = 4;
pub const EAGAIN: i32 = 11;

pub const O_RDONLY: usize = 0;
pub const O_RDWR: usize = 2;
pub const O_CLOEXEC: usize = 0o2_000_000;
pub const O_DIRECTORY: usize = 0o200_000;
pub const O_DSYNC: usize = 0o10_000;
pub const O_DIRECT: usize = 0o40_000;

pub const SOCK_STREAM: usize = 1;
pub const SOCK_DGRAM: usize = 2;
pub const SOCK_NONBLOCK: usize = 0o4000;
pub const SOCK_CLOEXEC: usize = 0o2_000_000;
pub const MSG_DONTWAIT: usize = 0x40;
pub const MSG_NOSIGNAL: usize = 0x4000;
pub const SOL_SOCKET: usize = 1;
pub const SO_REUSEADDR: usize = 2;

pub const POLLIN: i16 = 1;

pub const CLOCK_MONOTONIC: usize = 1;
pub const CLOCK_BOOTTIME: usize = 7;

pub const SIGKILL: usize = 9;
pub const SIGPIPE: usize = 13;
pub const SIGTERM: usize = 15;

pub const SEEK_END: usize = 2;

const NR_READ: usize = 0;
const NR_WRITE: usize = 1;
const NR_CLOSE: usize = 3;
const NR_POLL: usize = 7;
const NR_LSEEK: usize = 8;
const NR_MMAP: usize = 9;
const NR_RT_SIGACTION: usize = 13;
const NR_PREAD64: usize = 17;
const NR_PWRITE64: usize = 18;
const NR_SOCKET: usize = 41;
const NR_CONNECT: usize = 42;
const NR_SENDTO: usize = 44;
const NR_RECVFROM: usize = 45;
const NR_BIND: usize = 49;
const NR_LISTEN: usize = 50;
const NR_SETSOCKOPT: usize = 54;
const NR_KILL: usize = 62;
const NR_GETPID: usize = 39;
const NR_GETDENTS64: usize = 217;
const NR_SYNC: usize = 162;
const NR_REBOOT: usize = 169;
const NR_CLOCK_GETTIME: usize = 228;
const NR_CLOCK_NANOSLEEP: usize = 230;
const NR_EXIT_GROUP: usize = 231;
const NR_OPENAT: usize = 257;
const NR_ACCEPT4: usize = 288;

const AT_FDCWD: isize = -100;

/// # Safety
/// The arguments must be valid for system call `n`: any pointer among them
/// must point to memory the kernel may read or write as that call does.
#[inline(always)]
unsafe fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller vouches for the arguments; SYSCALL clobbers only
    // rax (the result), rcx and r11, which are declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

fn check(r: isize) -> Res {
    if (-4095..0).contains(&r) {
        Err(Errno(-r as i32))
    } else {
        Ok(r as usize)
    }
}

/// A system call whose pointer arguments (if any) come from live slices or
/// references of the caller.
macro_rules! sc {
    ($n:expr $(, $a:expr)*) => {{
        let mut args = [0usize; 6];
        let vals: &[usize] = &[$($a as usize),*];
        args[..vals.len()].copy_from_slice(vals);
        // SAFETY: every pointer passed comes from a slice or reference that
        // is live for the call, with its length alongside where the call
        // takes one; the kernel does not keep any of them after returning.
        check(unsafe { syscall6($n, args) })
    }};
}

/// Builds a NUL-terminated copy of `path` and calls `f` with its address.
fn with_cstr<T>(path: &[u8], f: impl FnOnce(*const u8) -> Result<T, Errno>) -> Result<T, Errno> {
    let mut buf = [0u8; 256];
    if path.len() >= buf.len() || path.contains(&0) {
        return Err(Errno(36)); // ENAMETOOLONG
    }
    buf[..path.len()].copy_from_slice(path);
    f(buf.as_ptr())
}

pub fn read(fd: i32, buf: &mut [u8]) -> Res {
    sc!(NR_READ, fd, buf.as_mut_ptr(), buf.len())
}

pub fn write(fd: i32, buf: &[u8]) -> Res {
    sc!(NR_WRITE, fd, buf.as_ptr(), buf.len())
}

/// Writes all of `buf`, retrying after short writes and EINTR.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return Err(Errno(5)),
            Ok(n) => buf = &buf[n..],
            Err(Errno(EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn open(path: &[u8], flags: usize) -> Result<i32, Errno> {
    with_cstr(path, |p| {
        sc!(NR_OPENAT, AT_FDCWD, p, flags | O_CLOEXEC, 0).map(|fd| fd as i32)
    })
}

pub fn close(fd: i32) {
    let _ = sc!(NR_CLOSE, fd);
}

pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> Res {
    sc!(NR_PREAD64, fd, buf.as_mut_ptr(), buf.len(), off)
}

pub fn pwrite(fd: i32, buf: &[u8], off: u64) -> Res {
    sc!(NR_PWRITE64, fd, buf.as_ptr(), buf.len(), off)
}

/// Size of a file or block device, from its end offset.
pub fn size_of(fd: i32) -> Res {
    sc!(NR_LSEEK, fd, 0, SEEK_END)
}

pub fn sync() {
    let _ = sc!(NR_SYNC);
}

/// Maps `len` bytes of private anonymous memory, faulted in by the kernel
/// (MAP_POPULATE) so that the caller's loop never takes a first-touch fault.
pub fn mmap_populated(len: usize) -> Result<*mut u8, Errno> {
    const PROT_RW: usize = 3;
    const MAP_PRIVATE_ANON_POPULATE: usize = 0x02 | 0x20 | 0x8000;
    sc!(
        NR_MMAP,
        0,
        len,
        PROT_RW,
        MAP_PRIVATE_ANON_POPULATE,
        usize::MAX,
        0
    )
    .map(|p| p as *mut u8)
}

/// Nanoseconds on `clock`.
pub fn clock_ns(clock: usize) -> u64 {
    let mut ts = [0i64; 2];
    if sc!(NR_CLOCK_GETTIME, clock, ts.as_mut_ptr()).is_err() {
        return 0;
    }
    (ts[0] as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts[1] as u64)
}

/// Monotonic milliseconds.
pub fn now_ms() -> u64 {
    clock_ns(CLOCK_MONOTONIC) / 1_000_000
}

/// Sleeps for `ns` nanoseconds (EINTR ends the sleep early).
pub fn sleep_ns(ns: u64) {
    let ts = [(ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i64];
    let _ = sc!(NR_CLOCK_NANOSLEEP, CLOCK_MONOTONIC, 0, ts.as_ptr(), 0);
}

/// Sleeps until CLOCK_MONOTONIC reads `deadline_ns`.
pub fn sleep_until_ns(deadline_ns: u64) {
    const TIMER_ABSTIME: usize = 1;
    let ts = [
        (deadline_ns / 1_000_000_000) as i64,
        (deadline_ns % 1_000_000_000) as i64,
    ];
    while let Err(Errno(EINTR)) = sc!(
        NR_CLOCK_NANOSLEEP,
        CLOCK_MONOTONIC,
        TIMER_ABSTIME,
        ts.as_ptr(),
        0
    ) {}
}

pub fn socket(domain: u16, ty: usize) -> Result<i32, Errno> {
    sc!(NR_SOCKET, domain, ty | SOCK_CLOEXEC, 0).map(|fd| fd as i32)
}

pub fn connect(fd: i32, addr: &[u8]) -> Res {
    sc!(NR_CONNECT, fd, addr.as_ptr(), addr.len())
}

pub fn bind(fd: i32, addr: &[u8]) -> Res {
    sc!(NR_BIND, fd, addr.as_ptr(), addr.len())
}

pub fn listen(fd: i32, backlog: usize) -> Res {
    sc!(NR_LISTEN, fd, backlog)
}

pub fn accept(fd: i32) -> Result<i32, Errno> {
    sc!(NR_ACCEPT4, fd, 0, 0, SOCK_CLOEXEC).map(|fd| fd as i32)
}

pub fn set_reuseaddr(fd: i32) {
    let one: i32 = 1;
    let _ = sc!(
        NR_SETSOCKOPT,
        fd,
        SOL_SOCKET,
        SO_REUSEADDR,
        &one as *const i32,
        4
    );
}

/// Sends on a connected socket (`to` empty) or to an address.
pub fn sendto(fd: i32, buf: &[u8], flags: usize, to: &[u8]) -> Res {
    let to_ptr = if to.is_empty() {
        core::ptr::null()
    } else {
        to.as_ptr()
    };
    sc!(
        NR_SENDTO,
        fd,
        buf.as_ptr(),
        buf.len(),
        flags,
        to_ptr,
        to.len()
    )
}

/// Receives a datagram and its sender's address (into `from`, whose used
/// length is returned alongside).
pub fn recvfrom(
    fd: i32,
    buf: &mut [u8],
    flags: usize,
    from: &mut [u8],
) -> Result<(usize, usize), Errno> {
    let mut len = from.len() as u32;
    let n = sc!(
        NR_RECVFROM,
        fd,
        buf.as_mut_ptr(),
        buf.len(),
        flags,
        from.as_mut_ptr(),
        &mut len as *mut u32
    )?;
    Ok((n, (len as usize).min(from.len())))
}

/// `struct pollfd`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PollFd {
    pub fd: i32,
    pub events: i16,
    pub revents: i16,
}

pub fn poll(fds: &mut [PollFd], timeout_ms: i32) -> Res {
    sc!(NR_POLL, fds.as_mut_ptr(), fds.len(), timeout_ms as isize)
}

pub fn kill(pid: i32, sig: usize) -> Res {
    sc!(NR_KILL, pid as isize, sig)
}

pub fn getpid() -> i32 {
    sc!(NR_GETPID).map_or(0, |p| p as i32)
}

/// Reads directory entries (`struct linux_dirent64` records) into `buf`;
/// `Ok(0)` at the end of the directory.
pub fn getdents64(fd: i32, buf: &mut [u8]) -> Res {
    sc!(NR_GETDENTS64, fd, buf.as_mut_ptr(), buf.len())
}

/// Ignores SIGPIPE, so that writing to a dropped connection is an EPIPE.
pub fn ignore_sigpipe() {
    // struct kernel_sigaction: handler, flags, restorer, mask.
    let act: [usize; 4] = [1 /* SIG_IGN */, 0, 0, 0];
    let _ = sc!(NR_RT_SIGACTION, SIGPIPE, act.as_ptr(), 0, 8);
}

/// Powers the machine off. Only returns if the kernel refused.
pub fn power_off() -> Res {
    const MAGIC1: usize = 0xfee1_dead;
    const MAGIC2: usize = 0x2812_1969;
    const CMD_POWER_OFF: usize = 0x4321_fedc;
    sc!(NR_REBOOT, MAGIC1, MAGIC2, CMD_POWER_OFF, 0)
}

pub fn exit(code: i32) -> ! {
    loop {
        let _ = sc!(NR_EXIT_GROUP, code as isize);
    }
}
