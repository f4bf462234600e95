//! Demo traffic: a peer answering from its netns, connections made from inside a
//! pod's netns, and what each answer says about who took the connection.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use iptables_rules::netns::Netns;

use super::interrupt::checkpoint;
use super::pods::Pod;
use super::table::Table;
use super::{NAMESPACE, PEER_PORT};

/// Connect/read limit for demo traffic.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(3);

/// A TCP listener in the peer netns answering every connection with one line.
pub struct PeerListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerListener {
    /// Listens on `:PEER_PORT` inside `ns` (whose address is `ip`).
    pub fn start(ns: &Netns, ip: Ipv4Addr) -> Result<Self> {
        // The socket is created inside the peer netns and stays there; accept runs anywhere.
        let listener = ns
            .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PEER_PORT)))?
            .with_context(|| format!("netns {}: cannot listen on :{PEER_PORT}", ns.label()))?;
        listener
            .set_nonblocking(true)
            .context("peer listener: set_nonblocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "peer {ip}:{PEER_PORT} answered {from}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener (joins its thread).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to `to` and returns the first line answered, or why not.
pub fn talk(ns: &Netns, to: SocketAddr) -> String {
    let res = ns.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, TRAFFIC_LIMIT)?;
        s.set_read_timeout(Some(TRAFFIC_LIMIT))?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while buf.len() < 512 {
            match s.read(&mut byte)? {
                0 => break,
                _ if byte[0] == b'\n' => break,
                _ => buf.push(byte[0]),
            }
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    });
    match res {
        Ok(Ok(line)) if line.is_empty() => "no answer (closed)".into(),
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("no answer ({e})"),
        Err(e) => format!("no answer ({e})"),
    }
}

/// Who answered a line from [`talk`].
pub fn answered_by(line: &str) -> &'static str {
    if line.starts_with("standin port=") {
        "stand-in (ztunnel)"
    } else if line.starts_with("peer ") {
        "peer (direct)"
    } else {
        "nobody"
    }
}

/// The listening ports in the text of `/proc/net/tcp` or `tcp6`.
pub fn listening_in(proc_net_tcp: &str) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for line in proc_net_tcp.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Column 3 is the state; 0A is LISTEN.
        if cols.get(3) != Some(&"0A") {
            continue;
        }
        let port = cols.get(1).and_then(|a| a.rsplit(':').next());
        if let Some(p) = port.and_then(|p| u16::from_str_radix(p, 16).ok()) {
            ports.insert(p);
        }
    }
    ports
}

/// TCP ports listening in the netns (read from inside it).
pub fn listening_ports(ns: &Netns) -> Vec<u16> {
    let ports = ns.run(|| {
        let mut ports = BTreeSet::new();
        for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(f) {
                ports.extend(listening_in(&text));
            }
        }
        ports
    });
    ports.map(|p| p.into_iter().collect()).unwrap_or_default()
}

/// Sends the traffic both ways and prints who answered; fails if it is not what
/// `captured` (per pod) says.
pub fn traffic(pods: &[Pod], peer_ns: &Netns, peer: SocketAddr, captured: &[bool]) -> Result<()> {
    let mut t = Table::new(&["FROM", "TO", "ANSWERED BY", "REPLY"]);
    let mut wrong = Vec::new();
    for (p, want) in pods.iter().zip(captured) {
        checkpoint()?;
        let ns = p.netns.as_ref().context("pod without netns")?;
        let out = talk(ns, peer);
        let want_out = if *want {
            format!("standin port=15001 orig={peer}")
        } else {
            format!("peer {peer} answered")
        };
        if !out.starts_with(&want_out) {
            wrong.push(format!(
                "{} -> {peer}: want {want_out:?}, got {out:?}",
                p.name
            ));
        }
        t.row(vec![
            format!("{NAMESPACE}/{}", p.name),
            peer.to_string(),
            answered_by(&out).into(),
            out,
        ]);
        let Some(ip) = p.ip else { continue };
        let to = SocketAddr::from((ip, PEER_PORT));
        let back = talk(peer_ns, to);
        if *want && !back.starts_with(&format!("standin port=15006 orig={to}")) {
            wrong.push(format!(
                "peer -> {}: want the stand-in's inbound port, got {back:?}",
                p.name
            ));
        }
        if !*want && back.starts_with("standin") {
            wrong.push(format!(
                "peer -> {}: released pod still captured inbound: {back:?}",
                p.name
            ));
        }
        t.row(vec![
            "(peer)".into(),
            to.to_string(),
            answered_by(&back).into(),
            back,
        ]);
    }
    t.print();
    if !wrong.is_empty() {
        bail!("traffic not as expected:\n  {}", wrong.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        assert_eq!(
            answered_by("standin port=15001 orig=10.0.0.1:80"),
            "stand-in (ztunnel)"
        );
        assert_eq!(
            answered_by("peer 10.0.0.1:8080 answered 10.0.0.2:5555"),
            "peer (direct)"
        );
        assert_eq!(answered_by("no answer (refused)"), "nobody");
    }

    #[test]
    fn reads_listening_ports_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n\
            0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n\
            1: 0100007F:3AFD 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2 1\n\
            2: 0A00000A:1F90 0B00000A:D431 01 00000000:00000000 00:00000000 00000000 0 0 3 1\n";
        assert_eq!(
            listening_in(text).into_iter().collect::<Vec<_>>(),
            [15001, 15101]
        );
    }
}
