//! The installer: plugin binary copy and CNI conflist chaining with repair.
//!
//! - [`merge`]: pure text transforms of CNI configs (insert / convert / remove our entry,
//!   byte-for-byte preserving everything else).
//! - [`Installer`]: the file effects (atomic writes, binary copy, owned mode, uninstall) and the
//!   inotify watch/repair loop ([`Installer::watch_blocking`], or [`Installer::run`] for tokio).
//! - [`cli`]: clap flags for `ambient-cni-agent install|uninstall|run`.

pub mod cli;
pub mod discover;
pub mod entry;
pub mod error;
pub mod fsops;
mod installer;
pub mod json_span;
pub mod merge;
pub mod throttle;
mod watch;

pub use entry::PluginEntry;
pub use error::InstallError;
pub use installer::{
    BinaryOutcome, ConfigOutcome, InstallConfig, InstallOutcome, InstallStatus, Installer,
    InstallerStats, ShutdownMode, UninstallOutcome, DEFAULT_OWNED_CONF,
};
pub use watch::{StopSignal, RESYNC_INTERVAL};
