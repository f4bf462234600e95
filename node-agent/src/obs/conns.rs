//! The connection cap of the health and metrics servers: every connection is accepted, and
//! when the cap is reached the *oldest* one is closed to make room. A client holding
//! connections open therefore cannot keep a fresh one (a kubelet probe) from being served:
//! with a permit taken before `accept`, 64 held connections made every probe wait in the
//! backlog until the kubelet restarted the agent.

use std::collections::BTreeMap;

/// Live connections in arrival order; `T` is what closes one (a oneshot sender).
#[derive(Debug)]
pub struct ConnTable<T> {
    cap: usize,
    next: u64,
    live: BTreeMap<u64, T>,
}

impl<T> ConnTable<T> {
    /// A table that holds at most `cap` connections (at least one).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            next: 0,
            live: BTreeMap::new(),
        }
    }

    /// Registers a new connection; returns its id and the closers of the oldest connections
    /// that must go so the table stays within the cap.
    pub fn admit(&mut self, closer: T) -> (u64, Vec<T>) {
        let id = self.next;
        self.next += 1;
        self.live.insert(id, closer);
        let mut evicted = Vec::new();
        while self.live.len() > self.cap {
            match self.live.pop_first() {
                Some((_, c)) => evicted.push(c),
                None => break,
            }
        }
        (id, evicted)
    }

    /// Forgets connection `id` (it ended on its own); a no-op when it was evicted.
    pub fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_every_connection_and_evicts_the_oldest_past_the_cap() {
        let mut t = ConnTable::new(3);
        let ids: Vec<u64> = ["a", "b", "c"]
            .into_iter()
            .map(|c| {
                let (id, ev) = t.admit(c);
                assert!(ev.is_empty());
                id
            })
            .collect();
        assert_eq!(t.len(), 3);
        // Full: the newcomer is admitted and the oldest goes.
        let (d, ev) = t.admit("d");
        assert_eq!(ev, vec!["a"]);
        assert_eq!(t.len(), 3);
        // A connection that ended frees its slot: nobody is evicted for the next one.
        t.remove(ids[2]);
        assert_eq!(t.admit("e").1, Vec::<&str>::new());
        // Removing an evicted id changes nothing.
        t.remove(ids[0]);
        assert_eq!(t.len(), 3);
        // The order is arrival order, not id reuse: b, d, e are live; b goes next.
        assert_eq!(t.admit("f").1, vec!["b"]);
        t.remove(d);
        assert_eq!(t.len(), 2);
        assert!(!t.is_empty());
    }

    #[test]
    fn a_cap_of_zero_still_serves_the_newest() {
        let mut t = ConnTable::new(0);
        assert!(t.admit(1).1.is_empty());
        assert_eq!(t.admit(2).1, vec![1]);
        assert_eq!(t.len(), 1);
    }
}
