//! In-memory fakes of the enroller's effects, for unit tests without root: each records
//! its calls, in order, in one shared [`CallLog`], and can be told to fail.
//! A fake netns is this process's own netns (nsfs, openable by any user), labelled with
//! the path asked for; paths marked gone fail with `NotFound`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::backend::{BackendKind, Installed};
use iptables_rules::config::InpodConfig;
use iptables_rules::netns::{Netns, NetnsError};
use iptables_rules::redirector::Report;
use iptables_rules::route::RouteState;

use super::enroller::{Effects, Enroller};
use super::hooks::{ProbeSet, StatusWriter};
use super::metrics::EnrolMetrics;
use super::netns::NetnsFinder;
use super::persist::{Record, RecordStore};
use super::rules::PodRules;
use super::table::Table;
use super::ztunnel::Ztunnel;
use crate::pods::PodId;

/// The calls made to every fake, in order (`"step uid"` strings).
#[derive(Debug, Default)]
pub struct CallLog(Mutex<Vec<String>>);

impl CallLog {
    fn push(&self, call: String) {
        self.0.lock().unwrap().push(call);
    }
    /// Every call so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// The calls so far whose text starts with `prefix`.
    pub fn starting(&self, prefix: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    }
    /// Forgets the calls so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// The inode of every fake netns (this process's netns).
pub fn fake_netns_ino() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

fn own_netns(label: &str) -> Netns {
    let f = std::fs::File::open("/proc/self/ns/net").unwrap();
    Netns::from_fd(f.into(), label).unwrap()
}

/// Opens any path as a fake netns, except those marked gone; scans find the pods marked running.
#[derive(Debug, Default)]
pub struct FakeNetns {
    log: Arc<CallLog>,
    /// Paths that no longer exist.
    pub gone: Mutex<HashSet<String>>,
    /// Pods whose processes a /proc scan finds.
    pub running: Mutex<HashSet<String>>,
}

impl NetnsFinder for FakeNetns {
    fn open(&self, path: &Path) -> Result<Netns, NetnsError> {
        let p = path.display().to_string();
        self.log.push(format!("netns {p}"));
        if self.gone.lock().unwrap().contains(&p) {
            return Err(NetnsError::Open {
                path: path.to_owned(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(own_netns(&p))
    }
    fn scan(&self, wanted: &HashMap<String, Vec<IpAddr>>) -> HashMap<String, Netns> {
        let running = self.running.lock().unwrap();
        let mut uids: Vec<&String> = wanted.keys().collect();
        uids.sort();
        uids.into_iter()
            .inspect(|uid| self.log.push(format!("scan {uid}")))
            .filter(|uid| running.contains(*uid))
            .map(|uid| (uid.clone(), own_netns(&format!("/proc/1/ns/net#{uid}"))))
            .collect()
    }
}

/// Rules that only record: `apply uid`, `remove uid`, `show uid` (uid: the netns label).
#[derive(Debug, Default)]
pub struct FakeRules {
    log: Arc<CallLog>,
    /// `apply` fails while set.
    pub fail_apply: AtomicBool,
    /// `remove` fails while set.
    pub fail_remove: AtomicBool,
}

impl PodRules for FakeRules {
    fn backend(&self) -> &'static str {
        "nftables"
    }
    fn apply(&self, ns: &Netns, _: &InpodConfig) -> Result<(), String> {
        self.log.push(format!("rules apply {}", ns.label()));
        if self.fail_apply.load(Ordering::SeqCst) {
            return Err(format!("netns {}: apply refused (fake)", ns.label()));
        }
        Ok(())
    }
    fn remove(&self, ns: &Netns, _: &InpodConfig) -> Result<(), String> {
        self.log.push(format!("rules remove {}", ns.label()));
        if self.fail_remove.load(Ordering::SeqCst) {
            return Err(format!("netns {}: remove refused (fake)", ns.label()));
        }
        Ok(())
    }
    fn show(&self, ns: &Netns, _: &InpodConfig) -> Result<Report, String> {
        self.log.push(format!("rules show {}", ns.label()));
        Ok(Report {
            netns: ns.label().to_owned(),
            installed: Installed {
                backend: BackendKind::Nftables,
                sections: Vec::new(),
                matches_expected: true,
                drift: Vec::new(),
            },
            route: RouteState::default(),
            complete: true,
        })
    }
}

/// A ztunnel that acks (or nacks while `nack` is set): `ztunnel add uid`, `ztunnel del uid`.
#[derive(Debug)]
pub struct FakeZtunnel {
    log: Arc<CallLog>,
    /// AddWorkload is refused while set.
    pub nack: AtomicBool,
    /// Connections reported.
    pub connections: AtomicUsize,
}

#[tonic::async_trait]
impl Ztunnel for FakeZtunnel {
    async fn add_workload(&self, uid: &str, _: WorkloadInfo, _: &Netns) -> Result<(), String> {
        self.log.push(format!("ztunnel add {uid}"));
        if self.nack.load(Ordering::SeqCst) {
            return Err("ztunnel nacked AddWorkload (fake)".into());
        }
        Ok(())
    }
    async fn del_workload(&self, uid: &str) -> Result<(), String> {
        self.log.push(format!("ztunnel del {uid}"));
        Ok(())
    }
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A probe set that records: `probes upsert uid`, `probes remove uid`, `probes resync uid,uid`.
#[derive(Debug, Default)]
pub struct FakeProbes {
    log: Arc<CallLog>,
}

impl ProbeSet for FakeProbes {
    fn upsert(&self, uid: &str, _: &[IpAddr]) -> Result<(), String> {
        self.log.push(format!("probes upsert {uid}"));
        Ok(())
    }
    fn remove(&self, uid: &str) -> Result<(), String> {
        self.log.push(format!("probes remove {uid}"));
        Ok(())
    }
    fn resync(&self, held: &[(String, Vec<IpAddr>)]) -> Result<(), String> {
        let uids: Vec<&str> = held.iter().map(|(u, _)| u.as_str()).collect();
        self.log.push(format!("probes resync {}", uids.join(",")));
        Ok(())
    }
}

/// A status writer that records: `status uid value` (`-` when cleared), `event uid reason`.
#[derive(Debug, Default)]
pub struct FakeStatus {
    log: Arc<CallLog>,
}

#[tonic::async_trait]
impl StatusWriter for FakeStatus {
    async fn set(&self, pod: &PodId, value: Option<&'static str>) -> Result<(), String> {
        self.log
            .push(format!("status {} {}", pod.uid, value.unwrap_or("-")));
        Ok(())
    }
    async fn event(&self, pod: &PodId, reason: &str, _: &str) -> Result<(), String> {
        self.log.push(format!("event {} {reason}", pod.uid));
        Ok(())
    }
}

/// Records in memory: `record save uid`, `record remove uid`.
#[derive(Debug, Default)]
pub struct FakeStore {
    log: Arc<CallLog>,
    /// The records, by uid.
    pub records: Mutex<BTreeMap<String, Record>>,
}

impl RecordStore for FakeStore {
    fn save(&self, rec: &Record) -> std::io::Result<()> {
        self.log.push(format!("record save {}", rec.uid));
        self.records
            .lock()
            .unwrap()
            .insert(rec.uid.clone(), rec.clone());
        Ok(())
    }
    fn remove(&self, uid: &str) {
        self.log.push(format!("record remove {uid}"));
        self.records.lock().unwrap().remove(uid);
    }
    fn load_all(&self) -> Vec<Record> {
        self.records.lock().unwrap().values().cloned().collect()
    }
}

/// Every fake, sharing one log.
pub struct Fakes {
    /// The calls, in order.
    pub log: Arc<CallLog>,
    /// Netns finder.
    pub netns: Arc<FakeNetns>,
    /// Rules.
    pub rules: Arc<FakeRules>,
    /// ztunnel (one connection, acking).
    pub ztunnel: Arc<FakeZtunnel>,
    /// Probe set.
    pub probes: Arc<FakeProbes>,
    /// Status writer.
    pub status: Arc<FakeStatus>,
    /// Record store.
    pub store: Arc<FakeStore>,
}

impl Default for Fakes {
    fn default() -> Self {
        Self::new()
    }
}

impl Fakes {
    /// Fresh fakes: nothing fails, one ztunnel connected.
    pub fn new() -> Self {
        let log = Arc::new(CallLog::default());
        Self {
            netns: Arc::new(FakeNetns {
                log: log.clone(),
                ..Default::default()
            }),
            rules: Arc::new(FakeRules {
                log: log.clone(),
                ..Default::default()
            }),
            ztunnel: Arc::new(FakeZtunnel {
                log: log.clone(),
                nack: AtomicBool::new(false),
                connections: AtomicUsize::new(1),
            }),
            probes: Arc::new(FakeProbes { log: log.clone() }),
            status: Arc::new(FakeStatus { log: log.clone() }),
            store: Arc::new(FakeStore {
                log: log.clone(),
                ..Default::default()
            }),
            log,
        }
    }

    /// An enroller over these fakes (ztunnel not yet set, as before a restart's rebuild).
    pub fn enroller(&self) -> Enroller {
        Enroller::new(
            Arc::new(Table::default()),
            Effects {
                netns: self.netns.clone(),
                rules: self.rules.clone(),
                probes: self.probes.clone(),
                status: self.status.clone(),
                store: self.store.clone(),
            },
            Arc::new(EnrolMetrics::new(&mut Default::default())),
        )
    }

    /// An enroller over these fakes with ztunnel connected.
    pub fn enroller_with_ztunnel(&self) -> Arc<Enroller> {
        let e = self.enroller();
        e.set_ztunnel(self.ztunnel.clone());
        Arc::new(e)
    }
}
