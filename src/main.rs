//! `vigil`: the command-line entry point.
//!
//! Subcommands live one per module (`run`; `vm` and `snapshot` in `vm_cmd`;
//! `agent`, `cluster` and the HA `vm` actions in `ha_cmd`; `migrate` will
//! join as its own module and variant of [`cli::Command`]). Each returns the process exit status; this
//! file only parses, sets up logging, and exits.

mod cli;
mod ha_cmd;
mod logging;
mod run;
mod signals;
mod support_bundle;
mod vm_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Whatever happens, leave the user's terminal usable.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        vmm::console::restore_terminal();
        default_hook(info);
    }));

    signals::install();

    // clap exits with status 2 on usage errors, 0 for --help/--version.
    let cli = cli::Cli::parse();
    let code = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Vm(args) => vm_cmd::vm(args),
        cli::Command::Snapshot(args) => vm_cmd::snapshot(args),
        cli::Command::Agent(args) => ha_cmd::agent(args),
        cli::Command::Cluster(args) => ha_cmd::cluster(args),
        cli::Command::SupportBundle(args) => support_bundle::support_bundle(args),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
