//! Root-only Unix sockets for the agent's local APIs: the file is 0600 and each
//! accepted peer's uid is checked with `SO_PEERCRED`.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Binds a socket: missing parent directories created 0750 (existing ones, e.g. `/run`,
/// are left as they are), stale file removed, socket 0600.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source| SocketError::Io { path, what, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_missing_dirs(dir).map_err(io("create directory"))?;
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

/// Creates `dir` and its missing ancestors with mode 0750; never touches the mode
/// of a directory that already exists (it is not ours to change).
fn create_missing_dirs(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while std::fs::symlink_metadata(d).is_err() {
        missing.push(d);
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    for m in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o750).create(m) {
            Ok(()) => {}
            // Made by someone else meanwhile: theirs, leave it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pause after a failed accept (EMFILE, ENFILE, ENOMEM): the error repeats until
/// something is freed, and the server would otherwise retry at once, at full CPU.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The accepted connections whose peer uid is `allowed_uid`; others are dropped and
/// logged. Accept errors are logged and followed by [`ACCEPT_BACKOFF`].
pub fn peers_with_uid(
    listener: UnixListener,
    allowed_uid: u32,
    what: &'static str,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    gate(UnixListenerStream::new(listener), allowed_uid, what)
}

/// [`peers_with_uid`] over any stream of accepted connections.
fn gate(
    accepted: impl Stream<Item = std::io::Result<UnixStream>>,
    allowed_uid: u32,
    what: &'static str,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    accepted
        .then(move |conn| async move {
            if let Err(e) = &conn {
                warn!(socket = what, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            conn
        })
        .filter(move |conn| match conn {
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
            // Logged and waited for above; the server would only retry.
            Err(_) => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn accept_errors_back_off_instead_of_spinning() {
        let polled = Arc::new(AtomicUsize::new(0));
        let counter = polled.clone();
        // A listener out of fds: every accept fails with EMFILE.
        let emfile = tokio_stream::iter(std::iter::repeat_with(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        }));
        let mut s = std::pin::pin!(gate(emfile, 0, "test"));
        let window = ACCEPT_BACKOFF * 4 - ACCEPT_BACKOFF / 2;
        assert!(tokio::time::timeout(window, s.next()).await.is_err());
        let n = polled.load(Ordering::Relaxed);
        assert!((1..=4).contains(&n), "{n} accepts in {window:?}");
    }

    #[tokio::test]
    async fn only_directories_it_creates_get_its_mode() {
        let base = std::env::temp_dir().join(format!("acni-uds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        // An existing directory (think /run) keeps its mode.
        let l = bind(&base.join("a.sock")).unwrap();
        assert_eq!(std::fs::metadata(&base).unwrap().mode() & 0o777, 0o755);
        assert_eq!(
            std::fs::metadata(base.join("a.sock")).unwrap().mode() & 0o777,
            0o600
        );
        drop(l);
        // Missing ones are created 0750.
        let l = bind(&base.join("x/y/b.sock")).unwrap();
        for d in ["x", "x/y"] {
            assert_eq!(
                std::fs::metadata(base.join(d)).unwrap().mode() & 0o777,
                0o750,
                "{d}"
            );
        }
        assert_eq!(std::fs::metadata(&base).unwrap().mode() & 0o777, 0o755);
        drop(l);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
