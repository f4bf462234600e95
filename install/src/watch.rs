//! The watch/repair loop: inotify on the conf dir and the bin dir, repair within milliseconds
//! of a rewrite or delete, throttled, with readiness published through an `AtomicBool`.
//!
//! The loop is blocking (one OS thread, `poll` on the inotify fd plus a stop fd);
//! [`Installer::watch`] and [`Installer::run`] wrap it for tokio via `spawn_blocking`.

use std::future::Future;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tracing::{debug, info, warn};

use crate::entry::PLUGIN_BINARY;
use crate::error::InstallError;
use crate::installer::{InstallStatus, Installer, ShutdownMode, UninstallOutcome};
use crate::throttle::{Throttle, ThrottleConfig};

/// Re-check everything this often even without events (missed events, queue overflow).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// After an event, wait this long for the writer to finish before looking.
const SETTLE: Duration = Duration::from_millis(30);
/// Coalesce a burst of events for at most this long.
const SETTLE_MAX: Duration = Duration::from_millis(250);
/// Retry interval while a directory is missing or a pass failed.
const RETRY: Duration = Duration::from_secs(1);

/// A level-triggered stop flag that a blocking loop can `poll` on.
#[derive(Debug)]
pub struct StopSignal {
    rx: UnixStream,
    tx: UnixStream,
}

