//! The hook through which the control API starts, watches and cancels a
//! live migration of this VM.
//!
//! `vmm` never links the `migration` crate (arrows go `migration -> vmm`),
//! yet the process that holds the VM must run the migration engine. So the
//! VMM defines this small trait, the API's `/vm/migrate` routes call it,
//! and the `vigil` binary (which links both) installs the implementation
//! (`migration::vmm::Outgoing`) through [`crate::RunOptions::migration`].
//! Request and status bodies are JSON defined by the implementation; the
//! VMM only routes them.

use std::sync::Arc;

use serde_json::Value;

use crate::machine::Machine;

/// An error for the API client: HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// 400 bad request, 409 not possible now, 500 failure.
    pub status: u16,
    /// One precise message.
    pub message: String,
}

/// Migration of the running VM, as the control API drives it.
pub trait MigrationHook: Send + Sync {
    /// Starts migrating `m` as the JSON `body` asks; returns at once (the
    /// migration runs on its own thread) with a JSON answer.
    fn start(&self, m: &Arc<Machine>, body: &[u8]) -> Result<Value, HookError>;
    /// Progress of the current or last migration, as JSON.
    fn status(&self) -> Value;
    /// Cancels the current migration; the VM keeps running here.
    fn cancel(&self) -> Result<Value, HookError>;
}

/// A shareable hook, printable in [`crate::RunOptions`]' debug output.
#[derive(Clone)]
pub struct HookRef(pub Arc<dyn MigrationHook>);

impl std::fmt::Debug for HookRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationHook")
    }
}
