//! The VM configuration: what a `VM.toml` file and the `vigil run` flags say.
//!
//! One [`VmConfig`] is the single source of truth for building a VM. It is
//! built from an optional TOML file and then overridden field by field from
//! the command line ([`ConfigOverrides`]), and only then validated, so the
//! same rules (and the same messages, naming the field) apply whichever way a
//! value arrived. Relative paths inside a file are resolved against the
//! file's directory, so a config file can sit next to its images.
//!
//! The file format rejects unknown fields (`deny_unknown_fields`): a typo such
//! as `vcpu = 2` is an error with the file, line and field named, not a value
//! silently ignored. Sections for disks, NICs and HA settings will be added as
//! new optional fields.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The largest number of vCPUs the VMM supports, whatever KVM allows: the
/// MADT and CPUID leaf 1 carry 8-bit APIC IDs.
pub const MAX_VCPUS_SUPPORTED: u32 = 254;

/// The smallest guest memory accepted, in MiB. Below that Linux cannot even
/// unpack itself; the precise check against kernel + initrd size happens when
/// the images are loaded.
pub const MIN_MEMORY_MIB: u64 = 16;

/// The largest guest memory accepted, in MiB (1 TiB). The host check against
/// /proc/meminfo is separate (see `memory::check_host_memory`).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// The longest kernel command line accepted, in bytes (Linux's x86
/// COMMAND_LINE_SIZE is 2048).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Errors while reading, overriding or validating a VM configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped fields.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml found, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A field has a value outside what is accepted.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as it is spelled in the file and on the command line.
        field: &'static str,
        /// Why, with the value found.
        reason: String,
    },
    /// A required field was given neither in the file nor on the command line.
    #[error("missing {field}: {hint}")]
    Missing {
        /// The field.
        field: &'static str,
        /// How to give it.
        hint: &'static str,
    },
}

/// Parses a memory size. A bare number is MiB; suffixes `K`, `M`, `G`, `T`
/// (optionally followed by `i`/`B`/`iB`, any case) are binary units.
/// Returns bytes. The result must be a whole number of MiB, since KVM memory
/// slots and the guest's memory map work in pages and we keep it simple.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".to_string());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("`{s}` does not start with a number"));
    }
    let value: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: number too large"))?;
    let suffix = suffix.trim().to_ascii_lowercase();
    let unit_shift = match suffix.trim_end_matches('b').trim_end_matches('i') {
        "" if suffix.is_empty() => 20,
        "" if suffix == "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{suffix}` (use K, M, G or T, or a plain number of MiB)"
            ))
        }
    };
    let bytes = value
        .checked_mul(1u64 << unit_shift)
        .ok_or_else(|| format!("`{s}`: size too large"))?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("`{s}` is not a whole number of MiB"));
    }
    Ok(bytes)
}

/// A memory size as written in a config file: a number of MiB or a string
/// with a unit.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SizeSpec {
    /// A plain number of MiB, e.g. `memory = 512`.
    Mib(u64),
    /// A string with a unit, e.g. `memory = "2G"`.
    Text(String),
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleMode {
    /// Output to stdout, input from stdin (raw mode if it is a terminal).
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
}

impl ConsoleMode {
    /// Parses `stdio`, `none` or `file:PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some("") => Err("`file:` needs a path, e.g. file:/tmp/console.log".to_string()),
                Some(p) => Ok(Self::File(PathBuf::from(p))),
                None => Err(format!("`{s}`: expected stdio, none or file:PATH")),
            },
        }
    }
}

impl fmt::Display for ConsoleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdio => write!(f, "stdio"),
            Self::None => write!(f, "none"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// What to do when the guest asks for a reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// Stop the VMM with exit status 3.
    #[default]
    Exit,
    /// Reload the kernel and start the guest again in the same process.
    Restart,
}

/// The named CPU templates (see `cpu::templates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplateName {
    /// A portable x86-64-v2-like feature set (the default).
    #[default]
    Baseline,
    /// Everything KVM supports on this host.
    Host,
}

/// The config file as written (all fields optional so flags can fill them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    id: Option<String>,
    vcpus: Option<u32>,
    memory: Option<SizeSpec>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    cpu_template: Option<CpuTemplateName>,
    console: Option<String>,
    on_reboot: Option<OnReboot>,
    #[serde(default)]
    disks: Vec<FileDisk>,
    vsock: Option<FileVsock>,
    #[serde(default)]
    nics: Vec<FileNic>,
}

/// A `[[nics]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNic {
    tap: String,
    mac: Option<String>,
    network: Option<String>,
}

