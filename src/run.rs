//! `vigil run`: build the config from file + flags, boot, map the outcome to
//! the exit status (see `vmm::control` for the table).

use vmm::config::{ConfigOverrides, CpuTemplateName, OnReboot, VmConfig};
use vmm::control::{ExitReason, EXIT_ERROR};

use crate::cli::{CpuTemplateArg, OnRebootArg, RunArgs};
use crate::logging;

/// Runs `vigil run` and returns the process exit status.
pub fn run(args: RunArgs) -> i32 {
    if let Err(e) = logging::init(args.log_level.as_deref(), args.log_file.as_deref()) {
        eprintln!("vigil: {}", chain(&e));
        return EXIT_ERROR;
    }
    let logs_to_file = args.log_file.is_some();
    let mut opts = vmm::RunOptions {
        api_socket: args.api_socket.clone(),
        ..Default::default()
    };
    if let Some(p) = &args.lease {
        match vmm::lease::LeaseSpec::load(p) {
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
    if let Some(dir) = &args.restore {
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
        cpu_template: args.cpu_template.map(|t| match t {
            CpuTemplateArg::Baseline => CpuTemplateName::Baseline,
            CpuTemplateArg::Host => CpuTemplateName::Host,
        }),
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
