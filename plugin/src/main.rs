//! `ambient-cni`: exec'd by the container runtime for each pod sandbox.

use std::io::{Read, Write};

use ambient_cni::client::GrpcAgent;
use ambient_cni::cmd::run;
use ambient_cni::conf::MAX_STDIN;
use ambient_cni::env::CniEnv;

fn main() {
    let env = CniEnv::from_process();
    // Read one byte past the limit so an oversized conf is refused, not truncated.
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_STDIN as u64 + 1)
        .read_to_end(&mut stdin);
    if let Err(e) = read {
        stdin.clear();
        let _ = writeln!(std::io::stderr(), "ambient-cni: cannot read stdin: {e}");
    }
    let outcome = run(&env, &stdin, |conf| {
        GrpcAgent::new(conf.agent_socket.clone(), conf.timeout_ms)
    });
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
