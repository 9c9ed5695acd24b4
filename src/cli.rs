//! Command-line definitions (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Vigil: a KVM micro-hypervisor with live migration and HA.
#[derive(Debug, Parser)]
#[command(name = "vigil", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once per process: the size difference between variants is moot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it in the foreground until it stops.
    #[command(after_long_help = RUN_EXIT_STATUS_HELP, after_help = RUN_EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Ask a running VM (through its control API socket) for its state, or
    /// to pause, resume, shut down or reset.
    Vm(VmArgs),
    /// Snapshot a running VM to a directory (restore with `vigil run --restore DIR`).
    Snapshot(SnapshotArgs),
    /// Live-migrate a running VM to a host where `vigil run --incoming` waits.
    Migrate(MigrateArgs),
    /// Run this host's HA agent (VMMs it starts outlive it).
    Agent(AgentArgs),
    /// Create an HA cluster, or show its state.
    Cluster(ClusterArgs),
    /// Collect logs, health summaries, cluster state and VM configs into one
    /// .tar.gz for a support case (secrets are left out).
    SupportBundle(SupportBundleArgs),
}

/// `vigil migrate --api-socket PATH --to ADDR:PORT [...]` or `--cancel`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM's control API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Target ADDR:PORT (where `vigil run --incoming tcp:ADDR:PORT` listens).
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "cancel")]
    pub to: Option<String>,
    /// Longest acceptable guest pause, ms [default: 100].
    #[arg(long, value_name = "N")]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap, MB/s (10^6 bytes) [default: unlimited].
    #[arg(long, value_name = "MBPS")]
    pub bandwidth: Option<u64>,
    /// Give up (the VM keeps running here) after this many seconds [default: 100].
    #[arg(long, value_name = "SECONDS")]
    pub max_duration_s: Option<u64>,
    /// Verify every page end to end (the target recomputes each checksum).
    #[arg(long)]
    pub checksum: bool,
    /// high: both hosts reserve first (the target commits all of guest
    /// memory, the source checks room for its buffers) and the migration
    /// is refused if either cannot; standard: the target checks room for
    /// the memory the guest uses now and proceeds [default: standard].
    #[arg(long, value_enum)]
    pub priority: Option<PriorityArg>,
    /// LZ4-compress data pages: auto (while --bandwidth caps the link),
    /// on (every round before the guest is paused), off [default: auto].
    #[arg(long, value_enum)]
    pub compress: Option<CompressArg>,
    /// Progress and summary as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Cancel the running migration; the VM keeps running here.
    #[arg(long, conflicts_with_all = ["to", "downtime_ms", "bandwidth", "max_duration_s", "checksum", "priority", "compress"])]
    pub cancel: bool,
    /// TLS 1.3: this host's certificate (PEM); with --tls-key and --tls-ca.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this host's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the cluster CA that signs every host's certificate (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// TLS: the name in the target's certificate [default: the host of --to].
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_name: Option<String>,
}

/// `vigil support-bundle [--out FILE] [--agent-dir DIR ...] [--config host.toml]`.
#[derive(Debug, Args)]
pub struct SupportBundleArgs {
    /// Where to write the archive [default: ./vigil-support-HOST-TIME.tar.gz].
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
    /// An agent's state directory (logs, summaries, cluster state, VM
    /// configs); repeatable [default: /var/lib/vigil].
    #[arg(long, value_name = "DIR")]
    pub agent_dir: Vec<std::path::PathBuf>,
    /// An agent's host.toml: its run directory is included, and its
    /// cluster status if an agent answers.
    #[arg(long, value_name = "host.toml")]
    pub config: Option<std::path::PathBuf>,
}

/// `vigil agent --config host.toml`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This host's agent configuration.
    #[arg(long, value_name = "host.toml")]
    pub config: PathBuf,
    /// Log filter, RUST_LOG syntax [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Write logs to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
}

/// `vigil cluster ...`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ClusterAction,
}

