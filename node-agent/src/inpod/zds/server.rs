//! The set of ztunnel connections and the policy over them: snapshot on
//! connect, adds to the newest connection, deletes to all, listener closed
//! before connections on shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::netns::Netns;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use super::config::ZdsConfig;
use super::connection::{fail_pending, run_after_hello, Connection, Job, Source};
use super::error::ZdsError;
use super::listener::ZdsListener;
use super::message::{self, Encoded};
use super::snapshot::SnapshotSource;

/// The ZDS server: ztunnels connect to it and get pods' netns fds.
pub struct ZdsServer {
    inner: Arc<Inner>,
    path: PathBuf,
    accept_stop: watch::Sender<bool>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("path", &self.path)
            .field("connections", &self.connections())
            .finish()
    }
}

struct Inner {
    cfg: ZdsConfig,
    source: Source,
    /// Registered connections, oldest first (registration = after hello).
    conns: Mutex<Vec<Handle>>,
    tasks: Mutex<JoinSet<()>>,
    conn_stop: watch::Sender<bool>,
    next_id: AtomicU64,
}

#[derive(Clone)]
struct Handle {
    id: u64,
    name: String,
    tx: mpsc::Sender<Job>,
}

/// Locks a mutex, recovering from poisoning (the data is a plain list).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn newest(&self) -> Option<Handle> {
        lock(&self.conns).last().cloned()
    }

    fn all(&self) -> Vec<Handle> {
        lock(&self.conns).clone()
    }

    fn register(&self, h: Handle) {
        lock(&self.conns).push(h);
    }

    fn deregister(&self, id: u64) {
        lock(&self.conns).retain(|h| h.id != id);
    }
}

impl ZdsServer {
    /// Binds at `path` with Istio's deadlines and starts accepting. Needs a tokio runtime.
    pub fn bind(path: &Path, snapshot: Arc<dyn SnapshotSource>) -> Result<Self, ZdsError> {
        Self::bind_with(path, snapshot, ZdsConfig::default())
    }

    /// Like [`ZdsServer::bind`] with explicit deadlines and limits.
    pub fn bind_with(
        path: &Path,
        snapshot: Arc<dyn SnapshotSource>,
        cfg: ZdsConfig,
    ) -> Result<Self, ZdsError> {
        let listener = ZdsListener::bind(path)?;
        let inner = Arc::new(Inner {
            cfg,
            source: snapshot,
            conns: Mutex::new(Vec::new()),
            tasks: Mutex::new(JoinSet::new()),
            conn_stop: watch::Sender::new(false),
            next_id: AtomicU64::new(1),
        });
        let (accept_stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, inner.clone(), stop_rx));
        info!(path = %path.display(), "ZDS server listening");
        Ok(Self {
            inner,
            path: path.to_owned(),
            accept_stop,
            accept_task: Mutex::new(Some(task)),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of ztunnel connections past their hello.
    pub fn connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Sends `AddWorkload` + netns fd to the newest connection and waits for its ack.
    pub async fn add_workload(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: &Netns,
    ) -> Result<(), ZdsError> {
        // Refuse oversize before touching any connection.
        let msg = message::encode(&message::add(uid, info))?;
        let fd = netns.try_clone_fd().map_err(|source| ZdsError::Io {
            conn: format!("(none; netns {})", netns.label()),
            op: "duplicate netns fd",
            source,
        })?;
        let mut job_parts = (msg, Some(fd));
        loop {
            let h = self.inner.newest().ok_or(ZdsError::NoConnection)?;
            let (reply, answer) = oneshot::channel();
            let job = Job {
                msg: job_parts.0,
                fd: job_parts.1,
                reply,
            };
            match h.tx.send(job).await {
                Ok(()) => return answer_of(&h, answer).await,
                Err(mpsc::error::SendError(job)) => {
                    // That connection just ended: try the next newest.
                    self.inner.deregister(h.id);
                    job_parts = (job.msg, job.fd);
                }
            }
        }
    }

    /// Sends `DelWorkload` to every connection and waits for all acks.
    /// With no connection there is nobody to tell: `Ok`.
    pub async fn del_workload(&self, uid: &str) -> Result<(), ZdsError> {
        let msg = message::encode(&message::del(uid))?;
        self.broadcast(msg).await
    }

    async fn broadcast(&self, msg: Encoded) -> Result<(), ZdsError> {
        let mut waiting = Vec::new();
        for h in self.inner.all() {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                msg: msg.clone(),
                fd: None,
                reply,
            };
            if h.tx.send(job).await.is_ok() {
                waiting.push((h, answer));
            } else {
                // Gone: its ztunnel will get a fresh snapshot when it reconnects.
                self.inner.deregister(h.id);
            }
        }
        let mut errors = Vec::new();
        for (h, answer) in waiting {
            if let Err(e) = answer_of(&h, answer).await {
                warn!(conn = %h.name, msg = %msg.what, "{e}");
                errors.push(e);
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ZdsError::Several(errors)),
        }
    }

    /// Stops: closes the listening socket first (so a reconnecting ztunnel
    /// does not land in a dying backlog), then every connection. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.accept_stop.send(true);
        let task = lock(&self.accept_task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let _ = self.inner.conn_stop.send(true);
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        while tasks.join_next().await.is_some() {}
        info!(path = %self.path.display(), "ZDS server stopped");
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        // Without an awaited shutdown(), still stop the tasks (listener first).
        let _ = self.accept_stop.send(true);
        let _ = self.inner.conn_stop.send(true);
    }
}

async fn answer_of(
    h: &Handle,
    answer: oneshot::Receiver<Result<(), ZdsError>>,
) -> Result<(), ZdsError> {
    answer.await.unwrap_or_else(|_| {
        Err(ZdsError::ConnectionClosed {
            conn: h.name.clone(),
        })
    })
}

async fn accept_loop(listener: ZdsListener, inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(fd) => {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let name = format!("zds#{id}");
                if peer_allowed(&fd, &name, inner.cfg.allowed_uid) {
                    let mut tasks = lock(&inner.tasks);
                    // Reap finished connection tasks so the set does not grow.
                    while tasks.try_join_next().is_some() {}
                    tasks.spawn(handle_connection(inner.clone(), id, name, fd));
                }
                // A refused peer's socket closes here, before it is sent anything.
            }
            Err(e) => warn!(path = %listener.path().display(), "accept failed: {e}"),
        }
        // Rate limit (5/s, burst 1), also the back-off after an accept error.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(inner.cfg.accept_interval) => {}
        }
    }
    drop(listener);
}

