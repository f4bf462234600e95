//! The verifier task: follows the [`Scheduler`], one pod at a time (so passes never overlap and
//! at most one readback runs), and takes "verify now" requests (a failed CHECK, a kernel
//! notification) at once.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::info;

use super::metrics::VerifyMetrics;
use super::outcome::Verified;
use super::pod::verify_pod;
use super::schedule::{Scheduler, Step};
use crate::mesh::enroller::Enroller;

/// Starts the verifier for `enroller`'s held pods, a pass every `interval`; nothing when the
/// interval is zero (verification off, notifications too). "Verify now" requests (a failed
/// CHECK, a kernel notification: [`super::notify`]) reach it through [`Enroller::request_verify`].
pub fn spawn(enroller: Arc<Enroller>, metrics: Arc<VerifyMetrics>, interval: Duration) {
    if interval.is_zero() {
        info!("drift verifier off (VERIFY_INTERVAL=0)");
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    enroller.set_verify_requests(tx);
    super::notify::spawn(enroller.clone(), metrics.clone());
    info!(
        interval_seconds = interval.as_secs_f64(),
        "drift verifier on"
    );
    tokio::spawn(run(enroller, metrics, interval, rx));
}

async fn run(
    enroller: Arc<Enroller>,
    metrics: Arc<VerifyMetrics>,
    interval: Duration,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let mut sched = Scheduler::new(interval, Instant::now());
    let mut pass_started: Option<Instant> = None;
    loop {
        while let Ok(uid) = rx.try_recv() {
            sched.verify_now(uid);
        }
        let now = Instant::now();
        let step = sched.next(now, || {
            pass_started = Some(now);
            enroller.table.uids()
        });
        match step {
            Step::Verify(uid) => {
                if let Some(outcome) = verify_pod(&enroller, &metrics, &uid).await {
                    let at = SystemTime::now();
                    enroller.table.set_verified(&uid, Verified { at, outcome });
                }
                if sched.pass_left() == 0 {
                    if let Some(t) = pass_started.take() {
                        metrics.pass(t.elapsed());
                    }
                }
            }
            Step::Wait(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    Some(uid) = rx.recv() => sched.verify_now(uid),
                }
            }
        }
    }
}
