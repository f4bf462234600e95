//! Finding a pod's netns: opening a path the runtime or a record gave, or scanning the
//! host's /proc for the pod's processes. Never the host's own netns.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use iptables_rules::netns::{Netns, NetnsError, NsId};

/// Opens pod netns (blocking: call off the runtime workers).
pub trait NetnsFinder: Send + Sync {
    /// Opens the netns at `path` (refused when it is the host's).
    fn open(&self, path: &Path) -> Result<Netns, NetnsError>;
    /// The netns of each wanted pod (uid → its IPs) whose processes are found.
    fn scan(&self, wanted: &HashMap<String, Vec<IpAddr>>) -> HashMap<String, Netns>;
}

/// The host's netns finder: paths are opened as they are, scans read `host_proc`.
#[derive(Debug, Clone)]
pub struct HostNetns {
    host_proc: PathBuf,
    host: NsId,
}

impl HostNetns {
    /// A finder over the host's /proc at `host_proc`, whose own netns is `host`.
    pub fn new(host_proc: PathBuf, host: NsId) -> Self {
        Self { host_proc, host }
    }
}

impl NetnsFinder for HostNetns {
    fn open(&self, path: &Path) -> Result<Netns, NetnsError> {
        Netns::open(path, Some(self.host))
    }
    fn scan(&self, wanted: &HashMap<String, Vec<IpAddr>>) -> HashMap<String, Netns> {
        crate::discovery::scan::scan_for_pods(&self.host_proc, wanted, self.host)
    }
}
