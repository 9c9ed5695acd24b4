//! The per-host HA agent (like vSphere HA's FDM): election, heartbeats,
//! classification of silent hosts, restarts, isolation responses, leases,
//! admission control and VM monitoring.
//!
//! Everything here except [`runtime`] is I/O-free: [`agent::Agent::handle`] takes the current
//! monotonic [`time::Time`] and one [`agent::Input`] and returns the
//! [`agent::Action`]s to carry out. Production wires inputs and actions to
//! sockets, datastore files and VMM processes; the tests wire them to a
//! simulated cluster (`sim`).
//!
//! Two modules do I/O, for the runtime to call: `health` (the periodic host
//! health record, read from `/proc`) and `selfwatch` (the agent's own
//! watchdog).

#![warn(missing_docs)]

pub mod admission;
pub mod agent;
pub mod config;
pub mod health;
pub mod lease;
pub mod monitoring;
pub mod rules;
pub mod runtime;
pub mod selfwatch;
pub mod time;
pub mod types;
pub mod wire;

#[cfg(test)]
mod sim;
