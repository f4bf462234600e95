//! The ZDS server against a test client speaking raw ZDS: snapshot, routing,
//! acks, deadlines, limits. No root needed (the netns handed out is our own).

mod zds_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_cni_agent::inpod::zds::{
    SnapshotEntry, SnapshotSource, ZdsConfig, ZdsError, ZdsServer,
};
use ambient_cni_api::zds::{workload_request::Payload, WorkloadInfo};
use iptables_rules::netns::Netns;
use zds_support::{cleanup, eventually, sock_path, Client};

#[derive(Default)]
struct State(Mutex<Vec<SnapshotEntry>>);

impl SnapshotSource for State {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.0.lock().unwrap().clone()
    }
}

fn fast() -> ZdsConfig {
    ZdsConfig {
        hello_timeout: Duration::from_millis(500),
        write_timeout: Duration::from_millis(500),
        ack_timeout: Duration::from_millis(500),
        accept_interval: Duration::from_millis(1),
        // The test's own uid is the "ztunnel" (no root needed).
        allowed_uid: nix::unistd::geteuid().as_raw(),
        ..ZdsConfig::default()
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "demo".into(),
        service_account: "sa".into(),
    }
}

fn own_netns() -> Netns {
    Netns::open(Path::new("/proc/self/ns/net"), None).unwrap()
}

fn serve(tag: &str, state: Arc<State>, cfg: ZdsConfig) -> ZdsServer {
    ZdsServer::bind_with(&sock_path(tag), state, cfg).unwrap()
}

/// Acks an empty snapshot's SnapshotSent.
async fn empty_snapshot(c: &Client) {
    let (req, fds) = c.next().await;
    assert!(
        matches!(req.payload, Some(Payload::SnapshotSent(_))),
        "{req:?}"
    );
    assert!(fds.is_empty());
    c.ack("").await;
}

