//! The agent's interface: what it is told ([`Input`]) and what it asks for
//! ([`Action`]), plus the records it keeps on datastores and what the CLI
//! shows. Everything here is plain data a runtime or a test can build and
//! match on.

use crate::config::ClusterConfig;
use crate::lease::LeaseRecord;
use crate::time::Time;
use crate::types::{
    DatastoreId, DatastoreLossResponse, HostHaState, HostId, IsolationResponse, Resources,
    VmConfig, VmId, VmProtection,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use thiserror::Error;

/// One heartbeat record a host keeps on each of its heartbeat datastores.
/// Datastores are trusted storage: records are not signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DsRecord {
    /// The writer.
    pub host: HostId,
    /// Bumped on every write: readers only compare it for change.
    pub counter: u64,
    /// The writer's own view of its state (isolated, slave...).
    pub state: HostHaState,
    /// How many agents the writer hears: tells a partition from isolation.
    pub peers_heard: u32,
    /// VMs its isolation response powered off: the master may restart them.
    pub released: BTreeSet<VmId>,
}

/// The protected-VM list the master persists on the datastores, so a new
/// master knows what to restart even for VMs of a host that died with the
/// old master.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedList {
    /// Bumped on every write; a reader finding different lists on several
    /// datastores takes the highest version.
    pub version: u64,
    /// Protected VM -> the host it last ran on.
    pub vms: BTreeMap<VmId, HostId>,
}

/// What happened to a local VM, as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// Running (after a StartVm: the runtime acquired the lease first).
    PoweredOn,
    /// Stopped, for whatever reason (the agent remembers why it asked).
    PoweredOff,
    /// The VMM died.
    Crashed,
    /// A StartVm failed (VMM error, lease held by a live owner...).
    StartFailed {
        /// The cause, for the log and the master.
        reason: String,
    },
    /// A lease renewal issued at `issued_at` (local time) succeeded.
    LeaseRenewed {
        /// When the successful write was issued.
        issued_at: Time,
    },
    /// A heartbeat from the guest tools.
    ToolsHeartbeat,
    /// A heartbeat from the monitored application inside the guest (VM and
    /// application monitoring).
    AppHeartbeat,
    /// Disk or network I/O was seen since the last report.
    IoActivity,
    /// A read of the lease shows another owner or generation.
    LeaseLost {
        /// Who holds it now.
        by: Option<HostId>,
        /// Their generation.
        generation: u64,
    },
    /// The VM live-migrated away: the target acknowledged and holds the
    /// lease. It no longer runs here and nothing is to be restarted.
    MigratedAway {
        /// The lease's new holder, when read.
        to: Option<HostId>,
    },
    /// An incoming migration ended without the guest running here (the
    /// migration failed or was cancelled): nothing ran, nothing to report.
    IncomingEnded,
}

