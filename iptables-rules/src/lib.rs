//! In-pod redirection rules: pure generation and the iptables / nftables backends.

pub mod netns;
