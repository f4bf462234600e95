//! Where Istio's golden files are: `shared/testdata/istio-goldens` beside the checkout
//! (CI and development machines), or `ISTIO_GOLDENS_DIR`.
#![allow(dead_code)]

use std::path::PathBuf;

/// Directory of Istio's golden files (it may not exist).
pub fn goldens() -> PathBuf {
    match std::env::var_os("ISTIO_GOLDENS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/istio-goldens")
        }
    }
}

/// True when the goldens are there; otherwise prints why `test` is skipped (a clone of the
/// repository alone has no goldens) and returns false. Panics under `CI`, which has them.
pub fn have_goldens(test: &str) -> bool {
    let dir = goldens();
    if dir.join("nftables").is_dir() && dir.join("iptables").is_dir() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: Istio's goldens are missing at {} (CI must have them)",
        dir.display()
    );
    eprintln!(
        "skipped {test}: Istio's goldens not found at {} (set ISTIO_GOLDENS_DIR); \
         our own rendered rules are still pinned by tests/snapshots",
        dir.display()
    );
    false
}

/// Directory of Istio's sidecar-mode CNI goldens: `istio-goldens-sidecar` beside
/// [`goldens`], or `ISTIO_SIDECAR_GOLDENS_DIR`.
pub fn sidecar_goldens() -> PathBuf {
    match std::env::var_os("ISTIO_SIDECAR_GOLDENS_DIR") {
        Some(d) => PathBuf::from(d),
        None => goldens().join("../istio-goldens-sidecar"),
    }
}

/// Like [`have_goldens`] for [`sidecar_goldens`].
pub fn have_sidecar_goldens(test: &str) -> bool {
    let dir = sidecar_goldens();
    if dir.join("basic.txt.golden").is_file() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: Istio's sidecar goldens are missing at {} (CI must have them)",
        dir.display()
    );
    eprintln!(
        "skipped {test}: Istio's sidecar goldens not found at {} (set ISTIO_SIDECAR_GOLDENS_DIR)",
        dir.display()
    );
    false
}
