//! `vigil`: the command-line entry point.
//!
//! Subcommands live one per module (`run`, with `--incoming`; `vm` and
//! `snapshot` in `vm_cmd`; `migrate` in `migrate_cmd`; `agent`, `cluster`
//! and the HA `vm` actions in `ha_cmd`; `support-bundle` in
//! `support_bundle`). Each returns the process exit status; this
//! file only parses, sets up logging, and exits.

mod cli;
mod ha_cmd;
mod logging;
mod migrate_cmd;
mod run;
mod signals;
mod support_bundle;
mod vm_cmd;

use std::process::ExitCode;

use clap::Parser;

/// Live migration moves guest memory in buffers of about 1 MiB, allocated
/// and freed per frame. glibc serves allocations of 128 KiB and more with a
/// fresh mmap each time, whose every page then faults on first touch (a few
/// microseconds each under nested virtualisation): that cost the stream
/// most of its throughput. Keeping such buffers in the heap lets freed ones
/// be reused.
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> ExitCode {
    // Whatever happens, leave the user's terminal usable.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        vmm::console::restore_terminal();
        default_hook(info);
    }));

    signals::install();
    tune_malloc();

    // clap exits with status 2 on usage errors, 0 for --help/--version.
    let cli = cli::Cli::parse();
    let code = match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Vm(args) => vm_cmd::vm(args),
        cli::Command::Snapshot(args) => vm_cmd::snapshot(args),
        cli::Command::Migrate(args) => migrate_cmd::migrate(args),
        cli::Command::Agent(args) => ha_cmd::agent(args),
        cli::Command::Cluster(args) => ha_cmd::cluster(args),
        cli::Command::SupportBundle(args) => support_bundle::support_bundle(args),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
