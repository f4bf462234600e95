//! One ztunnel connection: hello, snapshot, then strict request/ack lock-step.
//!
//! Acks carry no id, so correlation is purely by order. After an ack timeout the
//! connection is kept (Istio's behaviour) but the late ack is *owed*: the next
//! ack that arrives is attributed to the timed-out request, never to a newer one.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ambient_cni_api::zds::socket::{Recv, SeqPacket};
use ambient_cni_api::zds::{Version, MAX_MESSAGE_LEN};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::config::ZdsConfig;
use super::error::ZdsError;
use super::message::{self, Encoded};
use super::snapshot::SnapshotEntry;

/// A request queued for one connection, answered through `reply`.
#[derive(Debug)]
pub(crate) struct Job {
    /// The encoded request.
    pub msg: Encoded,
    /// The netns fd for an `AddWorkload` (closed after sending).
    pub fd: Option<OwnedFd>,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<(), ZdsError>>,
}

/// Counts of one snapshot, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// `AddWorkload`s acked.
    pub added: usize,
    /// `KeepWorkload`s acked.
    pub kept: usize,
    /// Entries nacked or not sendable (logged, skipped).
    pub failed: usize,
}

/// The agent's side of one ztunnel connection.
#[derive(Debug)]
pub(crate) struct Connection {
    name: String,
    sock: SeqPacket,
    cfg: ZdsConfig,
    owed_acks: usize,
    consecutive_timeouts: u32,
}

impl Connection {
    /// Wraps an accepted socket. Needs a tokio runtime.
    pub fn new(name: String, fd: OwnedFd, cfg: ZdsConfig) -> Result<Self, ZdsError> {
        let sock = SeqPacket::new(fd).map_err(|source| ZdsError::Io {
            conn: name.clone(),
            op: "register socket",
            source,
        })?;
        Ok(Self {
            name,
            sock,
            cfg,
            owed_acks: 0,
            consecutive_timeouts: 0,
        })
    }

    /// The connection's name in logs (`zds#<n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> ZdsError + '_ {
        move |source| ZdsError::Io {
            conn: self.name.clone(),
            op,
            source,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> ZdsError {
        ZdsError::Protocol {
            conn: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Reads one packet; EOF is `ConnectionClosed`.
    async fn recv_packet(&self, buf: &mut [u8]) -> Result<usize, ZdsError> {
        match self.sock.recv(buf).await.map_err(self.io("recv"))? {
            Recv::Packet(n) => Ok(n),
            Recv::Eof => Err(ZdsError::ConnectionClosed {
                conn: self.name.clone(),
            }),
        }
    }

    /// Waits (bounded) for ztunnel's `ZdsHello`.
    pub async fn read_hello(&self) -> Result<Version, ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let n = tokio::time::timeout(self.cfg.hello_timeout, self.recv_packet(&mut buf))
            .await
            .map_err(|_| ZdsError::Timeout {
                conn: self.name.clone(),
                what: "read hello",
                after: self.cfg.hello_timeout,
            })??;
        message::decode_hello(&buf[..n]).map_err(|r| self.protocol(r))
    }

    /// Consumes unread packets so closing gives ztunnel a clean EOF.
    pub fn discard_pending(&self) {
        self.sock.discard_pending();
    }

    /// Sends one request (with its fd) and waits for its ack.
    pub async fn exchange(&mut self, msg: &Encoded, fd: Option<&OwnedFd>) -> Result<(), ZdsError> {
        let sent = tokio::time::timeout(
            self.cfg.write_timeout,
            self.sock.send(&msg.bytes, fd.map(|f| f.as_fd())),
        )
        .await;
        match sent {
            Err(_) => return Err(self.timed_out("write")),
            Ok(r) => r.map_err(self.io("sendmsg"))?,
        }
        debug!(conn = %self.name, msg = %msg.what, "sent");
        let ack = tokio::time::timeout(self.cfg.ack_timeout, self.read_own_ack()).await;
        let ack = match ack {
            Err(_) => {
                // The ack may still come: it belongs to this request.
                self.owed_acks += 1;
                return Err(self.timed_out("read ack"));
            }
            Ok(r) => r?,
        };
        self.consecutive_timeouts = 0;
        match ack {
            None => Ok(()),
            Some(text) => Err(ZdsError::Nack(text)),
        }
    }

    fn timed_out(&mut self, what: &'static str) -> ZdsError {
        self.consecutive_timeouts += 1;
        let after = if what == "write" {
            self.cfg.write_timeout
        } else {
            self.cfg.ack_timeout
        };
        ZdsError::Timeout {
            conn: self.name.clone(),
            what,
            after,
        }
    }

    /// Reads acks until the one for the request just sent (skipping owed late acks).
    /// Cancel-safe between packets: an interrupted wait leaves the owed count right.
    async fn read_own_ack(&mut self) -> Result<Option<String>, ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        loop {
            let n = self.recv_packet(&mut buf).await?;
            let ack = message::decode_ack(&buf[..n]).map_err(|r| self.protocol(r))?;
            if self.owed_acks > 0 {
                self.owed_acks -= 1;
                info!(conn = %self.name, "late ack for an earlier timed-out request: {ack:?}");
                continue;
            }
            return Ok(ack);
        }
    }

    /// Sends the snapshot and exactly one `SnapshotSent`. Nacked or unsendable
    /// entries are logged and skipped; any other failure ends the connection
    /// (ztunnel reconnects and gets a whole new snapshot).
    pub async fn send_snapshot(
        &mut self,
        entries: Vec<SnapshotEntry>,
    ) -> Result<SnapshotStats, ZdsError> {
        let mut stats = SnapshotStats::default();
        for e in entries {
            let (req, fd) = match &e.netns {
                Some(ns) => match ns.try_clone_fd() {
                    Ok(fd) => (message::add(&e.uid, e.info.clone()), Some(fd)),
                    Err(err) => {
                        warn!(conn = %self.name, uid = %e.uid, netns = ns.label(),
                            "cannot duplicate netns fd, sending KeepWorkload: {err}");
                        (message::keep(&e.uid), None)
                    }
                },
                None => (message::keep(&e.uid), None),
            };
            let msg = match message::encode(&req) {
                Ok(m) => m,
                Err(err) => {
                    warn!(conn = %self.name, "snapshot entry skipped: {err}");
                    stats.failed += 1;
                    continue;
                }
            };
            match self.exchange(&msg, fd.as_ref()).await {
                Ok(()) if fd.is_some() => stats.added += 1,
                Ok(()) => stats.kept += 1,
                Err(ZdsError::Nack(text)) => {
                    warn!(conn = %self.name, msg = %msg.what, "snapshot entry nacked: {text}");
                    stats.failed += 1;
                }
                Err(err) => return Err(err),
            }
        }
        let done = message::encode(&message::snapshot_sent())?;
        match self.exchange(&done, None).await {
            Ok(()) => {}
            Err(ZdsError::Nack(text)) => warn!(conn = %self.name, "SnapshotSent nacked: {text}"),
            Err(err) => return Err(err),
        }
        Ok(stats)
    }

    /// Resolves when ztunnel sends something while no request is outstanding:
    /// a late owed ack is consumed (`Ok`); EOF or anything else ends the connection.
    pub async fn idle_event(&mut self) -> Result<(), ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let n = self.recv_packet(&mut buf).await?;
        if self.owed_acks > 0 {
            if let Ok(ack) = message::decode_ack(&buf[..n]) {
                self.owed_acks -= 1;
                info!(conn = %self.name, "late ack for an earlier timed-out request: {ack:?}");
                return Ok(());
            }
        }
        Err(self.protocol("unsolicited message from ztunnel"))
    }

