//! Sidecar mode with real traffic (root): a pod netns wired by a veth to a peer netns, the
//! rules applied through `SidecarRedirector`, an "app" (root) and an "envoy" stand-in (a
//! thread running as uid/gid 1337), and connections that show where packets land.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use iptables_rules::backend::BackendKind;
use iptables_rules::netns::Netns;
use iptables_rules::sidecar::{Applied, SidecarConfig, SidecarInputs, SidecarRedirector};
use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};

const POD4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// A second peer network, excluded from capture by annotation.
const EXCLUDED4: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 1);
const WAIT: Duration = Duration::from_millis(1500);
/// The proxy's UID/GID (Istio's default).
const PROXY: u32 = 1337;

/// Pod and peer netns joined by a veth (`eth0` both sides).
struct Topo {
    _pod: NamedNetns,
    _peer: NamedNetns,
    pod: Netns,
    peer: Netns,
}

fn topo() -> Topo {
    let pod = NamedNetns::new("scpod");
    let peer = NamedNetns::new("scpeer");
    sh(&[
        "ip", "link", "add", "eth0", "netns", &pod.name, "type", "veth", "peer", "name", "eth0",
        "netns", &peer.name,
    ]);
    for (ns, a4, a6) in [
        (&pod, "10.78.0.2/24", "fd78::2/64"),
        (&peer, "10.78.0.1/24", "fd78::1/64"),
    ] {
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "addr", "add", a4, "dev", "eth0"]);
        ns.exec(&["ip", "-6", "addr", "add", a6, "dev", "eth0", "nodad"]);
    }
    peer.exec(&["ip", "addr", "add", "10.78.1.1/24", "dev", "eth0"]);
    pod.exec(&["ip", "route", "add", "default", "via", "10.78.0.1"]);
    pod.exec(&["ip", "-6", "route", "add", "default", "via", "fd78::1"]);
    let (pod_ns, peer_ns) = (pod.open(), peer.open());
    Topo {
        _pod: pod,
        _peer: peer,
        pod: pod_ns,
        peer: peer_ns,
    }
}

fn inputs(ann: &[(&str, &str)], env: &[(&str, &str)], v6: bool) -> SidecarInputs {
    let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    SidecarInputs {
        pod: "default/app".into(),
        annotations: map(ann),
        proxy_env: map(env),
        proxy_uid: Some(i64::from(PROXY)),
        proxy_gid: Some(i64::from(PROXY)),
        pod_ips: vec![if v6 {
            IpAddr::V6(POD6)
        } else {
            IpAddr::V4(POD4)
        }],
    }
}

/// Runs `f` in `ns` on a thread whose credentials are uid/gid 1337 (the proxy); the raw
/// syscalls change this thread only, the test process stays root.
fn as_proxy<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    ns.run(move || {
        // SAFETY: plain syscalls with integer arguments.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, PROXY, PROXY, PROXY), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, PROXY, PROXY, PROXY), 0);
        }
        f()
    })
    .unwrap()
}

fn fam(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// A listening TCP socket bound on the calling thread (its netns and credentials).
fn listen_here(addr: SocketAddr, transparent: bool) -> TcpListener {
    let fd = sock::socket(fam(&addr), SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    if addr.is_ipv6() {
        sock::setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
    }
    if transparent {
        // What Envoy's inbound listener sets in TPROXY mode; TPROXY only hands packets to
        // transparent sockets.
        sock::setsockopt(&fd, sockopt::IpTransparent, &true).unwrap();
    }
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    sock::listen(&fd, sock::Backlog::new(16).unwrap()).unwrap();
    let l = TcpListener::from(fd);
    l.set_nonblocking(true).unwrap();
    l
}

fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run(|| listen_here(addr, false)).unwrap()
}

fn udp_bind(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = ns.run(|| UdpSocket::bind(addr).unwrap()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn accepted_within(l: &TcpListener, wait: Duration) -> Option<TcpStream> {
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if start.elapsed() > wait {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn accepted(l: &TcpListener) -> Option<TcpStream> {
    accepted_within(l, WAIT)
}

/// Nothing arrived (checked after the connection landed elsewhere).
fn none_pending(l: &TcpListener) -> bool {
    accepted_within(l, Duration::from_millis(30)).is_none()
}

/// Connects from the calling thread, optionally from a bound source, with a timeout.
fn connect_here(dst: SocketAddr, src: Option<SocketAddr>) -> Result<TcpStream, String> {
    let fd: OwnedFd = sock::socket(
        fam(&dst),
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| e.to_string())?;
    if let Some(s) = src {
        sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(s)).map_err(|e| e.to_string())?;
    }
    match sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let mut fds = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLOUT,
            )];
            let n = nix::poll::poll(&mut fds, 1500u16).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("connect {dst}: timeout"));
            }
            let err = sock::getsockopt(&fd, sockopt::SocketError).map_err(|e| e.to_string())?;
            if err != 0 {
                return Err(format!(
                    "connect {dst}: {}",
                    std::io::Error::from_raw_os_error(err)
                ));
            }
        }
        Err(e) => return Err(format!("connect {dst}: {e}")),
    }
    Ok(TcpStream::from(fd))
}

