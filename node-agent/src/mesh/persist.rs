//! Which netns each held pod lives in, kept on disk so a restarted agent finds
//! pods without processes of their own (and before any /proc scan).
//!
//! One small JSON file per pod UID in `<run dir>/pods/`. The inode is checked on
//! reload, so a path reused by another netns is never mistaken for the pod's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What is remembered of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The netns path (`CNI_NETNS` or `/proc/<pid>/ns/net`).
    pub netns_path: String,
    /// The netns inode when it was enrolled.
    pub netns_inode: u64,
}

/// The record directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Store {
    /// A store in `dir` (created, 0700).
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { dir })
    }

    fn path(&self, uid: &str) -> Option<PathBuf> {
        valid_uid(uid).then(|| self.dir.join(format!("{uid}.json")))
    }

    /// Saves a record atomically (UIDs that could escape the directory are refused).
    pub fn save(&self, rec: &Record) -> std::io::Result<()> {
        let Some(path) = self.path(&rec.uid) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid pod uid {:?}", rec.uid),
            ));
        };
        let tmp = self.dir.join(format!(".{}.tmp", rec.uid));
        std::fs::write(&tmp, serde_json::to_vec(rec)?)?;
        std::fs::rename(tmp, path)
    }

    /// Removes a record (absent is fine).
    pub fn remove(&self, uid: &str) {
        if let Some(p) = self.path(uid) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Every readable record; unreadable files are skipped.
    pub fn load_all(&self) -> Vec<Record> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| valid_uid(&r.uid))
            .collect()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_hostile_uids() {
        let dir = std::env::temp_dir().join(format!("acni-persist-{}", std::process::id()));
        let s = Store::open(&dir).unwrap();
        let r = Record {
            uid: "0b8c-11".into(),
            namespace: "a".into(),
            name: "b".into(),
            netns_path: "/var/run/netns/x".into(),
            netns_inode: 42,
        };
        s.save(&r).unwrap();
        assert_eq!(s.load_all(), vec![r.clone()]);
        assert!(s
            .save(&Record {
                uid: "../etc".into(),
                ..r.clone()
            })
            .is_err());
        s.remove("0b8c-11");
        assert!(s.load_all().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
