//! `ambient-cni-agent`: the node agent and its tools.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Istio's environment names (istio-cni's DaemonSet env) onto ours, before clap reads them.
    if let Err(e) = ambient_cni_agent::env_alias::apply() {
        eprintln!("ambient-cni-agent: {e}");
        return ExitCode::FAILURE;
    }
    let cli = ambient_cni_agent::cli::Cli::parse();
    match ambient_cni_agent::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambient-cni-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