impl StopSignal {
    /// A new, untriggered signal.
    pub fn new() -> std::io::Result<Self> {
        let (tx, rx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        Ok(StopSignal { rx, tx })
    }

    /// Ask the loop to stop (idempotent).
    pub fn trigger(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// Whether stop was asked.
    pub fn is_triggered(&self) -> bool {
        // Nobody reads the byte: once written, the fd stays readable, so the signal stays raised.
        let mut fds = [PollFd::new(self.rx.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Sleep up to `d`; returns true if stop was asked meanwhile.
    pub fn sleep(&self, d: Duration) -> bool {
        let mut fds = [PollFd::new(self.rx.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, timeout(d));
        self.is_triggered()
    }
}

fn timeout(d: Duration) -> PollTimeout {
    PollTimeout::try_from(d.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
}

const DIR_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

#[derive(Default)]
struct Watches {
    conf: Option<WatchDescriptor>,
    bin: Option<WatchDescriptor>,
}

impl Watches {
    /// Add the missing watches; false while a directory does not exist.
    fn ensure(&mut self, ino: &Inotify, conf: &Path, bin: &Path) -> bool {
        for (slot, dir) in [(&mut self.conf, conf), (&mut self.bin, bin)] {
            if slot.is_none() {
                match ino.add_watch(dir, DIR_MASK | AddWatchFlags::IN_ONLYDIR) {
                    Ok(wd) => *slot = Some(wd),
                    Err(e) => debug!(dir = %dir.display(), error = %e, "cannot watch yet"),
                }
            }
        }
        self.conf.is_some() && self.bin.is_some()
    }

    /// Whether the events matter; forgets watches whose directory went away.
    fn relevant(&mut self, events: &[nix::sys::inotify::InotifyEvent]) -> bool {
        let mut any = false;
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                any = true;
                continue;
            }
            let gone = ev.mask.intersects(
                AddWatchFlags::IN_IGNORED
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF,
            );
            let name = ev.name.as_ref().map(|n| n.to_string_lossy());
            if Some(ev.wd) == self.conf {
                if gone {
                    self.conf = None;
                    any = true;
                } else if name
                    .as_deref()
                    .is_some_and(|n| !n.contains(".ambient-cni.tmp."))
                {
                    any = true;
                }
            }
            if Some(ev.wd) == self.bin {
                if gone {
                    self.bin = None;
                    any = true;
                } else if name.as_deref() == Some(PLUGIN_BINARY) {
                    any = true;
                }
            }
        }
        any
    }
}

enum Wake {
    Stop,
    Changed,
    Timeout,
}

impl Installer {
    /// Run install passes until `stop` is triggered: at start, on every relevant change in the
    /// conf or bin dir, and every [`RESYNC_INTERVAL`]. `ready` is true exactly while the
    /// binary and our config are in place. Blocks the calling thread.
    pub fn watch_blocking(
        &self,
        stop: &StopSignal,
        ready: &AtomicBool,
    ) -> Result<(), InstallError> {
        self.watch_with(stop, ready, ThrottleConfig::default())
    }

    /// [`Installer::watch_blocking`] with explicit throttle settings.
    pub fn watch_with(
        &self,
        stop: &StopSignal,
        ready: &AtomicBool,
        throttle_cfg: ThrottleConfig,
    ) -> Result<(), InstallError> {
        let conf_dir = self.config().cni_conf_dir.clone();
        let bin_dir = self.config().cni_bin_dir.clone();
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| InstallError::io("inotify_init", &conf_dir, e.into()))?;
        let mut watches = Watches::default();
        let mut throttle = Throttle::new(throttle_cfg);
        let mut waiting_logged = false;
        // The same failure every second is logged once (then at debug level).
        let mut last_error = String::new();
        loop {
            if stop.is_triggered() {
                return Ok(());
            }
            let watched = watches.ensure(&ino, &conf_dir, &bin_dir);
            let mut wait = if watched { RESYNC_INTERVAL } else { RETRY };
            match self.reconcile(&mut throttle, stop, ready) {
                Ok(Some(true)) => {
                    ready.store(true, Ordering::SeqCst);
                    waiting_logged = false;
                    last_error.clear();
                    self.set_failing(None);
                }
                Ok(Some(false)) => {
                    ready.store(false, Ordering::SeqCst);
                    self.set_failing(Some(format!(
                        "no primary CNI config in {} yet",
                        conf_dir.display()
                    )));
                    if !waiting_logged {
                        info!(dir = %conf_dir.display(), "no primary CNI config yet; waiting for one");
                        waiting_logged = true;
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    ready.store(false, Ordering::SeqCst);
                    let msg = e.to_string();
                    self.set_failing(Some(msg.clone()));
                    if msg != last_error {
                        warn!(error = %msg, "install pass failed; retrying every second");
                        last_error = msg;
                    } else {
                        debug!(error = %msg, "install pass failed again");
                    }
                    wait = RETRY;
                }
            }
            match wait_events(&ino, &mut watches, stop, wait) {
                Wake::Stop => return Ok(()),
                Wake::Changed | Wake::Timeout => {}
            }
        }
    }

    /// One pass with the throttle; `Ok(None)` if stop was asked while throttled. Readiness
    /// drops as soon as something is missing, before any throttle delay.
    fn reconcile(
        &self,
        throttle: &mut Throttle,
        stop: &StopSignal,
        ready: &AtomicBool,
    ) -> Result<Option<bool>, InstallError> {
        self.stats().reconciles.fetch_add(1, Ordering::Relaxed);
        match self.status()? {
            InstallStatus::Installed => return Ok(Some(true)),
            InstallStatus::WaitingForPrimary => return Ok(Some(false)),
            InstallStatus::NeedsRepair => ready.store(false, Ordering::SeqCst),
        }
        // Only real writes count against the throttle.
        let d = throttle.delay(Instant::now());
        if !d.is_zero() {
            self.stats().throttled.fetch_add(1, Ordering::Relaxed);
            warn!(
                dir = %self.config().cni_conf_dir.display(),
                delay_ms = d.as_millis() as u64,
                repairs_in_window = throttle.recent(),
                "the ambient-cni installation (its conflist entry or the plugin binary) keeps \
                 disappearing and has been repaired repeatedly; backing off. If another CNI agent \
                 rewrites the conflist (Cilium: set cni.exclusive=false) use --owned-conf so \
                 ambient-cni keeps its own conflist; if the binary goes, find what cleans the CNI \
                 bin dir"
            );
            if stop.sleep(d) {
                return Ok(None);
            }
        }
        let outcome = self.install_once()?;
        if outcome.wrote() {
            self.stats().repairs.fetch_add(1, Ordering::Relaxed);
            info!(?outcome, "repaired ambient-cni installation");
        }
        Ok(Some(outcome.is_installed()))
    }

    /// Watch on a blocking thread until `shutdown` completes.
    pub async fn watch(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()>,
        ready: Arc<AtomicBool>,
    ) -> Result<(), InstallError> {
        let stop = Arc::new(
            StopSignal::new().map_err(|e| InstallError::io("create stop pipe", "socketpair", e))?,
        );
        let (me, s2) = (self.clone(), stop.clone());
        let mut task = tokio::task::spawn_blocking(move || me.watch_blocking(&s2, &ready));
        tokio::select! {
            r = &mut task => join(r),
            () = shutdown => {
                stop.trigger();
                join(task.await)
            }
        }
    }

    /// The installer's whole life in the agent: install, watch and repair until `shutdown`
    /// yields a mode, then mark not ready and apply that mode.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl Future<Output = ShutdownMode>,
        ready: Arc<AtomicBool>,
    ) -> Result<UninstallOutcome, InstallError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.clone()
            .watch(
                async move {
                    let _ = tx.send(shutdown.await);
                },
                ready.clone(),
            )
            .await?;
        ready.store(false, Ordering::SeqCst);
        // The watch only ends early on error (returned above), so the mode is there.
        let mode = rx.await.unwrap_or(ShutdownMode::Upgrade);
        let me = self.clone();
        join(tokio::task::spawn_blocking(move || me.shutdown(mode)).await)
    }
}

fn join<T>(r: Result<Result<T, InstallError>, tokio::task::JoinError>) -> Result<T, InstallError> {
    r.map_err(|e| {
        InstallError::io(
            "join installer thread",
            "watch",
            std::io::Error::other(e.to_string()),
        )
    })?
}

/// Wait for a relevant event (then let the writer settle), stop, or the timeout.
fn wait_events(ino: &Inotify, watches: &mut Watches, stop: &StopSignal, wait: Duration) -> Wake {
    let deadline = Instant::now() + wait;
    let mut changed_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let limit = match changed_at {
            // Settle: return once quiet for SETTLE, or after SETTLE_MAX at the latest.
            Some(first) => (now + SETTLE).min(first + SETTLE_MAX),
            None => deadline,
        };
        if now >= limit {
            return if changed_at.is_some() {
                Wake::Changed
            } else {
                Wake::Timeout
            };
        }
        let mut fds = [
            PollFd::new(ino.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout(limit - now)) {
            Ok(0) => {
                if changed_at.is_some() {
                    return Wake::Changed;
                }
            }
            Ok(_) => {
                if stop.is_triggered() {
                    return Wake::Stop;
                }
                match ino.read_events() {
                    Ok(evs) => {
                        if watches.relevant(&evs) && changed_at.is_none() {
                            changed_at = Some(Instant::now());
                        }
                    }
                    Err(Errno::EAGAIN) => {}
                    Err(e) => {
                        warn!(error = %e, "reading inotify events failed");
                        return Wake::Changed;
                    }
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "poll failed");
                return if stop.sleep(RETRY) {
                    Wake::Stop
                } else {
                    Wake::Changed
                };
            }
        }
    }
}