    /// True when the connection cannot be used any more after `err`.
    pub fn is_fatal(&self, err: &ZdsError) -> bool {
        match err {
            ZdsError::Nack(_) | ZdsError::TooLarge { .. } | ZdsError::NoConnection => false,
            ZdsError::Timeout { .. } => {
                self.consecutive_timeouts >= self.cfg.max_consecutive_timeouts
            }
            _ => true,
        }
    }

    /// Serves queued requests one at a time until the queue closes, `stop` is
    /// set, or the connection fails. While idle it watches the socket, so a
    /// closed or misbehaving ztunnel is noticed at once (this replaces Istio's
    /// 5 s idle read probe with the same verdicts: EOF closed, data an error).
    pub async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Job>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ZdsError> {
        loop {
            let job = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ok(()),
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => return Ok(()),
                },
                ev = self.idle_event() => { ev?; continue; }
            };
            let res = self.exchange(&job.msg, job.fd.as_ref()).await;
            let fatal = res
                .as_ref()
                .err()
                .filter(|e| self.is_fatal(e))
                .map(|e| e.to_string());
            // The caller may have given up waiting: nothing to do then.
            let _ = job.reply.send(res);
            if let Some(reason) = fatal {
                return Err(self.protocol(format!("dropping connection after: {reason}")));
            }
        }
    }
}

/// Drains requests left in a closed connection's queue, answering each.
pub(crate) fn fail_pending(name: &str, rx: &mut mpsc::Receiver<Job>) {
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(ZdsError::ConnectionClosed {
            conn: name.to_owned(),
        }));
    }
}