/// `vigil cluster` actions.
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Write the cluster file on the datastores and create the cluster secret.
    Init {
        /// The cluster description (TOML: [hosts.NAME] address, port, cpu_mhz,
        /// mem_mib, datastores; heartbeat_datastores).
        #[arg(long, value_name = "cluster.toml")]
        cluster: PathBuf,
        /// A datastore directory to hold the cluster file (repeatable).
        #[arg(long, value_name = "DIR", required = true)]
        datastore: Vec<PathBuf>,
        /// The secret file to create (kept if it exists); hand it to every host.
        #[arg(long, value_name = "PATH")]
        secret: PathBuf,
    },
    /// Each host's HA state and each VM's host and protection (asked of the
    /// master, through this host's agent).
    Status {
        /// This host's agent configuration.
        #[arg(long, value_name = "host.toml", default_value = "/etc/vigil/host.toml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a host into maintenance mode, or take it out (`enter|exit
    /// HOST`). A host in maintenance runs no VMs and receives no restarts.
    /// Entering is refused while VMs run there (unless --power-off) and
    /// when admission control says the other hosts could not honour the
    /// policy without it.
    Maintenance {
        /// enter or exit.
        action: MaintenanceAction,
        /// The host (its name in the cluster file).
        host: String,
        /// enter: power off the VMs running on the host first (they become
        /// unprotected, as with `vigil vm stop`).
        #[arg(long, conflicts_with = "migrate")]
        power_off: bool,
        /// enter: live-migrate the VMs running on the host to the others
        /// first (the master places each; they stay protected).
        #[arg(long)]
        migrate: bool,
        /// This host's agent configuration.
        #[arg(long, value_name = "host.toml", default_value = "/etc/vigil/host.toml")]
        config: PathBuf,
    },
}

/// `vigil cluster maintenance` actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MaintenanceAction {
    /// Enter maintenance mode.
    Enter,
    /// Exit maintenance mode.
    Exit,
}

/// `vigil vm ACTION --api-socket PATH [--json]` (one VM's VMM), or
/// `vigil vm register|start|stop|set|list ... [--config host.toml]` (HA).
#[derive(Debug, Args)]
pub struct VmArgs {
    /// What to do.
    #[arg(value_enum)]
    pub action: VmAction,
    /// register: DATASTORE VM.toml; start, stop, set: NAME.
    #[arg(value_name = "ARGS")]
    pub args: Vec<String>,
    /// The VM's control API socket (as given to `vigil run --api-socket`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// register/start/stop/set/list: this host's agent configuration
    /// [default: /etc/vigil/host.toml].
    #[arg(long, value_name = "host.toml")]
    pub config: Option<PathBuf>,
    /// start, migrate: the host to run it on (the master places it otherwise).
    #[arg(long)]
    pub host: Option<String>,
    /// migrate: the downtime target in milliseconds [default: 100].
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// migrate: cap the migration stream at this many MB/s [default: none].
    #[arg(long, value_name = "MBPS")]
    pub bandwidth: Option<u64>,
    /// migrate: cancel the VM's migration under way (it keeps running where
    /// it was).
    #[arg(long)]
    pub cancel: bool,
    /// register, set: restart priority: high, medium, low or disabled [default: medium].
    #[arg(long, value_parser = parse_serde::<ha::types::RestartPriority>)]
    pub priority: Option<ha::types::RestartPriority>,
    /// register: isolation response: leave-on, power-off or shut-down [default: leave-on].
    #[arg(long, value_parser = parse_serde::<ha::types::IsolationResponse>)]
    pub isolation_response: Option<ha::types::IsolationResponse>,
    /// register, set: CPU reservation in MHz [default: 0].
    #[arg(long)]
    pub cpu_mhz: Option<u64>,
    /// register, set: memory reservation in MiB [default: the VM's memory].
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// register: datastore-loss response: disabled, events_only or restart [default: disabled].
    #[arg(long, value_parser = parse_serde::<ha::types::DatastoreLossResponse>)]
    pub datastore_loss: Option<ha::types::DatastoreLossResponse>,
    /// register: seconds a datastore may be lost before that response [default: 180].
    #[arg(long, value_name = "SECONDS")]
    pub datastore_loss_delay_s: Option<u64>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// shutdown: seconds to wait for a graceful shutdown before powering off.
    #[arg(long, value_name = "SECONDS")]
    pub timeout_s: Option<u64>,
    /// reset: why (written to the VMM's log).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

/// Parses a lower-case enum value the way its serde form spells it
/// (hyphens accepted for underscores).
fn parse_serde<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.replace('-', "_")))
        .map_err(|_| format!("unknown value {s:?}"))
}

