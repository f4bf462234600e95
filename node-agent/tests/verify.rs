//! The drift verifier against the real kernel (issue 19): a held pod in a real netns with the
//! real nftables rules and policy route, and the real host probe set, in a throw-away "host"
//! netns (the test's runtime thread `unshare`s one, so the node's own tables are never touched).
//! Each kind of tampering is found and repaired with the ADD's apply, counted, and reported as
//! an Event; a clean pod costs no write and no Event; an ADD/DEL holding the pod's lock wins;
//! the scheduled verifier repairs within one interval and a "verify now" request at once; a
//! kernel notification in the pod's netns (nf_tables, route/rule) verifies it at once, and our
//! own writes cost one read-only verification and nothing more; a pod whose netns was replaced
//! is found by the /proc scan, repaired there and re-announced.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ambient_cni_agent::mesh::enroller::{Effects, Enroller};
use ambient_cni_agent::mesh::hooks::StatusWriter;
use ambient_cni_agent::mesh::host_probe::NftProbeSet;
use ambient_cni_agent::mesh::metrics::EnrolMetrics;
use ambient_cni_agent::mesh::netns::HostNetns;
use ambient_cni_agent::mesh::persist::Store;
use ambient_cni_agent::mesh::table::{Held, Phase, Table};
use ambient_cni_agent::mesh::ztunnel::Ztunnel;
use ambient_cni_agent::pods::PodId;
use ambient_cni_agent::verify::metrics::VerifyMetrics;
use ambient_cni_agent::verify::outcome::Outcome;
use ambient_cni_agent::verify::pod::{verify_pod, EVENT_REASON};
use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::backend::{make, BackendKind};
use iptables_rules::drift::DriftKind;
use iptables_rules::kernel_writes::KernelWrites;
use iptables_rules::netns::Netns;
use iptables_rules::{HostProbeConfig, InpodConfig, Redirector};
use prometheus_client::registry::Registry;

const UID: &str = "0d7f5e1c-drift-test";

fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "verifier tests need root (CI is set)"
    );
    eprintln!("skipping: verifier tests need root");
    false
}

/// Records the Events the verifier posts (the local pod source posts none).
#[derive(Default)]
struct Events(Mutex<Vec<(String, String)>>);

#[tonic::async_trait]
impl StatusWriter for Events {
    async fn set(&self, _: &PodId, _: Option<&'static str>) -> Result<(), String> {
        Ok(())
    }
    async fn event(&self, _: &PodId, reason: &str, message: &str) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push((reason.to_owned(), message.to_owned()));
        Ok(())
    }
}

impl Events {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn last(&self) -> (String, String) {
        self.0.lock().unwrap().last().cloned().unwrap()
    }
}

/// Runs a command in `ns` (forked from a thread inside it); panics on failure.
fn sh(ns: &Netns, args: &[&str]) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = ns
        .run(move || Command::new(&args[0]).args(&args[1..]).output())
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command in the calling thread's netns (the test's "host").
fn host_sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Listeners (in the calling thread's netns) for every nf_tables and route/rule change:
/// anything they hear is a write to the kernel.
fn watch() -> KernelWrites {
    KernelWrites::open_here(None).unwrap()
}

/// Whether `w` heard a write since last asked (what it heard is discarded).
fn heard(w: &KernelWrites) -> bool {
    w.drain().unwrap()
}

/// Discards everything `w` heard so far.
fn drain(w: &KernelWrites) {
    heard(w);
}

struct Pod {
    _keep: OwnedFd,
    ns: Arc<Netns>,
    path: String,
}

/// A fresh pod netns with `lo` up, named by a `/proc/<pid>/fd/<n>` path we hold open.
fn pod_netns() -> Pod {
    let fd: OwnedFd = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::fs::File::open("/proc/thread-self/ns/net")
            .unwrap()
            .into()
    })
    .join()
    .unwrap();
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let ns = Arc::new(Netns::open(std::path::Path::new(&path), None).unwrap());
    sh(&ns, &["ip", "link", "set", "lo", "up"]);
    Pod {
        _keep: fd,
        ns,
        path,
    }
}

