//! `ambient-cni-demo`: the README's local demo (`sudo ./scripts/demo.sh`); a
//! development tool, not shipped. See `ambient_cni_tests::demo`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = ambient_cni_tests::demo::DemoArgs::parse();
    match ambient_cni_tests::demo::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambient-cni-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
