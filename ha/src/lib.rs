//! The per-host HA agent.
