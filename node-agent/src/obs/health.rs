//! The health port (`:8000`): `/healthz` answers 200 while the process serves at
//! all; `/readyz` answers 200 only when every readiness condition holds, else 503
//! with the failing conditions listed.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::http::{self, Handler, HttpError, Reply};

/// The pod source delivered its first full listing and state was rebuilt from it.
pub const POD_SOURCE_SYNCED: &str = "pod_source_synced";
/// The plugin socket is bound and served.
pub const PLUGIN_SOCKET_SERVING: &str = "plugin_socket_serving";
/// The plugin binary and its conflist entry are in place (installer in its watch loop).
pub const INSTALL_IN_PLACE: &str = "install_in_place";

/// A condition's value: a flag set by its owner, or a check evaluated on each probe.
#[derive(Clone)]
enum Source {
    Flag(Arc<AtomicBool>),
    Check(Arc<dyn Fn() -> bool + Send + Sync>),
}

impl Source {
    fn get(&self) -> bool {
        match self {
            Source::Flag(f) => f.load(Ordering::Acquire),
            Source::Check(f) => f(),
        }
    }
}

/// The agent's named readiness conditions (cheap to clone; clones share state).
#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<RwLock<BTreeMap<String, Source>>>,
    /// Why a condition fails, where its owner can say (shown by `/readyz`).
    reasons: Arc<RwLock<BTreeMap<String, Reason>>>,
}

type Reason = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.snapshot()).finish()
    }
}

impl Readiness {
    /// Conditions `names`, all false until set.
    pub fn new(names: &[&str]) -> Self {
        let r = Self::default();
        for n in names {
            r.set(n, false);
        }
        r
    }

    /// The agent's conditions: pod source synced, plugin socket serving, install in place.
    pub fn agent() -> Self {
        Self::new(&[POD_SOURCE_SYNCED, PLUGIN_SOCKET_SERVING, INSTALL_IN_PLACE])
    }

    /// Sets condition `name` (declaring it if new).
    pub fn set(&self, name: &str, value: bool) {
        let mut c = self.conditions.write().unwrap_or_else(|e| e.into_inner());
        match c.get(name) {
            Some(Source::Flag(f)) => f.store(value, Ordering::Release),
            _ => {
                c.insert(
                    name.to_owned(),
                    Source::Flag(Arc::new(AtomicBool::new(value))),
                );
            }
        }
    }

    /// Makes condition `name` a check evaluated at every probe (e.g. `controller.is_ready()`).
    pub fn check(&self, name: &str, f: impl Fn() -> bool + Send + Sync + 'static) {
        self.conditions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), Source::Check(Arc::new(f)));
    }

    /// Gives condition `name` a reason `/readyz` shows while it fails.
    pub fn explain(&self, name: &str, why: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.reasons
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), Arc::new(why));
    }

    /// The reason given for condition `name`, if any.
    pub fn reason(&self, name: &str) -> Option<String> {
        let why = self
            .reasons
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        why.and_then(|f| f())
    }

    /// Every condition and its current value, by name.
    pub fn snapshot(&self) -> Vec<(String, bool)> {
        let sources: Vec<(String, Source)> = self
            .conditions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Checks run outside the lock: they may take their own locks.
        sources.into_iter().map(|(k, s)| (k, s.get())).collect()
    }

    /// The names of the conditions that do not hold, sorted.
    pub fn failing(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(k, _)| k)
            .collect()
    }

    /// True when every condition holds.
    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }
}

/// The `/readyz` answer for the current conditions.
pub fn readyz(readiness: &Readiness) -> Reply {
    let failing = readiness.failing();
    if failing.is_empty() {
        Reply::text(200, "ready\n")
    } else {
        let shown: Vec<String> = failing
            .into_iter()
            .map(|name| match readiness.reason(&name) {
                Some(why) => format!("{name} ({why})"),
                None => name,
            })
            .collect();
        Reply::text(503, format!("not ready: {}\n", shown.join(", ")))
    }
}

/// The health port's handler.
pub fn handler(readiness: Readiness) -> Handler {
    Arc::new(move |path: &str| match path {
        "/healthz" => Reply::text(200, "ok\n"),
        "/readyz" => readyz(&readiness),
        other => Reply::not_found(other),
    })
}

/// Binds `addr` and serves `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve_health(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HttpError> {
    let listener = http::bind(addr).await?;
    http::serve(
        listener,
        "health",
        handler(readiness),
        http::Limits::HEALTH,
        shutdown,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ready_only_when_every_condition_holds() {
        let r = Readiness::agent();
        assert_eq!(
            r.failing(),
            vec![INSTALL_IN_PLACE, PLUGIN_SOCKET_SERVING, POD_SOURCE_SYNCED]
        );
        r.set(POD_SOURCE_SYNCED, true);
        r.set(PLUGIN_SOCKET_SERVING, true);
        assert_eq!(
            readyz(&r),
            Reply::text(503, "not ready: install_in_place\n")
        );
        // A failing condition shows its owner's reason, if it gives one.
        let why = Arc::new(std::sync::Mutex::new(Some(
            "istio-cni is chained".to_owned(),
        )));
        let w = why.clone();
        r.explain(INSTALL_IN_PLACE, move || w.lock().unwrap().clone());
        assert_eq!(
            readyz(&r),
            Reply::text(503, "not ready: install_in_place (istio-cni is chained)\n")
        );
        *why.lock().unwrap() = None;
        assert_eq!(
            readyz(&r),
            Reply::text(503, "not ready: install_in_place\n")
        );
        r.set(INSTALL_IN_PLACE, true);
        assert!(r.is_ready());
        assert_eq!(readyz(&r).status, 200);
        // A repair in progress makes the agent unready again.
        r.clone().set(INSTALL_IN_PLACE, false);
        assert!(!r.is_ready());
    }

    #[test]
    fn checks_are_evaluated_at_probe_time() {
        let r = Readiness::new(&[]);
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        r.check(POD_SOURCE_SYNCED, move || f.load(Ordering::Acquire));
        assert_eq!(r.failing(), vec![POD_SOURCE_SYNCED]);
        flag.store(true, Ordering::Release);
        assert!(r.is_ready());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_healthz_and_readyz_over_http() {
        let r = Readiness::new(&["a", "b"]);
        let listener = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(http::serve(
            listener,
            "health",
            handler(r.clone()),
            http::Limits::HEALTH,
            async {
                let _ = stopped.await;
            },
        ));
        let get = move |p: &'static str| {
            tokio::task::spawn_blocking(move || {
                ambient_cni_tests::http::get(addr, p, Duration::from_secs(5)).unwrap()
            })
        };
        assert_eq!(get("/healthz").await.unwrap(), (200, "ok\n".into()));
        assert_eq!(
            get("/readyz").await.unwrap(),
            (503, "not ready: a, b\n".into())
        );
        r.set("a", true);
        assert_eq!(
            get("/readyz").await.unwrap(),
            (503, "not ready: b\n".into())
        );
        r.set("b", true);
        assert_eq!(get("/readyz").await.unwrap(), (200, "ready\n".into()));
        assert_eq!(get("/other").await.unwrap().0, 404);
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve_health(addr, Readiness::default(), async {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
