//! What ADD does when the agent does not answer: pass a pod through only if the agent's
//! decisions file, fresh enough, says the pod is not in the mesh; fail closed otherwise.

use ambient_cni_api::decisions::{Decisions, PodKey};

use crate::env::PodArgs;

/// A file written this far in the future (by this host's clock) is not trusted.
const FUTURE_SLACK_S: u64 = 60;

/// Which way a fallback went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// The pod starts without the agent; the reason says which fact allowed it.
    PassThrough(&'static str),
    /// The pod fails (closed); the reason says why the file did not allow it.
    FailClosed(String),
}

/// Decides from the decisions file's bytes (or why it could not be read), the current
/// time and the conf's `decisions_max_age_s` (0: never pass through).
pub fn decide(
    file: Result<Vec<u8>, String>,
    now_s: u64,
    max_age_s: u64,
    pod: &PodArgs,
) -> Fallback {
    if max_age_s == 0 {
        return Fallback::FailClosed("fallback disabled (decisions_max_age_s is 0)".into());
    }
    let bytes = match file {
        Ok(b) => b,
        Err(e) => return Fallback::FailClosed(format!("no decisions file: {e}")),
    };
    let d = match Decisions::parse(&bytes) {
        Ok(d) => d,
        Err(e) => return Fallback::FailClosed(format!("decisions file refused: {e}")),
    };
    if d.written_at > now_s.saturating_add(FUTURE_SLACK_S) {
        return Fallback::FailClosed(format!(
            "decisions file written in the future ({} s from now)",
            d.written_at - now_s
        ));
    }
    let age = now_s.saturating_sub(d.written_at);
    if age > max_age_s {
        return Fallback::FailClosed(format!(
            "decisions file is stale ({age} s old, decisions_max_age_s {max_age_s})"
        ));
    }
    let (Some(ns), Some(name)) = (pod.namespace.as_deref(), pod.name.as_deref()) else {
        return Fallback::FailClosed("no pod namespace/name".into());
    };
    if d.namespaces.iter().any(|n| n == ns) {
        return Fallback::PassThrough("namespace cannot be in the mesh");
    }
    // The uid makes sure this is the pod the agent saw, not a namesake created since.
    let Some(uid) = pod.uid.as_deref() else {
        return Fallback::FailClosed("no K8S_POD_UID in CNI_ARGS".into());
    };
    let key = PodKey {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
    };
    if d.pods.contains(&key) {
        Fallback::PassThrough("pod known not to be in the mesh")
    } else {
        Fallback::FailClosed("pod not known to be outside the mesh".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_cni_api::decisions::VERSION;

    const NOW: u64 = 1_700_000_000;

    fn file(written_at: u64) -> Vec<u8> {
        Decisions {
            version: VERSION,
            written_at,
            namespaces: vec!["infra".into()],
            pods: vec![PodKey {
                namespace: "plain".into(),
                name: "web".into(),
                uid: "u1".into(),
            }],
        }
        .to_json()
    }

    fn pod(ns: &str, name: &str, uid: Option<&str>) -> PodArgs {
        PodArgs {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: uid.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let fresh = file(NOW - 30);
        let known = pod("plain", "web", Some("u1"));
        let pass = |r| Fallback::PassThrough(r);
        /// (what, the file or why it is missing, decisions_max_age_s, pod, expected; None = fail closed)
        type Case = (
            &'static str,
            Result<Vec<u8>, String>,
            u64,
            PodArgs,
            Option<Fallback>,
        );
        let cases: Vec<Case> = vec![
            (
                "known pod",
                Ok(fresh.clone()),
                600,
                known.clone(),
                Some(pass("pod known not to be in the mesh")),
            ),
            (
                "closed namespace",
                Ok(fresh.clone()),
                600,
                pod("infra", "x", None),
                Some(pass("namespace cannot be in the mesh")),
            ),
            (
                "namesake (other uid)",
                Ok(fresh.clone()),
                600,
                pod("plain", "web", Some("u2")),
                None,
            ),
            (
                "no uid",
                Ok(fresh.clone()),
                600,
                pod("plain", "web", None),
                None,
            ),
            (
                "unknown pod",
                Ok(fresh.clone()),
                600,
                pod("plain", "new", Some("u3")),
                None,
            ),
            (
                "other namespace",
                Ok(fresh.clone()),
                600,
                pod("mesh", "web", Some("u1")),
                None,
            ),
            ("disabled", Ok(fresh.clone()), 0, known.clone(), None),
            (
                "absent",
                Err("No such file".into()),
                600,
                known.clone(),
                None,
            ),
            ("stale", Ok(file(NOW - 601)), 600, known.clone(), None),
            (
                "just fresh",
                Ok(file(NOW - 600)),
                600,
                known.clone(),
                Some(pass("pod known not to be in the mesh")),
            ),
            ("future", Ok(file(NOW + 3600)), 600, known.clone(), None),
            (
                "corrupt",
                Ok(b"{\"version\":1,".to_vec()),
                600,
                known.clone(),
                None,
            ),
            (
                "truncated",
                Ok(fresh[..fresh.len() - 3].to_vec()),
                600,
                known.clone(),
                None,
            ),
            (
                "wrong version",
                Ok(String::from_utf8(fresh.clone())
                    .unwrap()
                    .replace("\"version\":1", "\"version\":9")
                    .into_bytes()),
                600,
                known.clone(),
                None,
            ),
            (
                "oversized",
                Ok(vec![b' '; ambient_cni_api::decisions::MAX_BYTES + 1]),
                600,
                known.clone(),
                None,
            ),
        ];
        for (what, bytes, max_age, p, want) in cases {
            let got = decide(bytes, NOW, max_age, &p);
            match want {
                Some(w) => assert_eq!(got, w, "{what}"),
                None => assert!(matches!(got, Fallback::FailClosed(_)), "{what}: {got:?}"),
            }
        }
    }
}
