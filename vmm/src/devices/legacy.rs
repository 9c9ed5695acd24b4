//! Power control ports: the ACPI sleep control / status / reset registers
//! the FADT points at, and the i8042 command port whose 0xFE command pulses
//! the CPU reset line. Both turn guest requests into VM exits.

use std::sync::Arc;

use crate::control::{ExitReason, ExitSignal};

/// FADT sleep control register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// FADT sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// FADT reset register.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register to reset.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 (soft off), as listed in the DSDT's `_S5_` package.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 command: pulse the reset line.
pub const I8042_RESET_CMD: u8 = 0xfe;

/// What a write to the sleep control register asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepRequest {
    /// SLP_EN with SLP_TYP = S5.
    PowerOff,
    /// SLP_EN with another sleep type (not supported: ignored).
    OtherState(u8),
    /// SLP_EN not set.
    None,
}

/// Decodes a sleep control register value (SLP_TYP in bits 2..4).
pub fn decode_sleep_control(v: u8) -> SleepRequest {
    if v & SLP_EN == 0 {
        return SleepRequest::None;
    }
    match (v >> 2) & 0x7 {
        t if t == ACPI_S5_SLEEP_TYPE => SleepRequest::PowerOff,
        t => SleepRequest::OtherState(t),
    }
}

/// The ACPI power-management registers.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// New device signalling `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }

    /// Whether `port` is one of ours.
    pub fn handles(&self, port: u16) -> bool {
        (ACPI_SLEEP_CONTROL_PORT..=ACPI_RESET_PORT).contains(&port)
    }

    /// Reads: all registers read 0 (no wake events pending).
    pub fn read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    /// Writes: S5 powers off, the reset value reboots.
    pub fn write(&self, vcpu: u32, port: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match port {
            ACPI_SLEEP_CONTROL_PORT => match decode_sleep_control(v) {
                SleepRequest::PowerOff => {
                    tracing::info!(vcpu, "guest powered off (ACPI S5)");
                    self.exit.request(ExitReason::PowerOff);
                }
                SleepRequest::OtherState(t) => {
                    tracing::warn!(
                        vcpu,
                        sleep_type = t,
                        "guest asked for an unsupported ACPI sleep state; ignored"
                    )
                }
                SleepRequest::None => {}
            },
            ACPI_RESET_PORT if v == ACPI_RESET_VALUE => {
                tracing::info!(vcpu, "guest reset through the ACPI reset register");
                self.exit.request(ExitReason::Reboot);
            }
            _ => tracing::trace!(vcpu, port, value = v, "ignored ACPI register write"),
        }
    }
}

/// Just enough of an i8042 for the reset command. Status reads return 0
/// (both buffers empty) so a guest waiting for the controller never spins.
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// New device signalling `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }

    /// Whether `port` is one of ours.
    pub fn handles(&self, port: u16) -> bool {
        port == I8042_DATA_PORT || port == I8042_COMMAND_PORT
    }

    /// Reads: 0.
    pub fn read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    /// Writes: 0xFE to the command port reboots.
    pub fn write(&self, vcpu: u32, port: u16, data: &[u8]) {
        if port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET_CMD) {
            tracing::info!(vcpu, "guest reset through the i8042 controller");
            self.exit.request(ExitReason::Reboot);
        } else {
            tracing::trace!(vcpu, port, ?data, "ignored i8042 write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_control_decoding() {
        assert_eq!(decode_sleep_control(0x34), SleepRequest::PowerOff);
        assert_eq!(decode_sleep_control(0x14), SleepRequest::None);
        assert_eq!(decode_sleep_control(0x2c), SleepRequest::OtherState(3));
    }

    #[test]
    fn ports_request_exits() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let pm = AcpiPm::new(exit.clone());
        pm.write(0, ACPI_SLEEP_CONTROL_PORT, &[0x14]);
        assert!(!exit.should_stop());
        pm.write(
            0,
            ACPI_SLEEP_CONTROL_PORT,
            &[(ACPI_S5_SLEEP_TYPE << 2) | SLP_EN],
        );
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        I8042::new(exit.clone()).write(0, I8042_COMMAND_PORT, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));

        let exit = Arc::new(ExitSignal::new().unwrap());
        AcpiPm::new(exit.clone()).write(1, ACPI_RESET_PORT, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}
