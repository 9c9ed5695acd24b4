//! The host side of the guest console: where output goes (stdout, a file,
//! nowhere), the terminal put into raw mode while the guest owns it, and the
//! stdin -> UART path on the event loop.
//!
//! Raw mode is restored when [`TerminalGuard`] drops, which covers normal
//! exits and error returns; [`restore_terminal`] is also public so the
//! binary's panic hook can call it.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::config::ConsoleMode;
use crate::devices::serial::{ConsoleOut, SerialDevice};

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The console file cannot be opened.
    #[error("cannot open console file {path}: {source}")]
    OpenFile {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// termios calls failed.
    #[error("cannot put the terminal into raw mode: {0}")]
    Termios(#[source] io::Error),
}

/// Guest output to stdout, flushed per write so output is never stuck in a
/// buffer when the guest crashes.
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut o = io::stdout().lock();
        o.write_all(b)?;
        o.flush()?;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Opens the output sink for `mode`. Files are appended to, so a restarted
/// guest does not erase the previous boot's log.
pub fn output_for(mode: &ConsoleMode) -> Result<ConsoleOut, ConsoleError> {
    Ok(match mode {
        ConsoleMode::Stdio => Box::new(Stdout),
        ConsoleMode::None => Box::new(io::sink()),
        ConsoleMode::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| ConsoleError::OpenFile {
                    path: p.clone(),
                    source,
                })?,
        ),
    })
}

/// The terminal settings from before raw mode. Kept in a `OnceLock` plus a
/// flag (not a mutex) so [`restore_terminal`] is async-signal-safe and can
/// run from a SIGTERM handler.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Puts stdin's terminal into raw mode (no echo, no line editing, no
/// signals from Ctrl-C: those keys belong to the guest) until dropped.
pub struct TerminalGuard(());

impl TerminalGuard {
    /// Enters raw mode if stdin is a terminal; `None` if it is not.
    pub fn enter() -> Result<Option<Self>, ConsoleError> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; zeroed is a valid initial value
        // that tcgetattr overwrites.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a valid terminal and `t` a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(ConsoleError::Termios(io::Error::last_os_error()));
        }
        // The first saved state is the user's own; a restarted guest must
        // not save our raw mode as "original".
        let original = *SAVED_TERMIOS.get_or_init(|| t);
        let mut raw = original;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON);
        // SAFETY: fd is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(ConsoleError::Termios(io::Error::last_os_error()));
        }
        RAW_ACTIVE.store(true, Ordering::SeqCst);
        Ok(Some(TerminalGuard(())))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Restores the terminal settings saved by [`TerminalGuard::enter`], if raw
/// mode is on. Safe to call more than once, from a panic hook and from a
/// signal handler (it only does an atomic swap and tcsetattr).
pub fn restore_terminal() {
    if !RAW_ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: restores a termios obtained from tcgetattr on fd 0, which
        // is still the same terminal (we never close or dup2 over stdin).
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

/// Feeds stdin into the UART. Registered on the event loop only when the
/// console is stdio; removes itself at EOF so the loop does not spin.
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl StdinInput {
    /// Input for `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null (EPERM): then there is
        // simply no console input, which is right for such a stdin.
        if let Err(e) = ops.add(Events::new(&io::stdin(), EventSet::IN)) {
            tracing::debug!(error = ?e, "stdin cannot be polled; console input disabled");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF, error or hang-up.
            if let Err(e) = ops.remove(events) {
                tracing::debug!(error = ?e, "cannot unregister stdin");
            }
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let taken = serial.enqueue_input(&buf[..n]);
        if taken < n {
            // The guest is not draining its UART; typing faster than it
            // reads loses characters, as on real hardware.
            tracing::debug!(dropped = n - taken, "console input dropped: UART FIFO full");
        }
    }
}
