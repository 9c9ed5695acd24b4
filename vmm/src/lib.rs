//! The virtual machine monitor: one process per VM.
//!
//! [`run`] takes a validated [`config::VmConfig`], boots the guest and
//! returns why it stopped ([`control::ExitReason`], which maps to the
//! process exit status). The pieces:
//!
//! - [`config`]: the VM config file and flag overrides, validation.
//! - [`memory`]: guest memory layout and allocation.
//! - [`vm`]: KVM, memory slots, irqchip/PIT.
//! - [`boot`]: kernel/initrd/cmdline loading (PVH and Linux boot protocol).
//! - [`acpi`]: ACPI tables (SMP and power off).
//! - [`cpu`]: CPUID templates, register set-up, vCPU threads.
//! - [`devices`]: UART and power-control ports; the MMIO bus and the virtio
//!   devices (`devices::virtio`: transport, block, net, vsock).
//! - [`console`]: terminal, stdin and console output.
//! - [`instance`]: putting one VM together and running it to its end.
//! - [`control`]: exit reasons and the process exit statuses.
//! - [`machine`]: the running VM as the API, watchdog and snapshot code see
//!   it, and the hooks devices implement to appear in the API.
//! - [`api`]: the control API (HTTP/JSON on a unix socket) and its client.
//! - [`snapshot`]: the versioned state format, save and restore
//!   (`docs/SNAPSHOT.md`).
//! - [`watchdog`]: stall detection for vCPU threads and the event loop.
//! - [`migration_hook`]: the trait the control API's `/vm/migrate` routes
//!   call; the `vigil` binary installs `migration`'s implementation.
//! - [`lease`]: the VM's disk lease, renewed by the VMM (HA, `--lease`).
//!
//! Virtio-mmio devices (block, net, vsock) live in one folder each under
//! `devices/virtio/`; MMIO exits go to [`devices::mmio::MmioBus`], queue
//! notifications are ioeventfds and interrupts irqfds, and each device is an
//! `event_manager` subscriber on the loop in [`instance`].
//! `devices::virtio::attach::VirtioDevices` holds what the rest of the VMM
//! needs: counters, the tools-channel status, transports to quiesce/save.
//!
//! Where later work slots in:
//! - devices join snapshot/restore by implementing [`persist::Persist`] and
//!   adding their state to [`snapshot::DeviceStates`]; they join the API by
//!   registering a [`machine::IoCounterSource`] (I/O counters) or, for the
//!   vsock tools channel, a [`machine::GuestTools`] (heartbeat, graceful
//!   shutdown) on the [`machine::Machine`].
//! - live migration: [`vm::Vm::set_dirty_logging`] and
//!   [`vm::Vm::dirty_log`] give KVM's per-slot dirty log, and
//!   [`memory::take_vmm_dirty`] the VMM's own writes (the `AtomicBitmap` of
//!   [`memory::GuestMemory`]); [`cpu::gate::VcpuGate::set_throttle`]
//!   slows the vCPUs; [`instance::run_incoming`] runs a received VM.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod instance;
pub mod lease;
pub mod machine;
pub mod memory;
pub mod migration_hook;
pub mod persist;
pub mod snapshot;
pub mod vm;
pub mod watchdog;

pub use config::VmConfig;
pub use control::ExitReason;
pub use instance::{run, run_incoming, run_restored, run_with, Error, RunOptions};
