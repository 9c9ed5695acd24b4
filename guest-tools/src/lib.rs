//! The pure logic of `vigil-tools`, Vigil's in-guest tools daemon and test
//! workloads: everything that can be decided without a system call lives
//! here, so that it is unit-tested on the host with the standard test
//! harness while the binary (src/main.rs) stays `no_std` and tiny.
//!
//! - [`proto`]: the line protocol between the tools daemon and the host
//!   (also written down in PROTOCOL.md), and the local application
//!   heartbeat datagrams.
//! - [`addr`]: socket addresses (vsock, unix, inet) as the kernel wants them.
//! - [`journal`]: the disk writer's record format, resume scan and verifier.
//! - [`pages`]: the memory dirtier's page stamps and pacing.
//! - [`text`]: a fixed-size line builder (no allocator in the guest binary).
//! - [`args`]: decimal and `key=value,key=value` parsing.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod args;
pub mod journal;
pub mod pages;
pub mod proto;
pub mod text;

/// The version announced in `HELLO`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
