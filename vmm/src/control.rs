//! How a VM ends: the reasons, their process exit statuses, and the shared
//! signal vCPU threads and devices use to ask the VMM to stop.
//!
//! Exit statuses of `vigil run` (the CLI documents these too):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest powered off (ACPI S5), the API powered it off, it stopped after a snapshot, or it migrated away |
//! | 1 | VMM error or bad input (one message on stderr) |
//! | 2 | command-line usage error |
//! | 3 | the guest asked for a reboot (and `--on-reboot exit`) |
//! | 4 | the guest crashed: triple fault, KVM internal/emulation error, failed entry |
//! | 5 | the VM's disk lease was lost or could not be renewed in time (`--lease`, see `lease`) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit status: guest powered off.
pub const EXIT_POWEROFF: i32 = 0;
/// Exit status: VMM error or bad input.
pub const EXIT_ERROR: i32 = 1;
/// Exit status: command-line usage error (clap's).
pub const EXIT_USAGE: i32 = 2;
/// Exit status: guest requested a reboot.
pub const EXIT_REBOOT: i32 = 3;
/// Exit status: guest crashed.
pub const EXIT_CRASH: i32 = 4;
/// Exit status: the disk lease was lost or expired; the guest was stopped.
pub const EXIT_LEASE: i32 = 5;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off through ACPI.
    PowerOff,
    /// The guest asked for a reboot (ACPI reset register or i8042 0xFE).
    Reboot,
    /// The guest crashed.
    Crash {
        /// The vCPU that saw it.
        vcpu: u32,
        /// One line: what happened.
        reason: String,
        /// The vCPU's registers at that moment, one line.
        registers: String,
    },
    /// The VMM failed while the guest was running (a KVM ioctl failed).
    VmmError(String),
    /// Powered off from the host (control API shutdown, hard).
    HostPowerOff,
    /// Stopped after a snapshot (`PUT /vm/snapshot` with `stop: true`).
    Snapshotted,
    /// Migrated away: the target acknowledged that the guest runs there.
    Migrated,
    /// Reset from the host (`POST /vm/reset`, e.g. by HA VM monitoring): the
    /// VMM boots the guest again in the same process whatever the reboot
    /// policy, with the same config (disks, MACs). Never ends the process.
    Reset {
        /// Why, as given by the requester (logged).
        reason: String,
    },
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::PowerOff | Self::HostPowerOff | Self::Snapshotted | Self::Migrated => {
                EXIT_POWEROFF
            }
            // Not an exit in practice: the run loop boots the guest again.
            Self::Reboot | Self::Reset { .. } => EXIT_REBOOT,
            Self::Crash { .. } => EXIT_CRASH,
            Self::VmmError(_) => EXIT_ERROR,
        }
    }
}

/// Errors creating the exit signal.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// eventfd creation failed.
    #[error("cannot create the VM exit eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A one-shot "stop the VM" flag shared by vCPUs, devices and the main loop.
/// The first reason wins; later ones (other vCPUs seeing the same shutdown)
/// are only logged.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stop: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh, unset signal.
    pub fn new() -> Result<Self, ControlError> {
        Ok(Self {
            reason: Mutex::new(None),
            stop: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK).map_err(ControlError::EventFd)?,
        })
    }

    /// Asks the VM to stop for `reason` (only the first call counts).
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::info!(?reason, "VM stop requested");
            *r = Some(reason);
        } else {
            tracing::debug!(?reason, "VM already stopping; ignoring later reason");
        }
        self.stop.store(true, Ordering::SeqCst);
        // The main loop also polls `should_stop`, so a failed write only
        // delays the wake-up.
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "cannot signal VM exit eventfd");
        }
    }

    /// Whether a stop was requested.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The reason, once set.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd written on each request (for the event loop).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.should_stop());
        s.request(ExitReason::Reboot);
        s.request(ExitReason::PowerOff);
        assert!(s.should_stop());
        assert_eq!(s.reason(), Some(ExitReason::Reboot));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn codes() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::VmmError(String::new()).exit_code(), 1);
        assert_eq!(ExitReason::Reboot.exit_code(), 3);
        let c = ExitReason::Crash {
            vcpu: 0,
            reason: String::new(),
            registers: String::new(),
        };
        assert_eq!(c.exit_code(), 4);
    }
}
