//! Uninstall or upgrade? Decided at SIGTERM from the agent's own DaemonSet, as Istio's node
//! agent does: while the DaemonSet exists and is not being deleted, a stopping agent is an
//! upgrade (or a reboot, a drain, a crash loop) and leaves the plugin and its conflist entry in
//! place; otherwise it is an uninstall and removes them.
//!
//! Anything but "present" means uninstall, API errors included. Of the two mistakes, a
//! left-behind entry with no agent fails every new pod outside the excluded namespaces on the
//! node, for good; a removed entry during an upgrade lets pods start uncaptured until the next
//! agent (a few seconds later) reinstalls it and enrols them. And `helm uninstall` may delete
//! our ServiceAccount or Role before the pods stop, so an uninstall often *looks like* a 401/403.

use std::time::{Duration, Instant};

use ambient_cni_install::ShutdownMode;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};
use tracing::{info, warn};

/// How long the decision may take in all (the installer gets 5 s after SIGTERM).
pub const DECIDE_BUDGET: Duration = Duration::from_secs(3);
/// Pause between attempts while the API cannot be reached.
const RETRY: Duration = Duration::from_millis(250);

/// What the API server said about our DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonSetState {
    /// It exists and is not being deleted.
    Present,
    /// It exists with a deletion timestamp (foreground deletion, finalizers).
    Deleting,
    /// 404: deleted.
    Absent,
    /// 401/403 or another client error: our credentials or RBAC are gone (uninstall order).
    Refused(String),
    /// No answer (connection, timeout, 5xx, 429): unknown, worth another try.
    Unreachable(String),
}

/// What to do with the installed plugin for what the API said.
pub fn decide(state: &DaemonSetState) -> ShutdownMode {
    match state {
        DaemonSetState::Present => ShutdownMode::Upgrade,
        DaemonSetState::Deleting
        | DaemonSetState::Absent
        | DaemonSetState::Refused(_)
        | DaemonSetState::Unreachable(_) => ShutdownMode::Uninstall,
    }
}

/// The state for a `get` answer: the object (`None` = 404), or the error's HTTP status
/// (`None` when no response came) and text.
pub fn classify(got: Result<Option<&DaemonSet>, (Option<u16>, String)>) -> DaemonSetState {
    match got {
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => DaemonSetState::Deleting,
        Ok(Some(_)) => DaemonSetState::Present,
        Ok(None) => DaemonSetState::Absent,
        Err((Some(404), _)) => DaemonSetState::Absent,
        Err((Some(code), msg)) if code == 429 || code >= 500 => {
            DaemonSetState::Unreachable(format!("HTTP {code}: {msg}"))
        }
        Err((Some(code), msg)) => DaemonSetState::Refused(format!("HTTP {code}: {msg}")),
        Err((None, msg)) => DaemonSetState::Unreachable(msg),
    }
}

/// Asks for DaemonSet `namespace/name` until the answer is definite or `budget` is spent.
pub async fn lookup(
    client: Client,
    namespace: &str,
    name: &str,
    budget: Duration,
) -> DaemonSetState {
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    let deadline = Instant::now() + budget;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let state = match tokio::time::timeout(left, api.get_opt(name)).await {
            Ok(Ok(got)) => classify(Ok(got.as_ref())),
            Ok(Err(kube::Error::Api(s))) => classify(Err((Some(s.code), s.message.clone()))),
            Ok(Err(e)) => classify(Err((None, crate::kube_api::chain(&e)))),
            Err(_) => DaemonSetState::Unreachable(format!("no answer within {budget:?}")),
        };
        if !matches!(state, DaemonSetState::Unreachable(_)) || Instant::now() + RETRY >= deadline {
            return state;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// The shutdown mode for this stop: asks the API when there is one and the agent knows its
/// DaemonSet; without either (local pod source, `DAEMONSET_NAME` empty) it keeps everything.
pub async fn at_stop(client: Option<Client>, namespace: &str, name: Option<&str>) -> ShutdownMode {
    let (Some(client), Some(name)) = (client, name) else {
        info!("stopping outside a DaemonSet (no Kubernetes API or DAEMONSET_NAME empty): leaving the plugin installed");
        return ShutdownMode::Upgrade;
    };
    let state = lookup(client, namespace, name, DECIDE_BUDGET).await;
    let mode = decide(&state);
    match (&state, mode) {
        (_, ShutdownMode::Upgrade) => {
            info!(daemonset = %format!("{namespace}/{name}"), "stopping while our DaemonSet is in place: upgrade or restart, leaving the plugin installed")
        }
        (DaemonSetState::Refused(why) | DaemonSetState::Unreachable(why), _) => {
            warn!(daemonset = %format!("{namespace}/{name}"), error = %why, "cannot read our DaemonSet while stopping: treating this as an uninstall (removing the plugin and its conflist entry)")
        }
        (st, _) => {
            info!(daemonset = %format!("{namespace}/{name}"), state = ?st, "our DaemonSet is gone or being deleted: uninstalling")
        }
    }
    mode
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_cni_install::ShutdownMode::{Uninstall, Upgrade};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ds(deleting: bool) -> DaemonSet {
        let mut d = DaemonSet::default();
        d.metadata.name = Some("ambient-cni-node".into());
        if deleting {
            d.metadata.deletion_timestamp = Some(Time(Default::default()));
        }
        d
    }

    #[test]
    fn only_a_present_daemonset_keeps_the_plugin() {
        let (live, dying) = (ds(false), ds(true));
        let err = |code: Option<u16>| Err((code, "x".to_owned()));
        let table: Vec<(&str, DaemonSetState, ShutdownMode)> = vec![
            ("present", classify(Ok(Some(&live))), Upgrade),
            ("deleting", classify(Ok(Some(&dying))), Uninstall),
            ("absent", classify(Ok(None)), Uninstall),
            ("404", classify(err(Some(404))), Uninstall),
            ("403: Role gone", classify(err(Some(403))), Uninstall),
            (
                "401: ServiceAccount gone",
                classify(err(Some(401))),
                Uninstall,
            ),
            ("500", classify(err(Some(500))), Uninstall),
            ("429", classify(err(Some(429))), Uninstall),
            ("no connection", classify(err(None)), Uninstall),
        ];
        for (what, state, want) in &table {
            assert_eq!(decide(state), *want, "{what}: {state:?}");
        }
        assert_eq!(table[0].1, DaemonSetState::Present);
        assert_eq!(table[1].1, DaemonSetState::Deleting);
        assert_eq!(table[3].1, DaemonSetState::Absent);
        assert!(matches!(table[4].1, DaemonSetState::Refused(_)));
        assert!(matches!(table[5].1, DaemonSetState::Refused(_)));
        // Only "no answer" is retried; the rest are definite.
        for (what, state, _) in &table {
            let retried = matches!(state, DaemonSetState::Unreachable(_));
            assert_eq!(
                retried,
                ["500", "429", "no connection"].contains(what),
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn without_an_api_or_a_name_everything_stays() {
        assert_eq!(
            at_stop(None, "istio-system", Some("ambient-cni-node")).await,
            Upgrade
        );
    }

    #[tokio::test]
    async fn an_unreachable_api_is_retried_within_the_budget_then_uninstalls() {
        // A port that refuses connections: every attempt fails fast, the budget bounds them.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = Client::try_from(cfg).unwrap();
        let t = Instant::now();
        let state = lookup(client, "ns", "ds", Duration::from_millis(800)).await;
        assert!(matches!(state, DaemonSetState::Unreachable(_)), "{state:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(decide(&state), Uninstall);
    }
}
