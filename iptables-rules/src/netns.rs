//! Network namespace handles and safe entry.
//!
//! A netns is entered only on a dedicated OS thread that `setns`es in, runs the
//! closure, and `setns`es back; if it cannot get back the thread is left to die
//! rather than returned to a pool, so no other work ever runs in the wrong netns.
//! Async runtime worker threads never call `setns`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// `NSFS_MAGIC` from linux/magic.h: the filesystem type of `/proc/<pid>/ns/*` and bind mounts of them.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Errors from opening or entering a network namespace; each names the netns.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path could not be opened.
    #[error("netns {path}: cannot open: {source}")]
    Open {
        /// The netns path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path exists but is not a namespace file.
    #[error("netns {path}: not a network namespace (not an nsfs file)")]
    NotNsfs {
        /// The netns path.
        path: PathBuf,
    },
    /// The path is a namespace file of another kind (mount, pid, user, ...).
    #[error("netns {path}: not a network namespace (a {kind} namespace)")]
    WrongKind {
        /// The netns path.
        path: PathBuf,
        /// The namespace kind the kernel reports.
        kind: &'static str,
    },
    /// The path is the host's own network namespace.
    #[error("netns {path}: refusing the host network namespace")]
    HostNetns {
        /// The netns path.
        path: PathBuf,
    },
    /// `setns` into the namespace failed.
    #[error("netns {label}: setns failed: {source}")]
    Enter {
        /// Which netns.
        label: String,
        /// The OS error.
        source: nix::Error,
    },
    /// The worker thread could not be spawned or panicked.
    #[error("netns {label}: worker thread failed: {reason}")]
    Thread {
        /// Which netns.
        label: String,
        /// What went wrong.
        reason: String,
    },
}

/// Identity of a namespace file: (device, inode), as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    /// `st_dev` of the nsfs file.
    pub dev: u64,
    /// `st_ino` of the nsfs file (the namespace's inode number).
    pub ino: u64,
}

impl std::fmt::Display for NsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// An open network namespace (the fd keeps it alive while held).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    label: String,
    id: NsId,
}

impl Netns {
    /// Opens a netns path, checking it is a network namespace file and not `host` (when given).
    ///
    /// Never blocks and never opens a device: anything but a regular file is refused
    /// before `open` (a FIFO would block, a device open can have effects), and the open
    /// itself is `O_NONBLOCK` against a swap between the check and the open.
    pub fn open(path: &Path, host: Option<NsId>) -> Result<Self, NetnsError> {
        let open_err = |source| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        // nsfs files stat as regular (empty) files.
        if !std::fs::metadata(path).map_err(open_err)?.is_file() {
            return Err(NetnsError::NotNsfs {
                path: path.to_owned(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let ns = Self::from_fd(OwnedFd::from(file), path.display().to_string()).map_err(
            |e| match e {
                NetnsError::NotNsfs { .. } => NetnsError::NotNsfs {
                    path: path.to_owned(),
                },
                NetnsError::WrongKind { kind, .. } => NetnsError::WrongKind {
                    path: path.to_owned(),
                    kind,
                },
                other => other,
            },
        )?;
        if Some(ns.id) == host {
            return Err(NetnsError::HostNetns {
                path: path.to_owned(),
            });
        }
        Ok(ns)
    }

    /// Wraps an already-open fd (e.g. received over a socket), checking it is a
    /// network namespace (nsfs, and `NS_GET_NSTYPE` says `CLONE_NEWNET`).
    pub fn from_fd(fd: OwnedFd, label: impl Into<String>) -> Result<Self, NetnsError> {
        let label = label.into();
        let st = nix::sys::statfs::fstatfs(&fd).map_err(|e| NetnsError::Open {
            path: PathBuf::from(&label),
            source: e.into(),
        })?;
        if st.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotNsfs {
                path: PathBuf::from(&label),
            });
        }
        let kind = ns_type(&fd).map_err(|source| NetnsError::Open {
            path: PathBuf::from(&label),
            source,
        })?;
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::WrongKind {
                path: PathBuf::from(&label),
                kind: ns_kind_name(kind),
            });
        }
        let file = File::from(fd);
        let md = file.metadata().map_err(|source| NetnsError::Open {
            path: PathBuf::from(&label),
            source,
        })?;
        let id = NsId {
            dev: md.dev(),
            ino: md.ino(),
        };
        Ok(Self {
            fd: OwnedFd::from(file),
            label,
            id,
        })
    }

    /// The identity of the host netns: `<host_proc>/1/ns/net`, or, where PID 1 is
    /// not readable (sandboxes without ptrace access to it), this process's own
    /// netns, which is the host's for the host-network agent.
    pub fn host_id(host_proc: &Path) -> Result<NsId, NetnsError> {
        let p = host_proc.join("1/ns/net");
        let md = std::fs::metadata(&p)
            .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
            .map_err(|source| NetnsError::Open { path: p, source })?;
        Ok(NsId {
            dev: md.dev(),
            ino: md.ino(),
        })
    }

    /// The namespace's (dev, inode).
    pub fn id(&self) -> NsId {
        self.id
    }

