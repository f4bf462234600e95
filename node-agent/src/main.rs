//! `ambient-cni-agent`: the node agent and its tools.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ambient_cni_agent::cli::Cli::parse();
    match ambient_cni_agent::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambient-cni-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
