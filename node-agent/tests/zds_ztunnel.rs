//! The ZDS server against stock ztunnel (`ZTUNNEL_BIN`, built by
//! `shared/peers/ztunnel.sh` beside the checkout, see that README). Skips when the variable
//! is unset or not root; fails instead when `CI` is set.

mod zds_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_cni_agent::inpod::zds::{SnapshotEntry, SnapshotSource, ZdsServer};
use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::netns::Netns;
use zds_support::{cleanup, sock_path};

fn prerequisites() -> Option<PathBuf> {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (netns)".to_owned()
    } else if let Some(b) = std::env::var_os("ZTUNNEL_BIN") {
        return Some(PathBuf::from(b));
    } else {
        "ZTUNNEL_BIN is unset (see shared/peers/README.md beside the checkout: ztunnel.sh prints it)".to_owned()
    };
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

#[derive(Default)]
struct State(Mutex<Vec<SnapshotEntry>>);

impl SnapshotSource for State {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.0.lock().unwrap().clone()
    }
}

/// Netns and the ztunnel process, removed on drop (also on failure).
struct World {
    netns: Vec<String>,
    ztunnel: Option<Child>,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(z) = &mut self.ztunnel {
            let _ = z.kill();
            let _ = z.wait();
        }
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl World {
    fn netns(&mut self, name: &str) -> Arc<Netns> {
        assert!(Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success());
        self.netns.push(name.to_owned());
        assert!(Command::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        Arc::new(Netns::open(&Path::new("/run/netns").join(name), None).unwrap())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ztunnel.log")).unwrap_or_default()
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "demo".into(),
        service_account: "default".into(),
    }
}

fn xds(names: &[&str]) -> String {
    let mut s = String::from("workloads:\n");
    for n in names {
        s += &format!(
            "- uid: Kubernetes//Pod/demo/{n}\n  name: {n}\n  namespace: demo\n  \
             serviceAccount: default\n  workloadIps: []\n  protocol: HBONE\n  services: {{}}\n"
        );
    }
    s
}

fn connects(ns: &Netns, port: u16) -> bool {
    ns.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_millis(500),
        )
        .is_ok()
    })
    .unwrap()
}

fn ready(zt: &Netns) -> bool {
    zt.run(|| -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, 15021)),
            Duration::from_millis(500),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"GET /healthz/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        Ok(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"))
    })
    .unwrap()
    .unwrap_or(false)
}

async fn wait_until(what: &str, w: &World, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}; ztunnel log:\n{}", w.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_ztunnel_snapshot_add_del_and_agent_restart() {
    let Some(bin) = prerequisites() else { return };
    let path = sock_path("real-zt");
    let dir = path.parent().unwrap().to_owned();
    std::fs::create_dir_all(&dir).unwrap();
    let t = format!("{:x}", std::process::id());
    let mut w = World {
        netns: vec![],
        ztunnel: None,
        dir: dir.clone(),
    };
    let zt_ns = w.netns(&format!("zzt-{t}"));
    let p1 = w.netns(&format!("zzt-{t}-p1"));
    let p2 = w.netns(&format!("zzt-{t}-p2"));
    std::fs::write(dir.join("xds.yaml"), xds(&["p1", "p2"])).unwrap();

    let state = Arc::new(State::default());
    state.0.lock().unwrap().push(SnapshotEntry {
        uid: "uid-p1".into(),
        info: info("p1"),
        netns: Some(p1.clone()),
    });
    let srv = ZdsServer::bind(&path, state.clone()).unwrap();
    let log = std::fs::File::create(dir.join("ztunnel.log")).unwrap();
    w.ztunnel = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("zzt-{t}"),
                "env",
                "PROXY_MODE=shared",
            ])
            .arg(format!("INPOD_UDS={}", path.display()))
            .arg("FAKE_CA=true")
            .arg("XDS_ADDRESS=")
            .arg(format!("LOCAL_XDS_PATH={}", dir.join("xds.yaml").display()))
            .arg("RUST_LOG=info")
            .arg(&bin)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("ztunnel ready after our snapshot", &w, || ready(&zt_ns)).await;
    for port in [15001, 15006, 15008] {
        assert!(
            connects(&p1, port),
            "ztunnel listens on {port} in the snapshot pod's netns"
        );
    }

    state.0.lock().unwrap().push(SnapshotEntry {
        uid: "uid-p2".into(),
        info: info("p2"),
        netns: Some(p2.clone()),
    });
    srv.add_workload("uid-p2", info("p2"), &p2).await.unwrap();
    assert!(connects(&p2, 15008));
    srv.add_workload("uid-p2", info("p2"), &p2).await.unwrap(); // same netns: no-op
    state.0.lock().unwrap().retain(|e| e.uid != "uid-p2");
    srv.del_workload("uid-p2").await.unwrap();
    srv.del_workload("uid-never-added").await.unwrap();
    wait_until("p2's listeners closed", &w, || !connects(&p2, 15008)).await;

    // Agent restart: listener closed first, ztunnel reconnects to the new server.
    srv.shutdown().await;
    drop(srv);
    wait_until("ztunnel not ready without us", &w, || !ready(&zt_ns)).await;
    let srv = ZdsServer::bind(&path, state.clone()).unwrap();
    wait_until("ztunnel ready again", &w, || ready(&zt_ns)).await;
    assert!(connects(&p1, 15001), "p1's proxy survives the restart");
    let z = w.ztunnel.as_mut().unwrap();
    assert!(
        z.try_wait().unwrap().is_none(),
        "ztunnel exited:\n{}",
        w.log()
    );
    assert_eq!(srv.connections(), 1);
    srv.shutdown().await;
    let log = w.log();
    eprintln!("ztunnel log:\n{log}");
    assert!(!log.contains("protocol mismatch"), "{log}");
    assert!(!log.contains("Connection reset by peer"), "{log}");
    cleanup(&path);
}