/// `vigil vm` actions.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum VmAction {
    /// State, config, vCPUs, memory, uptime.
    Info,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Graceful shutdown through the guest tools, hard power-off after a timeout.
    Shutdown,
    /// Guest tools heartbeat status.
    Heartbeat,
    /// Per-device I/O counters.
    Counters,
    /// vCPU and event-loop progress (stall detection).
    Watchdog,
    /// HA: register a VM on a datastore (`register DATASTORE VM.toml`).
    Register,
    /// HA: power a registered VM on through the cluster (`start NAME [--host H]`).
    Start,
    /// HA: power a VM off; it is no longer protected (`stop NAME`).
    Stop,
    /// HA: live-migrate a VM to another cluster host, which then protects
    /// it (`migrate NAME [--host H]`); with `--api-socket PATH`, bring a VM
    /// running outside the cluster (a hand-started VMM on this machine)
    /// into it: admission control decides, as for a power-on.
    Migrate,
    /// HA: every VM's protection state and host.
    List,
    /// HA: change a registered VM's reservation or priority (`set NAME
    /// [--cpu-mhz MHZ] [--mem-mib MIB] [--priority P]`); admission control
    /// checks a larger reservation of a powered-on VM.
    Set,
    /// Hard reset: the guest boots again in the same VMM process, keeping
    /// its disks and MAC addresses (the reason goes to the VMM's log).
    Reset,
}

/// `vigil snapshot --api-socket PATH --to DIR [--stop]`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM's control API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Directory to write the snapshot to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Stop the VM after the snapshot instead of resuming it.
    #[arg(long)]
    pub stop: bool,
    /// Print the API's JSON answer.
    #[arg(long)]
    pub json: bool,
}

/// Text shown after `vigil run --help`.
pub const RUN_EXIT_STATUS_HELP: &str = "\
Exit status:
  0  the guest powered off (or, on a migration source, it moved to the target)
  1  VMM error or bad input (one message on stderr)
  2  command-line usage error
  3  the guest asked for a reboot (with --on-reboot exit, the default)
  4  the guest crashed (triple fault, KVM internal/emulation error, failed VM entry);
     the reason and the vCPU registers are printed on stderr
  5  --lease: the VM's disk lease was taken by another host or could not be renewed
     in time; the guest was stopped
  128+N  killed by signal N (SIGTERM, SIGINT, SIGHUP); the terminal is restored

Flags override the values in --config; relative paths in a config file are
relative to the file's directory.";

/// `--cpu-template` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CpuTemplateArg {
    /// Portable x86-64-v2-like feature set (no AVX/AVX-512/TSX/PKU/...).
    Baseline,
    /// Everything KVM on this host supports.
    Host,
}

/// `vigil migrate --priority` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    /// Check room for the memory in use, reserve nothing, proceed.
    Standard,
    /// Reserve on both hosts first; refuse if either cannot.
    High,
}

/// `vigil migrate --compress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    /// While a bandwidth cap applies.
    Auto,
    /// Every round before the guest is paused.
    On,
    /// Never.
    Off,
}

/// `--on-reboot` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnRebootArg {
    /// Exit with status 3.
    Exit,
    /// Reload the kernel and boot the guest again in this process.
    Restart,
}

