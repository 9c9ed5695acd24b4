//! Live migration of a running VM to another host (FEATURES.md M1-M11).
//!
//! - [`protocol`]: the versioned wire protocol, framing and sequence diagram.
//! - [`precheck`]: pure compatibility checks run on the target before any
//!   state moves.
pub mod precheck;
pub mod protocol;
