//! `vigil run`: build the config from file + flags, boot, map the outcome to
//! the exit status (see `vmm::control` for the table).

use vmm::config::{ConfigOverrides, CpuTemplateName, OnReboot, VmConfig};
use vmm::control::{ExitReason, EXIT_ERROR};

use crate::cli::{CpuTemplateArg, OnRebootArg, RunArgs};
use crate::logging;

/// Flags that only mean something with `--restore` or `--incoming`, and
/// those only with `--incoming`.
/// (clap's `requires` is not enough: it is waived when `--restore`
/// conflicts with another flag given, e.g. `--config`.)
fn check_restore_only(args: &RunArgs) -> Result<(), String> {
    let brings_a_vm = args.restore.is_some() || args.incoming.is_some();
    if !brings_a_vm && (!args.tap.is_empty() || args.vsock_socket.is_some()) {
        return Err(
            "--tap and --vsock-socket only apply with --restore DIR or --incoming; to boot a VM \
             use --net tap=NAME and --vsock cid=N,socket=PATH"
                .to_string(),
        );
    }
    if args.incoming.is_none() && (!args.network.is_empty() || args.cpu_limit.is_some()) {
        return Err(
            "--network and --cpu-limit describe a migration target: they only apply with \
             --incoming tcp:ADDR:PORT"
                .to_string(),
        );
    }
    Ok(())
}

/// Runs `vigil run` and returns the process exit status.
pub fn run(args: RunArgs) -> i32 {
    if let Err(e) = check_restore_only(&args) {
        eprintln!("vigil: {e}");
        return vmm::control::EXIT_USAGE;
    }
    if let Err(e) = logging::init(args.log_level.as_deref(), args.log_file.as_deref()) {
        eprintln!("vigil: {}", chain(&e));
        return EXIT_ERROR;
    }
    let logs_to_file = args.log_file.is_some();
    let host = hostname();
    let mut opts = vmm::RunOptions {
        api_socket: args.api_socket.clone(),
        migration: Some(vmm::migration_hook::HookRef(std::sync::Arc::new(
            migration::machine::Outgoing::new(&host),
        ))),
        ..Default::default()
    };
    if let Some(p) = &args.lease {
        match vmm::lease::LeaseSpec::load(p) {
            Ok(spec) if spec.handoff && args.incoming.is_none() => {
                eprintln!(
                    "vigil: lease spec {}: handoff = true only applies with --incoming \
                     tcp:ADDR:PORT (the target of a live migration takes over the source's lease)",
                    p.display()
                );
                return vmm::control::EXIT_USAGE;
            }
            Ok(spec) => opts.lease = Some(spec),
            Err(e) => {
                eprintln!("vigil: {}", chain(&e));
                return EXIT_ERROR;
            }
        }
    }
    if let Some(t) = args.watchdog_threshold_s {
        opts.watchdog_threshold = std::time::Duration::from_secs(t.max(1));
    }
    if args.restore.is_none()
        && args.incoming.is_none()
        && (!args.tap.is_empty() || args.vsock_socket.is_some())
    {
        eprintln!("vigil: --tap and --vsock-socket apply only with --restore or --incoming");
        return vmm::control::EXIT_USAGE;
    }
    if args.restore.is_some() || args.incoming.is_some() {
        let console = match args.console.as_deref().map(vmm::config::ConsoleMode::parse) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                eprintln!("vigil: --console: {e}");
                return EXIT_ERROR;
            }
        };
        let ov = vmm::snapshot::RestoreOverrides {
            console,
            name: args.name.clone(),
            taps: args.tap.clone(),
            vsock_socket: args.vsock_socket.clone(),
        };
        if let Some(spec) = &args.incoming {
            return incoming(spec, &host, ov, &args, opts, logs_to_file);
        }
        let Some(dir) = &args.restore else {
            return EXIT_ERROR;
        };
        return match vmm::snapshot::restore(dir, ov, &opts) {
            Ok(reason) => {
                report(&reason, logs_to_file);
                reason.exit_code()
            }
            Err(e) => fail(&e, logs_to_file),
        };
    }
    let overrides = ConfigOverrides {
        name: args.name,
        vcpus: args.cpus,
        memory: args.memory,
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpu_template: args.cpu_template.map(template_name),
        console: args.console,
        on_reboot: args.on_reboot.map(|r| match r {
            OnRebootArg::Exit => OnReboot::Exit,
            OnRebootArg::Restart => OnReboot::Restart,
        }),
        disks: args.disk,
        vsock: args.vsock,
        nics: args.net,
    };
    let cfg = match VmConfig::load(args.config.as_deref(), overrides) {
        Ok(c) => c,
        Err(e) => return fail_config(&e, logs_to_file),
    };
    tracing::info!(vm = %cfg.name, ?cfg, "configuration");
    match vmm::run_with(&cfg, &opts) {
        Ok(reason) => {
            report(&reason, logs_to_file);
            reason.exit_code()
        }
        Err(e) => fail(&e, logs_to_file),
    }
}

fn template_name(t: CpuTemplateArg) -> CpuTemplateName {
    match t {
        CpuTemplateArg::Baseline => CpuTemplateName::Baseline,
        CpuTemplateArg::Host => CpuTemplateName::Host,
    }
}

