//! Which pods the controller has dealt with, by UID (pure): each broken pod is acted on once
//! (a repaired pod stays broken-looking until its init container's back-off restart, and every
//! status change in between is an event), failed attempts are retried a few times, and the
//! memory is bounded and forgets pods that are gone.

use std::collections::{HashMap, HashSet, VecDeque};

/// Attempts per pod before giving up (Istio's queue: `WithMaxAttempts(5)`).
pub const MAX_ATTEMPTS: u32 = 5;
/// Most pod UIDs remembered (a node runs far fewer pods; the oldest is forgotten first).
pub const CAPACITY: usize = 4096;

/// Done pod UIDs and failed attempts of the others.
#[derive(Debug, Default)]
pub struct Memory {
    done: HashSet<String>,
    order: VecDeque<String>,
    attempts: HashMap<String, u32>,
}

impl Memory {
    /// True when the pod needs no more attention.
    pub fn is_done(&self, uid: &str) -> bool {
        self.done.contains(uid)
    }

    /// The pod was dealt with (repaired, deleted, labelled, or skipped for good).
    pub fn mark_done(&mut self, uid: &str) {
        self.attempts.remove(uid);
        if self.done.insert(uid.to_string()) {
            self.order.push_back(uid.to_string());
        }
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
    }

    /// One more failed attempt; true when it was the last (the pod is then done).
    pub fn failed(&mut self, uid: &str) -> bool {
        let n = self.attempts.entry(uid.to_string()).or_insert(0);
        *n += 1;
        if *n >= MAX_ATTEMPTS {
            self.mark_done(uid);
            return true;
        }
        false
    }

    /// Forgets every pod not in `live` (deleted pods; a UID is never reused).
    pub fn retain(&mut self, live: &HashSet<&str>) {
        self.done.retain(|u| live.contains(u.as_str()));
        self.order.retain(|u| live.contains(u.as_str()));
        self.attempts.retain(|u, _| live.contains(u.as_str()));
    }

    /// Number of UIDs remembered as done.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// True when nothing is remembered as done.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_uid() {
        let mut m = Memory::default();
        assert!(!m.is_done("a"));
        m.mark_done("a");
        m.mark_done("a");
        assert!(m.is_done("a"));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn failures_are_retried_then_given_up() {
        let mut m = Memory::default();
        for _ in 1..MAX_ATTEMPTS {
            assert!(!m.failed("a"));
            assert!(!m.is_done("a"));
        }
        assert!(m.failed("a"));
        assert!(m.is_done("a"));
    }

    #[test]
    fn bounded_and_forgets_gone_pods() {
        let mut m = Memory::default();
        for i in 0..CAPACITY + 10 {
            m.mark_done(&format!("u{i}"));
        }
        assert_eq!(m.len(), CAPACITY);
        assert!(!m.is_done("u0"));
        assert!(m.is_done(&format!("u{}", CAPACITY + 9)));
        let _ = m.failed("x");
        let live: HashSet<&str> = ["u20"].into_iter().collect();
        m.retain(&live);
        assert_eq!(m.len(), 1);
        assert!(m.is_done("u20"));
        assert!(m.attempts.is_empty());
    }
}
