//! Deadlines and limits of the ZDS server (defaults are Istio's, §3.3 / §7).

use std::time::Duration;

/// Tunables of [`super::ZdsServer`]; `Default` gives Istio's values.
#[derive(Debug, Clone)]
pub struct ZdsConfig {
    /// How long a new connection has to send `ZdsHello`.
    pub hello_timeout: Duration,
    /// How long a send may wait for socket buffer space.
    pub write_timeout: Duration,
    /// How long to wait for each ack.
    pub ack_timeout: Duration,
    /// Minimum gap between accepts (5/s, burst 1).
    pub accept_interval: Duration,
    /// Requests queued per connection before callers wait.
    pub queue_len: usize,
    /// Consecutive timeouts after which a connection is dropped as wedged
    /// (ztunnel then reconnects and gets a fresh snapshot).
    pub max_consecutive_timeouts: u32,
    /// The only peer uid allowed to connect (`SO_PEERCRED`): whoever connects gets
    /// every held pod's netns fd, so file permissions alone are not enough.
    pub allowed_uid: u32,
}

impl Default for ZdsConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
            accept_interval: Duration::from_millis(200),
            queue_len: 100,
            max_consecutive_timeouts: 2,
            allowed_uid: 0,
        }
    }
}
