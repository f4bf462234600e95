//! Which netns each held pod lives in, kept on disk so a restarted agent finds
//! pods without processes of their own (and before any /proc scan).
//!
//! One small JSON file per pod UID in `<run dir>/pods/`. The inode is checked on
//! reload, so a path reused by another netns is never mistaken for the pod's.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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
    /// The sandbox (CNI container ID) it was enrolled for, when it came from a CNI ADD:
    /// after a restart a late DEL of an older sandbox still cannot release it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

impl Record {
    /// The record of pod `id` held in the netns at `netns_path` (inode `netns_inode`).
    pub fn new(
        id: &crate::pods::PodId,
        netns_path: String,
        netns_inode: u64,
        container_id: Option<String>,
    ) -> Self {
        Self {
            uid: id.uid.clone(),
            namespace: id.namespace.clone(),
            name: id.name.clone(),
            netns_path,
            netns_inode,
            container_id,
        }
    }
}

/// Where records are kept (blocking: call off the runtime workers where it matters).
pub trait RecordStore: Send + Sync {
    /// Saves (or replaces) a pod's record.
    fn save(&self, rec: &Record) -> std::io::Result<()>;
    /// Removes a pod's record (absent is fine).
    fn remove(&self, uid: &str);
    /// Every readable record.
    fn load_all(&self) -> Vec<Record>;
}

impl RecordStore for Store {
    fn save(&self, rec: &Record) -> std::io::Result<()> {
        Store::save(self, rec)
    }
    fn remove(&self, uid: &str) {
        Store::remove(self, uid)
    }
    fn load_all(&self) -> Vec<Record> {
        Store::load_all(self)
    }
}

/// Largest record file read back: a record is a few hundred bytes, and a file
/// that is not ours must not cost the agent its memory at start-up.
pub const MAX_RECORD_LEN: u64 = 64 * 1024;

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
    /// A store in `dir` (created, 0700); temporary files a crash left behind are removed.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, uid: &str) -> Option<PathBuf> {
        valid_uid(uid).then(|| self.dir.join(format!("{uid}.json")))
    }

    /// Saves a record atomically (UIDs that could escape the directory are refused).
    ///
    /// No fsync (it was the tail of every ADD: up to tens of ms under I/O load). A record
    /// only has to outlive the agent, not the node: an agent crash leaves the written data
    /// in the page cache, and a power loss or reboot ends every pod netns the records point
    /// at (a rebooted node restarts its pods, whose ADDs write new records). The temporary
    /// file + rename still keeps a record whole if the agent dies mid-write.
    pub fn save(&self, rec: &Record) -> std::io::Result<()> {
        let Some(path) = self.path(&rec.uid) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid pod uid {:?}", rec.uid),
            ));
        };
        let tmp = self.dir.join(format!(".{}.tmp", rec.uid));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(rec)?)?;
        drop(f);
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
            // Regular files only (no symlinks, FIFOs or devices planted here).
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| read_capped(&e.path()))
            .filter_map(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| valid_uid(&r.uid))
            .collect()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A record file's bytes, or `None` when unreadable, not a regular file, or larger
/// than [`MAX_RECORD_LEN`].
fn read_capped(path: &Path) -> Option<Vec<u8>> {
    // O_NONBLOCK: a FIFO planted here must not block start-up.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(MAX_RECORD_LEN + 1).read_to_end(&mut buf).ok()?;
    (buf.len() as u64 <= MAX_RECORD_LEN).then_some(buf)
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
            container_id: Some("c1".into()),
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

    #[test]
    fn stale_temp_files_go_and_oversize_or_odd_records_are_skipped() {
        let dir = std::env::temp_dir().join(format!("acni-persist-odd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".u1.tmp"), b"{half").unwrap();
        let s = Store::open(&dir).unwrap();
        assert!(
            !dir.join(".u1.tmp").exists(),
            "a crashed save's temp file is removed"
        );
        let r = Record {
            uid: "u2".into(),
            namespace: "a".into(),
            name: "b".into(),
            netns_path: "/var/run/netns/x".into(),
            netns_inode: 7,
            container_id: None,
        };
        s.save(&r).unwrap();
        // Too large (a valid record padded past the cap), a FIFO, a directory: skipped, no hang.
        let mut big = serde_json::to_vec(&Record {
            uid: "u3".into(),
            ..r.clone()
        })
        .unwrap();
        big.extend(std::iter::repeat_n(b' ', MAX_RECORD_LEN as usize));
        std::fs::write(dir.join("u3.json"), big).unwrap();
        nix::unistd::mkfifo(
            &dir.join("u4.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::fs::create_dir(dir.join("u5.json")).unwrap();
        // A record of an older agent (no container id) still loads.
        std::fs::write(
            dir.join("u6.json"),
            br#"{"uid":"u6","namespace":"a","name":"c","netns_path":"/x","netns_inode":1}"#,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let mut got: Vec<String> = s.load_all().into_iter().map(|r| r.uid).collect();
        got.sort();
        assert_eq!(got, vec!["u2", "u6"]);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
