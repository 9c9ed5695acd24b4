//! The runtime a C library would otherwise provide: the ELF entry point,
//! the argument vector, console output and the panic handler.

use crate::sys;
use vigil_tools::text::Line;

// The kernel starts us with rsp pointing at argc, then argv[], NULL, envp[].
// Pass that address to Rust with the stack aligned as the ABI requires.
core::arch::global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {entry}",
    "ud2",
    entry = sym start_rust,
);

/// The command line, as the kernel handed it to us.
#[derive(Clone, Copy)]
pub struct Args {
    argc: usize,
    argv: *const *const u8,
}

impl Args {
    /// Number of arguments, program name included.
    pub fn len(&self) -> usize {
        self.argc
    }

    /// Argument `i` without its NUL.
    pub fn get(&self, i: usize) -> Option<&'static [u8]> {
        if i >= self.argc {
            return None;
        }
        // SAFETY: argv has argc valid entries (checked above), each a
        // NUL-terminated string that lives, unchanged, as long as the
        // process (the kernel put them on the initial stack, which we never
        // pop).
        unsafe {
            let p = *self.argv.add(i);
            let mut n = 0;
            while *p.add(n) != 0 {
                n += 1;
            }
            Some(core::slice::from_raw_parts(p, n))
        }
    }
}

extern "C" fn start_rust(sp: *const usize) -> ! {
    // SAFETY: `sp` is the initial stack pointer set by the kernel: argc at
    // sp[0] and the argv array right after it.
    let args = unsafe {
        Args {
            argc: *sp,
            argv: sp.add(1) as *const *const u8,
        }
    };
    sys::exit(crate::main(args))
}

/// Writes a line to standard output (the console in the guest).
pub fn out(l: &Line) {
    let _ = sys::write_all(1, l.as_bytes());
}

/// Writes `vigil-tools: <msg>` to standard error.
pub fn warn(l: &Line) {
    let mut w = Line::new();
    w.s("vigil-tools: ").b(l.as_bytes());
    if !w.as_bytes().ends_with(b"\n") {
        w.nl();
    }
    let _ = sys::write_all(2, w.as_bytes());
}

/// Shorthand for a warning made of a message and an errno.
pub fn warn_errno(what: &str, e: sys::Errno) {
    let mut l = Line::new();
    l.s(what).s(": errno ").u(e.0 as u64);
    warn(&l);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = Line::new();
    l.s("panic");
    if let Some(loc) = info.location() {
        l.s(" at ").s(loc.file()).s(":").u(u64::from(loc.line()));
    }
    warn(&l);
    sys::exit(101)
}

// With no libc, the compiler's calls to these land here. Plain byte loops
// would be turned back into calls to themselves by the optimiser, so they
// use the string instructions, which user space runs natively.

/// # Safety
/// As C's memcpy: `n` bytes readable at `src`, writable at `dst`, no overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; rep movsb copies forwards.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memmove: `n` bytes readable at `src`, writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst is below src or the
        // ranges do not overlap; the caller guarantees the ranges.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: overlapping with dst above src: copy backwards with the
        // direction flag set (and cleared again, as the ABI requires).
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _, options(nostack));
        }
        dst
    }
}

/// # Safety
/// As C's memset: `n` bytes writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memcmp: `n` bytes readable at `a` and at `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// As C's strlen: `s` points at a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let end: *const u8;
    // SAFETY: the caller guarantees a NUL within readable memory; repne
    // scasb stops right after it (rcx = -1: no count limit).
    unsafe {
        core::arch::asm!("repne scasb", inout("rdi") s => end, inout("rcx") usize::MAX => _,
            in("al") 0u8, options(nostack, readonly));
    }
    end as usize - s as usize - 1
}

/// `cargo test` builds the library with panic=unwind (the test harness
/// needs it) and links that build into this binary too, which then refers
/// to the unwinder's personality routine. Nothing ever unwinds here: the
/// panic handler exits. Release builds (panic=abort) drop this.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