/// Whether the peer is the allowed uid: whoever gets past hello is sent every held
/// pod's netns fd, so the socket's file mode alone (which `DAC_OVERRIDE` passes) is not enough.
fn peer_allowed(fd: &std::os::fd::OwnedFd, name: &str, allowed_uid: u32) -> bool {
    match getsockopt(fd, PeerCredentials) {
        Ok(c) if c.uid() == allowed_uid => {
            info!(conn = %name, pid = c.pid(), uid = c.uid(), "ztunnel connected");
            true
        }
        Ok(c) => {
            warn!(conn = %name, pid = c.pid(), uid = c.uid(), allowed_uid,
                "refused a ZDS peer with a foreign uid");
            false
        }
        Err(e) => {
            warn!(conn = %name, "refused a ZDS peer whose credentials cannot be read: {e}");
            false
        }
    }
}

async fn handle_connection(inner: Arc<Inner>, id: u64, name: String, fd: std::os::fd::OwnedFd) {
    let mut stop = inner.conn_stop.subscribe();
    let mut conn = match Connection::new(name.clone(), fd, inner.cfg.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(conn = %name, "{e}");
            return;
        }
    };
    let hello = tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        h = conn.read_hello() => h,
    };
    match hello {
        Ok(v) => info!(conn = %name, version = ?v, "ztunnel hello"),
        Err(e) => {
            warn!(conn = %name, "no valid hello, dropping: {e}");
            return;
        }
    }
    let (tx, mut rx) = mpsc::channel(inner.cfg.queue_len.max(1));
    // Register before taking the snapshot: an add racing with this connection
    // either is in the snapshot or queued after it (see SnapshotSource).
    inner.register(Handle {
        id,
        name: name.clone(),
        tx,
    });
    let entries = inner.source.snapshot();
    let res = run_after_hello(&mut conn, entries, &mut rx, &mut stop).await;
    inner.deregister(id);
    fail_pending(&name, &mut rx);
    conn.discard_pending();
    match res {
        Ok(()) => info!(conn = %name, "connection closed by agent"),
        Err(ZdsError::ConnectionClosed { .. }) => info!(conn = %name, "ztunnel disconnected"),
        Err(e) => warn!(conn = %name, "connection dropped: {e}"),
    }
}
