//! The plugin's fallback counter: the plugin, short-lived and never scraped, appends one
//! byte per ADD the agent did not answer (`p` passed through, `f` failed closed) to a file
//! beside the agent socket; the agent takes the file on scrape and counts its bytes.

use std::io::Read;
use std::path::Path;

use ambient_cni_api::decisions::{
    FALLBACK_FAIL_CLOSED, FALLBACK_PASS_THROUGH, MAX_FALLBACKS_BYTES,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// `ambient_cni_plugin_fallback_total{outcome}`, fed from the counter file at each scrape.
#[derive(Debug)]
pub struct FallbackMetrics {
    fallbacks: Family<OutcomeLabel, Counter>,
}

impl FallbackMetrics {
    /// Registers the fallback counter in `r` (both outcomes at 0).
    pub fn new(r: &mut Registry) -> Self {
        let fallbacks = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "ambient_cni_plugin_fallback",
            "Plugin ADDs the agent did not answer, by what the decisions file allowed (counted by the plugin, read on scrape)",
            fallbacks.clone(),
        );
        for outcome in ["pass_through", "fail_closed"] {
            let _ = fallbacks.get_or_create(&OutcomeLabel { outcome });
        }
        Self { fallbacks }
    }

    /// Plugin fallbacks counted since the last scrape: passed through, failed closed.
    pub fn add(&self, pass_through: u64, fail_closed: u64) {
        for (outcome, n) in [("pass_through", pass_through), ("fail_closed", fail_closed)] {
            self.fallbacks
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }
}

/// Counts (passed through, failed closed) in `bytes`; other bytes are ignored.
pub fn count(bytes: &[u8]) -> (u64, u64) {
    bytes.iter().fold((0, 0), |(p, f), b| match *b {
        FALLBACK_PASS_THROUGH => (p + 1, f),
        FALLBACK_FAIL_CLOSED => (p, f + 1),
        _ => (p, f),
    })
}

/// Takes the counter file at `path` (renamed away first, so the plugin starts a new one)
/// and returns its counts; (0, 0) when there is none. A plugin that opened the old file
/// just before the rename may append after it was read: that one count is lost.
pub fn consume(path: &Path) -> (u64, u64) {
    let taken = path.with_extension("taken");
    if let Err(e) = std::fs::rename(path, &taken) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot take the plugin fallback counter");
        }
        return (0, 0);
    }
    let mut bytes = Vec::new();
    let read = std::fs::File::open(&taken)
        .and_then(|f| f.take(MAX_FALLBACKS_BYTES + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        warn!(path = %taken.display(), error = %e, "cannot read the plugin fallback counter");
    }
    let _ = std::fs::remove_file(&taken);
    count(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_outcome_and_ignores_the_rest() {
        assert_eq!(count(b""), (0, 0));
        assert_eq!(count(b"ppfxp\n"), (3, 1));
    }

    #[test]
    fn consumes_the_file_once() {
        let dir = std::env::temp_dir().join(format!("acni-fallbacks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plugin-fallbacks");
        assert_eq!(consume(&path), (0, 0));
        std::fs::write(&path, b"pfp").unwrap();
        assert_eq!(consume(&path), (2, 1));
        assert_eq!(consume(&path), (0, 0), "counted once");
        assert!(
            std::fs::read_dir(&dir).unwrap().next().is_none(),
            "nothing left"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
