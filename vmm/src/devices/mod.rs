//! Emulated devices and the port I/O bus that routes vCPU exits to them.
//!
//! Only a few legacy devices exist today: the COM1 UART ([`serial`]), the
//! ACPI power-management ports and the i8042 reset line ([`legacy`]). Ports
//! nobody claims read as 0xff and ignore writes (logged at trace level),
//! which is what Linux expects from absent ISA hardware. Virtio-mmio devices
//! ([`virtio`]) live on the MMIO side ([`mmio::MmioBus`]), with ioeventfds
//! for queue notifications, irqfds for interrupts and one event-loop
//! subscriber each.

pub mod legacy;
pub mod mmio;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use crate::control::ExitSignal;
use legacy::{AcpiPm, I8042};
use serial::SerialDevice;

/// Routes port I/O from vCPU exits to devices. Shared by all vCPU threads.
pub struct PioBus {
    serial: Arc<Mutex<SerialDevice>>,
    acpi: AcpiPm,
    i8042: I8042,
}

impl PioBus {
    /// A bus with the COM1 UART and the power-control ports.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, exit: Arc<ExitSignal>) -> Self {
        Self {
            serial,
            acpi: AcpiPm::new(exit.clone()),
            i8042: I8042::new(exit),
        }
    }

    /// A guest `in` from `port`; fills `data`.
    pub fn read(&self, vcpu: u32, port: u16, data: &mut [u8]) {
        if let Some(off) = serial::com1_offset(port) {
            if let Some(b) = data.first_mut() {
                *b = self
                    .serial
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off);
            }
        } else if self.acpi.handles(port) {
            self.acpi.read(port, data);
        } else if self.i8042.handles(port) {
            self.i8042.read(port, data);
        } else {
            data.fill(0xff);
            tracing::trace!(vcpu, port, len = data.len(), "read from unclaimed port");
        }
    }

    /// A guest `out` of `data` to `port`.
    pub fn write(&self, vcpu: u32, port: u16, data: &[u8]) {
        if let Some(off) = serial::com1_offset(port) {
            if let Some(b) = data.first() {
                self.serial
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, *b);
            }
        } else if self.acpi.handles(port) {
            self.acpi.write(vcpu, port, data);
        } else if self.i8042.handles(port) {
            self.i8042.write(vcpu, port, data);
        } else {
            tracing::trace!(vcpu, port, ?data, "write to unclaimed port");
        }
    }
}