/// One virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// Host tap device (attached to, or created if missing).
    pub tap: String,
    /// MAC address: the guest's network identity. Default: derived from the
    /// VM id and the NIC's position (locally administered, stable).
    pub mac: [u8; 6],
    /// Logical network (port group) name; compared by migration pre-checks.
    /// Default `default`.
    pub network: String,
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("`{s}` is a multicast address"));
    }
    Ok(mac)
}

/// A stable locally administered MAC for NIC `index` of VM `id`.
fn default_mac(id: &str, index: usize) -> [u8; 6] {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes().chain(std::iter::once(index as u8)) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

impl NicConfig {
    fn parse(s: &str, id: &str, index: usize) -> Result<Self, String> {
        let (mut tap, mut mac, mut network) = (None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !t.is_empty() => tap = Some(t.to_string()),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                Some(("network", n)) if !n.is_empty() => network = Some(n.to_string()),
                _ => {
                    return Err(format!(
                        "`{part}` in `{s}`: expected tap=NAME, mac=MAC or network=NAME"
                    ))
                }
            }
        }
        Ok(Self {
            tap: tap.ok_or_else(|| format!("`{s}` has no tap=NAME"))?,
            mac: mac.unwrap_or_else(|| default_mac(id, index)),
            network: network.unwrap_or_else(|| "default".to_string()),
        })
    }
}

/// The `[vsock]` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVsock {
    cid: u64,
    socket: PathBuf,
}

/// The virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub cid: u64,
    /// Host socket: host processes connect here (`CONNECT <port>`); guest
    /// connections to port P go to `<socket>_P`.
    pub socket: PathBuf,
}

impl VsockConfig {
    /// Parses a `--vsock` value: `cid=N,socket=PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut cid = None;
        let mut socket = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", c)) => {
                    cid = Some(
                        c.parse::<u64>()
                            .map_err(|_| format!("cid `{c}` is not a number"))?,
                    )
                }
                Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                _ => return Err(format!("`{part}` in `{s}`: expected cid=N or socket=PATH")),
            }
        }
        Ok(Self {
            cid: cid.ok_or_else(|| format!("`{s}` has no cid=N"))?,
            socket: socket.ok_or_else(|| format!("`{s}` has no socket=PATH"))?,
        })
    }
}

/// A `[[disks]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
    id: Option<String>,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// What the guest reads with GET_ID (/sys/block/vdX/serial); at most 20
    /// bytes. Default `vigil-diskN` (N = position in the list), which is
    /// stable across boots as long as the list does not change.
    pub id: String,
}

impl DiskConfig {
    /// Parses a `--disk` value: `path=IMG[,ro][,id=NAME]`. The id defaults
    /// to `vigil-disk<index>`.
    pub fn parse(s: &str, index: usize) -> Result<Self, String> {
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("id", i)) => id = Some(i.to_string()),
                None if part == "ro" => read_only = true,
                _ => {
                    return Err(format!(
                        "`{part}` in `{s}`: expected path=IMG, ro or id=NAME"
                    ))
                }
            }
        }
        let path = path.ok_or_else(|| format!("`{s}` has no path=IMG"))?;
        Ok(Self {
            path,
            read_only,
            id: id.unwrap_or_else(|| default_disk_id(index)),
        })
    }
}

fn default_disk_id(index: usize) -> String {
    format!("vigil-disk{index}")
}

fn validate_disk_id(id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "disks.id (--disk id=)",
            format!("`{id}` must be 1 to 20 printable ASCII characters (virtio-blk serial)"),
        ));
    }
    Ok(())
}

