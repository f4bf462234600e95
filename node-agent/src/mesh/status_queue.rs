//! The pod status annotation written after the ADD returns: a [`StatusWriter`] that queues
//! each pod's latest value and lets a background worker write it, so the API server's round
//! trip is never in a pod's start-up path. Per pod the writes stay in order and coalesce (only
//! the newest value is written); a failed write is retried with back-off until it succeeds, a
//! newer value replaces it, or its attempts run out. Events go the same way, uncoalesced.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::hooks::StatusWriter;
use crate::pods::PodId;

/// Writes to different pods in flight at once (the API server serves them in parallel).
const PARALLEL: usize = 8;
/// How long a new value waits before its write starts. The write (our PATCH, then the API
/// server's and etcd's work and the watch event it sends back) otherwise runs beside the
/// reply of the ADD that queued it: measured on a 2-core node, it added ~0.9 ms to that ADD
/// (`kube_add` bench). A value replaced within the wait is written once.
const SETTLE: Duration = Duration::from_millis(10);
/// First and largest retry delay of a failed write.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Attempts of one value before it is given up (the pod is likely gone or renamed).
const ATTEMPTS: u32 = 8;
/// Events waiting at most; beyond, the oldest is dropped (they are diagnostics, not state).
const EVENTS_MAX: usize = 1024;

/// One pod's value waiting to be written.
#[derive(Debug, Clone)]
struct Pending {
    pod: PodId,
    value: Option<&'static str>,
    attempts: u32,
    not_before: Instant,
}

/// One event waiting to be recorded.
#[derive(Debug, Clone)]
struct PendingEvent {
    pod: PodId,
    reason: String,
    message: String,
}

#[derive(Debug, Default)]
struct State {
    /// The newest unwritten value per pod UID.
    values: HashMap<String, Pending>,
    /// Pod UIDs in the order their first unwritten value arrived.
    order: VecDeque<String>,
    /// Pod UIDs being written now (a newer value waits for it: per-pod order).
    in_flight: std::collections::HashSet<String>,
    events: VecDeque<PendingEvent>,
}

impl State {
    fn is_idle(&self) -> bool {
        self.values.is_empty() && self.in_flight.is_empty() && self.events.is_empty()
    }
}

/// The queue in front of a slower status writer (the Kube API's).
pub struct QueuedStatus {
    inner: Arc<dyn StatusWriter>,
    state: Mutex<State>,
    /// Woken on every new value or event and when a write ends.
    wake: Notify,
    /// Woken when the queue becomes empty (for [`QueuedStatus::flush`]).
    idle: Notify,
}

impl QueuedStatus {
    /// A queue writing through `inner`, with its worker spawned on the current runtime.
    pub fn spawn(inner: Arc<dyn StatusWriter>) -> Arc<Self> {
        let q = Arc::new(Self {
            inner,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            idle: Notify::new(),
        });
        // Lives as long as the agent's runtime: the queue is one per agent.
        tokio::spawn(worker(q.clone()));
        q
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes not done yet (values and events).
    pub fn backlog(&self) -> usize {
        let s = self.state();
        s.values.len() + s.in_flight.len() + s.events.len()
    }

    /// Waits until everything queued so far is written or given up, or `within` passes;
    /// returns whether the queue is empty.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.state().is_idle() {
                return true;
            }
            // A value waiting out its back-off makes the queue idle later, not never.
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.state().is_idle();
            }
        }
    }

    /// The writes that may start now: values whose pod has no write in flight and whose
    /// back-off is over (oldest first, at most `room`), then events. Also the earliest
    /// instant a waiting value becomes due.
    fn take_due(
        &self,
        room: usize,
        now: Instant,
    ) -> (Vec<Pending>, Vec<PendingEvent>, Option<Instant>) {
        let mut s = self.state();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        let mut keep = VecDeque::with_capacity(s.order.len());
        while let Some(uid) = s.order.pop_front() {
            let Some(p) = s.values.get(&uid) else {
                continue;
            };
            if due.len() < room && !s.in_flight.contains(&uid) && p.not_before <= now {
                if let Some(p) = s.values.remove(&uid) {
                    s.in_flight.insert(uid);
                    due.push(p);
                }
                continue;
            }
            if p.not_before > now {
                next = Some(next.map_or(p.not_before, |n: Instant| n.min(p.not_before)));
            }
            keep.push_back(uid);
        }
        s.order = keep;
        let n = room.saturating_sub(due.len()).min(s.events.len());
        let events = s.events.drain(..n).collect();
        (due, events, next)
    }

    /// After a write of `p`: done, or back in the queue for a retry unless a newer value came.
    fn finish(&self, mut p: Pending, result: Result<(), String>) {
        let mut s = self.state();
        s.in_flight.remove(&p.pod.uid);
        match result {
            Ok(()) => {
                debug!(pod = %p.pod, value = p.value.unwrap_or("(removed)"), "pod status written")
            }
            Err(e) if s.values.contains_key(&p.pod.uid) => {
                debug!(pod = %p.pod, error = %e, "pod status write failed; a newer value replaces it");
            }
            Err(e) => {
                p.attempts += 1;
                if p.attempts >= ATTEMPTS {
                    warn!(pod = %p.pod, error = %e, attempts = p.attempts, "giving up writing the pod's status");
                } else {
                    let delay = backoff(p.attempts);
                    warn!(pod = %p.pod, error = %e, retry_in_ms = delay.as_millis() as u64, "pod status write failed; will retry");
                    p.not_before = Instant::now() + delay;
                    let uid = p.pod.uid.clone();
                    s.values.insert(uid.clone(), p);
                    s.order.push_back(uid);
                }
            }
        }
        let idle = s.is_idle();
        drop(s);
        self.wake.notify_one();
        if idle {
            self.idle.notify_waiters();
        }
    }
}

