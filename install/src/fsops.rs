//! File effects: atomic replace (temp file in the same dir + fsync + rename + dir fsync),
//! stale temp cleanup, binary copy, file identity stamps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::error::InstallError;

/// Temp files of ours older than this are leftovers of a crashed writer.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(10);

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The temp-name prefix used for `target` (`<name>.tmp.`, or hidden for config files so no
/// runtime mistakes it for a config: it ends in digits, not `.conf`).
pub fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if is_conf_name(&name) {
        format!(".{name}.ambient-cni.tmp.")
    } else {
        format!("{name}.tmp.")
    }
}

fn is_conf_name(name: &str) -> bool {
    crate::merge::CONF_EXTENSIONS
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Identity of a file's current content, to notice a concurrent writer before we rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// The stamp of `path` (None when it does not exist).
pub fn stamp(path: &Path) -> Result<Option<Stamp>, InstallError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(InstallError::io("stat", path, e)),
    }
}

/// Mode bits and owner of an existing file, to carry over to its replacement.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    /// Permission bits.
    pub mode: u32,
    /// Owner (uid, gid), if it should be set.
    pub owner: Option<(u32, u32)>,
}

/// The attributes of `path`.
pub fn attrs(path: &Path) -> Result<Attrs, InstallError> {
    let m = fs::metadata(path).map_err(|e| InstallError::io("stat", path, e))?;
    Ok(Attrs {
        mode: m.mode() & 0o7777,
        owner: Some((m.uid(), m.gid())),
    })
}