/// Arguments of `vigil run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM config file (TOML). Flags override its values.
    #[arg(long, value_name = "VM.toml")]
    pub config: Option<PathBuf>,
    /// Kernel: uncompressed ELF vmlinux with a PVH note, or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (preferably uncompressed cpio).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1"].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest memory: 512M, 2G, 1024 (plain number = MiB) [default: 256M].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Serial console: stdio, file:PATH or none [default: stdio].
    #[arg(long, value_name = "stdio|file:PATH|none")]
    pub console: Option<String>,
    /// What a guest reboot does [default: exit].
    #[arg(long, value_enum)]
    pub on_reboot: Option<OnRebootArg>,
    /// CPU template shaping the guest's CPUID [default: baseline].
    #[arg(long, value_enum)]
    pub cpu_template: Option<CpuTemplateArg>,
    /// A virtio-blk disk: path=IMG[,ro][,id=NAME] (repeatable; the first is
    /// /dev/vda). Replaces the config file's [[disks]] when given.
    #[arg(long, value_name = "path=IMG[,ro][,id=NAME]")]
    pub disk: Vec<String>,
    /// A virtio-vsock device: cid=N,socket=PATH. Guest connections to host
    /// port P go to PATH_P; host processes connect to PATH and send
    /// "CONNECT <port>\n". Port 5252 is the VMM's guest tools channel.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<String>,
    /// A virtio-net NIC on a host tap: tap=NAME[,mac=MAC][,network=NAME]
    /// (repeatable; the first is eth0). Replaces the config file's [[nics]].
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,network=NAME]")]
    pub net: Vec<String>,
    /// VM name, used in logs [default: config `name`, or "vigil"].
    #[arg(long)]
    pub name: Option<String>,
    /// Log filter, RUST_LOG syntax (e.g. info, vmm=debug) [default: $RUST_LOG or warn].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Write logs to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Serve the control API (HTTP/JSON) on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Restore the VM saved in DIR (by `vigil snapshot`) instead of booting.
    /// Its disks, NICs and vsock device are reopened as saved; only
    /// --console, --name, --api-socket, --tap, --vsock-socket and logging
    /// flags apply.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "config", "kernel", "initrd", "cmdline", "cpus", "memory", "on_reboot", "cpu_template",
        "disk", "vsock", "net"
    ])]
    pub restore: Option<PathBuf>,
    /// Wait for a VM migrated from another host (`vigil migrate --to`)
    /// on tcp:ADDR:PORT and run it. The VM's config arrives with it; only
    /// --console, --name, --api-socket, --tap, --vsock-socket, --network
    /// and logging flags apply.
    #[arg(long, value_name = "tcp:ADDR:PORT", conflicts_with_all = [
        "config", "kernel", "initrd", "cmdline", "cpus", "memory", "on_reboot", "cpu_template",
        "restore", "disk", "vsock", "net"
    ])]
    pub incoming: Option<String>,
    /// With --incoming: a network (port group) this host offers, as NICs
    /// name it with `network=` (repeatable; case-sensitive). A VM whose
    /// NICs use a network not listed is refused by the pre-checks.
    #[arg(long, value_name = "NAME", requires = "incoming")]
    pub network: Vec<String>,
    /// With --incoming: offer at most the CPU features of this template
    /// (like an EVC baseline), whatever more KVM here supports. A VM
    /// started with features beyond it is refused by the pre-checks, which
    /// name the missing features.
    #[arg(long, value_enum, value_name = "TEMPLATE", requires = "incoming")]
    pub cpu_limit: Option<CpuTemplateArg>,
    /// With --incoming: require TLS 1.3, this host's certificate (PEM);
    /// with --tls-key and --tls-ca. Sources without a certificate from
    /// that CA get nothing.
    #[arg(long, value_name = "PATH", requires_all = ["incoming", "tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// With --incoming: this host's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --incoming: the cluster CA (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// With --restore or --incoming: attach the VM's NICs to these taps
    /// instead of the saved (source's) ones (repeatable, in NIC order; MAC
    /// and network stay).
    #[arg(long, value_name = "NAME")]
    pub tap: Vec<String>,
    /// With --restore or --incoming: the vsock device's host socket path
    /// instead of the saved (source's) one (the CID stays).
    #[arg(long, value_name = "PATH")]
    pub vsock_socket: Option<PathBuf>,
    /// Watchdog: a vCPU or the event loop without progress for this long is
    /// reported as stuck [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub watchdog_threshold_s: Option<u64>,
    /// Hold the VM's disk lease described in this TOML file (written by the
    /// HA agent): renew it, stop the guest (exit status 5) when it is taken
    /// or cannot be renewed in time, release it when the guest stops.
    #[arg(long, value_name = "LEASE.toml")]
    pub lease: Option<PathBuf>,
}
