//! ZDS on the wire, for both ends (the agent's server, the ztunnel stand-in, the tests):
//! one protobuf message per SOCK_SEQPACKET packet, an optional fd beside it as
//! SCM_RIGHTS, whole-packet receives that refuse truncation.
//!
//! Blocking functions take a borrowed socket; [`SeqPacket`] (feature `socket-tokio`)
//! is the same on tokio. Behaviour is ztunnel's (`src/inpod/protocol.rs`): a packet that
//! does not fit the buffer (`MSG_TRUNC`) or brings more fds than expected (`MSG_CTRUNC`)
//! is an error, never a silently cut message; fds that arrive with a refused packet are
//! closed, never leaked.
#![warn(clippy::all)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    recvmsg, sendmsg, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

#[cfg(feature = "socket-tokio")]
mod nonblocking;
#[cfg(feature = "socket-tokio")]
pub use nonblocking::SeqPacket;

/// What one receive that refuses fds returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A packet of this many bytes.
    Packet(usize),
    /// The peer closed the connection.
    Eof,
}

/// One packet received with the fds that came beside it.
#[derive(Debug)]
pub struct Packet {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// The SCM_RIGHTS fds (close-on-exec), owned by the caller now.
    pub fds: Vec<OwnedFd>,
}

/// Connects (blocking) to a ZDS socket at `path`, as ztunnel does; close-on-exec.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| with_path(e.into(), "socket", path))?;
    let addr = UnixAddr::new(path).map_err(|e| with_path(e.into(), "address", path))?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr)
        .map_err(|e| with_path(e.into(), "connect", path))?;
    Ok(fd)
}

fn with_path(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

/// Sends `buf` as one packet, with `fd` attached as SCM_RIGHTS when given.
/// A dead peer is an `EPIPE` error, never a SIGPIPE; a short write is an error.
/// On a non-blocking socket a full buffer is `WouldBlock`.
pub fn send(sock: BorrowedFd<'_>, buf: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let iov = [IoSlice::new(buf)];
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)?;
    if n != buf.len() {
        return Err(io::Error::other(format!(
            "short packet write: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// Receives one whole packet into `buf` with the fds beside it (ztunnel's side:
/// `AddWorkload` brings the netns fd); `None` at EOF. A packet larger than `buf`
/// or with over 4 fds is an `InvalidData` error (its fds are closed).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Packet>> {
    let cap = buf.len();
    // Room for a few fds so a misbehaving peer's fds are received (and closed)
    // rather than leaking in as a silent MSG_CTRUNC.
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in our table and
                // nothing else owns them; wrapping closes them on drop.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("packet truncated (over {cap} bytes)"),
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (too many fds)",
        ));
    }
    // A zero-length packet is EOF on SEQPACKET unless it carried fds.
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(Packet {
        len: msg.bytes,
        fds,
    }))
}

/// Receives one whole packet into `buf` where no fd may come (the agent's side:
/// ztunnel never sends one). Stray fds are closed and make an `InvalidData` error,
/// as do truncated packets.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Recv> {
    match recv_with_fds(sock, buf)? {
        None => Ok(Recv::Eof),
        Some(p) if !p.fds.is_empty() => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected control message with {} fd(s)", p.fds.len()),
        )),
        Some(p) if p.len == 0 => Ok(Recv::Eof),
        Some(p) => Ok(Recv::Packet(p.len)),
    }
}

/// Reads and discards whatever is queued on a non-blocking socket, without
/// waiting. Called right before closing: closing with unread data makes the
/// peer see `ECONNRESET` instead of a clean EOF.
pub fn discard_pending(sock: BorrowedFd<'_>) {
    let mut buf = [0u8; 1024];
    // Bounded: the peer could keep writing.
    for _ in 0..1024 {
        match recv(sock, &mut buf) {
            Ok(Recv::Packet(_)) => continue,
            // A refused packet (truncated, with fds) was still consumed.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
            _ => break,
        }
    }
}

/// Test helpers shared by this crate's and its users' unit tests.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::socket::socketpair;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    /// A connected, blocking SOCK_SEQPACKET pair.
    pub(crate) fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn packet_with_fd_arrives_whole() {
        let (a, b) = pair();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        send(a.as_fd(), b"hello", Some(file.as_fd())).unwrap();
        let mut buf = [0u8; 1024];
        let p = recv_with_fds(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..p.len], b"hello");
        assert_eq!(p.fds.len(), 1);
        let got = std::fs::File::from(p.fds.into_iter().next().unwrap());
        assert_eq!(
            got.metadata().unwrap().ino(),
            file.metadata().unwrap().ino()
        );
    }

    #[test]
    fn truncation_is_an_error_on_both_flavours() {
        let (a, b) = pair();
        let mut buf = [0u8; 1024];
        send(a.as_fd(), &[7u8; 2000], None).unwrap();
        let err = recv(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("truncated"), "{err}");
        send(a.as_fd(), &[7u8; 1025], None).unwrap();
        let err = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert!(
            err.to_string().contains("over 1024 bytes"),
            "exactly one byte over is refused: {err}"
        );
        send(a.as_fd(), &[7u8; 1024], None).unwrap();
        assert_eq!(recv(b.as_fd(), &mut buf).unwrap(), Recv::Packet(1024));
    }

    #[test]
    fn stray_fd_is_refused_and_eof_seen() {
        let (a, b) = pair();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        let mut buf = [0u8; 1024];
        send(a.as_fd(), b"x", Some(file.as_fd())).unwrap();
        let err = recv(b.as_fd(), &mut buf).unwrap_err();
        assert!(
            err.to_string().contains("unexpected control message"),
            "{err}"
        );
        send(a.as_fd(), b"yz", None).unwrap();
        assert_eq!(recv(b.as_fd(), &mut buf).unwrap(), Recv::Packet(2));
        drop(a);
        assert_eq!(recv(b.as_fd(), &mut buf).unwrap(), Recv::Eof);
        assert!(recv_with_fds(b.as_fd(), &mut buf).unwrap().is_none());
    }

    #[test]
    fn too_many_fds_are_closed_and_refused() {
        let (a, b) = pair();
        let files: Vec<_> = (0..6)
            .map(|_| std::fs::File::open("/proc/self/ns/net").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [IoSlice::new(b"x")];
        sendmsg::<()>(
            a.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = [0u8; 16];
        let err = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert!(err.to_string().contains("too many fds"), "{err}");
    }

    #[test]
    fn connect_names_the_path() {
        let err = connect(Path::new("/nonexistent-zds-dir/ztunnel.sock")).unwrap_err();
        assert!(
            err.to_string()
                .contains("connect /nonexistent-zds-dir/ztunnel.sock"),
            "{err}"
        );
    }

    #[test]
    fn send_to_a_closed_peer_is_epipe() {
        let (a, b) = pair();
        drop(b);
        let err = send(a.as_fd(), b"x", None).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_epipe()));
    }

    fn libc_epipe() -> i32 {
        nix::errno::Errno::EPIPE as i32
    }
}
