//! The result of one pod's verification, kept per pod for `doctor`.

use std::fmt;
use std::time::SystemTime;

use iptables_rules::drift::DriftKind;

/// What one verification of a pod found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The capture is exactly in place; nothing was written.
    Clean,
    /// The capture had drifted and was re-applied.
    Repaired {
        /// What had drifted.
        kinds: Vec<DriftKind>,
        /// The differences found, for logs and the Event.
        detail: String,
    },
    /// The capture had drifted and the repair failed (tried again next pass).
    RepairFailed {
        /// What had drifted.
        kinds: Vec<DriftKind>,
        /// Why the repair failed.
        error: String,
    },
    /// The state could not be read (e.g. the pod's netns is gone).
    Error(String),
}

impl Outcome {
    /// The `result` label of `ambient_cni_verifications_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Clean => "clean",
            Self::Repaired { .. } => "repaired",
            Self::RepairFailed { .. } => "repair_failed",
            Self::Error(_) => "error",
        }
    }

    /// True if the capture is in place after this verification.
    pub fn in_place(&self) -> bool {
        matches!(self, Self::Clean | Self::Repaired { .. })
    }
}

fn kinds(k: &[DriftKind]) -> String {
    k.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",")
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Clean => f.write_str("capture in place"),
            Self::Repaired { kinds: k, detail } => {
                write!(f, "drift repaired ({}): {detail}", kinds(k))
            }
            Self::RepairFailed { kinds: k, error } => {
                write!(f, "drift ({}) not repaired: {error}", kinds(k))
            }
            Self::Error(e) => write!(f, "cannot verify: {e}"),
        }
    }
}

/// A pod's last verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// When it finished.
    pub at: SystemTime,
    /// What it found.
    pub outcome: Outcome,
}
