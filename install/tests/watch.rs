//! The watch/repair loop, concurrency and atomicity, on real files (inotify, exec, mounts).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ambient_cni_install::fsops;
use ambient_cni_install::merge::{self, ConfKind, EntryState};
use ambient_cni_install::throttle::ThrottleConfig;
use ambient_cni_install::{Installer, PluginEntry, ShutdownMode, StopSignal};
use common::{skip_unless_root, wait_until, Node};

/// A running watch loop on its own thread; stopped and joined on drop.
struct Watcher {
    inst: Arc<Installer>,
    ready: Arc<AtomicBool>,
    stop: Arc<StopSignal>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(inst: Installer, throttle: ThrottleConfig) -> Watcher {
        let inst = Arc::new(inst);
        let ready = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(StopSignal::new().unwrap());
        let (i2, r2, s2) = (inst.clone(), ready.clone(), stop.clone());
        let handle = thread::spawn(move || i2.watch_with(&s2, &r2, throttle).unwrap());
        Watcher {
            inst,
            ready,
            stop,
            handle: Some(handle),
        }
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn current(node: &Node, name: &str) -> bool {
    fs::read_to_string(node.conf.join(name))
        .ok()
        .and_then(|t| merge::entry_state(&t, &PluginEntry::default()).ok())
        == Some(EntryState::Current)
}

#[test]
fn repairs_cilium_boot_rewrites_within_a_second() {
    let node = Node::new("cilium");
    let original = node.read("05-cilium.conflist");
    let w = Watcher::start(node.installer(None), ThrottleConfig::default());
    assert!(wait_until(Duration::from_secs(2), || w.ready()
        && current(&node, "05-cilium.conflist"))
    .is_some());

    let mut worst = Duration::ZERO;
    // Cilium's agent rewrites its conflist at boot, sometimes in place (truncate + write),
    // sometimes by rename; do both, a few times, like a restarting cilium-agent.
    for round in 0..4 {
        if round % 2 == 0 {
            node.write("05-cilium.conflist", &original);
        } else {
            let tmp = node.conf.join(".05-cilium.conflist.tmp");
            fs::write(&tmp, &original).unwrap();
            fs::rename(&tmp, node.conf.join("05-cilium.conflist")).unwrap();
        }
        let t = wait_until(Duration::from_secs(1), || {
            current(&node, "05-cilium.conflist")
        })
        .unwrap_or_else(|| panic!("round {round}: not repaired within 1 s"));
        worst = worst.max(t);
        assert!(wait_until(Duration::from_millis(500), || w.ready()).is_some());
        thread::sleep(Duration::from_millis(150));
    }
    eprintln!("worst repair latency: {worst:?}");
    assert_eq!(w.inst.stats().throttled.load(Ordering::Relaxed), 0);
}

#[test]
fn deleted_config_and_binary_are_restored_and_readiness_follows() {
    let node = Node::new("flannel");
    let original = node.read("10-flannel.conflist");
    let w = Watcher::start(node.installer(None), ThrottleConfig::default());
    assert!(wait_until(Duration::from_secs(2), || w.ready()).is_some());

    // The primary CNI goes away (Cilium with cni.exclusive deletes others' files; here the
    // CNI itself is reinstalled): not ready while there is nothing to chain onto.
    fs::remove_file(node.conf.join("10-flannel.conflist")).unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || !w.ready()).is_some(),
        "readiness must drop"
    );
    node.write("10-flannel.conflist", &original);
    assert!(wait_until(Duration::from_secs(1), || current(
        &node,
        "10-flannel.conflist"
    ) && w.ready())
    .is_some());

    let bin = node.bin.join("ambient-cni");
    fs::remove_file(&bin).unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || bin.exists()).is_some(),
        "binary restored"
    );
    fs::write(&bin, "corrupt").unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || fs::read(&bin).ok()
            == fs::read(&node.plugin).ok())
        .is_some(),
        "binary content restored"
    );
    // Conf dir vanishes and comes back (a re-created hostPath): watched again, repaired.
    let saved = node.read("10-flannel.conflist");
    fs::remove_dir_all(&node.conf).unwrap();
    assert!(wait_until(Duration::from_secs(1), || !w.ready()).is_some());
    fs::create_dir(&node.conf).unwrap();
    node.write("10-flannel.conflist", &merge::remove(&saved).unwrap());
    assert!(wait_until(Duration::from_secs(3), || current(
        &node,
        "10-flannel.conflist"
    ) && w.ready())
    .is_some());
}

