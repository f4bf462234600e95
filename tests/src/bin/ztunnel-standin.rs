//! A ztunnel stand-in for tests and the demo (not shipped).
//!
//! Connects to the agent's ZDS socket exactly like ztunnel (SOCK_SEQPACKET,
//! `ZdsHello{V1}`, one ack per message, 1024-byte packets, netns fd by
//! SCM_RIGHTS on `AddWorkload` only) and, per added pod, listens on 15001,
//! 15006, 15008 (and 15053 TCP+UDP) inside the pod's netns. Every accepted
//! connection is answered with one line (`standin port=15001 orig=IP:PORT`)
//! and closed. What it sees is printed as JSON lines on stdout.
//!
//! Like real ztunnel: proxies survive a reconnect; a snapshot drains proxies it
//! does not name; a second `SnapshotSent` or a `Keep` after it is a protocol
//! mismatch and the process exits with status 2.
//!
//! Independent of the agent on purpose: it only shares the wire types and the ZDS
//! packet I/O (`ambient_cni_api::zds::socket`, the agent's own).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use ambient_cni_api::zds::{
    socket as zds_socket, workload_request::Payload, workload_response, Ack, Version,
    WorkloadRequest, WorkloadResponse, ZdsHello, MAX_MESSAGE_LEN,
};
use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::socket::{
    self, setsockopt, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
};
use prost::Message;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// `NSFS_MAGIC` (linux/magic.h): what ztunnel checks a received fd against.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// ztunnel's packet mark on pod-side sockets (1337).
const PACKET_MARK: u32 = 0x539;
const PORT_OUT: u16 = 15001;
const PORT_IN: u16 = 15006;
const PORT_HBONE: u16 = 15008;
const PORT_DNS: u16 = 15053;

#[derive(Parser, Debug, Clone)]
#[command(about = "ztunnel stand-in: a ZDS client that opens ztunnel's ports in pod netns")]
struct Args {
    /// The agent's ZDS socket.
    #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
    socket: PathBuf,
    /// Nack AddWorkload for uids starting with this prefix.
    #[arg(long)]
    nack_uid_prefix: Option<String>,
    /// Nack every AddWorkload.
    #[arg(long)]
    nack_all: bool,
    /// Stop reading (and acking) at once after the hello.
    #[arg(long)]
    stall: bool,
    /// Ack this many messages per connection, then stop reading.
    #[arg(long)]
    stall_after: Option<usize>,
    /// Exit (status 2) on a second SnapshotSent or a Keep after it. Always on,
    /// like real ztunnel; the flag is accepted for explicit test command lines.
    #[arg(long)]
    exit_on_second_snapshot: bool,
    /// Do not open the DNS port 15053.
    #[arg(long)]
    no_dns: bool,
    /// Ceiling of the reconnect back-off (starts at 10 ms, doubles).
    #[arg(long, default_value_t = 1000)]
    max_backoff_ms: u64,
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel-standin: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    let mut standin = Standin {
        args,
        rt: rt.handle().clone(),
        proxies: HashMap::new(),
    };
    let code = standin.run();
    std::process::exit(code);
}

