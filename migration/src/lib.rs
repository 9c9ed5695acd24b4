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
//! - [`transport`]: the byte stream (TCP; TLS to come).
//!
//! The tests in `tests/` migrate a fake VM (memory as a `Vec`, a thread
//! dirtying pages) over real loopback TCP. End-to-end tests with real guests
//! come when the VMM implements the traits.

pub mod precheck;
pub mod progress;
pub mod protocol;
pub mod source;
pub mod target;
pub mod transport;
pub mod vm;

pub use progress::{CancelToken, Progress, Stage, Summary};
pub use source::{migrate, Failed, SourceOptions};
pub use target::{receive, TargetOptions};
pub use vm::{DirtyBitmap, IncomingVm, MigratableVm, Region, TargetHost};

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