#[test]
fn waits_for_the_primary_in_an_empty_dir() {
    let node = Node::new("empty");
    let w = Watcher::start(node.installer(None), ThrottleConfig::default());
    thread::sleep(Duration::from_millis(200));
    assert!(!w.ready());
    let cal = fs::read_to_string(common::fixtures().join("calico/10-calico.conflist")).unwrap();
    node.write("10-calico.conflist", &cal);
    let t = wait_until(Duration::from_secs(1), || {
        current(&node, "10-calico.conflist") && w.ready()
    });
    assert!(t.is_some(), "installed once the primary appeared");
}

#[test]
fn the_watch_says_why_it_waits_for_istio_cni_and_chains_once_it_is_gone() {
    let node = Node::new("istio-cni");
    let w = Watcher::start(node.installer(None), ThrottleConfig::default());
    // What /readyz shows beside install_in_place.
    let named = wait_until(Duration::from_secs(2), || {
        w.inst
            .failing()
            .is_some_and(|why| why.contains("istio-cni"))
    });
    assert!(named.is_some(), "failing: {:?}", w.inst.failing());
    assert!(!w.ready());
    // istio-cni's uninstall removes its entry: we chain, and the reason is gone.
    let text = node.read("10-calico.conflist");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "istio-cni");
    node.write(
        "10-calico.conflist",
        &serde_json::to_string_pretty(&v).unwrap(),
    );
    let t = wait_until(Duration::from_secs(3), || {
        current(&node, "10-calico.conflist") && w.ready() && w.inst.failing().is_none()
    });
    assert!(
        t.is_some(),
        "chained once istio-cni was gone: {:?}",
        w.inst.failing()
    );
}

#[test]
fn a_fighting_cni_is_throttled_not_fought_in_a_tight_loop() {
    let node = Node::new("cilium");
    let original = node.read("05-cilium.conflist");
    let cfg = ThrottleConfig {
        burst: 3,
        window: Duration::from_secs(20),
        base: Duration::from_millis(200),
        max: Duration::from_millis(400),
    };
    let w = Watcher::start(node.installer(None), cfg);
    assert!(wait_until(Duration::from_secs(2), || w.ready()).is_some());
    let t0 = Instant::now();
    let mut rewrites = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        node.write("05-cilium.conflist", &original);
        rewrites += 1;
        thread::sleep(Duration::from_millis(40));
    }
    let writes = w.inst.stats().writes.load(Ordering::Relaxed);
    let throttled = w.inst.stats().throttled.load(Ordering::Relaxed);
    eprintln!("{rewrites} rewrites by the other CNI, {writes} repairs, {throttled} throttled");
    assert!(throttled > 0, "the repair loop must back off");
    assert!(
        writes < rewrites / 2,
        "{writes} repairs for {rewrites} rewrites"
    );
    // Once the other writer stops, we win within the max backoff.
    assert!(wait_until(Duration::from_secs(2), || current(
        &node,
        "05-cilium.conflist"
    ) && w.ready())
    .is_some());
}

