//! A minimal ZDS client for the server's integration tests: connects like
//! ztunnel, hands every request (with its fds) to the test, answers as told.
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_cni_api::zds::{
    workload_response, Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use nix::sys::socket::{
    connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

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

/// Connects (blocking) from the calling thread, sends `ZdsHello{V1}`, and returns
/// the length of the first packet received (0: closed by the server) within `limit`.
pub fn blocking_hello_then_read(path: &Path, limit: Duration) -> usize {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    let tv = nix::sys::time::TimeVal::new(limit.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    let hello = ZdsHello {
        version: Version::V1 as i32,
    }
    .encode_to_vec();
    // The server may already have closed: a failed send is as good as EOF.
    let _ = nix::sys::socket::send(fd.as_raw_fd(), &hello, MsgFlags::MSG_NOSIGNAL);
    let mut buf = [0u8; 4096];
    match nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
        Ok(n) => n,
        Err(nix::errno::Errno::ECONNRESET) => 0,
        Err(e) => panic!("no answer and no close within {limit:?}: {e}"),
    }
}

/// One fake ztunnel connection.
pub struct Client {
    fd: AsyncFd<OwnedFd>,
}

impl Client {
    /// Connects and sends `ZdsHello{V1}`.
    pub async fn connect(path: &Path) -> Client {
        let c = Client::connect_silent(path).await;
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        c.send(&hello.encode_to_vec()).await;
        c
    }

    /// Connects without a hello.
    pub async fn connect_silent(path: &Path) -> Client {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        Client {
            fd: unsafe {
                AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
            }
            .unwrap(),
        }
    }

    pub async fn send(&self, bytes: &[u8]) {
        loop {
            let mut g = self.fd.writable().await.unwrap();
            let r = g.try_io(|fd| {
                sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            if let Ok(r) = r {
                r.unwrap();
                return;
            }
        }
    }

    pub async fn ack(&self, error: &str) {
        let resp = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.into(),
            })),
        };
        self.send(&resp.encode_to_vec()).await;
    }

    /// The next packet as raw bytes and fds; `None` at EOF.
    pub async fn recv_raw(&self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        loop {
            let mut g = self.fd.readable().await.unwrap();
            let r = g.try_io(|fd| {
                let mut buf = vec![0u8; 4096];
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = vec![];
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                let n = msg.bytes;
                buf.truncate(n);
                Ok((buf, fds))
            });
            match r {
                Ok(Ok((buf, fds))) if buf.is_empty() && fds.is_empty() => return None,
                Ok(Ok(x)) => return Some(x),
                Ok(Err(e)) => panic!("recvmsg: {e}"),
                Err(_) => continue,
            }
        }
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