#[tokio::test]
async fn snapshot_then_exactly_one_snapshot_sent() {
    let ns = Arc::new(own_netns());
    let state = Arc::new(State::default());
    *state.0.lock().unwrap() = vec![
        SnapshotEntry {
            uid: "u0".into(),
            info: info("p0"),
            netns: Some(ns.clone()),
        },
        SnapshotEntry {
            uid: "u1".into(),
            info: info("p1"),
            netns: Some(ns.clone()),
        },
        SnapshotEntry {
            uid: "u2".into(),
            info: info("p2"),
            netns: None,
        },
        SnapshotEntry {
            uid: "u3".into(),
            info: info(&"x".repeat(2000)),
            netns: Some(ns.clone()),
        },
    ];
    let srv = serve("snap", state, fast());
    let c = Client::connect(srv.path()).await;
    for uid in ["u0", "u1"] {
        let (req, fds) = c.next().await;
        match req.payload {
            Some(Payload::Add(a)) => {
                assert_eq!(a.uid, uid);
                assert_eq!(a.workload_info.unwrap().namespace, "demo");
            }
            other => panic!("expected Add, got {other:?}"),
        }
        assert_eq!(fds.len(), 1, "exactly one fd with AddWorkload");
        let got = std::fs::File::from(fds.into_iter().next().unwrap())
            .metadata()
            .unwrap();
        assert_eq!(got.ino(), ns.id().ino);
        // A nack in the snapshot is logged and the snapshot goes on.
        c.ack(if uid == "u0" {
            "failure to start proxy"
        } else {
            ""
        })
        .await;
    }
    let (req, fds) = c.next().await;
    assert!(
        matches!(req.payload, Some(Payload::Keep(ref k)) if k.uid == "u2"),
        "{req:?}"
    );
    assert!(fds.is_empty(), "no fd with KeepWorkload");
    c.ack("").await;
    // u3 does not fit in 1024 bytes: skipped, never sent.
    empty_snapshot(&c).await;
    assert!(
        c.quiet_for(Duration::from_millis(300)).await,
        "one SnapshotSent only"
    );
    assert_eq!(srv.connections(), 1);
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn adds_go_to_the_newest_dels_to_all() {
    let srv = serve("route", Arc::new(State::default()), fast());
    let old = Client::connect(srv.path()).await;
    empty_snapshot(&old).await;
    let new = Client::connect(srv.path()).await;
    empty_snapshot(&new).await;
    eventually(Duration::from_secs(2), "2 connections", || {
        srv.connections() == 2
    })
    .await;
    let ns = own_netns();
    let (res, _) = tokio::join!(srv.add_workload("uid-a", info("a"), &ns), async {
        let (req, fds) = new.next().await;
        assert!(matches!(req.payload, Some(Payload::Add(ref a)) if a.uid == "uid-a"));
        assert_eq!(fds.len(), 1);
        new.ack("").await;
    });
    res.unwrap();
    assert!(
        old.quiet_for(Duration::from_millis(200)).await,
        "old ztunnel gets no add"
    );
    let (res, _, _) = tokio::join!(
        srv.del_workload("uid-a"),
        async {
            let (req, fds) = old.next().await;
            assert!(matches!(req.payload, Some(Payload::Del(ref d)) if d.uid == "uid-a"));
            assert!(fds.is_empty());
            old.ack("").await;
        },
        async {
            let (req, _) = new.next().await;
            assert!(matches!(req.payload, Some(Payload::Del(_))));
            new.ack("").await;
        }
    );
    res.unwrap();
    // The newest leaves: adds go to the remaining one.
    drop(new);
    eventually(Duration::from_secs(2), "1 connection", || {
        srv.connections() == 1
    })
    .await;
    let (res, _) = tokio::join!(srv.add_workload("uid-b", info("b"), &ns), async {
        let (req, _) = old.next().await;
        assert!(matches!(req.payload, Some(Payload::Add(ref a)) if a.uid == "uid-b"));
        old.ack("").await;
    });
    res.unwrap();
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn nack_is_reported_and_the_connection_kept() {
    let srv = serve("nack", Arc::new(State::default()), fast());
    let c = Client::connect(srv.path()).await;
    empty_snapshot(&c).await;
    let ns = own_netns();
    let (res, _) = tokio::join!(srv.add_workload("u", info("a"), &ns), async {
        c.next().await;
        c.ack("failure to start proxy : boom").await;
    });
    let err = res.unwrap_err();
    assert!(matches!(err, ZdsError::Nack(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "got ack error: failure to start proxy : boom"
    );
    let (res, _) = tokio::join!(srv.add_workload("u", info("a"), &ns), async {
        c.next().await;
        c.ack("").await;
    });
    res.unwrap();
    // A nacked delete on one of two connections is returned too.
    let c2 = Client::connect(srv.path()).await;
    empty_snapshot(&c2).await;
    eventually(Duration::from_secs(2), "2 connections", || {
        srv.connections() == 2
    })
    .await;
    let (res, _, _) = tokio::join!(
        srv.del_workload("u"),
        async {
            c.next().await;
            c.ack("").await;
        },
        async {
            c2.next().await;
            c2.ack("nope").await;
        }
    );
    assert_eq!(res.unwrap_err().to_string(), "got ack error: nope");
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn stalled_ztunnel_times_out_within_the_deadline() {
    let srv = serve("stall", Arc::new(State::default()), fast());
    let c = Client::connect(srv.path()).await;
    empty_snapshot(&c).await;
    let ns = own_netns();
    let start = Instant::now();
    let (res, _) = tokio::join!(srv.add_workload("slow", info("a"), &ns), c.next());
    let took = start.elapsed();
    let err = res.unwrap_err();
    assert!(matches!(err, ZdsError::Timeout { .. }), "{err}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // The late ack belongs to "slow"; the next request gets its own answer.
    c.ack("").await;
    let (res, _) = tokio::join!(srv.add_workload("next", info("b"), &ns), async {
        let (req, _) = c.next().await;
        assert!(matches!(req.payload, Some(Payload::Add(ref a)) if a.uid == "next"));
        c.ack("nack for next").await;
    });
    assert_eq!(res.unwrap_err().to_string(), "got ack error: nack for next");
    // Two timeouts in a row: the connection is dropped as wedged.
    let _ = tokio::join!(srv.add_workload("s1", info("a"), &ns), c.next());
    let _ = tokio::join!(srv.add_workload("s2", info("a"), &ns), c.next());
    assert!(c.closed_within(Duration::from_secs(2)).await);
    eventually(Duration::from_secs(2), "0 connections", || {
        srv.connections() == 0
    })
    .await;
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn oversize_is_refused_before_anything_is_sent() {
    let srv = serve("big", Arc::new(State::default()), fast());
    let ns = own_netns();
    let err = srv
        .add_workload("u", info(&"n".repeat(1100)), &ns)
        .await
        .unwrap_err();
    assert!(matches!(err, ZdsError::TooLarge { .. }), "{err}");
    let c = Client::connect(srv.path()).await;
    empty_snapshot(&c).await;
    let err = srv
        .add_workload("u", info(&"n".repeat(1100)), &ns)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1024-byte limit"), "{err}");
    let long_uid = "u".repeat(1100);
    assert!(matches!(
        srv.del_workload(&long_uid).await,
        Err(ZdsError::TooLarge { .. })
    ));
    assert!(
        c.quiet_for(Duration::from_millis(200)).await,
        "nothing sent"
    );
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn without_ztunnel_adds_fail_and_dels_succeed() {
    let srv = serve("none", Arc::new(State::default()), fast());
    let err = srv
        .add_workload("u", info("a"), &own_netns())
        .await
        .unwrap_err();
    assert!(matches!(err, ZdsError::NoConnection));
    assert_eq!(err.to_string(), "no ztunnel connection");
    srv.del_workload("u").await.unwrap();
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn silent_and_chatty_clients_are_dropped() {
    let srv = serve("drop", Arc::new(State::default()), fast());
    let silent = Client::connect_silent(srv.path()).await;
    assert!(
        silent.closed_within(Duration::from_secs(2)).await,
        "no hello within 0.5 s"
    );
    let chatty = Client::connect(srv.path()).await;
    empty_snapshot(&chatty).await;
    eventually(Duration::from_secs(2), "registered", || {
        srv.connections() == 1
    })
    .await;
    chatty.ack("").await; // unsolicited
    assert!(chatty.closed_within(Duration::from_secs(2)).await);
    eventually(Duration::from_secs(2), "dropped", || srv.connections() == 0).await;
    let gone = Client::connect(srv.path()).await;
    empty_snapshot(&gone).await;
    eventually(Duration::from_secs(2), "registered", || {
        srv.connections() == 1
    })
    .await;
    drop(gone);
    eventually(Duration::from_secs(2), "EOF noticed", || {
        srv.connections() == 0
    })
    .await;
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn a_hello_without_a_version_is_refused() {
    let srv = serve("v0", Arc::new(State::default()), fast());
    let c = Client::connect_silent(srv.path()).await;
    // Field 1 (version) explicitly 0: protobuf's unset value.
    c.send(&[0x08, 0x00]).await;
    assert!(c.closed_within(Duration::from_secs(2)).await);
    assert_eq!(srv.connections(), 0);
    srv.shutdown().await;
    cleanup(srv.path());
}

/// A peer of another uid that can reach the socket (here: made world-writable, as
/// `DAC_OVERRIDE` would) is closed on without a single message: no snapshot, no fds.
#[tokio::test]
async fn a_peer_of_another_uid_gets_nothing() {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("skipped: needs root to connect as another uid");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let ns = Arc::new(own_netns());
    let state = Arc::new(State::default());
    *state.0.lock().unwrap() = vec![SnapshotEntry {
        uid: "u0".into(),
        info: info("p0"),
        netns: Some(ns),
    }];
    let srv = serve(
        "uid",
        state,
        ZdsConfig {
            allowed_uid: 0,
            ..fast()
        },
    );
    let path = srv.path().to_owned();
    for (p, mode) in [(path.parent().unwrap(), 0o755), (path.as_path(), 0o666)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let got = tokio::task::spawn_blocking(move || {
        // A thread of its own, and the raw syscall (not libc's process-wide
        // setresuid): only this thread becomes uid 65534.
        std::thread::spawn(move || {
            // SAFETY: changes the credentials of the calling thread only.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
            zds_support::blocking_hello_then_read(&path, Duration::from_secs(2))
        })
        .join()
        .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(got, 0, "the server closed without sending anything");
    assert_eq!(srv.connections(), 0);
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn accepts_are_rate_limited() {
    let cfg = ZdsConfig {
        accept_interval: Duration::from_millis(200),
        ..fast()
    };
    let srv = serve("rate", Arc::new(State::default()), cfg);
    let start = Instant::now();
    let cs = [
        Client::connect(srv.path()).await,
        Client::connect(srv.path()).await,
        Client::connect(srv.path()).await,
    ];
    for c in &cs {
        empty_snapshot(c).await;
    }
    eventually(Duration::from_secs(3), "3 connections", || {
        srv.connections() == 3
    })
    .await;
    assert!(
        start.elapsed() >= Duration::from_millis(380),
        "{:?}",
        start.elapsed()
    );
    srv.shutdown().await;
    cleanup(srv.path());
}

#[tokio::test]
async fn shutdown_closes_listener_and_connections() {
    let srv = serve("stop", Arc::new(State::default()), fast());
    let c = Client::connect(srv.path()).await;
    empty_snapshot(&c).await;
    eventually(Duration::from_secs(2), "registered", || {
        srv.connections() == 1
    })
    .await;
    srv.shutdown().await;
    assert!(c.closed_within(Duration::from_secs(1)).await);
    let err = std::os::unix::net::UnixDatagram::unbound()
        .unwrap()
        .connect(srv.path())
        .unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ECONNREFUSED) | Some(libc::EPROTOTYPE)
        ),
        "{err}"
    );
    assert_eq!(srv.connections(), 0);
    srv.shutdown().await; // idempotent
    cleanup(srv.path());
}
