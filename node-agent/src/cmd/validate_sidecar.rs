//! `ambient-cni-agent validate-sidecar`: Istio's `istio-validation` check (the init container
//! the injector adds when istio-cni programs sidecar pods), reproduced for debugging and for
//! our own real-node test: are this netns's sidecar REDIRECT rules in place?
//!
//! As Istio's `tools/istio-iptables/pkg/validation`: listen on loopback at the proxy's
//! outbound (15001) and inbound (15006) ports, dial `127.0.0.6:15002` (`::6` when the pod's
//! first address is IPv6) once a second from `127.0.0.1`, and succeed when a listener accepts
//! a connection whose original destination (`SO_ORIGINAL_DST`) is port 15002: only the rules
//! can turn that dial into a connection to a listener. Run it as the proxy's uid (1337): the
//! rules redirect loopback traffic only for that owner. No redirection within the timeout
//! exits 126 (Istio's `ValidationErrorCode`, what its repair controller looks for) with
//! Istio's message.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};

/// Exit status when the rules are not there (Istio's `constants.ValidationErrorCode`).
pub const VALIDATION_ERROR_CODE: i32 = 126;

/// What Istio's `istio-iptables --run-validation` prints when the check fails.
pub const FAILURE_MESSAGE: &str = "iptables validation failed; workload is not ready for Istio.
When using Istio CNI, this can occur if a pod is scheduled before the node is ready.

If installed with 'cni.repair.deletePods=true', this pod should automatically be deleted and retry.
Otherwise, this pod will need to be manually removed so that it is scheduled on a node with istio-cni running, allowing iptables rules to be established.
";

/// How often the client dials (Istio's: once a second, so TIME_WAIT sockets stay few).
const DIAL_EVERY: Duration = Duration::from_secs(1);

/// Flags of `validate-sidecar` (Istio's defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct ValidateArgs {
    /// The proxy's outbound capture port (Istio's `ENVOY_PORT`).
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// The proxy's inbound capture port (Istio's `INBOUND_CAPTURE_PORT`).
    #[arg(long, default_value_t = 15006)]
    pub inbound_capture_port: u16,
    /// The port dialled on 127.0.0.6 that the rules must redirect (Istio's `IPTABLES_PROBE_PORT`).
    #[arg(long, default_value_t = 15002)]
    pub probe_port: u16,
    /// Give up after this many seconds (Istio's `PROBE_TIMEOUT`, 5s).
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    pub probe_timeout: Duration,
    /// No check: stand in for the proxy until killed, listening on every address at the two
    /// ports and answering each connection with its original destination port (tests, and to
    /// see what a sidecar pod's rules redirect).
    #[arg(long)]
    pub serve: bool,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let t = s.trim().trim_end_matches('s');
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?}: not a number of seconds between 0 and 3600")),
    }
}

/// The sockets of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where the "proxy" listens.
    pub listen: Vec<SocketAddr>,
    /// The client's source (port chosen by the kernel).
    pub source: SocketAddr,
    /// What the client dials.
    pub target: SocketAddr,
}

/// Istio's choice: IPv6 loopback addresses when the first non-loopback, non-link-local
/// address of the netns is IPv6, else IPv4.
pub fn plan(addrs: &[IpAddr], args: &ValidateArgs) -> Plan {
    let v6 = first_pod_address(addrs).is_some_and(|a| a.is_ipv6());
    let (listen_ip, server_ip): (IpAddr, IpAddr) = if v6 {
        (
            Ipv6Addr::LOCALHOST.into(),
            Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into(),
        )
    } else {
        (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(127, 0, 0, 6).into(),
        )
    };
    Plan {
        listen: [args.proxy_port, args.inbound_capture_port]
            .iter()
            .map(|p| SocketAddr::new(listen_ip, *p))
            .collect(),
        source: SocketAddr::new(listen_ip, 0),
        target: SocketAddr::new(server_ip, args.probe_port),
    }
}

/// The address Istio's `getLocalIP` picks (IPv4-mapped addresses unwrapped).
pub fn first_pod_address(addrs: &[IpAddr]) -> Option<IpAddr> {
    addrs.iter().map(|a| a.to_canonical()).find(|a| match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_multicast(),
        IpAddr::V6(v6) => {
            let link_local_multicast = v6.is_multicast() && (v6.segments()[0] & 0x000f) == 2;
            !(v6.is_loopback() || v6.is_unicast_link_local() || link_local_multicast)
        }
    })
}

/// The netns's interface addresses, in kernel order.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    ifaddrs
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect()
}

/// Runs the check; returns the exit status (0 redirected, 126 not).
pub fn run(args: ValidateArgs) -> i32 {
    let plan = plan(&local_addresses(), &args);
    if args.serve {
        return serve_forever(&plan);
    }
    eprintln!(
        "Starting iptables validation. This check verifies that iptables rules are properly established for the network."
    );
    match validate(&plan, args.probe_port, args.probe_timeout) {
        Ok(()) => {
            eprintln!("Validation passed, iptables rules established");
            0
        }
        Err(e) => {
            eprintln!("Validation failed: {e}");
            eprint!("{FAILURE_MESSAGE}");
            let _ = std::io::stderr().flush();
            VALIDATION_ERROR_CODE
        }
    }
}

