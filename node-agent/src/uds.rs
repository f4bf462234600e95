//! Root-only Unix sockets for the agent's local APIs: the file is 0600 and each
//! accepted peer's uid is checked with `SO_PEERCRED`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tracing::warn;

/// Errors setting up a socket; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Creating the directory, binding or chmod failed.
    #[error("socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds a socket: parent dir 0750, stale file removed, socket 0600.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source| SocketError::Io { path, what, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create directory"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .map_err(io("chmod directory"))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove stale socket")(e)),
    }
    // Bind under a tight umask so the socket is never briefly world-connectable.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod socket"))?;
    Ok(listener)
}

/// The accepted connections whose peer uid is `allowed_uid`; others are dropped and logged.
pub fn peers_with_uid(
    listener: UnixListener,
    allowed_uid: u32,
    what: &'static str,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    UnixListenerStream::new(listener).filter(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == allowed_uid => true,
            Ok(cred) => {
                warn!(
                    socket = what,
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "refused peer with a foreign uid"
                );
                false
            }
            Err(e) => {
                warn!(socket = what, error = %e, "cannot read peer credentials; refused");
                false
            }
        },
        Err(_) => true,
    })
}
