//! The ambient-cni node agent: enrols pods into the ambient mesh and hands them to ztunnel.

pub mod admin;
pub mod agent_metrics;
pub mod cli;
pub mod cmd;
pub mod decisions;
pub mod discovery;
pub mod env_alias;
pub mod inpod;
pub mod kube_api;
pub mod logging;
pub mod mesh;
pub mod obs;
pub mod plugin_server;
pub mod pods;
pub mod privileges;
pub mod run;
pub mod sidecar_repair;
pub mod stop_mode;
pub mod uds;
pub mod verify;

#[cfg(test)]
mod test_support;

use cli::{Cli, Command};

/// Runs one parsed command line.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Redirect(args) => cmd::redirect::run(args),
        Command::ValidateSidecar(args) => match cmd::validate_sidecar::run(args) {
            0 => Ok(()),
            code => std::process::exit(code),
        },
        Command::Install(args) => {
            let out = ambient_cni_install::cli::run_install(&args)?;
            println!("{out:?}");
            Ok(())
        }
        Command::Uninstall(args) => {
            let out = ambient_cni_install::cli::run_uninstall(&args)?;
            println!("{out:?}");
            // The host probe SNAT table and its sets go too (kept across upgrades).
            match iptables_rules::nft::host::NftHostProbe.remove() {
                Ok(()) => println!("host probe rules removed"),
                Err(e) => eprintln!("host probe rules: {e}"),
            }
            Ok(())
        }
        Command::Status { run_dir, json } => admin::print_status(&run_dir, json),
        Command::Doctor { pod, run_dir } => {
            if admin::print_doctor(&run_dir, &pod)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::LogLevel { level, run_dir } => admin::set_log_level(&run_dir, &level),
    }
}
