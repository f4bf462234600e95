//! Running a netfilter tool with arguments (never a shell) and optional stdin, with a deadline.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::RulesError;

/// How long one netfilter tool run may take before it is killed. `iptables-restore` of a
/// pod's ruleset takes milliseconds; one stuck on the xtables lock must not hang a pod's ADD.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `bin args...` with `stdin`, returns stdout; non-zero exit is an error naming the command.
pub fn run(
    backend: &str,
    bin: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, RulesError> {
    run_env(backend, bin, args, stdin, &[])
}

/// Like [`run`] with extra environment variables; killed after [`EXEC_TIMEOUT`].
pub fn run_env(
    backend: &str,
    bin: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Result<String, RulesError> {
    run_with_deadline(backend, bin, args, stdin, env, EXEC_TIMEOUT)
}

/// Like [`run`] with extra environment variables and a deadline, after which the tool is
/// killed and the run fails with [`RulesError::Timeout`].
pub fn run_with_deadline(
    backend: &str,
    bin: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
    deadline: Duration,
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
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let input = child.stdin.take().zip(stdin.map(<[u8]>::to_vec));
    // The waiter thread owns the child: it feeds stdin, collects the output and reaps it.
    // Until it reaps, the pid cannot be reused, so killing by pid on timeout is safe.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Some((mut pipe, data)) = input {
            // A write error (tool exited early) shows up as the exit status below.
            let _ = pipe.write_all(&data);
        }
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(deadline) {
        Ok(out) => out.map_err(spawn_err)?,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // Reaped by the waiter; wait for it so no zombie outlives this call.
            let _ = rx.recv_timeout(Duration::from_secs(2));
            return Err(RulesError::Timeout {
                backend: backend.to_owned(),
                what: format!("`{command}`"),
                after: deadline,
            });
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_failure_are_reported() {
        let out = run("test", "sh", &["-c", "cat; echo done"], Some(b"in\n")).unwrap();
        assert_eq!(out, "in\ndone\n");
        let err = run("test", "sh", &["-c", "echo bad >&2; exit 3"], None).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }

    #[test]
    fn a_tool_that_hangs_is_killed_at_the_deadline() {
        let start = std::time::Instant::now();
        let err = run_with_deadline(
            "test",
            "sleep",
            &["30"],
            Some(b"ignored"),
            &[],
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        assert!(matches!(err, RulesError::Timeout { .. }), "{err}");
        assert!(
            err.to_string().contains("`sleep 30` did not finish"),
            "{err}"
        );
    }
}
