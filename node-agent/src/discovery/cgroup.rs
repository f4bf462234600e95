//! Pod UID from a process's `/proc/<pid>/cgroup` text. Pure.
//!
//! Kubelet names pod cgroups `pod<uid>`: `kubepods-burstable-pod<uid_with_underscores>.slice`
//! with the systemd driver, `.../burstable/pod<uid>/` with cgroupfs; possibly nested
//! (kind, docker-in-docker). v1 files have one line per hierarchy
//! (`N:controllers:path`), v2 a single `0::path`; lines outside kubepods are `/`.

/// Why a cgroup file could not be attributed to one pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    /// Different pod UIDs on different lines (or in one path).
    #[error("cgroup file names several pods: {0} and {1}")]
    Conflict(String, String),
    /// A line is not `hierarchy:controllers:path`.
    #[error("malformed cgroup line {0:?}")]
    Malformed(String),
}

/// The pod UID (canonical, dashed, lower-case) the process belongs to, if any.
pub fn pod_uid(cgroup_file: &str) -> Result<Option<String>, CgroupError> {
    let mut found: Option<String> = None;
    for line in cgroup_file.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(_hier), Some(_ctrl), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CgroupError::Malformed(line.to_owned()));
        };
        for uid in uids_in_path(path) {
            match &found {
                Some(f) if *f != uid => return Err(CgroupError::Conflict(f.clone(), uid)),
                Some(_) => {}
                None => found = Some(uid),
            }
        }
    }
    Ok(found)
}

/// Every `pod<uuid>` token in a cgroup path: `pod` preceded by punctuation (or
/// the start) and followed by a UUID whose separators may be `-`, `_` or absent,
/// then punctuation or the end.
fn uids_in_path(path: &str) -> Vec<String> {
    let b = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = path[i..].find("pod") {
        let at = i + off;
        i = at + 3;
        if at > 0 && !b[at - 1].is_ascii_punctuation() {
            continue;
        }
        if let Some((uid, end)) = parse_uuid(b, at + 3) {
            if end == b.len() || b[end].is_ascii_punctuation() {
                out.push(uid);
                i = end;
            }
        }
    }
    out
}

/// Parses 8-4-4-4-12 hex digits at `start`; returns the canonical UID and the end index.
fn parse_uuid(b: &[u8], start: usize) -> Option<(String, usize)> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let mut out = String::with_capacity(36);
    let mut pos = start;
    for (g, len) in GROUPS.iter().enumerate() {
        if g > 0 {
            out.push('-');
            if matches!(b.get(pos), Some(b'-' | b'_')) {
                pos += 1;
            }
        }
        let digits = b.get(pos..pos + len)?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        out.extend(digits.iter().map(|c| c.to_ascii_lowercase() as char));
        pos += len;
    }
    // A 13th hex digit means this was not a UUID boundary.
    if b.get(pos).is_some_and(u8::is_ascii_hexdigit) {
        return None;
    }
    Some((out, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e55";

    #[test]
    fn systemd_v2() {
        let f = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0d6c5c39_1b3e_4f6a_9d0e_2a4b8c7f1e55.slice/cri-containerd-2f0e1d.scope\n";
        assert_eq!(pod_uid(f).unwrap().as_deref(), Some(UID));
    }

    #[test]
    fn guaranteed_and_besteffort_layouts() {
        for p in [
            "0::/kubepods.slice/kubepods-pod0d6c5c39_1b3e_4f6a_9d0e_2a4b8c7f1e55.slice/crio-ab12.scope",
            "0::/kubepods/pod0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e55/ab12",
            "0::/kubepods/besteffort/pod0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e55/ab12",
            "0::/kubepods/besteffort/pod0D6C5C391B3E4F6A9D0E2A4B8C7F1E55/ab12",
        ] {
            assert_eq!(pod_uid(p).unwrap().as_deref(), Some(UID), "{p}");
        }
    }

    #[test]
    fn non_pods_and_near_misses() {
        for p in [
            "0::/\n",
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-0.slice/session-3.scope\n",
            // Not preceded by punctuation, or too long / too short.
            "0::/kubepods/xpod0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e55/ab\n",
            "0::/kubepods/pod0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e551/ab\n",
            "0::/kubepods/pod0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e5/ab\n",
            "",
        ] {
            assert_eq!(pod_uid(p).unwrap(), None, "{p}");
        }
    }

    #[test]
    fn conflicting_uids_are_an_error() {
        let f = "1:cpu:/kubepods/pod0d6c5c39-1b3e-4f6a-9d0e-2a4b8c7f1e55/a\n2:memory:/kubepods/pod11111111-1b3e-4f6a-9d0e-2a4b8c7f1e55/a\n";
        assert!(matches!(pod_uid(f), Err(CgroupError::Conflict(..))));
    }

    #[test]
    fn malformed_line() {
        assert!(matches!(
            pod_uid("garbage\n"),
            Err(CgroupError::Malformed(_))
        ));
    }
}