/// Prints one JSON event line (flushed: tests read it live).
fn emit(event: &str, mut fields: Value) {
    if let Value::Object(m) = &mut fields {
        m.insert("event".into(), Value::String(event.into()));
    }
    let line = fields.to_string();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The listeners of one pod's "proxy"; dropped = closed.
struct Proxy {
    netns: (u64, u64),
    tasks: Vec<JoinHandle<()>>,
}

struct Standin {
    args: Args,
    rt: Handle,
    /// Proxies by uid; they survive reconnects, like ztunnel's.
    proxies: HashMap<String, Proxy>,
}

/// How one connection ended.
enum End {
    /// EOF or a recoverable error: reconnect.
    Reconnect(String),
    /// Protocol mismatch: exit like ztunnel.
    Fatal(String),
}

/// Per-connection snapshot state.
#[derive(Default)]
struct ConnState {
    seen: HashSet<String>,
    snapshot_done: bool,
    answered: usize,
    adds: usize,
    keeps: usize,
}

impl Standin {
    fn run(&mut self) -> i32 {
        let max = Duration::from_millis(self.args.max_backoff_ms.max(10));
        let mut backoff = Duration::from_millis(10);
        let mut logged_wait = false;
        loop {
            let sock = match self.connect() {
                Ok(s) => s,
                Err(e) => {
                    if !logged_wait {
                        emit("connect_failed", json!({"error": format!("{e:#}")}));
                        logged_wait = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            logged_wait = false;
            emit(
                "connected",
                json!({"socket": self.args.socket.display().to_string()}),
            );
            match self.serve(&sock) {
                End::Reconnect(why) => emit("disconnected", json!({"reason": why})),
                End::Fatal(why) => {
                    emit("protocol_mismatch", json!({"reason": why}));
                    eprintln!("ztunnel-standin: protocol mismatch: {why}, shutting down");
                    return 2;
                }
            }
        }
    }

    fn connect(&self) -> Result<OwnedFd> {
        Ok(zds_socket::connect(&self.args.socket)?)
    }

    fn serve(&mut self, sock: &OwnedFd) -> End {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        if let Err(e) = send(sock, &hello.encode_to_vec()) {
            return End::Reconnect(format!("hello: {e}"));
        }
        let stall_after = if self.args.stall {
            Some(0)
        } else {
            self.args.stall_after
        };
        let mut st = ConnState::default();
        loop {
            if stall_after == Some(st.answered) {
                emit("stalled", json!({"answered": st.answered}));
                // Hold the socket open and never read again.
                loop {
                    std::thread::park();
                }
            }
            let (bytes, fds) = match recv(sock) {
                Ok(Some(p)) => p,
                Ok(None) => return End::Reconnect("eof".into()),
                Err(e) => {
                    let _ = send_ack(sock, &format!("read error: {e}"));
                    return End::Reconnect(format!("read error: {e}"));
                }
            };
            let req = match WorkloadRequest::decode(bytes.as_slice()) {
                Ok(r) => r,
                Err(e) => {
                    let _ = send_ack(sock, &format!("bad request: {e}"));
                    return End::Reconnect(format!("bad request: {e}"));
                }
            };
            let payload = match req.payload {
                Some(p) => p,
                None => return End::Fatal("WorkloadRequest without payload".into()),
            };
            let is_add = matches!(payload, Payload::Add(_));
            if !is_add && !fds.is_empty() {
                let _ = send_ack(sock, "Unexpected control message");
                return End::Reconnect("Unexpected control message".into());
            }
            let outcome = match payload {
                Payload::Add(add) => self.on_add(&mut st, add, fds),
                Payload::Keep(k) => {
                    if st.snapshot_done {
                        return End::Fatal(format!("KeepWorkload {} after SnapshotSent", k.uid));
                    }
                    st.keeps += 1;
                    let known = self.proxies.contains_key(&k.uid);
                    st.seen.insert(k.uid.clone());
                    emit("keep", json!({"uid": k.uid, "known": known}));
                    Ok(String::new())
                }
                Payload::Del(d) => {
                    self.on_del(&mut st, &d.uid);
                    Ok(String::new())
                }
                Payload::SnapshotSent(_) => {
                    if st.snapshot_done {
                        return End::Fatal("second SnapshotSent on one connection".into());
                    }
                    self.on_snapshot_sent(&mut st);
                    Ok(String::new())
                }
            };
            let nack = match outcome {
                Ok(nack) => nack,
                Err(DropConn(why)) => {
                    let _ = send_ack(sock, &why);
                    return End::Reconnect(why);
                }
            };
            if let Err(e) = send_ack(sock, &nack) {
                return End::Reconnect(format!("ack: {e}"));
            }
            st.answered += 1;
        }
    }

    /// Returns the nack text ("" = ack), or `DropConn` to nack and reconnect.
    fn on_add(
        &mut self,
        st: &mut ConnState,
        add: ambient_cni_api::zds::AddWorkload,
        fds: Vec<OwnedFd>,
    ) -> Result<String, DropConn> {
        let uid = add.uid;
        let Some(info) = add.workload_info else {
            return Err(DropConn(format!("AddWorkload {uid} without workload_info")));
        };
        let fd = match <[OwnedFd; 1]>::try_from(fds) {
            Ok([fd]) => fd,
            Err(v) if v.is_empty() => return Err(DropConn("No control message".into())),
            Err(v) => return Err(DropConn(format!("expected 1 fd, got {}", v.len()))),
        };
        let mut ev = json!({
            "uid": uid, "name": info.name, "namespace": info.namespace,
            "service_account": info.service_account,
            "phase": if st.snapshot_done { "steady" } else { "snapshot" },
        });
        let netns = match netns_id(&fd) {
            Ok(id) => id,
            Err(e) => {
                ev["result"] = "nacked".into();
                ev["error"] = format!("{e:#}").into();
                emit("add", ev);
                return Ok(format!("failure to start proxy : {e:#}"));
            }
        };
        ev["netns_dev"] = netns.0.into();
        ev["netns_inode"] = netns.1.into();
        if !st.snapshot_done {
            st.seen.insert(uid.clone());
            st.adds += 1;
        }
        let nack_it = self.args.nack_all
            || self
                .args
                .nack_uid_prefix
                .as_deref()
                .is_some_and(|p| uid.starts_with(p));
        if nack_it {
            ev["result"] = "nacked".into();
            emit("add", ev);
            return Ok(format!("standin: configured to nack {uid}"));
        }
        let result = match self.proxies.get(&uid) {
            Some(p) if p.netns == netns => "noop",
            Some(_) => {
                self.stop_proxy(&uid);
                "replaced"
            }
            None => "started",
        };
        if result != "noop" {
            match self.start_proxy(&uid, &fd) {
                Ok(proxy) => {
                    self.proxies.insert(uid.clone(), Proxy { netns, ..proxy });
                }
                Err(e) => {
                    ev["result"] = "nacked".into();
                    ev["error"] = format!("{e:#}").into();
                    emit("add", ev);
                    return Ok(format!("failure to start proxy : {e:#}"));
                }
            }
        }
        ev["result"] = result.into();
        emit("add", ev);
        Ok(String::new())
    }

    fn on_del(&mut self, st: &mut ConnState, uid: &str) {
        if !st.snapshot_done {
            // Before the snapshot ends a Del only forgets the uid (it is then drained).
            st.seen.remove(uid);
            emit("del", json!({"uid": uid, "phase": "snapshot"}));
            return;
        }
        let existed = self.stop_proxy(uid);
        emit(
            "del",
            json!({"uid": uid, "phase": "steady", "existed": existed}),
        );
    }

    fn on_snapshot_sent(&mut self, st: &mut ConnState) {
        let stale: Vec<String> = self
            .proxies
            .keys()
            .filter(|u| !st.seen.contains(*u))
            .cloned()
            .collect();
        for uid in stale {
            self.stop_proxy(&uid);
            emit("drained", json!({"uid": uid}));
        }
        st.snapshot_done = true;
        emit(
            "snapshot_sent",
            json!({"adds": st.adds, "keeps": st.keeps, "proxies": self.proxies.len()}),
        );
    }

    /// Stops a proxy and waits until its sockets are closed.
    fn stop_proxy(&mut self, uid: &str) -> bool {
        let Some(p) = self.proxies.remove(uid) else {
            return false;
        };
        for t in &p.tasks {
            t.abort();
        }
        self.rt.block_on(async {
            for t in p.tasks {
                let _ = t.await;
            }
        });
        true
    }

    fn start_proxy(&self, uid: &str, netns: &OwnedFd) -> Result<Proxy> {
        let dns = !self.args.no_dns;
        let sockets = in_netns(netns, move || make_listeners(dns))??;
        let mut tasks = Vec::new();
        for (port, kind, fd) in sockets {
            let uid = uid.to_owned();
            tasks.push(match kind {
                Kind::Tcp => self.rt.spawn(serve_tcp(uid, port, fd)),
                Kind::Udp => self.rt.spawn(serve_udp(uid, port, fd)),
            });
        }
        Ok(Proxy {
            netns: (0, 0),
            tasks,
        })
    }
}

/// An error after which the connection is nacked and dropped (ztunnel reconnects).
struct DropConn(String);

fn netns_id(fd: &OwnedFd) -> Result<(u64, u64)> {
    let st = nix::sys::statfs::fstatfs(fd).context("fstatfs on received fd")?;
    if st.filesystem_type().0 as i64 != NSFS_MAGIC {
        bail!("received fd is not a namespace (not nsfs)");
    }
    let md = std::fs::File::from(fd.try_clone()?).metadata()?;
    Ok((md.dev(), md.ino()))
}

/// Runs `f` on a fresh thread inside the netns (the thread dies afterwards).
fn in_netns<T: Send + 'static>(
    netns: &OwnedFd,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let fd = netns.try_clone()?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the pod netns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Udp,
}

/// Creates ztunnel's sockets (called inside the pod netns): IPv4 on all ports,
/// IPv6 beside them where the netns has IPv6.
fn make_listeners(dns: bool) -> Result<Vec<(u16, Kind, OwnedFd)>> {
    let mut out = Vec::new();
    for port in [PORT_OUT, PORT_IN, PORT_HBONE] {
        out.push((
            port,
            Kind::Tcp,
            bind_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), Kind::Tcp)?,
        ));
        if let Ok(fd) = bind_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), Kind::Tcp) {
            out.push((port, Kind::Tcp, fd));
        }
    }
    if dns {
        let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT_DNS));
        out.push((PORT_DNS, Kind::Tcp, bind_socket(lo, Kind::Tcp)?));
        out.push((PORT_DNS, Kind::Udp, bind_socket(lo, Kind::Udp)?));
    }
    Ok(out)
}