/// Listens, dials until a listener sees `probe_port` as the original destination, or times out.
pub fn validate(plan: &Plan, probe_port: u16, timeout: Duration) -> Result<(), String> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut listening = 0;
    for addr in &plan.listen {
        // std sets SO_REUSEADDR, as Istio's listener does.
        match TcpListener::bind(addr) {
            Ok(l) => {
                eprintln!("Listening on {addr}");
                listening += 1;
                let tx = done_tx.clone();
                std::thread::spawn(move || serve(l, probe_port, tx));
            }
            Err(e) => eprintln!("Error on listening on {addr}: {e}"),
        }
    }
    if listening == 0 {
        let all: Vec<String> = plan.listen.iter().map(|a| a.to_string()).collect();
        return Err(format!("no listener available: {}", all.join(",")));
    }
    let (source, target) = (plan.source, plan.target);
    // Detached: the process ends with the answer, whatever the dialler is doing.
    std::thread::spawn(move || loop {
        if let Err(e) = dial(source, target) {
            eprintln!("Error connecting to {target}: {e}");
        }
        std::thread::sleep(DIAL_EVERY);
    });
    done_rx
        .recv_timeout(timeout)
        .map_err(|_| "validation timeout".to_string())
}

/// `--serve`: the proxy stand-in, on the unspecified address of the plan's family.
fn serve_forever(plan: &Plan) -> i32 {
    let (tx, rx) = mpsc::channel::<()>();
    for addr in &plan.listen {
        let any = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let at = SocketAddr::new(any, addr.port());
        match TcpListener::bind(at) {
            Ok(l) => {
                eprintln!("Serving on {at}");
                let tx = tx.clone();
                // Port 0 never matches: every connection is answered, none ends the loop.
                std::thread::spawn(move || serve(l, 0, tx));
            }
            Err(e) => {
                eprintln!("Error on listening on {at}: {e}");
                return 1;
            }
        }
    }
    drop(tx);
    // The serving threads never end; this returns only if they all die.
    let _ = rx.recv();
    1
}

/// Accepts connections; reports the first whose original destination port is `probe_port`.
fn serve(l: TcpListener, probe_port: u16, done: mpsc::Sender<()>) {
    loop {
        let mut conn = match l.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                eprintln!("Listener failed to accept connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let port = match original_port(&conn) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("Error getting original dst: {e}");
                continue;
            }
        };
        // Istio echoes the port it recovered (a debugging aid for whoever dialled).
        let _ = conn.write_all(port.to_string().as_bytes());
        drop(conn);
        if port == probe_port {
            let _ = done.send(());
            return;
        }
    }
}

/// The destination port the connection had before NAT (`SO_ORIGINAL_DST`).
fn original_port(conn: &std::net::TcpStream) -> Result<u16, String> {
    let peer = conn.peer_addr().map_err(|e| e.to_string())?;
    if peer.is_ipv4() {
        let sin = socket::getsockopt(conn, sockopt::OriginalDst).map_err(|e| e.to_string())?;
        Ok(u16::from_be(sin.sin_port))
    } else {
        let sin6 = socket::getsockopt(conn, sockopt::Ip6tOriginalDst).map_err(|e| e.to_string())?;
        Ok(u16::from_be(sin6.sin6_port))
    }
}

/// One dial from `source` (so the rules see a loopback source, as Istio's client binds).
fn dial(source: SocketAddr, target: SocketAddr) -> Result<(), String> {
    let family = if source.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| e.to_string())?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(source))
        .map_err(|e| format!("bind {source}: {e}"))?;
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(target)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ValidateArgs {
        ValidateArgs {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            probe_port: 15002,
            probe_timeout: Duration::from_secs(5),
            serve: false,
        }
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_pod_address_family_picks_the_loopback_pair_as_istio_does() {
        // (addresses in kernel order, IPv6?)
        let table: &[(&[&str], bool)] = &[
            (&[], false),
            (&["127.0.0.1", "::1"], false),
            (&["127.0.0.1", "10.0.0.5", "fd00::5"], false),
            (
                &["127.0.0.1", "::1", "fe80::1", "fd00::5", "10.0.0.5"],
                true,
            ),
            (&["169.254.1.1", "fd00::5"], true),
            (&["::ffff:10.0.0.5"], false),
        ];
        for (addrs, v6) in table {
            let p = plan(&ips(addrs), &args());
            let (lo, six) = if *v6 {
                ("[::1]", "[::6]")
            } else {
                ("127.0.0.1", "127.0.0.6")
            };
            assert_eq!(
                p.listen,
                vec![
                    format!("{lo}:15001").parse().unwrap(),
                    format!("{lo}:15006").parse().unwrap()
                ],
                "{addrs:?}"
            );
            assert_eq!(p.source, format!("{lo}:0").parse().unwrap(), "{addrs:?}");
            assert_eq!(
                p.target,
                format!("{six}:15002").parse().unwrap(),
                "{addrs:?}"
            );
        }
    }

    #[test]
    fn timeouts_are_seconds() {
        assert_eq!(parse_seconds("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_seconds("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_seconds("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["", "0", "-1", "x", "nan", "99999"] {
            assert!(parse_seconds(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_failure_message_is_istios() {
        assert!(FAILURE_MESSAGE
            .starts_with("iptables validation failed; workload is not ready for Istio.\n"));
        assert_eq!(VALIDATION_ERROR_CODE, 126);
    }
}
