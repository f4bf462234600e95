//! Real traffic (root): a "pod" netns wired by a veth to a "peer" netns; the rules are
//! applied through `Redirector` with each available backend, and connections prove
//! where packets land.

mod common;

use std::io::ErrorKind;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use iptables_rules::backend::{self, iptables::Iptables, BackendKind, RulesBackend};
use iptables_rules::model::{Chain, Match, Rule, Table, Target};
use iptables_rules::netns::Netns;
use iptables_rules::{inpod_ruleset, InpodConfig, Redirector};
use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};

const POD4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const WAIT: Duration = Duration::from_millis(1500);

/// Pod and peer netns joined by a veth (`eth0` on both sides), addresses and routes set.
struct Topo {
    pod: NamedNetns,
    /// Kept for its Drop (deletes the peer netns).
    _peer: NamedNetns,
    pod_ns: Netns,
    peer_ns: Netns,
}

fn topo() -> Topo {
    let pod = NamedNetns::new("pod");
    let peer = NamedNetns::new("peer");
    // Created with both ends already in their netns, so nothing appears on the host.
    sh(&[
        "ip", "link", "add", "eth0", "netns", &pod.name, "type", "veth", "peer", "name", "eth0",
        "netns", &peer.name,
    ]);
    for (ns, a4, a6) in [
        (&pod, "10.77.0.2/24", "fd77::2/64"),
        (&peer, "10.77.0.1/24", "fd77::1/64"),
    ] {
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "addr", "add", a4, "dev", "eth0"]);
        ns.exec(&["ip", "-6", "addr", "add", a6, "dev", "eth0", "nodad"]);
    }
    // The probe SNAT addresses live on the peer (the "node" side).
    peer.exec(&["ip", "addr", "add", "169.254.7.127/32", "dev", "eth0"]);
    peer.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128",
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    pod.exec(&["ip", "-6", "route", "add", "default", "via", "fd77::1"]);
    let pod_ns = pod.open();
    let peer_ns = peer.open();
    Topo {
        pod,
        _peer: peer,
        pod_ns,
        peer_ns,
    }
}

/// A bound socket in `ns`; IPv6 ones are v6-only so the v4 and v6 passes never collide
/// on a port (a dual-stack `[::]` bind conflicts with lingering v4 sockets).
fn bound(ns: &Netns, addr: SocketAddr, ty: SockType) -> OwnedFd {
    ns.run(move || {
        let fam = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = sock::socket(fam, ty, SockFlag::SOCK_CLOEXEC, None).unwrap();
        sock::setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
        if addr.is_ipv6() {
            sock::setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
        }
        sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        fd
    })
    .unwrap()
}

fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let fd = bound(ns, addr, SockType::Stream);
    sock::listen(&fd, sock::Backlog::new(16).unwrap()).unwrap();
    let l = TcpListener::from(fd);
    l.set_nonblocking(true).unwrap();
    l
}

