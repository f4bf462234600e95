//! `ambient-cni-agent run`: the node agent daemon.

use std::sync::Arc;

use anyhow::Context;
use iptables_rules::backend::{self, BackendKind};
use iptables_rules::config::InpodConfig;
use iptables_rules::netns::Netns;
use iptables_rules::redirector::Redirector;
use tracing::{error, info, warn};

use crate::cli::{BackendChoice, PodSourceKind, RunArgs};
use crate::mesh::controller::Controller;
use crate::mesh::enroller::{Effects, Enroller};
use crate::mesh::hooks::{NoProbeSet, NoStatus};
use crate::mesh::netns::HostNetns;
use crate::mesh::persist::Store;
use crate::mesh::policy::{parse_selectors, Policy};
use crate::mesh::status_queue::QueuedStatus;
use crate::mesh::table::Table;
use crate::plugin_server;
use crate::pods::local::LocalSource;
use crate::pods::source::PodSource;

/// How long a stopping agent waits for queued pod status writes.
const STATUS_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::logging::init(&args.log.log_level, args.log.log_format)?;
    crate::privileges::drop_unneeded()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(args))
}

/// The policy the flags describe.
pub fn policy_from(args: &RunArgs) -> anyhow::Result<Policy> {
    Ok(Policy {
        selectors: parse_selectors(&args.ambient_enablement_selector)
            .map_err(anyhow::Error::msg)?,
        exclude_namespaces: args.install.exclude_namespaces_list(),
        system_namespace: args.system_namespace.clone(),
        inpod: InpodConfig {
            dns_capture: args.ambient_dns_capture,
            ipv6: args.ambient_ipv6,
            probe_snat_v4: args.host_probe_snat_ip,
            probe_snat_v6: args.host_probe_snat_ipv6,
            ..InpodConfig::default()
        },
        sidecar_mode: args.sidecar_mode,
    })
}

/// The rules backend the flags ask for (`auto`: native nftables when it works).
pub fn redirector_from(choice: BackendChoice) -> anyhow::Result<Redirector> {
    let kind = match choice {
        BackendChoice::Iptables => BackendKind::Iptables,
        BackendChoice::Nftables => BackendKind::Nftables,
        BackendChoice::Auto => match backend::make(BackendKind::Nftables) {
            Ok(b) => return Ok(Redirector::new(b)),
            Err(e) => {
                warn!(error = %e, "native nftables unavailable; using iptables");
                BackendKind::Iptables
            }
        },
    };
    let b = backend::make(kind).with_context(|| format!("rules backend {kind}"))?;
    Ok(Redirector::new(b))
}