fn connect(ns: &Netns, dst: SocketAddr) -> Result<TcpStream, String> {
    ns.run(|| connect_here(dst, None)).unwrap()
}

fn original_dst(s: &TcpStream) -> SocketAddr {
    if s.local_addr().unwrap().is_ipv6() {
        let a = sock::getsockopt(s, sockopt::Ip6tOriginalDst).unwrap();
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
            0,
            0,
        ))
    } else {
        let a = sock::getsockopt(s, sockopt::OriginalDst).unwrap();
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ))
    }
}

fn any(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    }
}

fn udp_lands(from: &Netns, dst: SocketAddr, on: &UdpSocket) -> bool {
    from.run(|| {
        let s = UdpSocket::bind(any(dst.is_ipv6(), 0)).unwrap();
        s.send_to(b"q", dst).unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 8];
    on.recv_from(&mut buf).is_ok()
}

/// The sidecar backends to run: both.
fn backends() -> Vec<BackendKind> {
    BackendKind::ALL.to_vec()
}

/// REDIRECT mode, one family: outbound to 15001 with its original destination, the
/// proxy's own traffic direct, excluded port and CIDR direct, inbound to 15006, DNS to 15053.
fn redirect_case(kind: BackendKind, v6: bool) {
    let t = topo();
    let (peer, pod) = if v6 {
        (IpAddr::V6(PEER6), IpAddr::V6(POD6))
    } else {
        (IpAddr::V4(PEER4), IpAddr::V4(POD4))
    };
    let cfg = SidecarConfig::from_inputs(&inputs(
        &[
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9090"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.78.1.0/24",
            ),
        ],
        &[("ISTIO_META_DNS_CAPTURE", "true")],
        v6,
    ))
    .unwrap();
    assert_eq!(cfg.ipv6(), v6);
    let r = SidecarRedirector::new(kind);
    assert_eq!(r.apply(&t.pod, &cfg).unwrap(), Applied::Installed);
    let tag = format!("{kind} v6={v6}");

    let out15001 = listen(&t.pod, any(v6, 15001));
    let in15006 = listen(&t.pod, any(v6, 15006));
    let dns15053 = udp_bind(&t.pod, any(v6, 15053));
    let peer80 = listen(&t.peer, SocketAddr::new(peer, 80));
    let peer9090 = listen(&t.peer, SocketAddr::new(peer, 9090));
    let peer53 = udp_bind(&t.peer, SocketAddr::new(peer, 53));

    // The app's outbound lands on Envoy's outbound listener, original destination intact.
    let _c = connect(&t.pod, SocketAddr::new(peer, 80)).unwrap();
    let s = accepted(&out15001).unwrap_or_else(|| panic!("{tag}: app outbound not on 15001"));
    assert_eq!(original_dst(&s), SocketAddr::new(peer, 80), "{tag}");
    assert!(none_pending(&peer80), "{tag}");

    // The proxy's own outbound goes out as it is.
    let _c = as_proxy(&t.pod, || connect_here(SocketAddr::new(peer, 80), None)).unwrap();
    assert!(
        accepted(&peer80).is_some(),
        "{tag}: proxy outbound not direct"
    );
    assert!(none_pending(&out15001), "{tag}");

    // An excluded port goes direct.
    let _c = connect(&t.pod, SocketAddr::new(peer, 9090)).unwrap();
    assert!(
        accepted(&peer9090).is_some(),
        "{tag}: excluded port captured"
    );
    assert!(none_pending(&out15001), "{tag}");

    if !v6 {
        // An excluded CIDR goes direct.
        let excl80 = listen(&t.peer, SocketAddr::new(IpAddr::V4(EXCLUDED4), 80));
        let _c = connect(&t.pod, SocketAddr::new(IpAddr::V4(EXCLUDED4), 80)).unwrap();
        assert!(accepted(&excl80).is_some(), "{tag}: excluded CIDR captured");
        assert!(none_pending(&out15001), "{tag}");
    }

    // Inbound from the peer lands on Envoy's inbound listener.
    let _c = connect(&t.peer, SocketAddr::new(pod, 8080)).unwrap();
    let s = accepted(&in15006).unwrap_or_else(|| panic!("{tag}: inbound not on 15006"));
    assert_eq!(original_dst(&s), SocketAddr::new(pod, 8080), "{tag}");

    // DNS capture: the app's UDP 53 reaches the agent's DNS listener, not the server.
    assert!(
        udp_lands(&t.pod, SocketAddr::new(peer, 53), &dns15053),
        "{tag}: DNS not on 15053"
    );
    peer53
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    assert!(
        peer53.recv_from(&mut [0u8; 8]).is_err(),
        "{tag}: DNS went direct"
    );

    // Re-applying the same config is a no-op.
    assert_eq!(r.apply(&t.pod, &cfg).unwrap(), Applied::AlreadyPresent);
    assert!(r.matches(&t.pod, &cfg).unwrap());
}

