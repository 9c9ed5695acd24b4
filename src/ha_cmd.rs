//! `vigil agent`, `vigil cluster init|status|maintenance` and `vigil vm
//! register|start|stop|set|list`: the HA commands (see `ha::runtime`).
//!
//! `cluster status` and `vm start|stop|set|list` ask this host's agent over its
//! authenticated command channel; an agent that is not the master redirects
//! to the master. `cluster status` then asks every other host for what VM
//! monitoring did to its VMs. `cluster maintenance enter HOST` asks the
//! master's admission control first, powers the host's VMs off if told to,
//! then asks HOST itself (which refuses while VMs run there). `vm register`
//! writes the VM's files on the datastore, where every agent finds them;
//! `vm set` has the master check admission control and rewrite them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ha::runtime::control::Request;
use ha::runtime::files::{vm_dir, write_json, ClusterFile, HostConfig, VmHaSettings};
use serde_json::Value;
use vmm::control::EXIT_ERROR;

use crate::cli::{AgentArgs, ClusterAction, ClusterArgs, MaintenanceAction, VmAction, VmArgs};
use crate::logging;
use crate::run::chain;

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("vigil: {msg}");
    EXIT_ERROR
}

/// Runs `vigil agent`.
pub fn agent(args: AgentArgs) -> i32 {
    let level = args.log_level.as_deref().or(Some("info"));
    if let Err(e) = logging::init(level, args.log_file.as_deref()) {
        return fail(chain(&e));
    }
    match ha::runtime::run(&args.config) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %chain(&e), "agent failed");
            fail(chain(&e))
        }
    }
}