#[test]
fn concurrent_installers_and_a_rewriting_cni_never_expose_a_partial_file() {
    let node = Arc::new(Node::new("calico"));
    let original = node.read("10-calico.conflist");
    let done = Arc::new(AtomicBool::new(false));
    let bad_reads = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    // What the kubelet would see: every read must be a complete, valid conflist.
    let reader = {
        let (node, done, bad, reads) =
            (node.clone(), done.clone(), bad_reads.clone(), reads.clone());
        thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Ok(t) = fs::read_to_string(node.conf.join("10-calico.conflist")) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if merge::classify("10-calico.conflist", &t) != Ok(ConfKind::List) {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // The primary CNI rewrites its file atomically, as well-behaved CNIs do.
    let cni = {
        let (node, original) = (node.clone(), original.clone());
        thread::spawn(move || {
            for i in 0..40 {
                let tmp = node.conf.join(format!(".calico-tmp-{i}"));
                fs::write(&tmp, &original).unwrap();
                fs::rename(&tmp, node.conf.join("10-calico.conflist")).unwrap();
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let installers: Vec<_> = (0..3)
        .map(|_| {
            let node = node.clone();
            thread::spawn(move || {
                let inst = node.installer(None);
                let mut lost_races = 0;
                for _ in 0..30 {
                    // Losing every retry against a file rewritten every 5 ms is allowed (the
                    // watch loop retries); any other error is not.
                    if let Err(e) = inst.install_once() {
                        assert!(e.to_string().contains("keeps changing"), "{e}");
                        lost_races += 1;
                    }
                }
                assert!(
                    lost_races < 10,
                    "{lost_races} of 30 passes lost every retry"
                );
            })
        })
        .collect();
    cni.join().unwrap();
    for h in installers {
        h.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    assert_eq!(
        bad_reads.load(Ordering::Relaxed),
        0,
        "of {} reads",
        reads.load(Ordering::Relaxed)
    );
    let inst = node.installer(None);
    inst.install_once().unwrap();
    let text = node.read("10-calico.conflist");
    assert_eq!(
        merge::plugin_types(&text).unwrap(),
        vec!["calico", "portmap", "bandwidth", "ambient-cni"]
    );
    let names: Vec<String> = fs::read_dir(&node.conf)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains(".tmp.")),
        "temp leftovers: {names:?}"
    );
}

#[test]
fn exec_while_the_binary_is_replaced_never_fails() {
    let node = Node::new("flannel");
    // Two different real executables: /bin/true and a copy with trailing bytes (ELF ignores them).
    let a = node.dir.path().join("true-a");
    let b = node.dir.path().join("true-b");
    fs::copy("/bin/true", &a).unwrap();
    let mut bytes = fs::read("/bin/true").unwrap();
    bytes.extend_from_slice(b"ambient-cni test padding");
    fs::write(&b, bytes).unwrap();
    for p in [&a, &b] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dst = node.bin.join("ambient-cni");
    fsops::copy_binary(&a, &dst).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let runner = {
        let (dst, done) = (dst.clone(), done.clone());
        thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !done.load(Ordering::SeqCst) {
                match Command::new(&dst).status() {
                    Ok(s) if s.success() => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    let mut copies = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        let src = if copies % 2 == 0 { &b } else { &a };
        assert!(fsops::copy_binary(src, &dst).unwrap());
        copies += 1;
    }
    done.store(true, Ordering::SeqCst);
    let (ok, failed) = runner.join().unwrap();
    eprintln!("{ok} execs during {copies} replacements");
    assert!(
        failed.is_empty(),
        "{} failed execs, first: {}",
        failed.len(),
        failed[0]
    );
    assert!(ok > 50 && copies > 50, "{ok} execs, {copies} copies");
}

#[test]
fn read_only_conf_dir_gives_a_clear_error() {
    if skip_unless_root("read_only_conf_dir_gives_a_clear_error") {
        return;
    }
    let node = Node::new("flannel");
    let conf = node.conf.clone();
    let inst = node.installer(None);
    // A private mount namespace on a dedicated thread: the read-only bind mount is invisible
    // to the rest of the machine and vanishes with the thread.
    let err = thread::spawn(move || {
        use nix::mount::{mount, MsFlags};
        use nix::sched::{unshare, CloneFlags};
        unshare(CloneFlags::CLONE_NEWNS).expect("unshare mount ns");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        mount(
            Some(&conf),
            &conf,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind");
        mount(
            None::<&str>,
            &conf,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("remount ro");
        inst.install_once().unwrap_err().to_string()
    })
    .join()
    .unwrap();
    eprintln!("error: {err}");
    assert!(
        err.contains(node.conf.to_str().unwrap()),
        "names the dir/file: {err}"
    );
    assert!(err.contains("read-only"), "says read-only: {err}");
    // Outside that namespace the dir is writable as before and nothing was changed.
    assert!(!node.read("10-flannel.conflist").contains("ambient-cni"));
}

#[test]
fn async_run_installs_then_uninstalls_on_shutdown() {
    let node = Node::new("kindnet");
    let before = node.snapshot();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let inst = Arc::new(node.installer(None));
    let ready = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel::<ShutdownMode>();
    let task = rt.spawn(inst.clone().run(
        async move { rx.await.unwrap_or(ShutdownMode::Upgrade) },
        ready.clone(),
    ));
    assert!(wait_until(Duration::from_secs(2), || ready.load(Ordering::SeqCst)).is_some());
    assert!(current(&node, "10-kindnet.conflist"));
    tx.send(ShutdownMode::Uninstall).unwrap();
    let out = rt.block_on(task).unwrap().unwrap();
    assert_eq!(out.edited.len(), 1);
    assert!(!ready.load(Ordering::SeqCst));
    assert_eq!(node.snapshot(), before);
    assert!(!node.bin.join("ambient-cni").exists());

    // Upgrade (stop once installed): everything stays.
    let r2 = ready.clone();
    let shutdown = async move {
        while !r2.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ShutdownMode::Upgrade
    };
    let task = rt.spawn(inst.clone().run(shutdown, ready.clone()));
    let out = rt.block_on(task).unwrap().unwrap();
    assert_eq!(out, Default::default());
    assert!(current(&node, "10-kindnet.conflist"));
    assert!(node.bin.join("ambient-cni").exists());
}