/// The whole life of one accepted connection after registration.
pub(crate) async fn run_after_hello(
    conn: &mut Connection,
    entries: Vec<SnapshotEntry>,
    rx: &mut mpsc::Receiver<Job>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ZdsError> {
    let stats = tokio::select! {
        _ = stop.wait_for(|s| *s) => return Ok(()),
        r = conn.send_snapshot(entries) => r?,
    };
    info!(conn = %conn.name(), added = stats.added, kept = stats.kept,
        failed = stats.failed, "snapshot sent");
    conn.serve(rx, stop).await
}

/// Keeps the shared snapshot source type in one place.
pub(crate) type Source = Arc<dyn super::snapshot::SnapshotSource>;

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_cni_api::zds::{
        workload_request::Payload, Ack, WorkloadRequest, WorkloadResponse, ZdsHello,
    };
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use prost::Message;
    use std::time::Duration;

    /// A connected SOCK_SEQPACKET pair.
    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap()
    }

    fn cfg() -> ZdsConfig {
        ZdsConfig {
            hello_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            ack_timeout: Duration::from_millis(300),
            ..ZdsConfig::default()
        }
    }

    fn ack(err: &str) -> Vec<u8> {
        WorkloadResponse {
            payload: Some(ambient_cni_api::zds::workload_response::Payload::Ack(Ack {
                error: err.into(),
            })),
        }
        .encode_to_vec()
    }

    async fn read_req(peer: &SeqPacket) -> WorkloadRequest {
        let mut buf = [0u8; 1024];
        let Recv::Packet(n) = peer.recv(&mut buf).await.unwrap() else {
            panic!("eof")
        };
        WorkloadRequest::decode(&buf[..n]).unwrap()
    }

    #[tokio::test]
    async fn hello_deadline_and_decode() {
        let (a, b) = pair();
        let conn = Connection::new("t".into(), a, cfg()).unwrap();
        let peer = SeqPacket::new(b).unwrap();
        let start = std::time::Instant::now();
        let err = conn.read_hello().await.unwrap_err();
        assert!(
            matches!(
                err,
                ZdsError::Timeout {
                    what: "read hello",
                    ..
                }
            ),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        let hello = ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec();
        peer.send(&hello, None).await.unwrap();
        assert_eq!(conn.read_hello().await.unwrap(), Version::V1);
    }

    #[tokio::test]
    async fn late_ack_is_attributed_to_the_timed_out_request() {
        let (a, b) = pair();
        let mut conn = Connection::new("t".into(), a, cfg()).unwrap();
        let peer = SeqPacket::new(b).unwrap();
        let del1 = message::encode(&message::del("one")).unwrap();
        let err = conn.exchange(&del1, None).await.unwrap_err();
        assert!(
            matches!(
                err,
                ZdsError::Timeout {
                    what: "read ack",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!conn.is_fatal(&err), "one timeout keeps the connection");
        assert_eq!(read_req(&peer).await, message::del("one"));
        // Late success for "one", then a nack for "two": "two" must see the nack.
        peer.send(&ack(""), None).await.unwrap();
        let del2 = message::encode(&message::del("two")).unwrap();
        let (res, _) = tokio::join!(conn.exchange(&del2, None), async {
            assert_eq!(read_req(&peer).await, message::del("two"));
            peer.send(&ack("no"), None).await.unwrap();
        });
        assert!(
            matches!(res, Err(ZdsError::Nack(ref t)) if t == "no"),
            "{res:?}"
        );
    }

    #[tokio::test]
    async fn two_timeouts_in_a_row_are_fatal() {
        let (a, _b) = pair();
        let mut conn = Connection::new("t".into(), a, cfg()).unwrap();
        let del = message::encode(&message::del("x")).unwrap();
        let e1 = conn.exchange(&del, None).await.unwrap_err();
        assert!(!conn.is_fatal(&e1));
        let e2 = conn.exchange(&del, None).await.unwrap_err();
        assert!(conn.is_fatal(&e2));
    }

    #[tokio::test]
    async fn idle_data_is_a_protocol_error_and_eof_closes() {
        let (a, b) = pair();
        let mut conn = Connection::new("t".into(), a, cfg()).unwrap();
        let peer = SeqPacket::new(b).unwrap();
        peer.send(&ack(""), None).await.unwrap();
        let err = conn.idle_event().await.unwrap_err();
        assert!(matches!(err, ZdsError::Protocol { .. }), "{err}");
        drop(peer);
        let err = conn.idle_event().await.unwrap_err();
        assert!(matches!(err, ZdsError::ConnectionClosed { .. }), "{err}");
    }

    #[tokio::test]
    async fn snapshot_keeps_then_one_snapshot_sent_and_nacks_continue() {
        let (a, b) = pair();
        let mut conn = Connection::new("t".into(), a, cfg()).unwrap();
        let peer = SeqPacket::new(b).unwrap();
        let entries = (0..3)
            .map(|i| SnapshotEntry {
                uid: format!("u{i}"),
                info: Default::default(),
                netns: None,
            })
            .collect();
        let (stats, seen) = tokio::join!(conn.send_snapshot(entries), async {
            let mut seen = vec![];
            for i in 0..4 {
                let req = read_req(&peer).await;
                seen.push(req.clone());
                peer.send(&ack(if i == 1 { "nope" } else { "" }), None)
                    .await
                    .unwrap();
            }
            seen
        });
        let stats = stats.unwrap();
        assert_eq!(
            stats,
            SnapshotStats {
                added: 0,
                kept: 2,
                failed: 1
            }
        );
        assert_eq!(seen[0], message::keep("u0"));
        assert_eq!(seen[2], message::keep("u2"));
        assert!(matches!(seen[3].payload, Some(Payload::SnapshotSent(_))));
    }
}
