//! The tokio flavour of the ZDS socket: the same sends and receives, awaiting readiness.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{Packet, Recv};

/// A connected, non-blocking SOCK_SEQPACKET socket on tokio.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    /// Wraps a connected socket, switching it to non-blocking. Needs a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open until it drops.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Connects to a ZDS socket at `path` (a unix connect does not wait) and wraps it.
    pub fn connect(path: &Path) -> io::Result<Self> {
        Self::new(super::connect(path)?)
    }

    /// Sends `buf` as one packet, with `fd` attached as SCM_RIGHTS when given.
    pub async fn send(&self, buf: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| super::send(inner.as_fd(), buf, fd)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf`, refusing fds (see [`super::recv`]).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Recv> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| super::recv(inner.as_fd(), buf)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf` with its fds; `None` at EOF (see [`super::recv_with_fds`]).
    pub async fn recv_with_fds(&self, buf: &mut [u8]) -> io::Result<Option<Packet>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| super::recv_with_fds(inner.as_fd(), buf)) {
                Ok(res) => return res,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads and discards whatever is queued, without waiting (see [`super::discard_pending`]).
    pub fn discard_pending(&self) {
        super::discard_pending(self.fd.get_ref().as_fd());
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for SeqPacket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::pair;
    use super::*;

    #[tokio::test]
    async fn round_trip_with_fd_and_eof() {
        let (a, b) = pair();
        let (a, b) = (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap());
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        a.send(b"add", Some(file.as_fd())).await.unwrap();
        a.send(b"ack", None).await.unwrap();
        let mut buf = [0u8; 1024];
        let p = b.recv_with_fds(&mut buf).await.unwrap().unwrap();
        assert_eq!((&buf[..p.len], p.fds.len()), (&b"add"[..], 1));
        assert_eq!(b.recv(&mut buf).await.unwrap(), Recv::Packet(3));
        drop(a);
        assert_eq!(b.recv(&mut buf).await.unwrap(), Recv::Eof);
    }

    #[tokio::test]
    async fn a_full_buffer_waits_instead_of_failing() {
        let (a, b) = pair();
        let (a, b) = (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap());
        // Fill the socket buffer, then let the reader drain it concurrently.
        let sent = async {
            for _ in 0..2000 {
                a.send(&[1u8; 1000], None).await.unwrap();
            }
            drop(a);
        };
        let got = async {
            let mut buf = [0u8; 1024];
            let mut n = 0;
            while let Recv::Packet(len) = b.recv(&mut buf).await.unwrap() {
                assert_eq!(len, 1000);
                n += 1;
            }
            n
        };
        let ((), n) = tokio::join!(sent, got);
        assert_eq!(n, 2000);
    }

    #[tokio::test]
    async fn discard_pending_empties_the_queue_without_waiting() {
        let (a, b) = pair();
        let (a, b) = (SeqPacket::new(a).unwrap(), SeqPacket::new(b).unwrap());
        for _ in 0..5 {
            a.send(b"late", None).await.unwrap();
        }
        b.discard_pending();
        b.discard_pending();
        drop(a);
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).await.unwrap(), Recv::Eof);
    }
}
