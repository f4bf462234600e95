//! Running a netfilter tool with arguments (never a shell) and optional stdin.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::error::RulesError;

/// Runs `bin args...` with `stdin`, returns stdout; non-zero exit is an error naming the command.
pub fn run(
    backend: &str,
    bin: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, RulesError> {
    run_env(backend, bin, args, stdin, &[])
}

/// Like [`run`] with extra environment variables.
pub fn run_env(
    backend: &str,
    bin: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Result<String, RulesError> {
    let command = std::iter::once(bin)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let spawn_err = |source| RulesError::Spawn {
        backend: backend.to_owned(),
        command: command.clone(),
        source,
    };
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (tool exited early) shows up as the exit status below.
        let _ = pipe.write_all(data);
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(RulesError::Command {
            backend: backend.to_owned(),
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
