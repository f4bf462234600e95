//! The plugin's fallback counter: the plugin, short-lived and never scraped, appends one
//! byte per ADD the agent did not answer (`p` passed through, `f` failed closed) to a file
//! beside the agent socket; the agent takes the file on scrape and counts its bytes.

use std::io::Read;
use std::path::Path;

use ambient_cni_api::decisions::{
    FALLBACK_FAIL_CLOSED, FALLBACK_PASS_THROUGH, MAX_FALLBACKS_BYTES,
};
use tracing::warn;

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
