//! The Kubernetes API, in one place: the pod source (this node's pods and all namespaces,
//! watched) and the pod status writer (the redirection annotation and events), over one
//! client configuration.

pub mod pods;
pub mod status;

use kube::Client;

/// A client from `KUBECONFIG` (or `~/.kube/config`), else the in-cluster service account.
pub async fn client_from_env() -> anyhow::Result<Client> {
    let config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes client configuration (KUBECONFIG or in-cluster): {e}")
    })?;
    Client::try_from(config).map_err(|e| anyhow::anyhow!("cannot build the Kubernetes client: {e}"))
}

/// An error with its causes ("client error (Connect): ... Connection refused").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        // Wrappers often repeat their cause's text.
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}