fn udp_bind(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = UdpSocket::from(bound(ns, addr, SockType::Datagram));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Accepts one connection within `WAIT`, if any arrives.
fn accepted(l: &TcpListener) -> Option<TcpStream> {
    accepted_within(l, WAIT)
}

/// For "must not arrive" checks, made after the connection already landed elsewhere.
fn none_pending(l: &TcpListener) -> bool {
    accepted_within(l, Duration::from_millis(30)).is_none()
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

/// Connects from inside `ns` (optionally with SO_MARK and a bound source), with a timeout.
fn connect(
    ns: &Netns,
    dst: SocketAddr,
    mark: Option<u32>,
    src: Option<IpAddr>,
) -> Result<TcpStream, String> {
    ns.run(move || -> Result<TcpStream, String> {
        let fam = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd: OwnedFd = sock::socket(
            fam,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| e.to_string())?;
        if let Some(m) = mark {
            sock::setsockopt(&fd, sockopt::Mark, &m).map_err(|e| e.to_string())?;
        }
        if let Some(s) = src {
            sock::bind(
                fd.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(s, 0)),
            )
            .map_err(|e| e.to_string())?;
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
    })
    .unwrap()
}

fn original_dst(s: &TcpStream, v6: bool) -> SocketAddr {
    if v6 {
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

/// The backends to run: all that `make` can build; a `NotAvailable` one is skipped loudly.
fn backends() -> Vec<BackendKind> {
    let mut out = Vec::new();
    for kind in BackendKind::ALL {
        match backend::make(kind) {
            Ok(_) => out.push(kind),
            Err(e) if e.is_not_available() => eprintln!("SKIPPED backend {kind}: {e}"),
            Err(e) => panic!("backend {kind}: {e}"),
        }
    }
    out
}

fn redirector(kind: BackendKind) -> Redirector {
    Redirector::new(backend::make(kind).unwrap())
}

/// Everything a netns shows of netfilter and policy routing, for before/after equality.
fn snapshot(ns: &NamedNetns) -> String {
    let mut s = String::new();
    for cmd in [
        &["iptables-save"][..],
        &["ip6tables-save"],
        &["iptables-legacy-save"],
        &["nft", "list", "ruleset"],
        &["ip", "rule"],
        &["ip", "-6", "rule"],
        &["ip", "route", "show", "table", "100"],
        &["ip", "-6", "route", "show", "table", "100"],
    ] {
        // A never-used table 100 is an error for `ip route show`, an emptied one is empty:
        // the kernel keeps FIB tables once created, so both count as "no routes".
        let out = ns.exec_stdin(cmd, "").unwrap_or_default();
        let out = if cmd[0] == "nft" {
            iptables_rules::normalize::nft_list(&out)
        } else {
            iptables_rules::normalize::iptables_save_all(&out)
        };
        s.push_str(&format!("== {}\n{out}\n", cmd.join(" ")));
    }
    s
}

struct Listeners {
    out15001: TcpListener,
    in15006: TcpListener,
    hbone15008: TcpListener,
    app8080: TcpListener,
    dns15053_tcp: TcpListener,
    dns15053_udp: UdpSocket,
    peer80: TcpListener,
    peer53_tcp: TcpListener,
    peer53_udp: UdpSocket,
}

fn listeners(t: &Topo, v6: bool) -> Listeners {
    let peer = if v6 {
        IpAddr::V6(PEER6)
    } else {
        IpAddr::V4(PEER4)
    };
    Listeners {
        out15001: listen(&t.pod_ns, any(v6, 15001)),
        in15006: listen(&t.pod_ns, any(v6, 15006)),
        hbone15008: listen(&t.pod_ns, any(v6, 15008)),
        app8080: listen(&t.pod_ns, any(v6, 8080)),
        dns15053_tcp: listen(&t.pod_ns, any(v6, 15053)),
        dns15053_udp: udp_bind(&t.pod_ns, any(v6, 15053)),
        peer80: listen(&t.peer_ns, SocketAddr::new(peer, 80)),
        peer53_tcp: listen(&t.peer_ns, SocketAddr::new(peer, 53)),
        peer53_udp: udp_bind(&t.peer_ns, SocketAddr::new(peer, 53)),
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

/// The core behaviour for one family: outbound, ztunnel-marked, inbound, HBONE, probes, DNS.
fn check_traffic(t: &Topo, cfg: &InpodConfig, v6: bool, tag: &str) {
    let l = listeners(t, v6);
    let (pod, peer) = if v6 {
        (IpAddr::V6(POD6), IpAddr::V6(PEER6))
    } else {
        (IpAddr::V4(POD4), IpAddr::V4(PEER4))
    };
    let snat = if v6 {
        IpAddr::V6(cfg.probe_snat_v6)
    } else {
        IpAddr::V4(cfg.probe_snat_v4)
    };

    // Outbound TCP from an app lands on 15001 with the original destination intact.
    let _c = connect(&t.pod_ns, SocketAddr::new(peer, 80), None, None).expect("outbound connect");
    let s =
        accepted(&l.out15001).unwrap_or_else(|| panic!("{tag}: outbound not redirected to 15001"));
    assert_eq!(
        original_dst(&s, v6),
        SocketAddr::new(peer, 80),
        "{tag}: SO_ORIGINAL_DST"
    );
    assert!(
        none_pending(&l.peer80),
        "{tag}: outbound also reached the peer"
    );

    // ztunnel's own (marked) sockets go straight out.
    let _c =
        connect(&t.pod_ns, SocketAddr::new(peer, 80), Some(0x539), None).expect("marked connect");
    assert!(
        accepted(&l.peer80).is_some(),
        "{tag}: marked connection did not reach peer:80"
    );
    assert!(
        none_pending(&l.out15001),
        "{tag}: marked connection was redirected"
    );

    // Inbound: to an app port -> 15006 (unless bypassed); to 15008 -> 15008.
    let _c = connect(&t.peer_ns, SocketAddr::new(pod, 8080), None, None).expect("inbound connect");
    if cfg.bypass_inbound {
        assert!(
            accepted(&l.app8080).is_some(),
            "{tag}: bypassed inbound did not reach 8080"
        );
        assert!(
            none_pending(&l.in15006),
            "{tag}: bypassed inbound redirected"
        );
    } else {
        let s = accepted(&l.in15006)
            .unwrap_or_else(|| panic!("{tag}: inbound not redirected to 15006"));
        assert_eq!(
            original_dst(&s, v6),
            SocketAddr::new(pod, 8080),
            "{tag}: inbound SO_ORIGINAL_DST"
        );
        assert!(none_pending(&l.app8080), "{tag}: inbound also reached 8080");
    }
    let _c = connect(&t.peer_ns, SocketAddr::new(pod, 15008), None, None).expect("hbone connect");
    assert!(
        accepted(&l.hbone15008).is_some(),
        "{tag}: HBONE did not reach 15008"
    );
    assert!(
        none_pending(&l.in15006),
        "{tag}: HBONE was redirected to 15006"
    );

    // Host probes (source = SNAT IP) reach the app unredirected.
    let _c =
        connect(&t.peer_ns, SocketAddr::new(pod, 8080), None, Some(snat)).expect("probe connect");
    assert!(
        accepted(&l.app8080).is_some(),
        "{tag}: probe did not reach 8080"
    );
    assert!(none_pending(&l.in15006), "{tag}: probe was redirected");

    // DNS.
    let dns = SocketAddr::new(peer, 53);
    if cfg.dns_capture {
        assert!(
            udp_lands(&t.pod_ns, dns, &l.dns15053_udp),
            "{tag}: UDP DNS not captured"
        );
        let _c = connect(&t.pod_ns, dns, None, None).expect("tcp dns connect");
        assert!(
            accepted(&l.dns15053_tcp).is_some(),
            "{tag}: TCP DNS not captured"
        );
    } else {
        assert!(
            udp_lands(&t.pod_ns, dns, &l.peer53_udp),
            "{tag}: UDP DNS did not reach the peer"
        );
        let _c = connect(&t.pod_ns, dns, None, None).expect("tcp dns connect");
        // Without DNS capture TCP/53 is ordinary outbound TCP: ztunnel's 15001 takes it.
        assert!(
            accepted(&l.out15001).is_some(),
            "{tag}: TCP DNS not on the outbound path"
        );
        assert!(
            none_pending(&l.dns15053_tcp),
            "{tag}: TCP DNS captured with DNS off"
        );
    }
    drop(l.peer53_tcp);
}

fn run_case(kind: BackendKind, cfg: InpodConfig, tag: &str) {
    let t = topo();
    let r = redirector(kind);
    r.apply(&t.pod_ns, &cfg)
        .unwrap_or_else(|e| panic!("{kind} {tag}: apply: {e}"));
    let report = r.show(&t.pod_ns, &cfg).unwrap();
    assert!(
        report.complete,
        "{kind} {tag}: show says incomplete: {report:?}"
    );
    check_traffic(&t, &cfg, false, &format!("{kind} {tag} v4"));
    if cfg.ipv6 {
        check_traffic(&t, &cfg, true, &format!("{kind} {tag} v6"));
    }
}

#[test]
fn default_rules_redirect_real_traffic() {
    if !root_or_skip("default_rules_redirect_real_traffic") {
        return;
    }
    for kind in backends() {
        run_case(kind, InpodConfig::default(), "default");
    }
}

#[test]
fn dual_stack_rules_redirect_real_traffic() {
    if !root_or_skip("dual_stack_rules_redirect_real_traffic") {
        return;
    }
    for kind in backends() {
        run_case(
            kind,
            InpodConfig {
                ipv6: true,
                ..InpodConfig::default()
            },
            "ipv6",
        );
    }
}

#[test]
fn dns_off_leaves_dns_alone() {
    if !root_or_skip("dns_off_leaves_dns_alone") {
        return;
    }
    for kind in backends() {
        run_case(
            kind,
            InpodConfig {
                dns_capture: false,
                ipv6: true,
                ..InpodConfig::default()
            },
            "dns-off",
        );
    }
}

#[test]
fn bypass_inbound_keeps_outbound_capture() {
    if !root_or_skip("bypass_inbound_keeps_outbound_capture") {
        return;
    }
    for kind in backends() {
        run_case(
            kind,
            InpodConfig {
                bypass_inbound: true,
                ipv6: true,
                ..InpodConfig::default()
            },
            "bypass",
        );
    }
}

#[test]
fn apply_twice_is_one_copy_and_remove_restores_the_netns() {
    if !root_or_skip("apply_twice_is_one_copy_and_remove_restores_the_netns") {
        return;
    }
    for kind in backends() {
        let t = topo();
        let before = snapshot(&t.pod);
        let r = redirector(kind);
        let cfg = InpodConfig {
            ipv6: true,
            ..InpodConfig::default()
        };
        r.apply(&t.pod_ns, &cfg).unwrap();
        let once = snapshot(&t.pod);
        r.apply(&t.pod_ns, &cfg).unwrap();
        assert_eq!(snapshot(&t.pod), once, "{kind}: second apply changed state");
        assert!(r.show(&t.pod_ns, &cfg).unwrap().complete);
        // A different config replaces ours in place (still one copy).
        let other = InpodConfig {
            dns_capture: false,
            bypass_inbound: true,
            ..InpodConfig::default()
        };
        r.apply(&t.pod_ns, &other).unwrap();
        assert!(
            r.show(&t.pod_ns, &other).unwrap().complete,
            "{kind}: reconfigured state incomplete"
        );
        assert!(!r.show(&t.pod_ns, &cfg).unwrap().complete);
        r.apply(&t.pod_ns, &cfg).unwrap();
        // iptables-nft re-creates chains in another order, which `nft list` shows; compare
        // what the tools and the kernel's semantics see instead.
        assert!(
            r.show(&t.pod_ns, &cfg).unwrap().complete,
            "{kind}: re-applying the first config"
        );
        r.remove(&t.pod_ns, &cfg).unwrap();
        assert_eq!(
            snapshot(&t.pod),
            before,
            "{kind}: remove did not restore the netns"
        );
        r.remove(&t.pod_ns, &cfg).unwrap();
        assert_eq!(
            snapshot(&t.pod),
            before,
            "{kind}: second remove changed state"
        );
        let report = r.show(&t.pod_ns, &cfg).unwrap();
        assert!(
            report.installed.is_empty() && report.route.is_empty(),
            "{kind}: {report:?}"
        );
    }
}

#[test]
fn failing_route_rolls_back_the_rules() {
    if !root_or_skip("failing_route_rolls_back_the_rules") {
        return;
    }
    for kind in backends() {
        let t = topo();
        // With lo down the IPv6 local route is refused (ENETDOWN) after the rules went in.
        t.pod.exec(&["ip", "link", "set", "lo", "down"]);
        let before = snapshot(&t.pod);
        let r = redirector(kind);
        let err = r
            .apply(
                &t.pod_ns,
                &InpodConfig {
                    ipv6: true,
                    ..InpodConfig::default()
                },
            )
            .unwrap_err();
        assert!(
            err.to_string().contains(&t.pod.name),
            "error names the netns: {err}"
        );
        assert_eq!(
            snapshot(&t.pod),
            before,
            "{kind}: failed apply left state behind"
        );
    }
}

#[test]
fn iptables_failing_late_keeps_the_previous_state() {
    if !root_or_skip("iptables_failing_late_keeps_the_previous_state") {
        return;
    }
    let t = topo();
    let ipt = Iptables::detect().unwrap();
    let cfg = InpodConfig {
        ipv6: true,
        ..InpodConfig::default()
    };
    let before = snapshot(&t.pod);
    // Fails in the last table (raw: REDIRECT is nat-only) after mangle and nat committed.
    let mut bad = inpod_ruleset(&InpodConfig {
        dns_capture: true,
        bypass_inbound: true,
        ipv6: true,
        ..InpodConfig::default()
    });
    bad.rules.push(Rule::new(
        None,
        Table::Raw,
        Chain::IstioOutput,
        vec![Match::Iif("x".into())],
        Target::Redirect(1),
    ));
    // On a clean netns: nothing is left.
    let err = t
        .pod_ns
        .run(|| ipt.apply_ruleset(&bad))
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("restore"), "{err}");
    assert_eq!(snapshot(&t.pod), before, "failed first apply left state");
    // Over an installed ruleset: the previous one stays exactly.
    t.pod_ns.run(|| ipt.apply(&cfg)).unwrap().unwrap();
    let good = snapshot(&t.pod);
    t.pod_ns
        .run(|| ipt.apply_ruleset(&bad))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        snapshot(&t.pod),
        good,
        "failed re-apply changed the previous state"
    );
    assert!(
        t.pod_ns
            .run(|| ipt.installed(&cfg))
            .unwrap()
            .unwrap()
            .matches_expected
    );
    t.pod_ns.run(|| ipt.remove(&cfg)).unwrap().unwrap();
    assert_eq!(snapshot(&t.pod), before);
}

#[test]
fn virtual_interface_names_are_validated() {
    // Pod annotations flow into restore text: anything but an interface name is refused.
    let ipt = Iptables::with_binary(
        iptables_rules::backend::iptables::Flavor::Nft,
        "iptables-nft",
    );
    for bad in [
        "eth0\n-A OUTPUT -j DROP",
        "a b",
        "",
        "this-name-is-too-long",
        "../x",
    ] {
        let cfg = InpodConfig {
            virtual_interfaces: vec![bad.into()],
            ..InpodConfig::default()
        };
        let err = ipt.apply(&cfg).unwrap_err();
        assert!(
            matches!(err, iptables_rules::RulesError::Config(_)),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn iptables_legacy_applies_idempotently_and_rolls_back() {
    if !root_or_skip("iptables_legacy_applies_idempotently_and_rolls_back") {
        return;
    }
    use iptables_rules::backend::iptables::Flavor;
    let t = topo();
    let ipt = Iptables::with_binary(Flavor::Legacy, "iptables-legacy");
    let r = Redirector::new(Box::new(ipt.clone()));
    let cfg = InpodConfig {
        ipv6: true,
        ..InpodConfig::default()
    };
    r.apply(&t.pod_ns, &cfg).unwrap();
    check_traffic(&t, &cfg, false, "legacy v4");
    check_traffic(&t, &cfg, true, "legacy v6");
    let once = snapshot(&t.pod);
    r.apply(&t.pod_ns, &cfg).unwrap();
    assert_eq!(snapshot(&t.pod), once, "legacy: second apply changed state");
    let mut bad = inpod_ruleset(&cfg);
    bad.rules.push(Rule::new(
        None,
        Table::Raw,
        Chain::IstioOutput,
        vec![],
        Target::Redirect(1),
    ));
    t.pod_ns
        .run(|| ipt.apply_ruleset(&bad))
        .unwrap()
        .unwrap_err();
    assert_eq!(snapshot(&t.pod), once, "legacy: failed apply changed state");
    r.remove(&t.pod_ns, &cfg).unwrap();
    // Legacy tables stay registered once used; none of ours may remain.
    let report = r.show(&t.pod_ns, &cfg).unwrap();
    assert!(
        report.installed.is_empty() && report.route.is_empty(),
        "{report:?}"
    );
    assert!(!t.pod.exec(&["iptables-legacy-save"]).contains("ISTIO"));
    assert!(!t.pod.exec(&["ip6tables-legacy-save"]).contains("ISTIO"));
}
