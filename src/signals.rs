//! Termination signals: restore the terminal, then die as the signal asks.
//!
//! While the guest console is in raw mode, Ctrl-C goes to the guest, but a
//! SIGTERM/SIGHUP/SIGINT from elsewhere would otherwise kill us with the
//! user's terminal left raw. The exit status is the shell convention
//! 128 + signal number.

extern "C" fn on_signal(sig: libc::c_int) {
    vmm::console::restore_terminal();
    // SAFETY: _exit is async-signal-safe and ends the process at once; no
    // Rust state is touched after this point.
    unsafe { libc::_exit(128 + sig) };
}

/// Installs the handlers. Failures are ignored: the default action (die
/// without restoring the terminal) is the only consequence.
pub fn install() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `on_signal` only calls async-signal-safe functions
        // (tcsetattr, _exit); installing it replaces the default action.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}
