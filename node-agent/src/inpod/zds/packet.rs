//! One SOCK_SEQPACKET unix socket on tokio: whole-packet send with an optional
//! SCM_RIGHTS fd, whole-packet receive that rejects truncation and stray fds.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A connected, non-blocking SOCK_SEQPACKET socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

/// What one receive returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A packet of this many bytes.
    Packet(usize),
    /// The peer closed the connection.
    Eof,
}

impl SeqPacket {
    /// Wraps a connected socket, switching it to non-blocking. Needs a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open until it drops.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Sends `buf` as one packet, with `fd` attached as SCM_RIGHTS when given.
    pub async fn send(&self, buf: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        let iov = [IoSlice::new(buf)];
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|inner| {
                // MSG_NOSIGNAL: a dead peer is an EPIPE error, never a SIGPIPE.
                sendmsg::<()>(
                    inner.as_raw_fd(),
                    &iov,
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match res {
                Ok(Ok(n)) if n == buf.len() => return Ok(()),
                Ok(Ok(n)) => {
                    return Err(io::Error::other(format!(
                        "short packet write: {n} of {} bytes",
                        buf.len()
                    )))
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf`. A truncated packet, truncated control data
    /// or any received fd (ztunnel never sends one) is an `InvalidData` error;
    /// received fds are closed.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Recv> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_once(inner.as_raw_fd(), buf)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }
}

impl SeqPacket {
    /// Reads and discards whatever is queued, without waiting. Called right
    /// before closing: closing with unread data makes the peer see
    /// `ECONNRESET` instead of a clean EOF.
    pub fn discard_pending(&self) {
        let raw = self.fd.get_ref().as_raw_fd();
        let mut buf = [0u8; 1024];
        // Bounded: the peer could keep writing.
        for _ in 0..1024 {
            match recv_once(raw, &mut buf) {
                Ok(Recv::Packet(_)) => continue,
                // A refused packet (truncated, with fds) was still consumed.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                _ => break,
            }
        }
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

fn recv_once(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    // Room for a few fds so a misbehaving peer's fds are received (and closed)
    // rather than leaking in as a silent MSG_CTRUNC.
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut stray = 0usize;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel just installed these fds in our table and
                    // nothing else owns them; wrapping closes them on drop.
                    drop(unsafe { OwnedFd::from_raw_fd(raw) });
                    stray += 1;
                }
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("packet truncated (over {} bytes)", buf_len(&iov)),
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (too many fds)",
        ));
    }
    if stray > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected control message with {stray} fd(s)"),
        ));
    }
    if msg.bytes == 0 {
        return Ok(Recv::Eof);
    }
    Ok(Recv::Packet(msg.bytes))
}

fn buf_len(iov: &[IoSliceMut<'_>]) -> usize {
    iov.iter().map(|s| s.len()).sum()
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    // SAFETY: fd is a live descriptor owned by the caller for this call's duration.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_truncate(fcntl(bfd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(bfd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::unix::fs::MetadataExt;

    /// A connected SOCK_SEQPACKET pair.
    pub(crate) fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn packet_with_fd_arrives_whole() {
        let (a, b) = pair();
        let (a, b) = (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap());
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        a.send(b"hello", Some(file.as_fd())).await.unwrap();
        // Receive by hand to see the fd (SeqPacket::recv refuses fds).
        let raw = b.as_fd().as_raw_fd();
        let mut buf = [0u8; 1024];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(raw, &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        assert_eq!(msg.bytes, 5);
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(f) => f,
                _ => vec![],
            })
            .collect();
        assert_eq!(fds.len(), 1);
        let got = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        assert_eq!(
            got.metadata().unwrap().ino(),
            file.metadata().unwrap().ino()
        );
    }

    #[tokio::test]
    async fn truncation_is_an_error() {
        let (a, b) = pair();
        let (a, b) = (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap());
        a.send(&[7u8; 2000], None).await.unwrap();
        let mut buf = [0u8; 1024];
        let err = b.recv(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[tokio::test]
    async fn stray_fd_is_refused_and_eof_seen() {
        let (a, b) = pair();
        let (a, b) = (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap());
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        a.send(b"x", Some(file.as_fd())).await.unwrap();
        let mut buf = [0u8; 1024];
        let err = b.recv(&mut buf).await.unwrap_err();
        assert!(
            err.to_string().contains("unexpected control message"),
            "{err}"
        );
        a.send(b"yz", None).await.unwrap();
        assert_eq!(b.recv(&mut buf).await.unwrap(), Recv::Packet(2));
        drop(a);
        assert_eq!(b.recv(&mut buf).await.unwrap(), Recv::Eof);
    }
}