struct World {
    enroller: Arc<Enroller>,
    metrics: Arc<VerifyMetrics>,
    events: Arc<Events>,
    pod: Pod,
    ips: Vec<IpAddr>,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "acni-verify-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A held, enabled pod with its rules, route and probe-set entries in place.
async fn world() -> World {
    world_for(UID, pod_netns()).await
}

/// [`world`] for pod `uid` in `pod`.
async fn world_for(uid: &str, pod: Pod) -> World {
    let dir = tempdir::Dir::new();
    let mut reg = Registry::default();
    let enrol = Arc::new(EnrolMetrics::new(&mut reg));
    let metrics = Arc::new(VerifyMetrics::new(&mut reg));
    let probes = Arc::new(
        NftProbeSet::install(&HostProbeConfig {
            kubelet_uid: Some(1000),
            ..HostProbeConfig::default()
        })
        .unwrap(),
    );
    let events = Arc::new(Events::default());
    let enroller = Arc::new(Enroller::new(
        Arc::new(Table::default()),
        Effects {
            netns: Arc::new(HostNetns::new(
                "/proc".into(),
                Netns::host_id(std::path::Path::new("/proc")).unwrap(),
            )),
            rules: Arc::new(Redirector::new(make(BackendKind::Nftables).unwrap())),
            probes,
            status: events.clone(),
            store: Arc::new(Store::open(dir.0.join("pods")).unwrap()),
        },
        enrol,
    ));
    let ips: Vec<IpAddr> = vec!["10.77.0.5".parse().unwrap()];
    let held = Held {
        id: PodId {
            namespace: "mesh".into(),
            name: "web".into(),
            uid: uid.into(),
        },
        service_account: "sa".into(),
        netns: Some(pod.ns.clone()),
        netns_path: Some(pod.path.clone()),
        cfg: InpodConfig::default(),
        ips: ips.clone(),
        container_id: None,
        phase: Phase::Enabled,
        last_error: None,
        since: SystemTime::now(),
    };
    enroller.reapply(&held).await.unwrap();
    enroller.probes().upsert(uid, &ips).unwrap();
    enroller.table.put(held);
    World {
        enroller,
        metrics,
        events,
        pod,
        ips,
        _dir: dir,
    }
}

/// Runs `f` on a current-thread runtime in a fresh netns (the test's "host"): every thread the
/// runtime starts inherits it.
fn in_test_host<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .unwrap();
}

/// Tampers with `tamper`, verifies once: repaired as `kind`, one Event more; then clean.
async fn repaired(w: &World, name: &str, tamper: impl FnOnce(&World), kind: DriftKind) {
    let (before, events) = (w.metrics.repairs(kind), w.events.count());
    tamper(w);
    let out = verify_pod(&w.enroller, &w.metrics, UID).await.unwrap();
    assert!(
        matches!(&out, Outcome::Repaired { kinds, .. } if kinds == &vec![kind]),
        "{name}: {out:?}"
    );
    assert_eq!(w.metrics.repairs(kind), before + 1, "{name}");
    assert_eq!(w.events.count(), events + 1, "{name}");
    let (reason, msg) = w.events.last();
    assert_eq!(reason, EVENT_REASON);
    assert!(msg.contains("was repaired"), "{msg}");
    let again = verify_pod(&w.enroller, &w.metrics, UID).await.unwrap();
    assert_eq!(again, Outcome::Clean, "{name}: after the repair");
    eprintln!("{name}: {out}");
}

#[test]
fn every_kind_of_drift_is_found_and_repaired_and_clean_pods_cost_no_write() {
    if !root_or_skip() {
        return;
    }
    in_test_host(|| async {
        let w = world().await;
        // Nothing drifted: no repair, no Event, no write to the kernel (pod netns or host).
        let pod_watch = w.pod.ns.run(watch).unwrap();
        let host_watch = watch();
        for _ in 0..3 {
            let out = verify_pod(&w.enroller, &w.metrics, UID).await.unwrap();
            assert_eq!(out, Outcome::Clean);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!heard(&pod_watch), "a clean pass wrote in the pod netns");
        assert!(!heard(&host_watch), "a clean pass wrote in the host netns");
        assert_eq!(w.events.count(), 0);
        assert_eq!(w.metrics.verifications("clean"), 3);
        for k in DriftKind::ALL {
            assert_eq!(w.metrics.repairs(k), 0);
        }

        let nat = "istio-ambient-nat";
        repaired(
            &w,
            "flushed nft table",
            |w| sh(&w.pod.ns, &["nft", "flush", "table", "inet", nat]),
            DriftKind::Rules,
        )
        .await;
        repaired(
            &w,
            "nft flush ruleset",
            |w| sh(&w.pod.ns, &["nft", "flush", "ruleset"]),
            DriftKind::Rules,
        )
        .await;
        repaired(
            &w,
            "one rule replaced by another",
            |w| {
                let out = w
                    .pod
                    .ns
                    .run(|| {
                        Command::new("nft")
                            .args(["-a", "list", "chain", "inet", nat, "istio-output"])
                            .output()
                    })
                    .unwrap()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let handle = text
                    .lines()
                    .filter(|l| !l.contains("chain ") && !l.contains("type "))
                    .find_map(|l| l.split("# handle ").nth(1))
                    .unwrap()
                    .trim()
                    .to_owned();
                sh(
                    &w.pod.ns,
                    &[
                        "nft",
                        "replace",
                        "rule",
                        "inet",
                        nat,
                        "istio-output",
                        "handle",
                        &handle,
                        "tcp",
                        "dport",
                        "9",
                        "accept",
                    ],
                );
            },
            DriftKind::Rules,
        )
        .await;
        assert!(
            w.events.last().1.contains("replaced by"),
            "{:?}",
            w.events.last()
        );
        repaired(
            &w,
            "policy route deleted",
            |w| {
                sh(
                    &w.pod.ns,
                    &[
                        "ip",
                        "route",
                        "del",
                        "local",
                        "0.0.0.0/0",
                        "dev",
                        "lo",
                        "table",
                        "100",
                    ],
                )
            },
            DriftKind::Route,
        )
        .await;
        repaired(
            &w,
            "fwmark rule deleted",
            |w| {
                sh(
                    &w.pod.ns,
                    &[
                        "ip",
                        "rule",
                        "del",
                        "fwmark",
                        "0x111/0xfff",
                        "pref",
                        "32764",
                        "lookup",
                        "100",
                    ],
                )
            },
            DriftKind::FwmarkRule,
        )
        .await;
        repaired(
            &w,
            "probe-set element removed",
            |_| {
                host_sh(&[
                    "nft",
                    "delete",
                    "element",
                    "inet",
                    nat,
                    "istio-inpod-probes-v4",
                    "{ 10.77.0.5 }",
                ])
            },
            DriftKind::ProbeSet,
        )
        .await;
        assert_eq!(w.enroller.probes().check(UID, &w.ips).unwrap(), vec![]);

        // An ADD/DEL in flight holds the pod's lock: the verifier skips the pod, repairs nothing.
        let guard = w.enroller.try_pod_lock(UID).unwrap();
        sh(&w.pod.ns, &["nft", "flush", "table", "inet", nat]);
        assert_eq!(verify_pod(&w.enroller, &w.metrics, UID).await, None);
        drop(guard);
        assert!(matches!(
            verify_pod(&w.enroller, &w.metrics, UID).await,
            Some(Outcome::Repaired { .. })
        ));
    });
}