    /// A human-readable name (the path it was opened from).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A duplicate fd for the same namespace (e.g. to hand to ztunnel).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Runs `f` on a fresh OS thread inside this netns and returns its result.
    ///
    /// Child processes spawned by `f` inherit the netns. Blocking: call from a
    /// blocking context (e.g. `tokio::task::spawn_blocking`), never on a runtime worker.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let target = self.fd.as_fd();
        let label = self.label.clone();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, move || enter_and_run(target, &self.label, f))
                .map_err(|e| NetnsError::Thread {
                    label: label.clone(),
                    reason: e.to_string(),
                })?;
            handle.join().map_err(|_| NetnsError::Thread {
                label,
                reason: "panicked".into(),
            })?
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Netns {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// `NS_GET_NSTYPE` (linux/nsfs.h: `_IO(0xb7, 0x3)`): the `CLONE_NEW*` flag of an nsfs fd.
const NS_GET_NSTYPE: libc::c_ulong = 0xb7 << 8 | 0x3;

/// The namespace kind of an nsfs fd, as its `CLONE_NEW*` flag.
fn ns_type(fd: &OwnedFd) -> std::io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A readable name of a `CLONE_NEW*` namespace kind, for errors.
fn ns_kind_name(kind: libc::c_int) -> &'static str {
    match kind {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWCGROUP => "cgroup",
        0x80 => "time",
        _ => "unknown",
    }
}

/// Body of the worker thread: this thread is never reused, so even a failed
/// restore cannot leak the pod's netns into other work. The restore only matters
/// for thread-local state the closure's destructors might touch.
fn enter_and_run<T, F>(target: BorrowedFd<'_>, label: &str, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T,
{
    // The thread must have its own fs/files view for setns(CLONE_NEWNET) to be
    // harmless to siblings: netns is per-thread already, nothing to unshare.
    let original = File::open("/proc/thread-self/ns/net").map_err(|e| NetnsError::Thread {
        label: label.to_owned(),
        reason: format!("cannot open own netns: {e}"),
    })?;
    setns(target, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        label: label.to_owned(),
        source,
    })?;
    let out = f();
    // Best effort: the thread ends right after, so a failure here cannot leak.
    let _ = setns(original.as_fd(), CloneFlags::CLONE_NEWNET);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("netns-test-{}", std::process::id()));
        std::fs::write(&dir, b"x").unwrap();
        let err = Netns::open(&dir, None).unwrap_err();
        assert!(matches!(err, NetnsError::NotNsfs { .. }), "{err}");
        std::fs::remove_file(&dir).unwrap();
    }

    /// Nothing that is not a network namespace file blocks or gets through: each is
    /// refused with an error naming the path, well within 100 ms.
    #[test]
    fn refuses_everything_but_a_netns_quickly() {
        let dir = std::env::temp_dir().join(format!("netns-kinds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let host = Netns::host_id(Path::new("/proc")).unwrap();
        type Case<'a> = (&'a Path, fn(&NetnsError) -> bool);
        let cases: [Case<'_>; 8] = [
            (&fifo, |e| matches!(e, NetnsError::NotNsfs { .. })),
            (&dir, |e| matches!(e, NetnsError::NotNsfs { .. })),
            (&file, |e| matches!(e, NetnsError::NotNsfs { .. })),
            (Path::new("/dev/zero"), |e| {
                matches!(e, NetnsError::NotNsfs { .. })
            }),
            (Path::new("/proc/self/ns/mnt"), |e| {
                matches!(e, NetnsError::WrongKind { kind: "mount", .. })
            }),
            (Path::new("/proc/self/ns/pid"), |e| {
                matches!(e, NetnsError::WrongKind { kind: "pid", .. })
            }),
            (Path::new("/proc/self/ns/user"), |e| {
                matches!(e, NetnsError::WrongKind { kind: "user", .. })
            }),
            (Path::new("/proc/self/ns/net"), |e| {
                matches!(e, NetnsError::HostNetns { .. })
            }),
        ];
        for (path, want) in cases {
            let started = std::time::Instant::now();
            let err = Netns::open(path, Some(host)).unwrap_err();
            let took = started.elapsed();
            assert!(want(&err), "{}: {err}", path.display());
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
            assert!(took < std::time::Duration::from_millis(100), "{took:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_missing_path() {
        let err = Netns::open(Path::new("/nonexistent/netns/x"), None).unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/netns/x"));
    }

    #[test]
    fn refuses_the_host_netns() {
        let host = Netns::host_id(Path::new("/proc")).unwrap();
        let err = Netns::open(Path::new("/proc/self/ns/net"), Some(host)).unwrap_err();
        assert!(matches!(err, NetnsError::HostNetns { .. }), "{err}");
    }

    #[test]
    fn runs_in_the_target_netns() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("skipped: needs root to unshare a netns");
            return;
        }
        // A thread that owns a fresh netns for the duration of the test.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            let tid = nix::unistd::gettid();
            tx.send(format!("/proc/self/task/{tid}/ns/net")).unwrap();
            let _ = done_rx.recv();
        });
        let path = rx.recv().unwrap();
        let ns = Netns::open(Path::new(&path), None).unwrap();
        let seen = ns
            .run(|| std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino())
            .unwrap();
        assert_eq!(seen, ns.id().ino);
        let own = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert_ne!(own, ns.id().ino, "caller thread must not change netns");
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