/// The host probe set: native nf_tables keyed on the kubelet's uid; none on a host without a kubelet.
fn host_probes(args: &RunArgs) -> Arc<dyn crate::mesh::hooks::ProbeSet> {
    let found = || crate::mesh::host_probe::kubelet_uid(&args.host_proc);
    let Some(uid) = args.kubelet_uid.or_else(found) else {
        warn!("no kubelet process found: host probe SNAT not installed (kubelet probes to mesh pods would be redirected)");
        return Arc::new(NoProbeSet);
    };
    let cfg = iptables_rules::config::HostProbeConfig {
        ipv6: args.ambient_ipv6,
        probe_snat_v4: args.host_probe_snat_ip,
        probe_snat_v6: args.host_probe_snat_ipv6,
        kubelet_uid: Some(uid),
    };
    match crate::mesh::host_probe::NftProbeSet::install(&cfg) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            error!(error = %e, "host probe SNAT not installed");
            Arc::new(NoProbeSet)
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    catch_shutdown_signals();
    info!(node = %args.node_name, "starting ambient-cni-agent");
    let policy = policy_from(&args)?;
    // For the upgrade-or-uninstall question at SIGTERM (stop_mode); made now so a bad
    // configuration fails the start, not the stop.
    let stop_client = match args.pod_source {
        PodSourceKind::Kube => Some(crate::kube_api::client_from_env().await?),
        PodSourceKind::Local => None,
    };
    let redirector = Arc::new(redirector_from(args.rules_backend)?);
    info!(backend = %redirector.kind(), "in-pod rules backend");
    let backend_kind = redirector.kind();
    let source: Arc<dyn PodSource> = match args.pod_source {
        PodSourceKind::Local => {
            let dir = args
                .local_pods_dir
                .clone()
                .context("--local-pods-dir is required with --pod-source local")?;
            Arc::new(
                LocalSource::new(&dir)
                    .with_context(|| format!("local pod source {}", dir.display()))?,
            )
        }
        PodSourceKind::Kube => Arc::new(crate::kube_api::pods::KubeSource::new(
            crate::kube_api::client_from_env().await?,
            args.node_name.clone(),
        )),
    };
    let store = Store::open(args.run_dir.join("pods"))
        .with_context(|| format!("state directory {}", args.run_dir.display()))?;
    let host = Netns::host_id(&args.host_proc).context("cannot identify the host netns")?;
    let probes = host_probes(&args);
    let table = Arc::new(Table::default());
    // The annotation is written after the ADD returns (queued per pod, coalesced, retried).
    let status_queue = match args.pod_source {
        PodSourceKind::Kube => Some(QueuedStatus::spawn(Arc::new(
            crate::kube_api::status::KubeStatus::new(crate::kube_api::client_from_env().await?)
                .with_node(args.node_name.clone()),
        ))),
        PodSourceKind::Local => None,
    };
    let all_metrics = crate::agent_metrics::AgentMetrics::new();
    let sidecar_status: Arc<dyn crate::mesh::hooks::StatusWriter> = match &status_queue {
        Some(q) => q.clone(),
        None => Arc::new(NoStatus),
    };
    let enroller = Arc::new(Enroller::new(
        table,
        Effects {
            netns: Arc::new(HostNetns::new(args.host_proc.clone(), host)),
            rules: redirector,
            probes: probes.clone(),
            // A second client costs no extra connection: the source's are held by its watches.
            status: match &status_queue {
                Some(q) => q.clone(),
                None => Arc::new(NoStatus),
            },
            store: Arc::new(store),
        },
        all_metrics.enrol.clone(),
    ));
    let metrics = all_metrics.exposition.clone();
    let sampled = enroller.clone();
    metrics.on_scrape(move || sampled.sample_metrics());
    let controller = Controller::new(policy, enroller, source, all_metrics.reconcile.clone());
    controller.set_sidecar(Arc::new(crate::mesh::sidecar::SidecarPath::new(
        backend_kind,
        Arc::new(HostNetns::new(args.host_proc.clone(), host)),
        sidecar_status,
        all_metrics.sidecar.clone(),
    )));
    start_repair(&args, &controller, backend_kind, host, &all_metrics).await?;
    let readiness = crate::obs::health::Readiness::agent();
    let ctl = controller.clone();
    readiness.check(crate::obs::health::POD_SOURCE_SYNCED, move || {
        ctl.is_ready()
    });
    crate::obs::start_servers(
        args.health_addr,
        args.metrics_addr,
        readiness.clone(),
        metrics.clone(),
        crate::run::shutdown_signal,
    )
    .await?;

    // The plugin socket opens first: until state is rebuilt it answers "try again".
    let socket = std::path::PathBuf::from(&args.install.agent_socket);
    let listener = plugin_server::bind(&socket)?;
    crate::decisions::start(
        &controller,
        &socket,
        std::time::Duration::from_secs(args.decisions_refresh_seconds),
        &metrics,
        all_metrics.fallbacks.clone(),
    );
    readiness.set(crate::obs::health::PLUGIN_SOCKET_SERVING, true);
    let uid = nix::unistd::geteuid().as_raw();
    let plugin = tokio::spawn(plugin_server::serve(
        listener,
        controller.clone(),
        all_metrics.plugin.clone(),
        uid,
        crate::run::shutdown_signal(),
    ));
    let admin_path = crate::admin::socket_path(&args.run_dir);
    let (admin_ctl, node) = (controller.clone(), args.node_name.clone());
    tokio::spawn(async move {
        if let Err(e) =
            crate::admin::serve(&admin_path, admin_ctl, node, crate::run::shutdown_signal()).await
        {
            error!(error = %e, "admin socket failed (status/doctor unavailable)");
        }
    });
    let ctl = controller.clone();
    let zds_path = args.ztunnel_uds_address.clone();
    let zds_cfg = crate::inpod::zds::config::ZdsConfig {
        allowed_uid: args.ztunnel_uid,
        ..Default::default()
    };
    let control = tokio::spawn(async move { ctl.start(zds_path, zds_cfg).await });
    // The drift verifier starts once state is rebuilt (its pods are all held by then).
    let (ctl, verify_metrics) = (controller.clone(), all_metrics.verify.clone());
    let verify_interval = std::time::Duration::from_secs(args.verify_interval);
    tokio::spawn(async move {
        while !ctl.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        crate::verify::verifier::spawn(ctl.enroller().clone(), verify_metrics, verify_interval);
    });

    // Then the CNI config (Istio's order): the kubelet only chains us once we can answer.
    let install_ready = Arc::new(std::sync::atomic::AtomicBool::new(!args.install_cni));
    let ready = install_ready.clone();
    readiness.check(crate::obs::health::INSTALL_IN_PLACE, move || {
        ready.load(std::sync::atomic::Ordering::Acquire)
    });
    let (ready, install_metrics) = (install_ready.clone(), all_metrics.install.clone());
    metrics.on_scrape(move || {
        install_metrics.set_ready(ready.load(std::sync::atomic::Ordering::Acquire))
    });
    // Decided at SIGTERM (see stop_mode): the installer waits for the answer before it stops.
    let (mode_tx, mode_rx) = tokio::sync::watch::channel(None);
    let installer = if args.install_cni {
        let inst = Arc::new(args.install.installer().context("installer settings")?);
        let explained = inst.clone();
        readiness.explain(crate::obs::health::INSTALL_IN_PLACE, move || {
            explained.failing()
        });
        let (watched, m) = (inst.clone(), all_metrics.install.clone());
        metrics.on_scrape(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let st = watched.stats();
            m.sync_repairs(st.repairs.load(Relaxed));
            m.sync_installs("SUCCESS", st.successes.load(Relaxed));
            m.sync_installs("CREATE_CNI_CONFIG_FAILURE", st.failures.load(Relaxed));
        });
        let ready = install_ready.clone();
        let runner = inst.clone();
        Some(tokio::spawn(async move {
            let mut mode_rx = mode_rx;
            let shutdown = async move {
                match mode_rx.wait_for(Option::is_some).await {
                    Ok(m) => m.unwrap_or(ambient_cni_install::ShutdownMode::Upgrade),
                    // The agent is ending without a SIGTERM decision (a crash): keep.
                    Err(_) => ambient_cni_install::ShutdownMode::Upgrade,
                }
            };
            if let Err(e) = runner.run(shutdown, ready).await {
                error!(error = %e, "installer failed");
            }
        }))
    } else {
        None
    };

    // The plugin server ends only on SIGTERM/SIGINT; a failed controller is no uninstall.
    let signalled = tokio::select! {
        r = plugin => {
            r.context("plugin server task")?.context("plugin socket server failed")?;
            true
        }
        r = control => {
            match r {
                Ok(Ok(())) => warn!("controller ended"),
                Ok(Err(e)) => error!(error = %e, "controller failed"),
                Err(e) => error!(error = %e, "controller task failed"),
            }
            false
        }
    };
    // Listener first, then connections: ztunnel's instant reconnect must not land in a dying backlog.
    if let Some(z) = controller.zds() {
        z.shutdown().await;
    }
    let mode = if signalled {
        let name = Some(args.daemonset_name.as_str()).filter(|n| !n.is_empty());
        crate::stop_mode::at_stop(stop_client, &args.pod_namespace, name).await
    } else {
        ambient_cni_install::ShutdownMode::Upgrade
    };
    let _ = mode_tx.send(Some(mode));
    if let Some(i) = installer {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), i).await;
    }
    if mode == ambient_cni_install::ShutdownMode::Uninstall {
        match probes.uninstall() {
            Ok(()) => info!("host probe rules removed (uninstall)"),
            Err(e) => error!(error = %e, "host probe rules: removal failed"),
        }
        // Nothing of ours stays on the host: no successor will bind these (on an upgrade
        // they stay, and the next agent replaces them).
        for path in [
            crate::admin::socket_path(&args.run_dir),
            args.ztunnel_uds_address.clone(),
        ] {
            remove_our_socket(&path);
        }
    }
    if let Some(q) = &status_queue {
        if !q.flush(STATUS_DRAIN).await {
            warn!(
                backlog = q.backlog(),
                "stopping with pod status writes not done (the next agent rewrites them)"
            );
        }
    }
    let _ = std::fs::remove_file(&socket);
    info!("stopped (in-pod rules stay in place)");
    Ok(())
}