fn bind_socket(addr: SocketAddr, kind: Kind) -> Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let ty = match kind {
        Kind::Tcp => SockType::Stream,
        Kind::Udp => SockType::Datagram,
    };
    let fd = socket::socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .with_context(|| format!("socket for {addr}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    setsockopt(&fd, sockopt::Mark, &PACKET_MARK).context("SO_MARK (needs CAP_NET_ADMIN)")?;
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))
        }
    }
    .with_context(|| format!("bind {addr}"))?;
    if let Kind::Tcp = kind {
        socket::listen(&fd, Backlog::new(128)?).with_context(|| format!("listen {addr}"))?;
    }
    Ok(fd)
}

async fn serve_tcp(uid: String, port: u16, fd: OwnedFd) {
    let std_l = std::net::TcpListener::from(fd);
    let Ok(listener) = tokio::net::TcpListener::from_std(std_l) else {
        return;
    };
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            // e.g. EMFILE: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let orig = if port == PORT_OUT || port == PORT_IN {
            original_dst(&stream, peer).map_or_else(|| "-".to_owned(), |a| a.to_string())
        } else {
            "-".to_owned()
        };
        emit(
            "accepted",
            json!({"uid": uid, "port": port, "proto": "tcp", "peer": peer.to_string(), "orig": orig}),
        );
        let line = format!("standin port={port} orig={orig}\n");
        tokio::spawn(async move {
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn serve_udp(uid: String, port: u16, fd: OwnedFd) {
    let std_s = std::net::UdpSocket::from(fd);
    let Ok(sock) = tokio::net::UdpSocket::from_std(std_s) else {
        return;
    };
    let mut buf = [0u8; 1500];
    loop {
        let Ok((_, peer)) = sock.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        emit(
            "accepted",
            json!({"uid": uid, "port": port, "proto": "udp", "peer": peer.to_string(), "orig": "-"}),
        );
        let line = format!("standin port={port} orig=-\n");
        let _ = sock.send_to(line.as_bytes(), peer).await;
    }
}

/// The pre-NAT destination (SO_ORIGINAL_DST), if the connection was redirected
/// or at least tracked.
fn original_dst(stream: &tokio::net::TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let fd = stream.as_fd();
    if peer.is_ipv4() {
        let sa = socket::getsockopt(&fd, sockopt::OriginalDst).ok()?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Some(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sa.sin_port),
        )))
    } else {
        let sa = socket::getsockopt(&fd, sockopt::Ip6tOriginalDst).ok()?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(sa.sin6_port),
            0,
            0,
        )))
    }
}

fn send(sock: &OwnedFd, bytes: &[u8]) -> Result<()> {
    Ok(zds_socket::send(sock.as_fd(), bytes, None)?)
}

fn send_ack(sock: &OwnedFd, error: &str) -> Result<()> {
    let resp = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.to_owned(),
        })),
    };
    send(sock, &resp.encode_to_vec())
}

/// One packet and the fds that came with it; `None` at EOF.
fn recv(sock: &OwnedFd) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let Some(p) = zds_socket::recv_with_fds(sock.as_fd(), &mut buf)? else {
        return Ok(None);
    };
    buf.truncate(p.len);
    Ok(Some((buf, p.fds)))
}
