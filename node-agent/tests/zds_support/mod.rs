//! A minimal ZDS client for the server's integration tests: connects like
//! ztunnel, hands every request (with its fds) to the test, answers as told.
//! The packet I/O is the shared `ambient_cni_api::zds::socket`.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_cni_api::zds::socket::{self, SeqPacket};
use ambient_cni_api::zds::{
    workload_response, Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use prost::Message;

/// A fresh socket path under /tmp, unique per test.
pub fn sock_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::env::temp_dir()
        .join(format!("zds-it-{tag}-{}-{nanos}", std::process::id()))
        .join("ztunnel.sock")
}

/// Removes the test's socket directory.
pub fn cleanup(path: &Path) {
    if let Some(d) = path.parent() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn hello() -> Vec<u8> {
    ZdsHello {
        version: Version::V1 as i32,
    }
    .encode_to_vec()
}

/// Connects (blocking) from the calling thread, sends `ZdsHello{V1}`, and returns
/// the length of the first packet received (0: closed by the server) within `limit`.
pub fn blocking_hello_then_read(path: &Path, limit: Duration) -> usize {
    let fd = socket::connect(path).unwrap();
    let tv = nix::sys::time::TimeVal::new(limit.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    // The server may already have closed: a failed send is as good as EOF.
    let _ = socket::send(fd.as_fd(), &hello(), None);
    let mut buf = [0u8; 4096];
    match socket::recv_with_fds(fd.as_fd(), &mut buf) {
        Ok(Some(p)) => p.len,
        Ok(None) => 0,
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => 0,
        Err(e) => panic!("no answer and no close within {limit:?}: {e}"),
    }
}

/// One fake ztunnel connection.
pub struct Client {
    sock: SeqPacket,
}

impl Client {
    /// Connects and sends `ZdsHello{V1}`.
    pub async fn connect(path: &Path) -> Client {
        let c = Client::connect_silent(path).await;
        c.send(&hello()).await;
        c
    }

    /// Connects without a hello.
    pub async fn connect_silent(path: &Path) -> Client {
        Client {
            sock: SeqPacket::connect(path).unwrap(),
        }
    }

    pub async fn send(&self, bytes: &[u8]) {
        self.sock.send(bytes, None).await.unwrap();
    }

    pub async fn ack(&self, error: &str) {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.into(),
            })),
        };
        self.send(&resp.encode_to_vec()).await;
    }

    /// The next packet as raw bytes and fds; `None` at EOF. The buffer is larger
    /// than the protocol's limit so an oversize packet shows as one.
    pub async fn recv_raw(&self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; 4096];
        let p = self
            .sock
            .recv_with_fds(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("recvmsg: {e}"))?;
        buf.truncate(p.len);
        Some((buf, p.fds))
    }

    /// The next request, decoded (panics at EOF or after 5 s).
    pub async fn next(&self) -> (WorkloadRequest, Vec<OwnedFd>) {
        let (buf, fds) = tokio::time::timeout(Duration::from_secs(5), self.recv_raw())
            .await
            .expect("no request within 5 s")
            .expect("connection closed");
        assert!(buf.len() <= 1024, "packet over 1024 bytes");
        (WorkloadRequest::decode(buf.as_slice()).unwrap(), fds)
    }

    /// Nothing arrives within `d`.
    pub async fn quiet_for(&self, d: Duration) -> bool {
        tokio::time::timeout(d, self.recv_raw()).await.is_err()
    }

    /// Waits until the server closes the connection.
    pub async fn closed_within(&self, d: Duration) -> bool {
        matches!(tokio::time::timeout(d, self.recv_raw()).await, Ok(None))
    }
}

/// Waits until `f` holds (polling), panicking after `d`.
pub async fn eventually(d: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + d;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