/// Operator commands (from the CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start HA on this host with this cluster view.
    EnableHa(ClusterConfig),
    /// Stop HA on this host (VMs keep running).
    DisableHa,
    /// Power on a VM (master only: admission control, placement).
    PowerOnVm {
        /// The VM.
        vm: VmId,
        /// Where; the master places it when `None`.
        host: Option<HostId>,
    },
    /// Power off a local VM: it becomes unprotected.
    PowerOffVm {
        /// The VM.
        vm: VmId,
    },
    /// Leave HA for maintenance. Refused (`MaintenanceBusy`) while VMs run
    /// or start on this host: they must be moved or powered off first (a
    /// host in maintenance runs no VMs). On the master, admission control
    /// is checked first (the cluster without this host must still satisfy
    /// the policy); for a slave the CLI asks the master with
    /// `CheckMaintenance` before sending this.
    EnterMaintenance,
    /// Master only: may `host` enter maintenance mode under admission
    /// control? `Ok` with a note, or `Admission` with the arithmetic.
    CheckMaintenance {
        /// The host that wants to enter maintenance.
        host: HostId,
        /// Its VMs will be powered off rather than moved to the other
        /// hosts: they no longer count.
        power_off: bool,
    },
    /// Come back from maintenance.
    ExitMaintenance,
    /// Master only: may `vm`'s reservation become `reservation`? A VM that
    /// is neither powered on nor starting reserves nothing yet, and a
    /// decrease frees capacity: both are accepted without a check.
    /// Otherwise admission control decides (`Admission` with the
    /// arithmetic). Changes nothing: the caller writes the registration
    /// and sends `RegisterVm` with the new settings.
    CheckReservation {
        /// The VM.
        vm: VmId,
        /// The reservation it would have.
        reservation: Resources,
    },
    /// A VM was registered (or its HA settings changed) after HA was
    /// enabled: add it to the cluster view (the runtime finds registrations
    /// on the datastores).
    RegisterVm(VmConfig),
    /// Plan a live migration of `vm` (master): to `to`, or to a host the
    /// master places it on. `from_outside`: the VM runs on a VMM outside
    /// the cluster and comes in (admission control decides, as for a
    /// power-on); otherwise it runs on a cluster host and moves within it.
    /// `Ok` is `"FROM -> TO"` (FROM is `outside` for a VM coming in); the
    /// master then counts the migration as in flight until
    /// [`Command::EndMigration`] (or a timeout), and does not take the VM's
    /// absence from its source's reports for a loss meanwhile.
    BeginMigration {
        /// The VM.
        vm: VmId,
        /// The target host; placed when absent.
        to: Option<HostId>,
        /// The VM comes from outside the cluster.
        from_outside: bool,
    },
    /// A planned migration ended (master): `ok` when the guest runs on the
    /// target.
    EndMigration {
        /// The VM.
        vm: VmId,
        /// The guest runs on the target.
        ok: bool,
    },
    /// This host is about to receive `vm` by live migration (the host
    /// itself): refused in maintenance mode or when the VM runs here.
    AcceptIncoming {
        /// The VM.
        vm: VmId,
    },
}

/// Everything the agent can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed.
    Tick,
    /// Bytes received from a peer (verified here).
    Message(Vec<u8>),
    /// Result of reading heartbeat records from one datastore.
    DatastoreRead {
        /// The datastore.
        datastore: DatastoreId,
        /// The records, or the I/O error.
        result: Result<Vec<DsRecord>, String>,
    },
    /// Result of a ping.
    PingResult {
        /// The address pinged.
        addr: String,
        /// Whether it answered within the ping timeout.
        answered: bool,
    },
    /// A local VM changed.
    Vm {
        /// The VM.
        vm: VmId,
        /// What happened.
        event: VmEvent,
    },
    /// An operator command.
    Command(Command),
    /// Answer to [`Action::ReadProtectedList`] (`None`: nothing stored yet).
    ProtectedListRead(Option<ProtectedList>),
    /// Answer to [`Action::ReadLeases`], one per VM (`Ok(None)`: no record).
    LeaseRead {
        /// The VM.
        vm: VmId,
        /// Its lease record, or the I/O error.
        result: Result<Option<LeaseRecord>, String>,
    },
    /// This host's access to one of its datastores, as the runtime's probe
    /// finds it (report every probe or at least every change).
    DatastoreAccess {
        /// The datastore.
        datastore: DatastoreId,
        /// Whether a read and a write of a probe file completed in time.
        accessible: bool,
    },
}

/// Why the agent powers a VM off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerOffReason {
    /// The operator asked.
    User,
    /// Isolation response "power off".
    IsolationResponse,
    /// Isolation response "shut down" timed out.
    IsolationShutdownTimeout,
    /// Another host holds the VM's lease: this copy is stale.
    StaleCopy,
    /// The lease was not renewed for `stop_time`.
    LeaseExpired,
    /// Datastore-loss protection: a datastore of the VM is lost here and
    /// reachable from another host, which will restart it. The lease may be
    /// on the lost datastore: release it if the write succeeds, otherwise
    /// let it lapse.
    DatastoreLost,
}