/// The delay before attempt `attempts + 1`: doubling from [`RETRY_MIN`] up to [`RETRY_MAX`].
fn backoff(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    (RETRY_MIN * (1u32 << shift)).min(RETRY_MAX)
}

async fn worker(me: Arc<QueuedStatus>) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        let wake = me.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let room = PARALLEL.saturating_sub(running.len());
        let (due, events, next) = me.take_due(room, Instant::now());
        for p in due {
            let me = me.clone();
            running.spawn(async move {
                let r = me.inner.set(&p.pod, p.value).await;
                me.finish(p, r);
            });
        }
        for e in events {
            let me = me.clone();
            running.spawn(async move {
                if let Err(err) = me.inner.event(&e.pod, &e.reason, &e.message).await {
                    warn!(pod = %e.pod, error = %err, reason = %e.reason, "cannot record the event");
                }
                let idle = me.state().is_idle();
                me.wake.notify_one();
                if idle {
                    me.idle.notify_waiters();
                }
            });
        }
        // Reap finished writes so `running.len()` frees room.
        while running.try_join_next().is_some() {}
        match next {
            Some(at) => {
                let _ = tokio::time::timeout_at(at, wake).await;
            }
            None => wake.await,
        }
        while running.try_join_next().is_some() {}
    }
}