/// This host's name, for migration messages.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// `vigil run --incoming tcp:ADDR:PORT`: wait for one migrated VM, run it.
fn incoming(
    spec: &str,
    host: &str,
    overrides: vmm::snapshot::RestoreOverrides,
    args: &RunArgs,
    run: vmm::RunOptions,
    logs_to_file: bool,
) -> i32 {
    let Some(listen) = spec.strip_prefix("tcp:") else {
        eprintln!("vigil: --incoming `{spec}` must be tcp:ADDR:PORT, e.g. tcp:0.0.0.0:5253");
        return EXIT_ERROR;
    };
    let tls = args
        .tls_cert
        .clone()
        .map(|cert| migration::transport::TlsFiles {
            cert,
            key: args.tls_key.clone().unwrap_or_default(),
            ca: args.tls_ca.clone().unwrap_or_default(),
        });
    let opts = migration::machine::IncomingOptions {
        listen: listen.to_string(),
        target: migration::TargetOptions {
            host: host.to_string(),
            ..Default::default()
        },
        overrides,
        run,
        tls,
        cpu_limit: args.cpu_limit.map(template_name),
        // Without --network this host offers only the default network.
        networks: if args.network.is_empty() {
            ["default".to_string()].into()
        } else {
            args.network.iter().cloned().collect()
        },
    };
    let result = migration::machine::run_incoming(opts, |addr| {
        // Scripts and tests wait for this line before starting the source.
        eprintln!("vigil: waiting for an incoming migration on tcp:{addr}");
    });
    match result {
        Ok(reason) => {
            report(&reason, logs_to_file);
            reason.exit_code()
        }
        Err(e) => {
            let msg = chain(&e);
            if logs_to_file {
                tracing::error!(error = %msg, "incoming migration failed");
            }
            eprintln!("vigil: {msg}");
            EXIT_ERROR
        }
    }
}

/// The error and its causes on one line: "a: b: c".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn fail(e: &vmm::Error, logs_to_file: bool) -> i32 {
    let msg = chain(e);
    if logs_to_file {
        tracing::error!(error = %msg, "vigil run failed");
    }
    eprintln!("vigil: {msg}");
    EXIT_ERROR
}

fn fail_config(e: &vmm::config::ConfigError, logs_to_file: bool) -> i32 {
    let msg = chain(e);
    if logs_to_file {
        tracing::error!(error = %msg, "invalid configuration");
    }
    eprintln!("vigil: {msg}");
    EXIT_ERROR
}

fn report(reason: &ExitReason, logs_to_file: bool) {
    match reason {
        ExitReason::PowerOff => tracing::info!("guest powered off"),
        ExitReason::Reboot => tracing::info!("guest requested reboot"),
        ExitReason::HostPowerOff => tracing::info!("powered off through the control API"),
        ExitReason::Snapshotted => tracing::info!("stopped after a snapshot"),
        ExitReason::Migrated => tracing::info!("migrated to another host; stopped here"),
        ExitReason::Reset { reason } => tracing::info!(%reason, "guest reset"),
        ExitReason::Crash {
            vcpu,
            reason,
            registers,
        } => {
            // The vCPU thread already logged it (with fields); stderr gets
            // it whatever the log filter says.
            eprintln!("vigil: guest crashed on vCPU {vcpu}: {reason}");
            eprintln!("vigil: vCPU {vcpu} registers: {registers}");
        }
        ExitReason::VmmError(msg) => {
            if logs_to_file {
                tracing::error!(error = %msg, "VMM error while running");
            }
            eprintln!("vigil: {msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::check_restore_only;
    use crate::cli::{Cli, Command};

    fn run_args(args: &[&str]) -> crate::cli::RunArgs {
        let mut all = vec!["vigil", "run"];
        all.extend(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Run(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn restore_overrides_need_restore() {
        for extra in [["--tap", "vds0"], ["--vsock-socket", "/tmp/v.sock"]] {
            let mut args = vec!["--config", "vm.toml"];
            args.extend(extra);
            let e = check_restore_only(&run_args(&args)).unwrap_err();
            assert!(
                e.starts_with("--tap and --vsock-socket only apply with --restore"),
                "{e}"
            );
            let mut args = vec!["--restore", "/tmp/snap"];
            args.extend(extra);
            check_restore_only(&run_args(&args)).unwrap();
            let mut args = vec!["--incoming", "tcp:127.0.0.1:47999"];
            args.extend(extra);
            check_restore_only(&run_args(&args)).unwrap();
        }
    }

    #[test]
    fn cpu_limit_only_with_incoming() {
        let a = run_args(&[
            "--incoming",
            "tcp:127.0.0.1:47999",
            "--cpu-limit",
            "baseline",
        ]);
        assert!(matches!(
            a.cpu_limit,
            Some(crate::cli::CpuTemplateArg::Baseline)
        ));
        for extra in [["--cpu-limit", "host"], ["--network", "lab"]] {
            let mut args = vec!["--config", "vm.toml"];
            args.extend(extra);
            let e = check_restore_only(&run_args(&args)).unwrap_err();
            assert!(e.contains("only apply with --incoming"), "{e}");
        }
        assert!(Cli::try_parse_from([
            "vigil",
            "run",
            "--incoming",
            "tcp:127.0.0.1:1",
            "--cpu-limit",
            "avx"
        ])
        .is_err());
    }

    #[test]
    fn migrate_priority_is_high_or_standard() {
        let parse = |extra: &[&str]| {
            let mut all = vec![
                "vigil",
                "migrate",
                "--api-socket",
                "/tmp/s",
                "--to",
                "198.19.77.2:5253",
            ];
            all.extend(extra);
            Cli::try_parse_from(all).map(|c| match c.command {
                Command::Migrate(m) => m.priority,
                _ => unreachable!(),
            })
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(
            parse(&["--priority", "high"]).unwrap(),
            Some(crate::cli::PriorityArg::High)
        );
        assert!(parse(&["--priority", "urgent"]).is_err());
        let e = Cli::try_parse_from([
            "vigil",
            "migrate",
            "--api-socket",
            "/tmp/s",
            "--cancel",
            "--priority",
            "high",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be used with"), "{e}");
    }
}
