//! The migration engine over a real VMM: the traits of [`crate::vm`]
//! implemented for `vmm::machine::Machine`, and the glue the `vigil` binary
//! uses on each side.
//!
//! # How the pieces meet
//!
//! ```text
//!  source host                                     target host
//!  vigil migrate --to ADDR:PORT                    vigil run --incoming tcp:ADDR:PORT
//!     |  PUT /vm/migrate (unix socket)                 |
//!     v                                                v
//!  VMM process: api -> vmm::migration_hook        machine::target::run_incoming
//!     -> machine::source::Outgoing (installed         listens, accepts one stream,
//!        by `vigil run` in RunOptions::migration)     crate::receive(IncomingHost)
//!     -> thread: crate::migrate(SourceVm) ------TCP------> IncomingShell (memory, state)
//!     <- GET /vm/migrate: progress, summary              -> vmm::run_incoming on a thread;
//!     VM exits (ExitReason::Migrated) after the ack     ack only once its vCPUs run
//! ```
//!
//! A VM holding an HA disk lease (`vigil run --lease`) hands it over at
//! switchover through `vmm::lease` (`handoff_stop`, `handoff_sent`,
//! `handoff_done`, `handoff_abort`, `handoff_race`); the target, started
//! with a `handoff = true` lease spec, claims its next generation in
//! `vmm::run_incoming` before the vCPUs start (`vmm::lease::take_over`).
//!
//! `vmm` never imports `migration`: the API calls the
//! `vmm::migration_hook::MigrationHook` trait and `vigil run` installs
//! [`source::Outgoing`] as its implementation. The state blob is the
//! snapshot module's `VmState` (`vmm::snapshot::capture`), so a migration
//! carries exactly what a snapshot saves.

pub mod announce;
pub mod cpuid_names;
pub mod reserve;
pub mod source;
pub mod target;

pub use source::{MigrateRequest, Outgoing, SourceVm};
pub use target::{run_incoming, IncomingError, IncomingHost, IncomingOptions, IncomingShell};

use std::collections::BTreeSet;

use kvm_bindings::CpuId;

/// CPUID feature words compared by the pre-checks: (leaf, subleaf, register
/// name, index into `[eax, ebx, ecx, edx]`).
const FEATURE_WORDS: &[(u32, u32, &str, usize)] = &[
    (0x1, 0, "ecx", 2),
    (0x1, 0, "edx", 3),
    (0x7, 0, "ebx", 1),
    (0x7, 0, "ecx", 2),
    (0x7, 0, "edx", 3),
    (0x7, 1, "eax", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 2),
    (0x8000_0001, 0, "edx", 3),
];

/// The feature bits set in `cpuid`, named `cpuid.LEAF.SUB.REG[BIT]` (the
/// names the pre-check error prints on both sides).
pub fn cpu_features(cpuid: &CpuId) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in cpuid.as_slice() {
        for &(leaf, sub, reg, i) in FEATURE_WORDS {
            if e.function != leaf || (leaf == 0x7 || leaf == 0xd) && e.index != sub {
                continue;
            }
            let v = [e.eax, e.ebx, e.ecx, e.edx][i];
            for bit in 0..32 {
                if v & (1 << bit) != 0 {
                    out.insert(format!("cpuid.{leaf:#x}.{sub}.{reg}[{bit}]"));
                }
            }
        }
    }
    out
}