#[tonic::async_trait]
impl StatusWriter for QueuedStatus {
    /// Queues the value and returns at once; a queued older value of the pod is replaced.
    async fn set(&self, pod: &PodId, value: Option<&'static str>) -> Result<(), String> {
        let mut s = self.state();
        let p = Pending {
            pod: pod.clone(),
            value,
            attempts: 0,
            not_before: Instant::now() + SETTLE,
        };
        if s.values.insert(pod.uid.clone(), p).is_none() {
            s.order.push_back(pod.uid.clone());
        }
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues the event and returns at once.
    async fn event(&self, pod: &PodId, reason: &str, message: &str) -> Result<(), String> {
        let mut s = self.state();
        if s.events.len() >= EVENTS_MAX {
            s.events.pop_front();
            warn!(pod = %pod, "event queue full: the oldest event is dropped");
        }
        s.events.push_back(PendingEvent {
            pod: pod.clone(),
            reason: reason.to_owned(),
            message: message.to_owned(),
        });
        drop(s);
        self.wake.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A status writer that records each write and can hold or fail them.
    struct Slow {
        writes: Mutex<Vec<(String, Option<&'static str>)>>,
        events: Mutex<Vec<String>>,
        /// Writes wait for this before returning when `hold` is set.
        gate: tokio::sync::Semaphore,
        hold: std::sync::atomic::AtomicBool,
        /// The first `fail` writes fail.
        fail: AtomicU32,
    }

    impl Default for Slow {
        fn default() -> Self {
            Self {
                writes: Mutex::default(),
                events: Mutex::default(),
                gate: tokio::sync::Semaphore::new(0),
                hold: Default::default(),
                fail: AtomicU32::new(0),
            }
        }
    }

    #[tonic::async_trait]
    impl StatusWriter for Slow {
        async fn set(&self, pod: &PodId, value: Option<&'static str>) -> Result<(), String> {
            if self.hold.load(Ordering::SeqCst) {
                let _ = self.gate.acquire().await.map(|p| p.forget());
            }
            self.writes.lock().unwrap().push((pod.uid.clone(), value));
            if self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err("the API server said no".into());
            }
            Ok(())
        }
        async fn event(&self, pod: &PodId, reason: &str, _: &str) -> Result<(), String> {
            self.events
                .lock()
                .unwrap()
                .push(format!("{}:{reason}", pod.uid));
            Ok(())
        }
    }

    fn id(uid: &str) -> PodId {
        PodId {
            namespace: "ns".into(),
            name: format!("pod-{uid}"),
            uid: uid.into(),
        }
    }

    #[tokio::test]
    async fn set_returns_before_the_write_and_the_write_follows() {
        let slow = Arc::new(Slow::default());
        slow.hold.store(true, Ordering::SeqCst);
        let q = QueuedStatus::spawn(slow.clone());
        // The inner writer is blocked: set must not wait for it.
        tokio::time::timeout(Duration::from_millis(100), q.set(&id("a"), Some("enabled")))
            .await
            .expect("set waited for the API")
            .unwrap();
        assert!(slow.writes.lock().unwrap().is_empty());
        slow.gate.add_permits(10);
        assert!(q.flush(Duration::from_secs(2)).await);
        assert_eq!(
            *slow.writes.lock().unwrap(),
            vec![("a".into(), Some("enabled"))]
        );
    }

    #[tokio::test]
    async fn a_pods_values_coalesce_and_stay_in_order() {
        let slow = Arc::new(Slow::default());
        slow.hold.store(true, Ordering::SeqCst);
        let q = QueuedStatus::spawn(slow.clone());
        q.set(&id("a"), Some("pending")).await.unwrap();
        // Let the worker start the first write (it blocks on the gate).
        while q.state().in_flight.is_empty() {
            tokio::task::yield_now().await;
        }
        // While it is in flight: two more values; only the newest is written, after it.
        q.set(&id("a"), Some("enabled")).await.unwrap();
        q.set(&id("a"), None).await.unwrap();
        slow.gate.add_permits(10);
        assert!(q.flush(Duration::from_secs(2)).await);
        assert_eq!(
            *slow.writes.lock().unwrap(),
            vec![("a".into(), Some("pending")), ("a".into(), None)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waits_out_the_settle_time_and_values_within_it_are_written_once() {
        let slow = Arc::new(Slow::default());
        let q = QueuedStatus::spawn(slow.clone());
        let started = Instant::now();
        // An ADD's pending then enabled, back to back: one write, of the newest, after SETTLE.
        q.set(&id("a"), Some("pending")).await.unwrap();
        q.set(&id("a"), Some("enabled")).await.unwrap();
        tokio::time::sleep(SETTLE / 2).await;
        assert!(
            slow.writes.lock().unwrap().is_empty(),
            "written before SETTLE"
        );
        assert!(q.flush(Duration::from_secs(1)).await);
        assert_eq!(
            *slow.writes.lock().unwrap(),
            vec![("a".into(), Some("enabled"))]
        );
        // Paused clock: exact.
        assert!(started.elapsed() >= SETTLE);
        assert!(started.elapsed() < SETTLE * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_with_back_off() {
        let slow = Arc::new(Slow::default());
        slow.fail.store(2, Ordering::SeqCst);
        let q = QueuedStatus::spawn(slow.clone());
        let started = Instant::now();
        q.set(&id("a"), Some("enabled")).await.unwrap();
        assert!(q.flush(Duration::from_secs(10)).await);
        assert_eq!(
            slow.writes.lock().unwrap().len(),
            3,
            "two failures, then success"
        );
        // 200 ms then 400 ms of back-off (paused clock: exact).
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert!(started.elapsed() < Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_keeps_failing_is_given_up() {
        let slow = Arc::new(Slow::default());
        slow.fail.store(u32::MAX, Ordering::SeqCst);
        let q = QueuedStatus::spawn(slow.clone());
        q.set(&id("gone"), Some("enabled")).await.unwrap();
        assert!(q.flush(Duration::from_secs(60)).await, "the queue empties");
        assert_eq!(slow.writes.lock().unwrap().len(), ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn many_pods_are_written_and_events_recorded() {
        let slow = Arc::new(Slow::default());
        let q = QueuedStatus::spawn(slow.clone());
        for i in 0..100 {
            q.set(&id(&i.to_string()), Some("enabled")).await.unwrap();
        }
        q.event(&id("7"), "EnrollmentFailed", "no ztunnel")
            .await
            .unwrap();
        assert!(q.flush(Duration::from_secs(5)).await);
        assert_eq!(q.backlog(), 0);
        let mut uids: Vec<String> = slow
            .writes
            .lock()
            .unwrap()
            .iter()
            .map(|w| w.0.clone())
            .collect();
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 100);
        assert_eq!(
            *slow.events.lock().unwrap(),
            vec!["7:EnrollmentFailed".to_owned()]
        );
    }

    #[test]
    fn back_off_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(6), RETRY_MAX);
        assert_eq!(backoff(u32::MAX), RETRY_MAX);
    }
}
