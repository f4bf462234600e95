//! Verification at once on a kernel notification. Each held pod gets two netlink sockets
//! created inside its netns (a socket stays bound to the netns it was created in): one hears
//! every nf_tables change there (`NFNLGRP_NFTABLES`: the nftables backend, and iptables-nft,
//! which writes through nf_tables; legacy iptables sends no notification at all, so with it
//! only the policy route/rule are heard), one every IPv4/IPv6 route and rule change. Anything
//! heard sends the pod to the verifier's "verify now" queue, coalesced: one request per burst
//! ([`DEBOUNCE`]) and at most one per [`MIN_GAP`].
//!
//! No loop: a verification that finds nothing writes nothing, so it is never heard; a repair
//! is heard and costs exactly one more (read-only) verification. A writer fighting us is
//! repaired at most once per [`MIN_GAP`]. Memory is bounded: messages are read and discarded,
//! into a small receive buffer; an overrun (`ENOBUFS`) just counts as "heard".
//!
//! The sockets follow the held table: opened when a pod becomes held (or its netns changes),
//! closed when it is released.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use iptables_rules::kernel_writes::{drain, KernelWrites};
use iptables_rules::netns::{Netns, NsId};
use netlink_sys::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::metrics::VerifyMetrics;
use crate::mesh::enroller::Enroller;
use crate::pods::PodId;

/// Notifications within this long of the first are one burst (one `nft` transaction or one
/// apply makes many).
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Least time between two requests for one pod: bounds the repairs of a fight with another
/// writer, and our own repair's echo to one verification.
pub const MIN_GAP: Duration = Duration::from_millis(500);

/// Receive buffer per socket (the kernel doubles it); overruns are fine (see `drain`).
const RCVBUF: usize = 32 * 1024;

/// Starts following the held pods of `enroller` (the verifier calls it when it is on).
pub fn spawn(enroller: Arc<Enroller>, metrics: Arc<VerifyMetrics>) {
    raise_open_files_limit();
    tokio::spawn(follow(enroller, metrics));
}

/// The watches cost two fds per held pod: the soft open-files limit is raised to the hard one
/// (as Go's runtime does for istio-cni's agent), so they never starve an ADD's netns open.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed, which outlives the calls.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if got != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        debug!(
            from = before,
            to = lim.rlim_max,
            "raised the open-files limit"
        );
    } else {
        warn!(limit = before, error = %io::Error::last_os_error(), "cannot raise the open-files limit");
    }
}

/// A pod's watch task, aborted (its sockets closed) when dropped.
struct Watch {
    netns: NsId,
    task: Option<JoinHandle<()>>,
    /// The pass of [`follow`] that last found its pod held in this netns.
    seen: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Keeps one watch per held pod with a known netns, in step with the table.
async fn follow(enroller: Arc<Enroller>, metrics: Arc<VerifyMetrics>) {
    let mut watches: HashMap<String, Watch> = HashMap::new();
    let mut pass = 0u64;
    loop {
        // One pass per table change (several per ADD): marks the watches that stay and copies
        // only the pods that need a new one, never the whole table.
        pass += 1;
        let mut new = Vec::new();
        enroller.table.for_each(|h| {
            let Some(ns) = &h.netns else {
                return;
            };
            match watches.get_mut(&h.id.uid) {
                Some(w) if w.netns == ns.id() => w.seen = pass,
                _ => new.push((h.id.clone(), ns.clone())),
            }
        });
        // Released, or moved to another netns: dropping the watch closes its sockets.
        watches.retain(|_, w| w.seen == pass);
        for (pod, ns) in new {
            let task = match open(&ns).await {
                Ok(socks) => {
                    debug!(pod = %pod, netns = %ns.id(), "watching for drift notifications");
                    Some(tokio::spawn(watch_pod(
                        socks,
                        pod.clone(),
                        enroller.clone(),
                        metrics.clone(),
                    )))
                }
                Err(e) => {
                    // Not retried for this netns: the scheduled passes still verify the pod.
                    warn!(pod = %pod, error = %e, "cannot watch the pod's netns; verified on schedule only");
                    None
                }
            };
            watches.insert(
                pod.uid,
                Watch {
                    netns: ns.id(),
                    task,
                    seen: pass,
                },
            );
        }
        let live = watches
            .values()
            .filter(|w| w.task.as_ref().is_some_and(|t| !t.is_finished()))
            .count();
        metrics.set_watched(live);
        enroller.table.changed().await;
    }
}

/// The two sockets of one pod.
struct Sockets {
    nf: AsyncFd<Socket>,
    rt: AsyncFd<Socket>,
}

/// Creates the sockets inside `ns` (on a thread that enters it) and registers them.
async fn open(ns: &Arc<Netns>) -> Result<Sockets, String> {
    let ns2 = ns.clone();
    let writes =
        tokio::task::spawn_blocking(move || ns2.run(|| KernelWrites::open_here(Some(RCVBUF))))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("netns {}: netlink socket: {e}", ns.label()))?;
    let KernelWrites { nf, rt } = writes;
    let reg = |s: Socket| {
        // SAFETY: the Socket owns its fd and closes it only when dropped, which the AsyncFd
        // owning it does last; the fd is never replaced.
        unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }.map_err(|e| {
            format!(
                "netns {}: register netlink socket: {}",
                ns.label(),
                e.into_parts().1
            )
        })
    };
    Ok(Sockets {
        nf: reg(nf)?,
        rt: reg(rt)?,
    })
}

impl Sockets {
    /// Waits until either socket hears something (draining both as it goes).
    async fn heard(&self) -> io::Result<()> {
        loop {
            let heard = tokio::select! {
                g = self.nf.readable() => take(g?)?,
                g = self.rt.readable() => take(g?)?,
            };
            if heard {
                return Ok(());
            }
        }
    }

    /// Discards whatever is queued on both.
    fn drain(&self) -> io::Result<()> {
        drain(self.nf.get_ref())?;
        drain(self.rt.get_ref())?;
        Ok(())
    }
}

/// Drains a ready socket and clears its readiness (it is empty now).
fn take(mut g: tokio::io::unix::AsyncFdReadyGuard<'_, Socket>) -> io::Result<bool> {
    let heard = drain(g.get_inner())?;
    g.clear_ready();
    Ok(heard)
}

/// Sends `pod` to verification once per burst of notifications, at most once per [`MIN_GAP`].
async fn watch_pod(
    socks: Sockets,
    pod: PodId,
    enroller: Arc<Enroller>,
    metrics: Arc<VerifyMetrics>,
) {
    let mut last: Option<Instant> = None;
    loop {
        if let Err(e) = socks.heard().await {
            warn!(pod = %pod, error = %e, "drift notifications lost; the pod is verified on schedule only");
            return;
        }
        let mut at = Instant::now() + DEBOUNCE;
        if let Some(l) = last {
            at = at.max(l + MIN_GAP);
        }
        tokio::time::sleep_until(at).await;
        // The rest of the burst is covered by this request.
        if let Err(e) = socks.drain() {
            warn!(pod = %pod, error = %e, "drift notifications lost; the pod is verified on schedule only");
            return;
        }
        metrics.notified();
        enroller.request_verify(&pod.uid);
        last = Some(Instant::now());
    }
}
