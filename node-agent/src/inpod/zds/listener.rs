//! The ZDS listening socket: SOCK_SEQPACKET at a path, stale file replaced,
//! parent directory created 0750, socket file 0600 (it hands out pod netns fds).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::error::ZdsError;

/// Default path of the ZDS socket (ztunnel's `INPOD_UDS`).
pub const DEFAULT_ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// A bound, listening ZDS socket.
#[derive(Debug)]
pub struct ZdsListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl ZdsListener {
    /// Binds and listens at `path`. Needs a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        let err = |op: &'static str| {
            let path = path.to_owned();
            move |source: io::Error| ZdsError::Listen { path, op, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .map_err(err("create directory"))?;
            }
        }
        remove_stale(path).map_err(err("remove stale socket"))?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| err("socket")(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| err("address")(e.into()))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| err("bind")(e.into()))?;
        // Before listen(): nobody can connect yet, so no window with a looser mode.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(err("chmod"))?;
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| err("listen")(e.into()))?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open until it drops.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| err("register")(e.into_parts().1))?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection (non-blocking, close-on-exec).
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| {
                accept4(
                    inner.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match res {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(Ok(raw)) => return Ok(unsafe { OwnedFd::from_raw_fd(raw) }),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Removes a leftover socket at `path` (a previous agent's); refuses to delete
/// anything that is not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket; not removing it",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("zds-listener-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn creates_dir_replaces_stale_and_refuses_files() {
        let d = tmpdir("a");
        let path = d.join("sub/ztunnel.sock");
        let l = ZdsListener::bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(d.join("sub")).unwrap().mode() & 0o777,
            0o750
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        drop(l);
        // The file is left behind (like a crashed agent): binding again replaces it.
        let l2 = ZdsListener::bind(&path).unwrap();
        drop(l2);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        let err = ZdsListener::bind(&path).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert!(err.to_string().contains("ztunnel.sock"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_stream_client_is_refused() {
        let d = tmpdir("b");
        let path = d.join("z.sock");
        let _l = ZdsListener::bind(&path).unwrap();
        let err = std::os::unix::net::UnixStream::connect(&path).unwrap_err();
        // EPROTOTYPE, exactly what ztunnel logs for a mismatched socket type.
        assert_eq!(err.raw_os_error(), Some(libc::EPROTOTYPE));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