/// Runs `vigil cluster ...`.
pub fn cluster(args: ClusterArgs) -> i32 {
    match args.action {
        ClusterAction::Init {
            cluster,
            datastore,
            secret,
        } => match init(&cluster, &datastore, &secret) {
            Ok(msg) => {
                println!("{msg}");
                0
            }
            Err(e) => fail(e),
        },
        ClusterAction::Status { config, json } => {
            let host = match HostConfig::load(&config) {
                Ok(h) => h,
                Err(e) => return fail(chain(&e)),
            };
            match ha::runtime::ask(&host, &Request::Status) {
                Ok((from, mut v)) => {
                    v["monitoring"] = monitoring(&host, &from, &v);
                    if json {
                        println!("{v}");
                    } else {
                        print!("{}", render_status(&from, &v));
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        ClusterAction::Maintenance {
            action,
            host: target,
            power_off,
            migrate,
            config,
        } => {
            let host = match HostConfig::load(&config) {
                Ok(h) => h,
                Err(e) => return fail(chain(&e)),
            };
            match maintenance(&host, action, &target, power_off, migrate) {
                Ok(msg) => {
                    println!("{msg}");
                    0
                }
                Err(e) => fail(e),
            }
        }
    }
}

/// Asks every host but `answered` (whose status `v` is) what VM
/// monitoring did to its VMs: `{VM: {host, resets, last_reason, ...}}`.
/// A host that does not answer is skipped (the master's host list says
/// what state it is in).
fn monitoring(host: &HostConfig, answered: &str, v: &Value) -> Value {
    let mut all = serde_json::Map::new();
    let mut add = |h: &str, local: &Value| {
        if let Some(m) = local["monitoring"].as_object() {
            for (vm, rec) in m {
                let mut rec = rec.clone();
                rec["host"] = Value::String(h.to_string());
                all.insert(vm.clone(), rec);
            }
        }
    };
    add(answered, v);
    let (Ok(cluster), Ok(secret)) = (host.cluster_file(), host.secret()) else {
        return Value::Object(all);
    };
    let secret = ha::wire::ClusterSecret::new(secret);
    for h in cluster.hosts.keys().filter(|h| h.as_str() != answered) {
        if let Ok((_, local)) = ha::runtime::ask_at(&cluster, &secret, h, &Request::LocalStatus) {
            add(h, &local);
        }
    }
    Value::Object(all)
}

/// `vigil cluster maintenance enter|exit HOST`.
fn maintenance(
    host: &HostConfig,
    action: MaintenanceAction,
    target: &str,
    power_off: bool,
    migrate: bool,
) -> Result<String, String> {
    let cluster = host.cluster_file().map_err(|e| chain(&e))?;
    let secret = ha::wire::ClusterSecret::new(host.secret().map_err(|e| chain(&e))?);
    if cluster.agent_addr(target).is_none() {
        return Err(format!("host {target} is not in the cluster file"));
    }
    let at = |req: &Request| ha::runtime::ask_at(&cluster, &secret, target, req);
    if action == MaintenanceAction::Exit {
        return at(&Request::ExitMaintenance).map(|(_, v)| format!("{target}: {}", s(&v)));
    }
    // The master's admission control decides first (the host's VMs count
    // as moved to the others, or as off with --power-off).
    let (_, ok) = ha::runtime::ask(
        host,
        &Request::CheckMaintenance {
            host: target.into(),
            power_off,
        },
    )?;
    let mut notes = vec![s(&ok)];
    if migrate {
        let vms = local_vms(&at(&Request::LocalStatus)?.1);
        for vm in &vms {
            let opts = MigrateOpts::default();
            let done = migrate_vm(host, vm, None, None, &opts)
                .map_err(|e| format!("{target} stays out of maintenance: {e}"))?;
            notes.push(done);
        }
    }
    let mut moved = false;
    if power_off {
        let vms = local_vms(&at(&Request::LocalStatus)?.1);
        for vm in &vms {
            at(&Request::Stop { vm: vm.clone() })?;
            notes.push(format!("powered off {vm}"));
        }
        moved = !vms.is_empty();
    }
    if power_off || migrate {
        // The host's agent drops each VM once its VMM is gone, and reports
        // that to the master with its next heartbeat.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let (_, local) = at(&Request::LocalStatus)?;
            if local_vms(&local).is_empty() {
                break;
            }
            moved = true;
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{target}: its VMs did not stop or leave within 60 s: {}",
                    local["local_vms"]
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        if moved {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    let (_, v) = at(&Request::EnterMaintenance)?;
    notes.push(format!("{target}: {}", s(&v)));
    Ok(notes.join("\n"))
}

/// The VMs whose VMMs run on a host, from its `LocalStatus`.
fn local_vms(local: &Value) -> Vec<String> {
    local["local_vms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn init(cluster: &Path, datastores: &[PathBuf], secret: &Path) -> Result<String, String> {
    let c = ClusterFile::load(cluster).map_err(|e| chain(&e))?;
    if datastores.is_empty() {
        return Err("give at least one --datastore to hold the cluster file".into());
    }
    for ds in datastores {
        if !ds.is_dir() {
            return Err(format!("datastore {} is not a directory", ds.display()));
        }
        write_json(&ds.join(".vigil/cluster.json"), &c).map_err(|e| chain(&e))?;
        ha::runtime::files::ensure_datastore_id(ds)
            .map_err(|e| format!("cannot write {}'s id file: {e}", ds.display()))?;
    }
    let made = if secret.exists() {
        false
    } else {
        let key = ha::runtime::control::random_hex(32).map_err(|e| e.to_string())?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(secret)
            .map_err(|e| format!("cannot create {}: {e}", secret.display()))?;
        f.write_all(key.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", secret.display()))?;
        true
    };
    Ok(format!(
        "cluster of {} hosts written to {} datastore(s); secret {} {} (copy it to every host, root-only)",
        c.hosts.len(),
        datastores.len(),
        secret.display(),
        if made { "created" } else { "kept" }
    ))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn render_status(from: &str, v: &Value) -> String {
    let mut out = format!(
        "answered by {from} ({}); master: {}\n",
        s(&v["state"]),
        s(&v["master"])
    );
    out.push_str("HOST                 STATE\n");
    if let Some(m) = v["hosts"].as_object() {
        for (h, st) in m {
            out.push_str(&format!("{h:<20} {}\n", s(st)));
        }
    }
    out.push_str("VM                   PROTECTION           HOST\n");
    if let Some(m) = v["vms"].as_object() {
        for (vm, p) in m {
            let host = p.get("host").map(s).unwrap_or_else(|| "-".into());
            let extra = p
                .get("reason")
                .map(|r| format!(" ({})", s(r)))
                .unwrap_or_default();
            out.push_str(&format!("{vm:<20} {:<20} {host}{extra}\n", s(&p["state"])));
        }
    }
    if let Some(m) = v["monitoring"].as_object().filter(|m| !m.is_empty()) {
        out.push_str("VM MONITORING        HOST       RESETS  STATE\n");
        for (vm, r) in m {
            let state = if r["limit_reached"] == true {
                "hung again, reset limit reached: left alone"
            } else {
                "reset"
            };
            out.push_str(&format!(
                "{vm:<20} {:<10} {:<7} {state}; last: {}\n",
                s(&r["host"]),
                s(&r["resets"]),
                s(&r["last_reason"])
            ));
        }
    }
    if let Some(c) = v["capacity"]["text"].as_str() {
        out.push_str("CAPACITY\n");
        out.push_str(c.trim_end());
        out.push('\n');
    }
    out
}

/// Runs `vigil vm register|start|stop|set|list`.
pub fn vm(args: VmArgs) -> i32 {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("/etc/vigil/host.toml"));
    let host = match HostConfig::load(&config) {
        Ok(h) => h,
        Err(e) => {
            return fail(format!(
                "{} (this host's agent configuration; give it with --config host.toml)",
                chain(&e)
            ))
        }
    };
    let res = match (args.action, args.args.as_slice()) {
        (VmAction::Register, [ds, file]) => register(&host, ds, Path::new(file), &args),
        (VmAction::Register, _) => Err("usage: vigil vm register DATASTORE VM.toml".into()),
        (VmAction::Start, [name]) => {
            let req = Request::Start {
                vm: name.clone(),
                host: args.host.clone(),
            };
            ha::runtime::ask(&host, &req).map(|(_, v)| s(&v))
        }
        (VmAction::Stop, [name]) => stop(&host, name),
        (VmAction::Migrate, [name]) if args.cancel => cancel_migration(&host, name),
        (VmAction::Migrate, [name]) => {
            let opts = MigrateOpts {
                downtime_ms: args.downtime_ms,
                bandwidth: args.bandwidth,
                json: args.json,
            };
            migrate_vm(
                &host,
                name,
                args.host.as_deref(),
                args.api_socket.as_deref(),
                &opts,
            )
        }
        (VmAction::Set, [name]) => set_request(name, &args)
            .and_then(|req| ha::runtime::ask(&host, &req).map(|(_, v)| s(&v))),
        (VmAction::Set, _) => Err(SET_USAGE.into()),
        (VmAction::List, []) => ha::runtime::ask(&host, &Request::Status).map(|(from, v)| {
            if args.json {
                v["vms"].to_string()
            } else {
                render_status(&from, &v)
                    .lines()
                    .skip_while(|l| !l.starts_with("VM "))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }),
        (a, _) => Err(format!("usage: vigil vm {a:?} NAME").to_lowercase()),
    };
    match res {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => fail(e),
    }
}

/// `vigil vm migrate NAME --cancel`: the host running the VM (the
/// master's view) cancels its outgoing migration.
fn cancel_migration(host: &HostConfig, vm: &str) -> Result<String, String> {
    let (_, st) = ha::runtime::ask(host, &Request::Status)?;
    let Some(source) = st["vms"][vm]["host"].as_str().map(str::to_string) else {
        return Err(format!("VM {vm} does not run in the cluster"));
    };
    let cluster = host.cluster_file().map_err(|e| chain(&e))?;
    let secret = ha::wire::ClusterSecret::new(host.secret().map_err(|e| chain(&e))?);
    ha::runtime::ask_at(
        &cluster,
        &secret,
        &source,
        &Request::CancelMigration { vm: vm.into() },
    )?;
    Ok(format!("cancel requested; {vm} keeps running on {source}"))
}

/// `vigil vm migrate` options.
#[derive(Debug, Default)]
struct MigrateOpts {
    downtime_ms: Option<u64>,
    bandwidth: Option<u64>,
    json: bool,
}

/// Live-migrates `vm` through the agents: the master plans it (placement,
/// maintenance, dedicated failover hosts; admission control for a VM
/// coming from outside, given by its VMM's API socket `outside`), the
/// target's agent starts a VMM waiting for it, the source's agent (or,
/// from outside, the VMM here) sends it, and the master hears the outcome.
/// A failed migration leaves the VM where it ran: the waiting VMM is
/// stopped and nothing is restarted elsewhere.
fn migrate_vm(
    host: &HostConfig,
    vm: &str,
    to: Option<&str>,
    outside: Option<&Path>,
    opts: &MigrateOpts,
) -> Result<String, String> {
    use std::time::{Duration, Instant};
    let cluster = host.cluster_file().map_err(|e| chain(&e))?;
    let secret = ha::wire::ClusterSecret::new(host.secret().map_err(|e| chain(&e))?);
    let (master, plan) = ha::runtime::ask(
        host,
        &Request::PlanMigration {
            vm: vm.into(),
            host: to.map(str::to_string),
            from_outside: outside.is_some(),
        },
    )?;
    let at = |h: &str, req: &Request| ha::runtime::ask_at(&cluster, &secret, h, req);
    let end = |ok: bool| {
        if let Err(e) = at(&master, &Request::EndMigration { vm: vm.into(), ok }) {
            eprintln!(
                "vigil: warning: could not tell the master how the migration of {vm} ended: {e}"
            );
        }
    };
    let target = s(&plan["to"]);
    let source = plan["from"].as_str().map(str::to_string);
    let from_name = source.clone().unwrap_or_else(|| "this machine".into());
    if !opts.json {
        eprintln!("migrating {vm}: {from_name} -> {target}");
    }
    let address = match at(
        &target,
        &Request::Incoming {
            vm: vm.into(),
            from_outside: outside.is_some(),
        },
    ) {
        Ok((_, v)) => s(&v["address"]),
        Err(e) => {
            // It may have started all the same (an answer lost to a timeout).
            let _ = at(&target, &Request::CancelIncoming { vm: vm.into() });
            end(false);
            return Err(format!("{e}; {vm} keeps running on {from_name}"));
        }
    };
    let mut options = serde_json::json!({
        "downtime_ms": opts.downtime_ms.unwrap_or(100),
        "bandwidth_mbps": opts.bandwidth,
    });
    // Progress: from the source's agent, or the VMM here.
    let status: Box<dyn Fn() -> Result<Value, String>> = match (&source, outside) {
        (Some(src), _) => {
            let started = at(
                src,
                &Request::MigrateOut {
                    vm: vm.into(),
                    to: address.clone(),
                    options: options.clone(),
                },
            );
            if let Err(e) = started {
                let _ = at(&target, &Request::CancelIncoming { vm: vm.into() });
                end(false);
                return Err(format!("{e}; {vm} keeps running on {src}"));
            }
            let src = src.clone();
            Box::new(move || at(&src, &Request::MigrationStatus { vm: vm.into() }).map(|(_, v)| v))
        }
        (None, Some(sock)) => {
            options["to"] = Value::String(address.clone());
            let sock = sock.to_path_buf();
            if let Err(e) = vmm::api::client::call(
                &sock,
                "PUT",
                "/vm/migrate",
                Some(&options),
                Duration::from_secs(30),
            ) {
                let _ = at(&target, &Request::CancelIncoming { vm: vm.into() });
                end(false);
                return Err(format!("{}; {vm} keeps running here", chain(&e)));
            }
            Box::new(move || {
                vmm::api::client::call(&sock, "GET", "/vm/migrate", None, Duration::from_secs(30))
                    .map_err(|e| chain(&e))
            })
        }
        (None, None) => return Err("internal: a migration without a source".into()),
    };
    let mut last = Instant::now() - Duration::from_secs(10);
    let mut last_json = Value::Null;
    let outcome = loop {
        let v = match status() {
            Ok(v) => v,
            Err(e) => {
                break Err(format!(
                    "lost track of the migration: {e}; {vm} was running on {from_name}"
                ))
            }
        };
        let state = s(&v["state"]);
        if opts.json && v != last_json {
            println!("{v}");
            last_json = v.clone();
        } else if !opts.json && state == "running" && last.elapsed() >= Duration::from_secs(1) {
            eprintln!("{}", crate::migrate_cmd::bar(&v));
            last = Instant::now();
        }
        match state.as_str() {
            "running" => std::thread::sleep(Duration::from_millis(200)),
            "succeeded" => break Ok(v),
            _ => break Err(crate::migrate_cmd::failed(&v, vm, &from_name)),
        }
    };
    match outcome {
        Ok(v) => {
            end(true);
            Ok(format!(
                "{}\n{vm} runs on {target}, protected by HA there",
                crate::migrate_cmd::succeeded(&v)
            ))
        }
        Err(e) => {
            let _ = at(&target, &Request::CancelIncoming { vm: vm.into() });
            end(false);
            Err(e)
        }
    }
}

const SET_USAGE: &str =
    "usage: vigil vm set NAME [--cpu-mhz MHZ] [--mem-mib MIB] [--priority high|medium|low|disabled]";

/// The `vm set` request: at least one setting, and only those `set` changes.
fn set_request(name: &str, args: &VmArgs) -> Result<Request, String> {
    let unsupported = [
        ("--isolation-response", args.isolation_response.is_some()),
        ("--datastore-loss", args.datastore_loss.is_some()),
        (
            "--datastore-loss-delay-s",
            args.datastore_loss_delay_s.is_some(),
        ),
        ("--host", args.host.is_some()),
    ];
    if let Some((flag, _)) = unsupported.iter().find(|(_, given)| *given) {
        return Err(format!(
            "vm set changes only --cpu-mhz, --mem-mib and --priority, not {flag}"
        ));
    }
    if args.cpu_mhz.is_none() && args.mem_mib.is_none() && args.priority.is_none() {
        return Err(format!("nothing to change: {SET_USAGE}"));
    }
    Ok(Request::SetVm {
        vm: name.to_string(),
        cpu_mhz: args.cpu_mhz,
        mem_mib: args.mem_mib,
        priority: args.priority,
    })
}

/// Asks the master where the VM runs, then that host to power it off.
fn stop(host: &HostConfig, name: &str) -> Result<String, String> {
    let (_, status) = ha::runtime::ask(host, &Request::Status)?;
    let runs_on = status["vms"][name]["host"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("VM {name} is not running (per the master)"))?;
    let cluster = host.cluster_file().map_err(|e| chain(&e))?;
    let secret = ha::wire::ClusterSecret::new(host.secret().map_err(|e| chain(&e))?);
    let req = Request::Stop { vm: name.into() };
    ha::runtime::ask_at(&cluster, &secret, &runs_on, &req).map(|(_, v)| s(&v))
}

fn register(host: &HostConfig, ds: &str, file: &Path, args: &VmArgs) -> Result<String, String> {
    let ds_path = host.datastore(ds).map_err(|e| chain(&e))?;
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let name = match table.get("name") {
        Some(toml::Value::String(n)) if !n.is_empty() && !n.contains('/') => n.clone(),
        _ => {
            return Err(format!(
                "{}: a registered VM needs a `name` (no `/`)",
                file.display()
            ))
        }
    };
    let dir = vm_dir(ds_path, &name);
    if dir.join("vm.toml").exists() {
        return Err(format!(
            "VM {name} is already registered on {ds} ({})",
            dir.display()
        ));
    }
    // Kernel and initrd are host files: make them absolute. Disks stay as
    // written, resolved in the VM's directory on the datastore.
    let base = file.parent().unwrap_or(Path::new("."));
    for key in ["kernel", "initrd"] {
        if let Some(toml::Value::String(p)) = table.get(key) {
            let abs = std::path::absolute(base.join(p)).map_err(|e| e.to_string())?;
            table.insert(key.into(), toml::Value::String(abs.display().to_string()));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let vm_toml = dir.join("vm.toml");
    std::fs::write(
        &vm_toml,
        toml::to_string(&table).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", vm_toml.display()))?;
    let cfg = match vmm::VmConfig::load(Some(&vm_toml), Default::default()) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&vm_toml);
            return Err(format!(
                "the registered copy {} does not load: {}",
                vm_toml.display(),
                chain(&e)
            ));
        }
    };
    let settings = VmHaSettings {
        priority: args.priority.unwrap_or_default(),
        isolation_response: args.isolation_response.unwrap_or_default(),
        cpu_mhz: args.cpu_mhz.unwrap_or(0),
        mem_mib: args.mem_mib.unwrap_or(cfg.memory_bytes >> 20),
        datastore_loss: ha::types::DatastoreLossSettings {
            response: args.datastore_loss.unwrap_or_default(),
            delay: args
                .datastore_loss_delay_s
                .map(std::time::Duration::from_secs)
                .unwrap_or(ha::types::DatastoreLossSettings::default().delay),
        },
    };
    let ha = dir.join("ha.toml");
    std::fs::write(&ha, toml::to_string(&settings).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", ha.display()))?;
    Ok(format!("VM {name} registered on {ds} ({})", dir.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::set_request;
    use crate::cli::{Cli, Command, VmArgs};
    use ha::runtime::control::Request;
    use ha::types::RestartPriority;

    fn vm_args(args: &[&str]) -> VmArgs {
        let mut all = vec!["vigil", "vm", "set", "web"];
        all.extend(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Vm(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn vm_set_takes_the_registration_flags() {
        let a = vm_args(&["--cpu-mhz", "3000", "--priority", "high"]);
        assert_eq!(
            set_request("web", &a).unwrap(),
            Request::SetVm {
                vm: "web".into(),
                cpu_mhz: Some(3000),
                mem_mib: None,
                priority: Some(RestartPriority::High),
            }
        );
        let a = vm_args(&["--mem-mib", "256"]);
        assert_eq!(
            set_request("web", &a).unwrap(),
            Request::SetVm {
                vm: "web".into(),
                cpu_mhz: None,
                mem_mib: Some(256),
                priority: None,
            }
        );
    }

    #[test]
    fn vm_set_refuses_nothing_to_change_and_flags_it_does_not_change() {
        let e = set_request("web", &vm_args(&[])).unwrap_err();
        assert!(
            e.starts_with("nothing to change: usage: vigil vm set NAME"),
            "{e}"
        );
        let e = set_request(
            "web",
            &vm_args(&["--cpu-mhz", "1", "--isolation-response", "power-off"]),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "vm set changes only --cpu-mhz, --mem-mib and --priority, not --isolation-response"
        );
        let e = set_request("web", &vm_args(&["--mem-mib", "1", "--host", "host-2"])).unwrap_err();
        assert!(e.ends_with("not --host"), "{e}");
        assert!(Cli::try_parse_from(["vigil", "vm", "set", "web", "--cpu-mhz", "lots"]).is_err());
    }
}