/// Replace `path` with `content` atomically. With `guard`, refuse (return `Ok(false)`) when the
/// file no longer has that stamp right before the rename: someone else wrote it meanwhile.
pub fn atomic_write(
    path: &Path,
    content: &[u8],
    attrs: Attrs,
    guard: Option<Option<Stamp>>,
) -> Result<bool, InstallError> {
    let dir = parent(path);
    let temp = dir.join(format!(
        "{}{}.{}",
        temp_prefix(path),
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_temp(&temp, content, attrs).and_then(|()| {
        if attrs.mode & 0o111 != 0 {
            wait_no_writers(&temp);
        }
        if let Some(expected) = guard {
            if stamp(path)? != expected {
                return Ok(false);
            }
        }
        fs::rename(&temp, path).map_err(|e| InstallError::io("rename into place", path, e))?;
        sync_dir(dir)?;
        Ok(true)
    });
    if !matches!(result, Ok(true)) {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_temp(temp: &Path, content: &[u8], attrs: Attrs) -> Result<(), InstallError> {
    // The fd is closed before the rename: a path that is open for writing fails exec (ETXTBSY).
    let mut f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(attrs.mode)
        .open(temp)
        .map_err(|e| InstallError::io("create", temp, e))?;
    f.write_all(content)
        .map_err(|e| InstallError::io("write", temp, e))?;
    // Explicit chmod: the open mode is filtered by the umask.
    f.set_permissions(fs::Permissions::from_mode(attrs.mode))
        .map_err(|e| InstallError::io("chmod", temp, e))?;
    if let Some((uid, gid)) = attrs.owner {
        // Best effort: only root may give a file away, and then it matters.
        let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
    }
    f.sync_all()
        .map_err(|e| InstallError::io("fsync", temp, e))?;
    Ok(())
}

/// Wait (≤ 1 s) until no process holds `path` open for writing. A process of ours that forked
/// while our write fd was open keeps a copy of it until its exec; renaming the file into place
/// then would make the kubelet's exec of it fail with ETXTBSY. A read lease is only granted
/// when the inode has no writers, which is exactly the condition exec checks.
fn wait_no_writers(path: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match has_writers(path) {
            Some(false) => return,
            Some(true) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Some(true) => return,
            // Leases unsupported here: fall back to a short grace for forked children to exec.
            None => {
                std::thread::sleep(Duration::from_millis(5));
                return;
            }
        }
    }
}

/// Whether some process has `path` open for writing (`None`: cannot tell on this system).
pub fn has_writers(path: &Path) -> Option<bool> {
    let f = File::open(path).ok()?;
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above; releases the lease we just took.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// fsync a directory so a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| InstallError::io("fsync dir", dir, e))
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Remove our temp files for `target` older than `min_age` (all of them with `Duration::ZERO`).
/// Returns the removed paths.
pub fn remove_stale_temps(target: &Path, min_age: Duration) -> Result<Vec<PathBuf>, InstallError> {
    let dir = parent(target);
    let prefix = temp_prefix(target);
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(InstallError::io("list", dir, e)),
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let old_enough = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() >= min_age)
            .unwrap_or(true);
        if old_enough {
            let p = entry.path();
            match fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(InstallError::io("remove stale temp", p, e)),
            }
        }
    }
    Ok(removed)
}

/// Copy the binary `src` to `dst` atomically with mode 0755, unless `dst` already has exactly
/// that content and mode. Returns whether it copied.
pub fn copy_binary(src: &Path, dst: &Path) -> Result<bool, InstallError> {
    let content = fs::read(src).map_err(|e| InstallError::io("read plugin binary", src, e))?;
    remove_stale_temps(dst, STALE_TEMP_AGE)?;
    if let Ok(m) = fs::metadata(dst) {
        if m.len() == content.len() as u64 && m.mode() & 0o7777 == 0o755 {
            if let Ok(existing) = fs::read(dst) {
                if existing == content {
                    return Ok(false);
                }
            }
        }
    }
    let attrs = Attrs {
        mode: 0o755,
        owner: None,
    };
    atomic_write(dst, &content, attrs, None)?;
    Ok(true)
}

/// Whether `dst` holds exactly the content of `src` and is executable.
pub fn binary_current(src: &Path, dst: &Path) -> bool {
    let (Ok(sm), Ok(dm)) = (fs::metadata(src), fs::metadata(dst)) else {
        return false;
    };
    if sm.len() != dm.len() || dm.mode() & 0o111 == 0 {
        return false;
    }
    matches!((fs::read(src), fs::read(dst)), (Ok(a), Ok(b)) if a == b)
}

/// Remove `path`; a missing file is fine. Returns whether it existed.
pub fn remove_if_exists(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("acni-fsops-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temp() {
        let d = tmpdir("mode");
        let p = d.join("10-x.conflist");
        let a = Attrs {
            mode: 0o640,
            owner: None,
        };
        assert!(atomic_write(&p, b"{}", a, None).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn leases_see_writers() {
        let d = tmpdir("lease");
        let p = d.join("bin");
        let w = File::create(&p).unwrap();
        assert_eq!(has_writers(&p), Some(true));
        drop(w);
        assert_eq!(has_writers(&p), Some(false));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn guard_refuses_when_file_changed() {
        let d = tmpdir("guard");
        let p = d.join("a.conf");
        fs::write(&p, "1").unwrap();
        let s = stamp(&p).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&p, "22").unwrap();
        let a = attrs(&p).unwrap();
        assert!(!atomic_write(&p, b"3", a, Some(s)).unwrap());
        assert_eq!(fs::read_to_string(&p).unwrap(), "22");
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "temp removed");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_temps_are_removed_by_prefix_only() {
        let d = tmpdir("stale");
        let bin = d.join("ambient-cni");
        fs::write(d.join("ambient-cni.tmp.1.2"), "x").unwrap();
        fs::write(d.join("other.tmp.1.2"), "x").unwrap();
        let removed = remove_stale_temps(&bin, Duration::ZERO).unwrap();
        assert_eq!(removed, vec![d.join("ambient-cni.tmp.1.2")]);
        assert!(d.join("other.tmp.1.2").exists());
        assert_eq!(
            temp_prefix(&d.join("05-cilium.conflist")),
            ".05-cilium.conflist.ambient-cni.tmp."
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
