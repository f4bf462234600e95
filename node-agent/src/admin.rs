//! The admin API (`ambient_cni.admin.v1`) on a root-only socket, and its CLI
//! clients `ambient-cni-agent status`, `doctor NS/POD` and `log-level LEVEL`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambient_cni_api::admin as pb;
use ambient_cni_api::admin::admin_client::AdminClient;
use ambient_cni_api::admin::admin_server::{Admin, AdminServer};
use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::mesh::controller::Controller;
use crate::mesh::table::Phase;

/// The admin socket inside the agent's run dir.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("admin.sock")
}

struct Service {
    ctl: Arc<Controller>,
    node: String,
}

#[tonic::async_trait]
impl Admin for Service {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let enroller = self.ctl.enroller();
        let mut pods = Vec::new();
        for h in enroller.table.all() {
            let (rules_ok, rules_detail) = match h.netns.clone() {
                Some(ns) => {
                    let (r, cfg) = (enroller.rules().clone(), h.cfg.clone());
                    match tokio::task::spawn_blocking(move || r.show(&ns, &cfg)).await {
                        Ok(Ok(rep)) => (
                            rep.complete,
                            if rep.complete {
                                "ok".into()
                            } else {
                                format!(
                                    "rules match: {}, route: {:?}",
                                    rep.installed.matches_expected, rep.route
                                )
                            },
                        ),
                        Ok(Err(e)) => (false, e.to_string()),
                        Err(e) => (false, e.to_string()),
                    }
                }
                None => (false, "netns unknown".into()),
            };
            pods.push(pb::PodStatus {
                namespace: h.id.namespace.clone(),
                name: h.id.name.clone(),
                uid: h.id.uid.clone(),
                phase: h.phase.as_str().into(),
                netns: h.netns_path.clone().unwrap_or_default(),
                netns_inode: h.netns.as_ref().map_or(0, |n| n.id().ino),
                rules_ok,
                rules_detail,
                ztunnel_acked: h.phase == Phase::Enabled,
                last_error: h.last_error.clone().unwrap_or_default(),
                ips: h.ips.iter().map(ToString::to_string).collect(),
                age_seconds: SystemTime::now()
                    .duration_since(h.since)
                    .map_or(0, |d| d.as_secs()),
            });
        }
        Ok(Response::new(pb::StatusResponse {
            node: self.node.clone(),
            backend: enroller.rules().backend().to_string(),
            ztunnel_connections: enroller.ztunnels() as u32,
            ready: self.ctl.is_ready(),
            pods,
        }))
    }

    async fn doctor(
        &self,
        req: Request<pb::DoctorRequest>,
    ) -> Result<Response<pb::DoctorResponse>, Status> {
        let req = req.into_inner();
        let (checks, healthy) =
            crate::mesh::doctor::doctor(&self.ctl, &req.namespace, &req.name).await;
        Ok(Response::new(pb::DoctorResponse { checks, healthy }))
    }

    async fn set_log_level(
        &self,
        req: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelResponse>, Status> {
        let level = req.into_inner().level;
        let previous = crate::logging::set_level(&level).map_err(Status::invalid_argument)?;
        tracing::info!(level = %level, previous = %previous, "log level changed");
        Ok(Response::new(pb::SetLogLevelResponse { previous }))
    }
}

/// Serves the admin API on `path` (root-only) until `shutdown`.
pub async fn serve(
    path: &Path,
    ctl: Arc<Controller>,
    node: String,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let listener = crate::uds::bind(path)?;
    let uid = nix::unistd::geteuid().as_raw();
    let incoming = crate::uds::peers_with_uid(listener, uid, "admin");
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(Service { ctl, node }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

async fn client(path: &Path) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let path = path.to_owned();
    let shown = path.display().to_string();
    let channel = Endpoint::from_static("http://ambient-cni-admin.local")
        .connect_timeout(Duration::from_secs(2))
        // `doctor` runs every check (netns, rules, ZDS) in the agent; 30 s bounds a stuck one.
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent's admin socket {shown}: {e} (is the agent running? are you root?)"))?;
    Ok(AdminClient::new(channel))
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// `ambient-cni-agent status`: a table of the pods the running agent holds.
pub fn print_status(run_dir: &Path, json: bool) -> anyhow::Result<()> {
    let resp = block_on(async {
        let mut c = client(&socket_path(run_dir)).await?;
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    })?;
    if json {
        let pods: Vec<serde_json::Value> = resp
            .pods
            .iter()
            .map(|p| {
                serde_json::json!({
                    "namespace": p.namespace, "name": p.name, "uid": p.uid, "phase": p.phase,
                    "netns": p.netns, "netns_inode": p.netns_inode, "rules_ok": p.rules_ok,
                    "rules_detail": p.rules_detail, "ztunnel_acked": p.ztunnel_acked,
                    "last_error": p.last_error, "ips": p.ips, "age_seconds": p.age_seconds,
                })
            })
            .collect();
        let v = serde_json::json!({"node": resp.node, "backend": resp.backend, "ready": resp.ready,
            "ztunnel_connections": resp.ztunnel_connections, "pods": pods});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "node {}  backend {}  ready {}  ztunnel connections {}  pods {}",
        resp.node,
        resp.backend,
        resp.ready,
        resp.ztunnel_connections,
        resp.pods.len()
    );
    println!(
        "{:<40} {:<8} {:<6} {:<6} {:<16} {:<34} ERROR",
        "POD", "PHASE", "RULES", "ACKED", "IPS", "NETNS"
    );
    for p in &resp.pods {
        println!(
            "{:<40} {:<8} {:<6} {:<6} {:<16} {:<34} {}",
            format!("{}/{}", p.namespace, p.name),
            p.phase,
            if p.rules_ok { "ok" } else { "MISSING" },
            if p.ztunnel_acked { "yes" } else { "no" },
            p.ips.join(","),
            p.netns,
            p.last_error
        );
    }
    Ok(())
}

/// `ambient-cni-agent doctor NS/POD`: each check with pass/fail and the fix; exit status 1 if unhealthy.
pub fn print_doctor(run_dir: &Path, pod: &str) -> anyhow::Result<bool> {
    let (ns, name) = pod
        .split_once('/')
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| anyhow::anyhow!("give the pod as NAMESPACE/NAME, got {pod:?}"))?;
    let resp = block_on(async {
        let mut c = client(&socket_path(run_dir)).await?;
        Ok(c.doctor(pb::DoctorRequest {
            namespace: ns.into(),
            name: name.into(),
        })
        .await?
        .into_inner())
    })?;
    for c in &resp.checks {
        let mark = match c.result.as_str() {
            "pass" => "PASS",
            "fail" => "FAIL",
            "info" => "INFO",
            _ => "SKIP",
        };
        println!("[{mark}] {}: {}", c.name, c.detail);
        if !c.fix.is_empty() {
            println!("       fix: {}", c.fix);
        }
    }
    println!(
        "{}",
        if resp.healthy {
            "healthy"
        } else {
            "NOT healthy"
        }
    );
    Ok(resp.healthy)
}

/// `ambient-cni-agent log-level LEVEL`.
pub fn set_log_level(run_dir: &Path, level: &str) -> anyhow::Result<()> {
    let prev = block_on(async {
        let mut c = client(&socket_path(run_dir)).await?;
        Ok(c.set_log_level(pb::SetLogLevelRequest {
            level: level.into(),
        })
        .await?
        .into_inner()
        .previous)
    })?;
    println!("log level {level} (was {prev})");
    Ok(())
}
