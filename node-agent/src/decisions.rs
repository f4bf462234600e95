//! The decisions file (format: `ambient_cni_api::decisions`): which pods the agent knows
//! are outside the mesh, for the plugin to read when the agent does not answer.
//!
//! Conservative by construction. The plugin sees only a pod's namespace, name and uid
//! (never its labels), so the file lists:
//! - namespaces none of whose pods can be captured whatever their labels (excluded, or
//!   refused by every selector entry's namespace selector). With Istio's default selectors
//!   only excluded namespaces qualify: a pod labelled `istio.io/dataplane-mode=ambient`
//!   is in the mesh in any namespace, so an unlabelled namespace proves nothing about a
//!   pod the agent has not seen;
//! - pods the agent has seen, with their labels and their namespace's labels, and refuses.
//!   The uid pins the very pod (a namesake created later is not listed).
//!
//! With sidecar mode on, a sidecar-injected pod needs the agent (its rules are programmed at
//! ADD) and is never listed; and since any pod may be injected, only excluded namespaces are
//! closed as a whole then.
//!
//! Everything else (unseen pods, pods whose namespace the agent has not seen) fails closed.
//! These facts change only through API events the agent would see while it runs; while it
//! is down they can go stale, which is why the file carries its write time, is rewritten
//! on every change and at least every `--decisions-refresh-seconds`, and the plugin
//! ignores it beyond `decisions_max_age_s`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambient_cni_api::decisions::{
    self as format, listable, Decisions, PodKey, MAX_NAME, MAX_NAMESPACE, MAX_NAMESPACES, MAX_PODS,
    MAX_UID, VERSION,
};
use k8s_openapi::api::core::v1::Pod;
use tracing::{debug, warn};

use crate::mesh::controller::Controller;
use crate::mesh::policy::Policy;
use crate::mesh::sidecar_policy::{decide, Mode};
use crate::obs::fallbacks::FallbackMetrics;
use crate::obs::metrics::Metrics;
use crate::pods;

/// Bursts of pod events are coalesced into at most one write per this interval.
const MIN_GAP: Duration = Duration::from_secs(1);
/// How often to look again while the agent has not synced yet (it writes nothing then).
const STARTING_POLL: Duration = Duration::from_millis(100);

/// The file's content for the agent's current view: `pods` bound to this node and the
/// labels of every namespace seen (a namespace missing from `namespaces` is unknown).
pub fn compute<'a>(
    policy: &Policy,
    pods: impl IntoIterator<Item = &'a Pod>,
    namespaces: &HashMap<String, BTreeMap<String, String>>,
    now_s: u64,
) -> Decisions {
    let closed: BTreeSet<String> = policy
        .exclude_namespaces
        .iter()
        .map(|n| (n, None))
        .chain(namespaces.iter().map(|(n, l)| (n, Some(l))))
        .filter(|(n, l)| {
            let excluded = policy.exclude_namespaces.iter().any(|e| e == *n);
            // Selectors say nothing about sidecar pods, which sidecar mode serves anywhere.
            listable(n, MAX_NAMESPACE)
                && (excluded
                    || !policy.sidecar_mode
                        && policy.namespace_excludes_all(n, l.unwrap_or(&BTreeMap::new())))
        })
        .map(|(n, _)| n.clone())
        .collect();
    let mut listed: Vec<PodKey> = pods
        .into_iter()
        .filter_map(|pod| {
            let id = pods::pod_id(pod);
            let listable_id = listable(&id.namespace, MAX_NAMESPACE)
                && listable(&id.name, MAX_NAME)
                && listable(&id.uid, MAX_UID);
            // hostNetwork and finished pods never get a sandbox ADD: no need to list them.
            if !listable_id
                || closed.contains(&id.namespace)
                || pods::host_network(pod)
                || pods::is_terminal(pod)
            {
                return None;
            }
            let ns_labels = namespaces.get(&id.namespace)?;
            let outside = matches!(decide(policy, pod, ns_labels), Mode::PassThrough(_));
            outside.then_some(PodKey {
                namespace: id.namespace,
                name: id.name,
                uid: id.uid,
            })
        })
        .collect();
    listed.sort();
    // Leaving entries out only makes the plugin fail closed for them.
    listed.truncate(MAX_PODS);
    Decisions {
        version: VERSION,
        written_at: now_s,
        namespaces: closed.into_iter().take(MAX_NAMESPACES).collect(),
        pods: listed,
    }
}

