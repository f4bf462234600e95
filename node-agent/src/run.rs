//! `ambient-cni-agent run`: the node agent daemon.

use std::sync::Arc;

use anyhow::Context;
use tracing::info;

use crate::cli::RunArgs;
use crate::plugin_server::{self, NotInMesh};

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::logging::init(&args.log.log_level, args.log.log_format)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    info!(node = %args.node_name, socket = %args.plugin_socket.display(), "starting ambient-cni-agent");
    let listener = plugin_server::bind(&args.plugin_socket)?;
    let uid = nix::unistd::geteuid().as_raw();
    plugin_server::serve(listener, Arc::new(NotInMesh), uid, shutdown_signal())
        .await
        .context("plugin socket server failed")?;
    let _ = std::fs::remove_file(&args.plugin_socket);
    info!("stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the process still dies on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
}