/// Everything the agent can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these (sealed) bytes to a peer.
    Send {
        /// Destination.
        to: HostId,
        /// A sealed [`crate::wire::Envelope`].
        bytes: Vec<u8>,
    },
    /// Ping an address; answer with [`Input::PingResult`].
    Ping {
        /// The address.
        addr: String,
    },
    /// Write this host's heartbeat record on these datastores.
    WriteHeartbeat {
        /// Where.
        datastores: Vec<DatastoreId>,
        /// What.
        record: DsRecord,
    },
    /// Read all heartbeat records on these datastores; answer with one
    /// [`Input::DatastoreRead`] per datastore.
    ReadDatastores {
        /// Where.
        datastores: Vec<DatastoreId>,
    },
    /// Store the protected-VM list on these datastores.
    PersistProtectedList {
        /// Where.
        datastores: Vec<DatastoreId>,
        /// What.
        list: ProtectedList,
    },
    /// Read the protected-VM list; answer with [`Input::ProtectedListRead`].
    ReadProtectedList {
        /// Where to look.
        datastores: Vec<DatastoreId>,
    },
    /// Read these VMs' lease records (a VM's lease lives on the first, in id
    /// order, of its datastores); answer with one [`Input::LeaseRead`] each.
    /// The master asks when a host answers ping but writes no heartbeat: its
    /// agent may be dead while its VMs still run and renew their leases.
    ReadLeases {
        /// VM and the datastore holding its lease.
        leases: Vec<(VmId, DatastoreId)>,
    },
    /// Start a VM here: acquire its lease, then boot; report with [`VmEvent`].
    StartVm {
        /// The VM.
        vm: VmConfig,
    },
    /// Power a VM off now (hard), releasing its lease unless `StaleCopy`.
    PowerOffVm {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: PowerOffReason,
    },
    /// Reset (power-cycle) a hung guest (VM monitoring, H11): the runtime
    /// calls the VMM's `POST /vm/reset` with `reason`.
    ResetVm {
        /// The VM.
        vm: VmId,
        /// Why (which heartbeat, how long, the idle I/O window), for the
        /// VMM's log.
        reason: String,
    },
    /// Ask the guest to shut down.
    ShutdownVm {
        /// The VM.
        vm: VmId,
    },
    /// The answer to an operator command.
    CommandDone(Result<String, CommandError>),
    /// Something worth logging (and asserting on in tests).
    Event(HaEvent),
}