/// Values given on the command line; each `Some` replaces the file's value.
#[derive(Debug, Default, Clone)]
pub struct ConfigOverrides {
    /// `--name`.
    pub name: Option<String>,
    /// `--cpus`.
    pub vcpus: Option<u32>,
    /// `--memory`, unparsed.
    pub memory: Option<String>,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--cpu-template`.
    pub cpu_template: Option<CpuTemplateName>,
    /// `--console`, unparsed.
    pub console: Option<String>,
    /// `--on-reboot`.
    pub on_reboot: Option<OnReboot>,
    /// `--disk`, unparsed, in order. When any is given they replace the
    /// file's `[[disks]]`.
    pub disks: Vec<String>,
    /// `--vsock`, unparsed.
    pub vsock: Option<String>,
    /// `--net`, unparsed, in order. When any is given they replace the
    /// file's `[[nics]]`.
    pub nics: Vec<String>,
}

/// A complete, validated VM configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Human-readable name, used in logs (`vm` field). Default `vigil`.
    pub name: String,
    /// Stable identifier (for the control API and HA later). Default: name.
    pub id: String,
    /// Number of vCPUs, 1..=min(KVM_CAP_MAX_VCPUS, 254).
    pub vcpus: u32,
    /// Guest memory in bytes, a whole number of MiB.
    pub memory_bytes: u64,
    /// Kernel image: ELF vmlinux with a PVH note, or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// CPU template name.
    pub cpu_template: CpuTemplateName,
    /// Serial console destination.
    pub console: ConsoleMode,
    /// Reboot policy.
    pub on_reboot: OnReboot,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// The virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-net NICs, in the order the guest sees them (eth0, eth1, ...).
    pub nics: Vec<NicConfig>,
}

/// Default guest memory when neither file nor flag says: 256 MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;

/// The default command line: serial console, and ask Linux to power off
/// through ACPI when it panics rather than hang (reboot=t would triple-fault).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

impl VmConfig {
    /// Reads `path` (if any), applies `ov`, validates everything but what
    /// needs KVM or the images (vCPU limit of KVM, image sizes).
    pub fn load(path: Option<&Path>, ov: ConfigOverrides) -> Result<Self, ConfigError> {
        let (file, base) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let file: FileConfig =
                    toml::from_str(&text).map_err(|source| ConfigError::Parse {
                        path: p.to_path_buf(),
                        source,
                    })?;
                let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
                (file, Some(dir))
            }
            None => (FileConfig::default(), None),
        };
        Self::from_parts(file, base.as_deref(), ov)
    }

    /// Parses a config from TOML text, with relative paths resolved against
    /// `base_dir` (used by tests and by callers that hold the text).
    pub fn from_toml(
        text: &str,
        base_dir: &Path,
        ov: ConfigOverrides,
    ) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: base_dir.join("<inline>"),
            source,
        })?;
        Self::from_parts(file, Some(base_dir), ov)
    }

    fn from_parts(
        file: FileConfig,
        base: Option<&Path>,
        ov: ConfigOverrides,
    ) -> Result<Self, ConfigError> {
        // File paths are relative to the file; flag paths stay relative to
        // the current directory, as a shell user expects.
        let rel = |p: PathBuf| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let name = ov.name.or(file.name).unwrap_or_else(|| "vigil".to_string());
        validate_name("name", &name)?;
        let id = file.id.unwrap_or_else(|| name.clone());
        validate_name("id", &id)?;

        let vcpus = ov.vcpus.or(file.vcpus).unwrap_or(1);
        validate_vcpus(vcpus, MAX_VCPUS_SUPPORTED)?;

        let memory_bytes = match (ov.memory, file.memory) {
            (Some(s), _) => {
                parse_size(&s).map_err(|reason| invalid("memory (--memory)", reason))?
            }
            (None, Some(SizeSpec::Mib(m))) => m
                .checked_mul(1 << 20)
                .ok_or_else(|| invalid("memory", format!("{m} MiB is too large")))?,
            (None, Some(SizeSpec::Text(s))) => {
                parse_size(&s).map_err(|reason| invalid("memory", reason))?
            }
            (None, None) => DEFAULT_MEMORY_BYTES,
        };
        validate_memory(memory_bytes)?;

        let kernel = match (ov.kernel, file.kernel) {
            (Some(k), _) => k,
            (None, Some(k)) => rel(k),
            (None, None) => {
                return Err(ConfigError::Missing {
                    field: "kernel",
                    hint: "pass --kernel PATH or set `kernel` in the config file",
                })
            }
        };
        let initrd = match (ov.initrd, file.initrd) {
            (Some(i), _) => Some(i),
            (None, f) => f.map(rel),
        };
        let cmdline = ov
            .cmdline
            .or(file.cmdline)
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        validate_cmdline(&cmdline)?;

        let console = match (ov.console, file.console) {
            (Some(c), _) => {
                ConsoleMode::parse(&c).map_err(|reason| invalid("console (--console)", reason))?
            }
            (None, Some(c)) => {
                match ConsoleMode::parse(&c).map_err(|reason| invalid("console", reason))? {
                    ConsoleMode::File(p) => ConsoleMode::File(rel(p)),
                    other => other,
                }
            }
            (None, None) => ConsoleMode::Stdio,
        };

        let disks = if ov.disks.is_empty() {
            file.disks
                .into_iter()
                .enumerate()
                .map(|(i, d)| DiskConfig {
                    path: rel(d.path),
                    read_only: d.read_only,
                    id: d.id.unwrap_or_else(|| default_disk_id(i)),
                })
                .collect()
        } else {
            ov.disks
                .iter()
                .enumerate()
                .map(|(i, s)| DiskConfig::parse(s, i).map_err(|r| invalid("disk (--disk)", r)))
                .collect::<Result<Vec<_>, _>>()?
        };
        for d in &disks {
            validate_disk_id(&d.id)?;
        }
        if let Some(i) = (1..disks.len()).find(|&i| disks[..i].iter().any(|d| d.id == disks[i].id))
        {
            return Err(invalid(
                "disks.id (--disk id=)",
                format!("`{}` is used by two disks", disks[i].id),
            ));
        }

        let vsock = match (ov.vsock, file.vsock) {
            (Some(v), _) => {
                Some(VsockConfig::parse(&v).map_err(|r| invalid("vsock (--vsock)", r))?)
            }
            (None, Some(v)) => Some(VsockConfig {
                cid: v.cid,
                socket: rel(v.socket),
            }),
            (None, None) => None,
        };
        if let Some(v) = &vsock {
            if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                return Err(invalid(
                    "vsock.cid (--vsock cid=)",
                    format!("{} is reserved or too large: use 3 to 4294967295", v.cid),
                ));
            }
        }

        let nics = if ov.nics.is_empty() {
            file.nics
                .into_iter()
                .enumerate()
                .map(|(i, n)| {
                    Ok(NicConfig {
                        mac: match n.mac {
                            Some(m) => parse_mac(&m).map_err(|r| invalid("nics.mac", r))?,
                            None => default_mac(&id, i),
                        },
                        tap: n.tap,
                        network: n.network.unwrap_or_else(|| "default".to_string()),
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?
        } else {
            ov.nics
                .iter()
                .enumerate()
                .map(|(i, s)| NicConfig::parse(s, &id, i).map_err(|r| invalid("net (--net)", r)))
                .collect::<Result<Vec<_>, _>>()?
        };
        for n in &nics {
            if n.tap.is_empty() || n.tap.len() > 15 {
                return Err(invalid(
                    "nics.tap (--net tap=)",
                    format!(
                        "`{}` must be 1 to 15 characters (a Linux interface name)",
                        n.tap
                    ),
                ));
            }
        }

        Ok(VmConfig {
            name,
            id,
            vcpus,
            memory_bytes,
            kernel,
            initrd,
            cmdline,
            cpu_template: ov.cpu_template.or(file.cpu_template).unwrap_or_default(),
            console,
            on_reboot: ov.on_reboot.or(file.on_reboot).unwrap_or_default(),
            disks,
            vsock,
            nics,
        })
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

fn validate_name(field: &'static str, s: &str) -> Result<(), ConfigError> {
    if s.is_empty() || s.len() > 64 {
        return Err(invalid(field, format!("`{s}` must be 1 to 64 characters")));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            field,
            format!("`{s}` may only contain letters, digits, `-`, `_` and `.`"),
        ));
    }
    Ok(())
}

/// Checks a vCPU count against `max` (KVM's limit, or ours, whichever is
/// lower). Public so the VM builder can re-check with KVM's real limit.
pub fn validate_vcpus(vcpus: u32, max: u32) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > max {
        return Err(invalid(
            "vcpus (--cpus)",
            format!("{vcpus} vCPUs requested; must be between 1 and {max}"),
        ));
    }
    Ok(())
}

fn validate_memory(bytes: u64) -> Result<(), ConfigError> {
    let mib = bytes >> 20;
    if mib < MIN_MEMORY_MIB {
        return Err(invalid(
            "memory (--memory)",
            format!("{mib} MiB is too small; at least {MIN_MEMORY_MIB} MiB"),
        ));
    }
    if mib > MAX_MEMORY_MIB {
        return Err(invalid(
            "memory (--memory)",
            format!("{mib} MiB is too large; at most {MAX_MEMORY_MIB} MiB"),
        ));
    }
    Ok(())
}

fn validate_cmdline(s: &str) -> Result<(), ConfigError> {
    if s.len() >= MAX_CMDLINE_LEN {
        return Err(invalid(
            "cmdline (--cmdline)",
            format!("{} bytes; at most {} bytes", s.len(), MAX_CMDLINE_LEN - 1),
        ));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(invalid(
            "cmdline (--cmdline)",
            format!("contains the character {c:?}; only printable ASCII is allowed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "config_devices_tests.rs"]
mod devices_tests;
