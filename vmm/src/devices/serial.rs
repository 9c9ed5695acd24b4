//! COM1: a 16550 UART (vm-superio) at 0x3f8, raising IRQ 4 through an
//! irqfd, writing guest output to the chosen console sink.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line (ISA IRQ = GSI 4).
pub const COM1_IRQ: u32 = 4;

/// The register offset for a COM1 port, if it is one.
pub fn com1_offset(port: u16) -> Option<u8> {
    port.checked_sub(COM1_PORT)
        .filter(|o| *o < 8)
        .map(|o| o as u8)
}

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The COM1 UART.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Register read.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Register write. Output errors (console closed) are logged, not fatal:
    /// a guest must not die because nobody reads its console.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!(error = %e, "serial write failed");
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "serial input dropped");
                0
            }
        }
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`,
/// mirrored so it has serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// Errors restoring the UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// vm-superio refused the state (FIFO larger than the UART's).
    #[error("serial device state is invalid: {0}")]
    Restore(String),
}

/// What a restored UART needs besides its state.
pub struct SerialArgs {
    /// The irqfd for COM1's line.
    pub irq: EventFd,
    /// Where output goes (chosen by the restoring process).
    pub out: ConsoleOut,
}

impl crate::persist::Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(args: SerialArgs, s: &SerialDeviceState) -> Result<Self, SerialError> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(args.irq), NoEvents, args.out)
            .map_err(|e| SerialError::Restore(e.to_string()))?;
        Ok(Self { uart })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let buf = Buf::default();
        let irq = EventFd::new(0).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        s.write(0, b'h');
        s.write(0, b'i');
        assert_eq!(&*buf.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then feed input.
        s.write(1, 0x01);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(s.read(0), b'a');
        assert_eq!(s.input_capacity(), 63);
    }

    #[test]
    fn persist_round_trip() {
        use crate::persist::Persist;
        let buf = Buf::default();
        let irq = EventFd::new(0).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        s.write(3, 0x03); // 8N1
        s.write(7, 0x5a); // scratch
        s.enqueue_input(b"xy");
        let st = s.save();
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        let args = SerialArgs {
            irq,
            out: Box::new(buf),
        };
        let mut r = SerialDevice::restore(args, &back).unwrap();
        assert_eq!(r.read(7), 0x5a);
        assert_eq!(r.read(0), b'x');
        assert_eq!(r.save().line_control, 0x03);
    }

    #[test]
    fn offsets() {
        assert_eq!(com1_offset(0x3f8), Some(0));
        assert_eq!(com1_offset(0x3ff), Some(7));
        assert_eq!(com1_offset(0x400), None);
        assert_eq!(com1_offset(0x2f8), None);
    }
}
