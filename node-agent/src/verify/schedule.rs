//! When to verify which held pod: pure logic, no clock of its own (the caller passes `now`).
//!
//! A pass takes the pods held when it starts and spreads them evenly over one interval, so the
//! kernel readbacks are smoothed instead of bursting. A pass starts only when the previous one
//! is done and at least one interval after it started: passes never overlap, and a slow pass
//! delays the next instead of piling up. A "verify now" request (a failed CHECK, a notification)
//! jumps the queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the verifier should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<K> {
    /// Verify this pod now.
    Verify(K),
    /// Nothing is due: sleep this long (or until a "verify now" request arrives).
    Wait(Duration),
}

/// The verification schedule of the held pods, keyed by `K` (the pod UID in the agent).
#[derive(Debug)]
pub struct Scheduler<K> {
    interval: Duration,
    /// The rest of the current pass, in due order.
    pass: VecDeque<(Instant, K)>,
    /// Earliest start of the next pass.
    next_pass: Instant,
    /// "Verify now" requests, oldest first, without duplicates.
    urgent: VecDeque<K>,
}

impl<K: Clone + PartialEq> Scheduler<K> {
    /// A schedule with passes every `interval` (must be non-zero: zero means no verifier),
    /// the first one starting one interval from `now` (pods were just applied at start).
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            interval: interval.max(Duration::from_millis(1)),
            pass: VecDeque::new(),
            next_pass: now + interval,
            urgent: VecDeque::new(),
        }
    }

    /// Asks for `key` to be verified before anything else (once, however often asked).
    pub fn verify_now(&mut self, key: K) {
        if !self.urgent.contains(&key) {
            self.urgent.push_back(key);
        }
    }

    /// Pods still to verify in the current pass (not counting "verify now" requests).
    pub fn pass_left(&self) -> usize {
        self.pass.len()
    }

    /// The next step at `now`; `held` lists the pods held (called only when a pass starts).
    pub fn next(&mut self, now: Instant, held: impl FnOnce() -> Vec<K>) -> Step<K> {
        if let Some(k) = self.urgent.pop_front() {
            // Verified now: no need to do it again later in this pass.
            self.pass.retain(|(_, p)| *p != k);
            return Step::Verify(k);
        }
        if self.pass.is_empty() {
            if now < self.next_pass {
                return Step::Wait(self.next_pass - now);
            }
            let keys = held();
            self.next_pass = now + self.interval;
            let n = keys.len() as u32;
            for (i, k) in keys.into_iter().enumerate() {
                self.pass.push_back((now + self.interval * i as u32 / n, k));
            }
            if self.pass.is_empty() {
                return Step::Wait(self.interval);
            }
        }
        match self.pass.front() {
            Some((due, _)) if *due > now => Step::Wait(*due - now),
            _ => match self.pass.pop_front() {
                Some((_, k)) => Step::Verify(k),
                None => Step::Wait(self.interval),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Runs the schedule with a fake clock: verification takes `cost`; returns (time, pod) pairs.
    fn simulate(
        sched: &mut Scheduler<u32>,
        start: Instant,
        until: Duration,
        cost: Duration,
        held: &[u32],
    ) -> Vec<(Duration, u32)> {
        let mut now = start;
        let mut out = Vec::new();
        while now < start + until {
            match sched.next(now, || held.to_vec()) {
                Step::Verify(k) => {
                    out.push((now - start, k));
                    now += cost;
                }
                Step::Wait(d) => {
                    assert!(d > Duration::ZERO, "a wait is never zero");
                    now += d;
                }
            }
        }
        out
    }

    #[test]
    fn pods_are_spread_over_the_interval() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(8 * S, t0);
        let got = simulate(&mut s, t0, 24 * S, Duration::ZERO, &[1, 2, 3, 4]);
        let at = |secs: u32, k| (S * secs, k);
        assert_eq!(
            got,
            vec![
                at(8, 1),
                at(10, 2),
                at(12, 3),
                at(14, 4),
                at(16, 1),
                at(18, 2),
                at(20, 3),
                at(22, 4)
            ]
        );
    }

    #[test]
    fn a_slow_pass_delays_the_next_and_never_overlaps() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(2 * S, t0);
        // Each verification takes 1.5 s: a pass of 3 pods takes 4.5 s > the 2 s interval.
        let got = simulate(
            &mut s,
            t0,
            11 * S,
            1500 * Duration::from_millis(1),
            &[1, 2, 3],
        );
        let pods: Vec<u32> = got.iter().map(|(_, k)| *k).collect();
        assert_eq!(pods, vec![1, 2, 3, 1, 2, 3], "each pass completes in order");
        // Back to back: the second pass starts right after the first ends (t=2+4.5).
        assert_eq!(got[3].0, Duration::from_millis(6500));
        for w in got.windows(2) {
            assert!(w[1].0 >= w[0].0 + Duration::from_millis(1500), "no overlap");
        }
    }

    #[test]
    fn verify_now_jumps_the_queue_once() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(10 * S, t0);
        s.verify_now(7);
        s.verify_now(7);
        s.verify_now(3);
        assert_eq!(s.next(t0, Vec::new), Step::Verify(7));
        assert_eq!(s.next(t0, Vec::new), Step::Verify(3));
        assert_eq!(s.next(t0, Vec::new), Step::Wait(10 * S));
        // During a pass: the urgent pod goes first and is not verified again in that pass.
        let t1 = t0 + 10 * S;
        assert_eq!(s.next(t1, || vec![1, 2, 3]), Step::Verify(1));
        s.verify_now(3);
        assert_eq!(s.next(t1, Vec::new), Step::Verify(3));
        assert_eq!(s.pass_left(), 1);
        assert_eq!(s.next(t1 + 5 * S, Vec::new), Step::Verify(2));
        assert_eq!(s.next(t1 + 5 * S, Vec::new), Step::Wait(5 * S));
    }

    #[test]
    fn empty_node_waits_a_full_interval_and_picks_up_new_pods() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(3 * S, t0);
        assert_eq!(s.next(t0 + 3 * S, Vec::new), Step::Wait(3 * S));
        assert_eq!(s.next(t0 + 6 * S, || vec![9]), Step::Verify(9));
        assert_eq!(s.next(t0 + 6 * S, || vec![9]), Step::Wait(3 * S));
    }
}
