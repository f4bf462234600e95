//! The agent binary reads Istio's environment names (istio-cni's DaemonSet env): resolved before
//! the command line is parsed, refusals exit non-zero with the variable's name. No root needed.

use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ambient-cni-agent"));
    for v in [
        "RUN_DIR",
        "CNI_AGENT_RUN_DIR",
        "CHAINED_CNI_PLUGIN",
        "AMBIENT_ENABLED",
    ] {
        c.env_remove(v);
    }
    c
}

#[test]
fn istio_run_dir_name_reaches_the_admin_tools() {
    // Never created: only its name must show up.
    let istio_dir =
        std::env::temp_dir().join(format!("env-alias-{}/istio-cni", std::process::id()));
    let out = agent()
        .args(["status"])
        .env("CNI_AGENT_RUN_DIR", &istio_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // No agent runs there: the error names the socket under Istio's run dir.
    assert!(err.contains(&istio_dir.display().to_string()), "{err}");
}

#[test]
fn istio_settings_we_cannot_honour_stop_the_agent_with_the_name() {
    let out = agent()
        .args(["status"])
        .env("CHAINED_CNI_PLUGIN", "false")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CHAINED_CNI_PLUGIN=false"), "{err}");
}