/// A refused operator command.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    /// HA is not enabled here.
    #[error("HA is not enabled on this host: enable it first")]
    NotEnabled,
    /// Only the master does this.
    #[error("this host is not the master; ask {master:?}")]
    NotMaster {
        /// Whom to ask, if known.
        master: Option<HostId>,
    },
    /// The VM is not in the cluster configuration.
    #[error("VM {0} is not in the cluster configuration")]
    UnknownVm(VmId),
    /// The configuration handed to EnableHa does not validate.
    #[error("cannot enable HA: {0}")]
    InvalidConfig(String),
    /// The VM does not run here.
    #[error("VM {0} is not running on this host")]
    NotRunningHere(VmId),
    /// Admission control refused (the message shows the arithmetic).
    #[error("{0}")]
    Admission(String),
    /// Entering maintenance mode while VMs run (or start) on the host.
    #[error("host {host} cannot enter maintenance mode while VMs run on it ({vms}): enter with --migrate to move them to the other hosts by live migration, or with --power-off to power them off (or move or stop them yourself: `vigil vm migrate NAME`, `vigil vm stop NAME`)")]
    MaintenanceBusy {
        /// The host.
        host: HostId,
        /// The VMs running or starting there, comma-separated.
        vms: String,
    },
    /// A live migration cannot be done.
    #[error("cannot migrate VM {vm}: {reason}")]
    Migration {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// No host can take the VM.
    #[error("no host can run VM {vm}: {reason}")]
    NoPlacement {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
}

/// Structured log events: what the agent decided and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaEvent {
    /// This host's state changed.
    StateChanged {
        /// Before.
        from: HostHaState,
        /// After.
        to: HostHaState,
    },
    /// This host now follows `master`.
    JoinedMaster {
        /// The master.
        master: HostId,
    },
    /// This master met a better one and stepped down.
    SteppedDown {
        /// The better master.
        for_master: HostId,
    },
    /// The master classified a silent host.
    HostClassified {
        /// The host.
        host: HostId,
        /// Its state.
        state: HostHaState,
    },
    /// A silent host is heard again.
    HostRecovered {
        /// The host.
        host: HostId,
    },
    /// A VM needs a restart.
    RestartQueued {
        /// The VM.
        vm: VmId,
        /// Where it ran.
        from: HostId,
    },
    /// A restart order went out.
    RestartOrdered {
        /// The VM.
        vm: VmId,
        /// The target.
        host: HostId,
        /// 1 for the first try.
        attempt: u32,
    },
    /// A restarted VM is running.
    VmRestarted {
        /// The VM.
        vm: VmId,
        /// Where.
        host: HostId,
    },
    /// A restart failed and will be retried.
    RestartRetry {
        /// The VM.
        vm: VmId,
        /// Attempts so far.
        attempt: u32,
        /// Back-off before the next one.
        after: Duration,
        /// The failure.
        reason: String,
    },
    /// A restart cannot be placed yet (reported once per distinct reason).
    RestartPending {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// All attempts failed.
    RestartGaveUp {
        /// The VM.
        vm: VmId,
        /// The last failure.
        reason: String,
    },
    /// Isolation addresses are being pinged.
    IsolationCheck,
    /// No agent and no isolation address: this host is isolated.
    IsolationDeclared,
    /// The isolation ended.
    IsolationEnded,
    /// An isolation response was applied to a VM.
    IsolationResponseApplied {
        /// The VM.
        vm: VmId,
        /// The response.
        response: IsolationResponse,
    },
    /// A VM is stopped because another host holds its lease.
    StaleCopyPoweredOff {
        /// The VM.
        vm: VmId,
        /// The new owner.
        by: Option<HostId>,
    },
    /// A VM is stopped because its lease could not be renewed in time.
    LeaseExpiredStop {
        /// The VM.
        vm: VmId,
    },
    /// VM monitoring reset a hung guest.
    VmReset {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: String,
    },
    /// VM monitoring found the guest hung again but has used its resets.
    VmResetLimitReached {
        /// The VM.
        vm: VmId,
        /// Resets in the current window.
        resets: u32,
    },
    /// The periodic summary line (seed 003: find leaks after the fact). The
    /// runtime adds process memory figures (`health::HostSummary`) and
    /// writes the line to its log and the rotating `health::SummaryLog`.
    Summary {
        /// Time since HA was enabled on this host.
        uptime: Duration,
        /// HA state.
        state: HostHaState,
        /// VMs running here.
        vms_running: usize,
        /// Master only: VMs protected in the cluster.
        vms_protected: Option<usize>,
    },
    /// This host lost access to one of its datastores.
    DatastoreInaccessible {
        /// The datastore.
        datastore: DatastoreId,
    },
    /// This host reaches the datastore again.
    DatastoreAccessible {
        /// The datastore.
        datastore: DatastoreId,
    },
    /// Master: a VM's datastore has been lost on its host for the VM's
    /// delay while another host reaches it; `response` is applied.
    DatastoreLossResponse {
        /// The VM.
        vm: VmId,
        /// Where it runs.
        host: HostId,
        /// The lost datastore.
        datastore: DatastoreId,
        /// What is done: an event only, or a restart elsewhere.
        response: DatastoreLossResponse,
    },
    /// Master: a VM's datastore is lost on its host, but no other live host
    /// reaches all of the VM's datastores either: nothing to gain by moving it.
    DatastoreLossNoTarget {
        /// The VM.
        vm: VmId,
        /// The lost datastore.
        datastore: DatastoreId,
    },
    /// This host stopped a VM on its master's datastore-loss order.
    DatastoreLossStopped {
        /// The VM.
        vm: VmId,
        /// The lost datastore.
        datastore: DatastoreId,
    },
    /// An incoming message was dropped.
    MessageRejected {
        /// Why (never contains the secret).
        reason: String,
    },
    /// Fewer than two heartbeat datastores qualify for this host.
    TooFewHeartbeatDatastores {
        /// How many.
        count: usize,
    },
    /// No isolation address is configured: isolation cannot be detected.
    NoIsolationAddress,
}

/// What the CLI shows for one agent (H16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// This host.
    pub host: HostId,
    /// Its state.
    pub state: HostHaState,
    /// The master it follows (itself when master).
    pub master: Option<HostId>,
    /// Master only: every host's state.
    pub hosts: BTreeMap<HostId, HostHaState>,
    /// Master only: every VM's protection state.
    pub vms: BTreeMap<VmId, VmProtection>,
}
