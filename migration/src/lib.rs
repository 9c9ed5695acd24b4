//! Live migration of a running VM to another host (FEATURES.md M1-M11).
//!
//! - [`protocol`]: the versioned wire protocol: sequence diagram, frame
//!   layout, message types, version negotiation.
//! - [`precheck`]: pure compatibility checks the target runs before any
//!   state moves.
//! - [`vm`]: the traits the VMM implements ([`vm::MigratableVm`] on the
//!   source, [`vm::TargetHost`] + [`vm::IncomingVm`] on the target) and the
//!   dirty bitmap.
//! - [`source`]: the pre-copy engine with auto-converge, cancel and
//!   rollback.
//! - [`target`]: receiving, verifying, starting only on an intact stream.
//! - [`progress`]: progress reports, summary, cancel token.
//! - [`transport`]: the byte stream (TCP, TLS 1.3).
//! - [`machine`]: the traits implemented over the real VMM
//!   (`vmm::machine::Machine`), the control API's migration hook, and the
//!   incoming side behind `vigil run --incoming`.
//!
//! # Use
//!
//! ```no_run
//! use migration::{CancelToken, MigratableVm, SourceOptions, TargetHost, TargetOptions};
//! use std::net::{TcpListener, TcpStream};
//!
//! // On the source host, with a VM that implements `MigratableVm`:
//! fn send<V: MigratableVm>(vm: &mut V) -> Result<(), Box<dyn std::error::Error>> {
//!     let stream = TcpStream::connect("198.18.0.2:5253")?;
//!     let opts = SourceOptions { host: "host-a".into(), ..Default::default() };
//!     let summary = migration::migrate(vm, stream, &opts, &CancelToken::new(), &mut |p| {
//!         println!("{} {}% throttle {}%", p.stage, p.percent, p.throttle)
//!     })?;
//!     println!("downtime {:?}; destroy the source VM now", summary.downtime);
//!     Ok(())
//! }
//!
//! // On the target host:
//! fn accept<H: TargetHost>(host: &mut H) -> Result<H::Vm, Box<dyn std::error::Error>> {
//!     let (stream, _) = TcpListener::bind("198.18.0.2:5253")?.accept()?;
//!     let opts = TargetOptions { host: "host-b".into(), ..Default::default() };
//!     let (vm, _received) = migration::receive(host, stream, &opts, &CancelToken::new())?;
//!     Ok(vm) // running
//! }
//! ```
//!
//! The tests in `tests/` migrate a fake VM (memory as a `Vec`, a thread
//! dirtying pages) over real loopback TCP; the workspace's
//! `tests/migration.rs` migrates real guests between two VMM processes.

pub mod machine;
pub mod precheck;
pub mod progress;
pub mod protocol;
pub mod source;
pub mod target;
pub mod transport;
pub mod vm;

pub use progress::{CancelToken, Progress, Stage, Summary};
pub use source::{migrate, Compression, Failed, LeaseAfterFailure, SourceOptions};
pub use target::{receive, TargetOptions};
pub use vm::{DirtyBitmap, IncomingVm, LeaseRace, MigratableVm, Region, TargetHost};

/// An error and its causes on one line, for logs, CLIs and `Abort` reasons
/// (the peer's user should read the whole story, not just the top line).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// CPU time this thread has used: with wall time, tells a busy side from
/// one that waits for its peer (logged with the first pass's figures).
pub(crate) fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
