//! Errors of rule installation; each names the netns, backend and command involved.

use crate::netns::NetnsError;
use crate::nft::NftError;

/// Why installing, removing or inspecting redirection state failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Entering the netns failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A backend binary could not be run at all.
    #[error("{backend}: cannot run `{command}`: {source}")]
    Spawn {
        /// Backend name (e.g. `iptables-nft`).
        backend: String,
        /// The command line.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A backend command ran and failed.
    #[error("{backend}: `{command}` failed ({status}): {stderr}")]
    Command {
        /// Backend name.
        backend: String,
        /// The command line.
        command: String,
        /// Exit status text.
        status: String,
        /// What the command printed on stderr (trimmed).
        stderr: String,
    },
    /// A command or kernel request did not finish in time (it was killed / abandoned).
    #[error("{backend}: {what} did not finish within {after:?}")]
    Timeout {
        /// Backend or subsystem.
        backend: String,
        /// What was running (the command line or the request).
        what: String,
        /// The deadline that passed.
        after: std::time::Duration,
    },
    /// A netlink request failed (rules, routes, nf_tables messages).
    #[error("{backend}: netlink {op} failed: {reason}")]
    Netlink {
        /// Backend or subsystem (`route`, `nftables`).
        backend: String,
        /// The operation (e.g. `add rule fwmark 0x111/0xfff`).
        op: String,
        /// The kernel's or library's error text.
        reason: String,
    },
    /// The requested backend is not available on this host / build.
    #[error("backend {backend} not available: {reason}")]
    NotAvailable {
        /// Backend name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// The configuration cannot be expressed (e.g. a bad interface name).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Applying failed and rolling back failed too: the netns may hold partial state.
    #[error("{netns}: apply failed ({apply}); rollback also failed ({rollback})")]
    Rollback {
        /// Which netns.
        netns: String,
        /// The apply error.
        apply: Box<RulesError>,
        /// The rollback error.
        rollback: Box<RulesError>,
    },
    /// An error with the netns it happened in.
    #[error("netns {netns}: {source}")]
    InNetns {
        /// Which netns.
        netns: String,
        /// The underlying error.
        source: Box<RulesError>,
    },
}

impl RulesError {
    /// Wraps `self` with the netns label it happened in.
    pub fn in_netns(self, netns: &str) -> Self {
        match self {
            // Backends do not know the netns label; fill it in.
            RulesError::Rollback {
                apply, rollback, ..
            } => RulesError::Rollback {
                netns: netns.to_owned(),
                apply,
                rollback,
            },
            e @ (RulesError::Netns(_) | RulesError::InNetns { .. }) => e,
            other => RulesError::InNetns {
                netns: netns.to_owned(),
                source: Box::new(other),
            },
        }
    }

    /// True if this is (or wraps) [`RulesError::NotAvailable`].
    pub fn is_not_available(&self) -> bool {
        match self {
            RulesError::NotAvailable { .. } => true,
            RulesError::InNetns { source, .. } => source.is_not_available(),
            _ => false,
        }
    }
}

/// Maps an nf_tables error to the crate error, naming the object or operation.
pub(crate) fn nft_err(e: NftError) -> RulesError {
    let (op, reason) = match &e {
        NftError::Object {
            object,
            source,
            detail,
        }
        | NftError::Request {
            what: object,
            source,
            detail,
        } => (
            object.clone(),
            match detail {
                Some(d) => format!("{source} ({d})"),
                None => source.to_string(),
            },
        ),
        NftError::Socket { op, source } => ((*op).to_owned(), source.to_string()),
        NftError::Protocol { what } => (what.clone(), "malformed or unexpected reply".into()),
    };
    RulesError::Netlink {
        backend: "nftables".into(),
        op,
        reason,
    }
}