#[test]
fn sidecar_redirect_mode_real_traffic_ipv4() {
    if root_or_skip("sidecar_redirect_mode_real_traffic_ipv4") {
        for kind in backends() {
            redirect_case(kind, false);
        }
    }
}

#[test]
fn sidecar_redirect_mode_real_traffic_ipv6() {
    if root_or_skip("sidecar_redirect_mode_real_traffic_ipv6") {
        for kind in backends() {
            redirect_case(kind, true);
        }
    }
}

#[test]
fn sidecar_tproxy_inbound_reaches_15006() {
    if !root_or_skip("sidecar_tproxy_inbound_reaches_15006") {
        return;
    }
    for kind in backends() {
        let t = topo();
        let cfg = SidecarConfig::from_inputs(&inputs(
            &[("sidecar.istio.io/interceptionMode", "TPROXY")],
            &[],
            false,
        ))
        .unwrap();
        let r = SidecarRedirector::new(kind);
        assert_eq!(r.apply(&t.pod, &cfg).unwrap(), Applied::Installed);
        let rules = t._pod.exec(&["ip", "rule"]);
        assert!(
            rules.contains("fwmark 0x539 lookup 133"),
            "{kind}: no TPROXY rule: {rules}"
        );
        let routes = t._pod.exec(&["ip", "route", "show", "table", "133"]);
        assert!(
            routes.contains("local default dev lo"),
            "{kind}: no TPROXY route: {routes}"
        );
        let in15006 = t.pod.run(|| listen_here(any(false, 15006), true)).unwrap();
        let app8080 = listen(&t.pod, any(false, 8080));
        let dst = SocketAddr::new(IpAddr::V4(POD4), 8080);
        let _c = connect(&t.peer, dst).unwrap();
        let s = accepted(&in15006).unwrap_or_else(|| panic!("{kind}: TPROXY inbound not on 15006"));
        // TPROXY keeps the original destination as the socket's local address.
        assert_eq!(s.local_addr().unwrap(), dst, "{kind}");
        assert!(none_pending(&app8080), "{kind}");
        assert_eq!(r.apply(&t.pod, &cfg).unwrap(), Applied::AlreadyPresent);
    }
}

/// Istio's `istio-validation` check, as the proxy: listen on 127.0.0.1:15001 and :15006,
/// dial 127.0.0.6:15002 from 127.0.0.1, and read back the original port the listener saw.
fn validation_check(ns: &Netns) -> Result<u16, String> {
    as_proxy(ns, || {
        let listeners = [
            listen_here("127.0.0.1:15001".parse().unwrap(), false),
            listen_here("127.0.0.1:15006".parse().unwrap(), false),
        ];
        let mut c = connect_here(
            "127.0.0.6:15002".parse().unwrap(),
            Some("127.0.0.1:0".parse().unwrap()),
        )?;
        let start = Instant::now();
        while start.elapsed() < WAIT {
            for l in &listeners {
                if let Ok((mut s, _)) = l.accept() {
                    let port = original_dst(&s).port();
                    // The validator echoes the port back to its client.
                    s.write_all(port.to_string().as_bytes()).unwrap();
                    drop(s);
                    let mut got = String::new();
                    c.set_nonblocking(false).unwrap();
                    c.read_to_string(&mut got).unwrap();
                    assert_eq!(got, port.to_string());
                    return Ok(port);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err("no listener accepted the probe".into())
    })
}

#[test]
fn sidecar_istio_validation_check_passes_only_with_rules() {
    if !root_or_skip("sidecar_istio_validation_check_passes_only_with_rules") {
        return;
    }
    for kind in backends() {
        let ns = NamedNetns::new("scvalid");
        let pod = ns.open();
        // No rules: the probe is refused (istio-validation would exit 126).
        let err = validation_check(&pod).unwrap_err();
        assert!(err.contains("refused"), "{kind}: {err}");
        let cfg = SidecarConfig::from_inputs(&inputs(&[], &[], false)).unwrap();
        SidecarRedirector::new(kind).apply(&pod, &cfg).unwrap();
        assert_eq!(validation_check(&pod), Ok(15002), "{kind}");
    }
}
