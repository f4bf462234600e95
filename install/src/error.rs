//! Installer errors; each names the file or directory that failed.

use std::io;
use std::path::PathBuf;

use crate::merge::MergeError;

/// An installer failure.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A filesystem operation failed.
    #[error("cannot {op} {}: {source}{}", path.display(), io_hint(source))]
    Io {
        /// What we were doing ("write", "rename", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A CNI config file we must edit cannot be edited.
    #[error("CNI config {}: {source}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: MergeError,
    },
    /// The owned conflist would not be the kubelet's choice.
    #[error(
        "owned CNI config {} would be ignored: {} sorts before it; pick a name that sorts first \
         (e.g. 00-ambient-cni.conflist)",
        owned.display(),
        first.display()
    )]
    OwnedNotFirst {
        /// Our owned file.
        owned: PathBuf,
        /// The file that wins over it.
        first: PathBuf,
    },
    /// `--cni-conf-name` names a file that is missing or not a usable config.
    #[error("CNI config {} (from --cni-conf-name) is not usable: {reason}", path.display())]
    NamedConf {
        /// The named file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A setting is invalid.
    #[error("invalid installer setting: {0}")]
    Setting(String),
}

impl InstallError {
    /// Wrap an io error with the operation and path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        InstallError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// A short remedy for the errors a misconfigured DaemonSet gives.
fn io_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EROFS) => {
            " (read-only filesystem: mount the host's CNI directories read-write into the agent)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (permission denied: the agent needs root / DAC_OVERRIDE on the host CNI directories)"
        }
        _ => "",
    }
}