/// Writes `d` to `path` atomically: a temporary file in the same directory (0600),
/// fsynced, renamed over `path`, then the directory fsynced.
pub fn write_atomic(path: &Path, d: &Decisions) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(format!(".{}.{}.tmp", format::FILE_NAME, std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&d.to_json())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps the decisions file beside `socket` current (after the first sync: on every
/// change and every `refresh`), and counts the plugin's fallbacks on every scrape.
pub fn start(
    ctl: &Arc<Controller>,
    socket: &Path,
    refresh: Duration,
    metrics: &Metrics,
    counted: Arc<FallbackMetrics>,
) {
    let fallbacks = format::fallbacks_beside(socket);
    metrics.on_scrape(move || {
        let (pass, fail) = crate::obs::fallbacks::consume(&fallbacks);
        counted.add(pass, fail);
    });
    tokio::spawn(keep_written(
        ctl.clone(),
        format::file_beside(socket),
        refresh,
    ));
}

async fn keep_written(ctl: Arc<Controller>, path: PathBuf, refresh: Duration) {
    loop {
        // Registered before reading the cache, so no change slips between read and wait.
        let changed = ctl.changes().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Before the first sync the cache is partial: the previous file stands until then.
        let ready = ctl.is_ready();
        if ready {
            let d =
                ctl.with_cache(|pods, namespaces| compute(ctl.policy(), pods, namespaces, now_s()));
            let (p, n) = (path.clone(), d.pods.len());
            match tokio::task::spawn_blocking(move || write_atomic(&p, &d)).await {
                Ok(Ok(())) => debug!(path = %path.display(), pods = n, "decisions file written"),
                Ok(Err(e)) => {
                    warn!(path = %path.display(), error = %e, "cannot write the decisions file")
                }
                Err(e) => warn!(path = %path.display(), error = %e, "decisions file writer failed"),
            }
        }
        let wait = if ready { refresh } else { STARTING_POLL };
        tokio::select! {
            _ = changed => tokio::time::sleep(MIN_GAP).await,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::policy::{parse_selectors, DATAPLANE_MODE};
    use serde_json::json;

    fn pod(ns: &str, name: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("u-{name}"), "labels": labels},
            "spec": {"containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn namespaces() -> HashMap<String, BTreeMap<String, String>> {
        let mut m = HashMap::new();
        m.insert(
            "mesh".into(),
            BTreeMap::from([(DATAPLANE_MODE.to_owned(), "ambient".to_owned())]),
        );
        m.insert("plain".into(), BTreeMap::new());
        m.insert("kube-system".into(), BTreeMap::new());
        m
    }

    fn keys(d: &Decisions) -> Vec<String> {
        d.pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    #[test]
    fn lists_only_what_is_known_to_be_outside_the_mesh() {
        let p = Policy::default();
        let mut host = pod("plain", "host", json!({}));
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = pod("plain", "done", json!({}));
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let pods = [
            pod("plain", "web", json!({})),
            pod("plain", "labelled", json!({DATAPLANE_MODE: "ambient"})),
            pod("mesh", "app", json!({})),
            pod("mesh", "opted-out", json!({DATAPLANE_MODE: "none"})),
            pod("unseen-ns", "x", json!({})),
            pod("kube-system", "coredns", json!({})),
            pod("plain", "Bad_Name", json!({})),
            host,
            done,
        ];
        let d = compute(&p, &pods, &namespaces(), 42);
        assert_eq!(d.version, VERSION);
        assert_eq!(d.written_at, 42);
        // Default selectors: only the excluded namespace is closed as a whole.
        assert_eq!(d.namespaces, vec!["kube-system"]);
        assert_eq!(keys(&d), vec!["mesh/opted-out", "plain/web"]);
        assert_eq!(d.pods[1].uid, "u-web");
    }

    #[test]
    fn namespace_only_selectors_close_unlabelled_namespaces() {
        let p = Policy {
            selectors: parse_selectors(
                "- namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}",
            )
            .unwrap(),
            exclude_namespaces: vec!["kube-system".into(), "not listed?".into()],
            sidecar_mode: false,
            ..Policy::default()
        };
        let d = compute(&p, &[pod("plain", "web", json!({}))], &namespaces(), 1);
        assert_eq!(d.namespaces, vec!["kube-system", "plain"]);
        assert!(d.pods.is_empty(), "covered by its namespace");
        // Sidecar mode on: an unlabelled namespace may still hold injected pods.
        let p = Policy {
            sidecar_mode: true,
            ..p
        };
        let d = compute(&p, &[pod("plain", "web", json!({}))], &namespaces(), 1);
        assert_eq!(d.namespaces, vec!["kube-system"]);
        assert_eq!(keys(&d), vec!["plain/web"]);
    }

    /// A pod shaped as Istio's injector leaves it with `pilot.cni.enabled=true`.
    fn injected(ns: &str, name: &str) -> Pod {
        let mut p = pod(ns, name, json!({}));
        p.metadata.annotations = Some(BTreeMap::from([(
            crate::mesh::policy::SIDECAR_STATUS.to_owned(),
            "{}".to_owned(),
        )]));
        p.spec.as_mut().unwrap().containers = vec![k8s_openapi::api::core::v1::Container {
            name: "istio-proxy".into(),
            args: Some(vec!["proxy".into(), "sidecar".into()]),
            ..Default::default()
        }];
        p
    }

    #[test]
    fn sidecar_pods_need_the_agent_and_are_never_listed() {
        let mut gateway = injected("plain", "gateway");
        gateway.spec.as_mut().unwrap().containers[0].args =
            Some(vec!["proxy".into(), "router".into()]);
        let pods = [
            injected("plain", "sidecar"),
            injected("mesh", "sidecar-in-mesh-ns"),
            gateway,
            pod("plain", "web", json!({})),
        ];
        let d = compute(&Policy::default(), &pods, &namespaces(), 1);
        assert_eq!(keys(&d), vec!["plain/gateway", "plain/web"]);
        // Sidecar mode off: the agent does nothing for them, so they may pass.
        let off = Policy {
            sidecar_mode: false,
            ..Policy::default()
        };
        let d = compute(&off, &pods, &namespaces(), 1);
        assert_eq!(
            keys(&d),
            vec![
                "mesh/sidecar-in-mesh-ns",
                "plain/gateway",
                "plain/sidecar",
                "plain/web"
            ]
        );
    }

    #[test]
    fn bounded() {
        let p = Policy::default();
        let many: Vec<Pod> = (0..MAX_PODS + 10)
            .map(|i| pod("plain", &format!("p{i}"), json!({})))
            .collect();
        let d = compute(&p, &many, &namespaces(), 1);
        assert_eq!(d.pods.len(), MAX_PODS);
        assert!(Decisions::parse(&d.to_json()).is_ok());
    }

    #[test]
    fn written_atomically_root_only_and_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("acni-decisions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format::FILE_NAME);
        let p = Policy::default();
        let first = compute(&p, &[pod("plain", "a", json!({}))], &namespaces(), 1);
        write_atomic(&path, &first).unwrap();
        let second = compute(&p, &[pod("plain", "b", json!({}))], &namespaces(), 2);
        write_atomic(&path, &second).unwrap();
        let back = Decisions::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, second);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        assert!(write_atomic(&dir.join("no/such/dir/f"), &second).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
