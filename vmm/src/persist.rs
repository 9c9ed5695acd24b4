//! Save and restore of VM state: the one trait every stateful piece
//! implements (vCPUs, the VM's irqchip/PIT/clock, every device), so a
//! snapshot and a live migration carry exactly the same state.
//!
//! State types are plain data with serde: no file descriptors, no guest
//! memory, no host paths that only make sense on one host. What a piece
//! needs to be rebuilt that is not state (guest memory, the VM fd, an irqfd,
//! a backend opened by the restoring process) comes in `ConstructorArgs`.
//!
//! The on-disk / on-wire format and its version live with the snapshot
//! code; a state struct that changes shape bumps that version.

/// A piece of VM state that can be saved to plain data and rebuilt from it.
pub trait Persist: Sized {
    /// The saved state: plain serde data.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What restoring needs besides the state (memory, fds, backends).
    type ConstructorArgs;
    /// Why restoring failed.
    type Error: std::error::Error;

    /// Captures the state. Called with the vCPUs paused.
    fn save(&self) -> Self::State;

    /// Rebuilds the piece from saved state.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