#[test]
fn scheduled_verifier_repairs_within_one_interval_and_on_request() {
    if !root_or_skip() {
        return;
    }
    in_test_host(|| async {
        let w = world().await;
        let interval = Duration::from_secs(1);
        ambient_cni_agent::verify::verifier::spawn(w.enroller.clone(), w.metrics.clone(), interval);
        // "Verify now" (a failed CHECK) is served at once, before the first scheduled pass.
        sh(
            &w.pod.ns,
            &["nft", "flush", "table", "inet", "istio-ambient-nat"],
        );
        let t0 = Instant::now();
        w.enroller.request_verify(UID);
        while w.metrics.repairs(DriftKind::Rules) < 1 {
            assert!(
                t0.elapsed() < Duration::from_millis(800),
                "not verified at once"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Scheduled passes: drift is repaired within one interval (plus the repair itself).
        tokio::time::sleep(Duration::from_millis(300)).await;
        sh(
            &w.pod.ns,
            &[
                "ip",
                "route",
                "del",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ],
        );
        let t1 = Instant::now();
        while w.metrics.repairs(DriftKind::Route) < 1 {
            assert!(
                t1.elapsed() < interval + Duration::from_millis(500),
                "not repaired within one interval"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let v = w
            .enroller
            .table
            .verified(UID)
            .expect("doctor's last verification");
        assert!(v.outcome.in_place(), "{:?}", v.outcome);
    });
}

/// Waits until `cond` holds, at most `within`; panics with `what` otherwise.
async fn within(within: Duration, what: &str, cond: impl Fn() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t0.elapsed()
}

#[test]
fn kernel_notification_verifies_at_once_and_a_clean_pod_stays_quiet() {
    if !root_or_skip() {
        return;
    }
    in_test_host(|| async {
        let w = world().await;
        // An interval no test outlives: only a notification (or a request) verifies.
        ambient_cni_agent::verify::verifier::spawn(
            w.enroller.clone(),
            w.metrics.clone(),
            Duration::from_secs(3600),
        );
        within(Duration::from_secs(2), "pod watched", || {
            w.metrics.watched_pods() == 1
        })
        .await;
        let clean = || w.metrics.verifications("clean");

        // Our own apply is heard: exactly one read-only verification, then quiet (no loop).
        let held = w.enroller.table.get(UID).unwrap();
        w.enroller.reapply(&held).await.unwrap();
        within(Duration::from_secs(1), "own apply verified", || {
            clean() == 1
        })
        .await;
        let pod_watch = w.pod.ns.run(watch).unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            !heard(&pod_watch),
            "the verification wrote in the pod netns"
        );
        assert_eq!(w.metrics.notifications(), 1);
        assert_eq!(clean(), 1);
        assert_eq!(w.events.count(), 0);

        // `nft flush ruleset` in the pod: repaired at once, then one clean echo and quiet.
        sh(&w.pod.ns, &["nft", "flush", "ruleset"]);
        let took = within(Duration::from_secs(1), "flush repaired", || {
            w.metrics.repairs(DriftKind::Rules) == 1
        })
        .await;
        eprintln!("nft flush ruleset repaired after {took:?}");
        within(Duration::from_secs(2), "repair's echo verified", || {
            clean() == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        drain(&pod_watch);
        let notes = w.metrics.notifications();

        // The policy route deleted: repaired at once.
        sh(
            &w.pod.ns,
            &[
                "ip",
                "route",
                "del",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ],
        );
        let took = within(Duration::from_secs(1), "route repaired", || {
            w.metrics.repairs(DriftKind::Route) == 1
        })
        .await;
        eprintln!("policy route repaired after {took:?}");
        within(Duration::from_secs(2), "repair's echo verified", || {
            clean() == 3
        })
        .await;

        // Settled: nothing more is verified, written, or notified.
        tokio::time::sleep(Duration::from_millis(700)).await;
        drain(&pod_watch);
        let notes_settled = w.metrics.notifications();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!heard(&pod_watch), "a settled pod saw a kernel write");
        assert_eq!(w.metrics.notifications(), notes_settled);
        assert_eq!(
            notes_settled,
            notes + 2,
            "the route repair: one burst and one echo"
        );
        assert_eq!(clean(), 3);
        assert_eq!(w.metrics.repairs(DriftKind::Rules), 1);
        assert_eq!(w.metrics.repairs(DriftKind::Route), 1);

        // Released: the watch closes with it.
        w.enroller.table.take(UID);
        within(Duration::from_secs(1), "watch closed", || {
            w.metrics.watched_pods() == 0
        })
        .await;
    });
}

/// What the enroller tells ztunnel: (uid, netns inode) per AddWorkload. The ZDS server itself is
/// tested against the stand-in and stock ztunnel; here only the verifier's decision matters.
#[derive(Default)]
struct Announced(Mutex<Vec<(String, u64)>>);

#[tonic::async_trait]
impl Ztunnel for Announced {
    async fn add_workload(&self, uid: &str, _: WorkloadInfo, netns: &Netns) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push((uid.to_owned(), netns.id().ino));
        Ok(())
    }
    async fn del_workload(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn connections(&self) -> usize {
        1
    }
}

#[test]
fn changed_netns_is_found_by_proc_scan_repaired_there_and_re_announced() {
    if !root_or_skip() {
        return;
    }
    if ambient_cni_tests::kubelet::cgroup2_mount().is_none() {
        assert!(std::env::var_os("CI").is_none(), "no cgroup2 mount");
        eprintln!("skipping: no cgroup2 hierarchy mounted");
        return;
    }
    in_test_host(|| async {
        let uid = ambient_cni_tests::kubelet::pod_uid(0xd1f7, 1);
        let old = ambient_cni_tests::NamedNetns::new();
        let path = old.path();
        let ns = Arc::new(Netns::open(std::path::Path::new(&path), None).unwrap());
        let pod = Pod {
            _keep: ns.try_clone_fd().unwrap(),
            ns: ns.clone(),
            path,
        };
        let w = world_for(&uid, pod).await;
        let zt = Arc::new(Announced::default());
        w.enroller.set_ztunnel(zt.clone());
        // The sandbox is replaced without an ADD reaching the agent: the held netns path is
        // gone, the pod's process runs in a new netns holding its IP, in its kubelet cgroup.
        let new = ambient_cni_tests::kubelet::RunningPod::start(&uid, "10.77.0.5");
        old.delete().unwrap();
        let out = verify_pod(&w.enroller, &w.metrics, &uid).await.unwrap();
        assert!(
            matches!(&out, Outcome::Repaired { kinds, .. } if kinds == &vec![DriftKind::Netns]),
            "{out:?}"
        );
        let held = w.enroller.table.get(&uid).unwrap();
        let now = held.netns.as_ref().unwrap().id();
        let want = std::fs::metadata(new.netns.path()).unwrap();
        assert_eq!(
            (now.dev, now.ino),
            (
                std::os::unix::fs::MetadataExt::dev(&want),
                std::os::unix::fs::MetadataExt::ino(&want)
            )
        );
        assert_eq!(*zt.0.lock().unwrap(), vec![(uid.clone(), now.ino)]);
        assert_eq!(w.metrics.repairs(DriftKind::Netns), 1);
        assert!(w.events.last().1.contains("netns changed"));
        // The rules are in place in the new netns; nothing more is announced.
        let again = verify_pod(&w.enroller, &w.metrics, &uid).await.unwrap();
        assert_eq!(again, Outcome::Clean);
        assert_eq!(
            zt.0.lock().unwrap().len(),
            1,
            "re-announced only on a change"
        );
    });
}
