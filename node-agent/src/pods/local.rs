//! A pod source reading Kubernetes objects from a directory (tests and the demo).
//!
//! Layout: `<dir>/namespaces/<name>.json` (Namespace objects) and
//! `<dir>/pods/<anything>.json` (Pod objects). The directory is polled; a
//! changed file is an update, a removed file a deletion.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use tokio::sync::mpsc;
use tracing::warn;

use super::source::{Found, PodSource, SourceEvent};

/// How often the directory is re-read.
const POLL: Duration = Duration::from_millis(100);

/// Reads pods and namespaces from a directory.
#[derive(Debug, Clone)]
pub struct LocalSource {
    dir: PathBuf,
}

impl LocalSource {
    /// A source over `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("pods"))?;
        std::fs::create_dir_all(dir.join("namespaces"))?;
        Ok(Self { dir })
    }
}

type Stamp = (SystemTime, u64);

fn list(dir: &Path) -> HashMap<PathBuf, Stamp> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let md = e.metadata().ok()?;
            Some((e.path(), (md.modified().ok()?, md.len())))
        })
        .collect()
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            // Half-written files are re-read on the next poll.
            warn!(file = %path.display(), error = %e, "local pod source: skipping unreadable file");
            None
        }
    }
}

fn ns_labels(ns: &Namespace) -> (String, BTreeMap<String, String>) {
    (
        ns.metadata.name.clone().unwrap_or_default(),
        ns.metadata.labels.clone().unwrap_or_default(),
    )
}

#[tonic::async_trait]
impl PodSource for LocalSource {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn run(self: Arc<Self>, sink: mpsc::Sender<SourceEvent>) {
        let mut seen_ns: HashMap<PathBuf, Stamp> = HashMap::new();
        let mut seen_pods: HashMap<PathBuf, (Stamp, Arc<Pod>)> = HashMap::new();
        let mut synced = false;
        loop {
            let mut events = Vec::new();
            // Namespaces first, so a pod's namespace labels are known when it arrives.
            let now = list(&self.dir.join("namespaces"));
            for (path, stamp) in &now {
                if seen_ns.get(path) != Some(stamp) {
                    if let Some(ns) = read::<Namespace>(path) {
                        let (name, labels) = ns_labels(&ns);
                        events.push(SourceEvent::Namespace { name, labels });
                        seen_ns.insert(path.clone(), *stamp);
                    }
                }
            }
            seen_ns.retain(|p, _| now.contains_key(p));
            let now = list(&self.dir.join("pods"));
            for (path, stamp) in &now {
                if seen_pods.get(path).map(|(s, _)| s) != Some(stamp) {
                    if let Some(pod) = read::<Pod>(path) {
                        let pod = Arc::new(pod);
                        events.push(SourceEvent::Pod(pod.clone()));
                        seen_pods.insert(path.clone(), (*stamp, pod));
                    }
                }
            }
            let gone: Vec<PathBuf> = seen_pods
                .keys()
                .filter(|p| !now.contains_key(*p))
                .cloned()
                .collect();
            for p in gone {
                if let Some((_, pod)) = seen_pods.remove(&p) {
                    events.push(SourceEvent::PodDeleted(pod));
                }
            }
            if !synced {
                events.push(SourceEvent::Synced);
                synced = true;
            }
            for e in events {
                if sink.send(e).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<Found>, String> {
        let pods = list(&self.dir.join("pods"));
        for path in pods.keys() {
            let Some(pod) = read::<Pod>(path) else {
                continue;
            };
            if pod.metadata.namespace.as_deref() == Some(namespace)
                && pod.metadata.name.as_deref() == Some(name)
            {
                let labels = list(&self.dir.join("namespaces"))
                    .keys()
                    .filter_map(|p| read::<Namespace>(p))
                    .map(|ns| ns_labels(&ns))
                    .find(|(n, _)| n == namespace)
                    .map(|(_, l)| l)
                    .unwrap_or_default();
                return Ok(Some(Found {
                    pod: Arc::new(pod),
                    namespace_labels: labels,
                }));
            }
        }
        Ok(None)
    }
}