/// Starts the sidecar race repair controller when the settings turn it on (and sidecar
/// mode is on: it repairs what the ADD would have programmed).
async fn start_repair(
    args: &RunArgs,
    controller: &Arc<Controller>,
    kind: BackendKind,
    host: iptables_rules::netns::NsId,
    metrics: &crate::agent_metrics::AgentMetrics,
) -> anyhow::Result<()> {
    use crate::sidecar_repair::{effects, repairer};
    let Some(mode) = args.repair.mode() else {
        info!("sidecar repair controller is disabled");
        return Ok(());
    };
    if !args.sidecar_mode {
        info!("sidecar mode is off: no sidecar repair controller");
        return Ok(());
    }
    let (client, events) = match args.pod_source {
        PodSourceKind::Kube => {
            let client = crate::kube_api::client_from_env().await?;
            let events = crate::kube_api::status::KubeStatus::new(client.clone())
                .with_node(args.node_name.clone());
            (Some(client), Some(Arc::new(events)))
        }
        PodSourceKind::Local => (None, None),
    };
    let node_effects = effects::NodeEffects {
        find: effects::proc_scan(args.host_proc.clone(), host),
        rules: iptables_rules::sidecar::SidecarRedirector::new(kind),
        client,
        events,
    };
    let ctl = controller.clone();
    let is_sidecar: repairer::IsSidecar = Arc::new(move |pod, ns_labels| {
        crate::mesh::sidecar_policy::decide(ctl.policy(), pod, ns_labels)
            == crate::mesh::sidecar_policy::Mode::Sidecar
    });
    let r = Arc::new(repairer::Repairer::new(
        mode,
        args.repair.filter(),
        is_sidecar,
        Arc::new(node_effects),
        metrics.repair.clone(),
    ));
    r.spawn(controller.clone());
    Ok(())
}

/// Set once the first SIGTERM or SIGINT arrived; every [`shutdown_signal`] waits on it.
static SHUTDOWN: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>> =
    std::sync::OnceLock::new();

/// Catches SIGTERM/SIGINT from now on. Called first thing at start: a signal that lands
/// while the agent is still starting (after it touched the host, before its tasks run)
/// must reach the stop path, not the default action or a listener made too late.
pub fn catch_shutdown_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    if SHUTDOWN.get().is_some() {
        return;
    }
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot catch SIGTERM/SIGINT: the agent will stop without its stop path");
        return;
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    if SHUTDOWN.set(rx).is_err() {
        return;
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
        let _ = tx.send(true);
    });
}

/// Resolves once SIGTERM or SIGINT has arrived (also when it arrived before this was called).
pub async fn shutdown_signal() {
    let Some(rx) = SHUTDOWN.get() else {
        // Signals are not caught: the process dies on the default action.
        return std::future::pending().await;
    };
    let mut rx = rx.clone();
    if rx.wait_for(|fired| *fired).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Removes the socket at `path` if it is one (never another kind of file).
fn remove_our_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt as _;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(path = %path.display(), error = %e, "cannot remove socket at uninstall");
        }
    }
}
