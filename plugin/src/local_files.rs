//! The plugin's two local files beside the agent socket: the agent's decisions file
//! (read, bounded) and the fallback counter (one byte appended per fallback).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Reads at most `max` bytes of `path` (one more, so an oversized file is seen as such).
/// Only a regular file owned by us (root) and writable by no one else is trusted.
pub fn read_trusted(path: &Path, max: usize) -> Result<Vec<u8>, String> {
    let (f, md) = open_no_follow(OpenOptions::new().read(true), path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_file() || md.uid() != me || md.mode() & 0o022 != 0 {
        return Err(format!(
            "{}: not a regular file owned by uid {me} and writable only by it",
            path.display()
        ));
    }
    let mut buf = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(buf)
}

/// Appends `byte` to the counter file `path` (created 0600) unless it is already `max`
/// bytes long. One `write` of one byte with `O_APPEND` never interleaves with another.
pub fn append_byte(path: &Path, byte: u8, max: u64) -> Result<(), String> {
    let (mut f, md) = open_no_follow(
        OpenOptions::new().append(true).create(true).mode(0o600),
        path,
    )?;
    if !md.is_file() || md.len() >= max {
        return Ok(());
    }
    f.write_all(&[byte])
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Opens `path` with `opts`, never through a symlink and never blocking (a FIFO planted there
/// must not hang the plugin); returns the file and what it is.
fn open_no_follow(
    opts: &mut OpenOptions,
    path: &Path,
) -> Result<(std::fs::File, std::fs::Metadata), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let f = opts
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let md = f.metadata().map_err(err)?;
    Ok((f, md))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("acni-lf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_bounded_and_refuses_shared_files() {
        let d = dir("read");
        let p = d.join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_trusted(&p, 100).unwrap(), b"0123456789");
        assert_eq!(read_trusted(&p, 4).unwrap().len(), 5, "one past the limit");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(read_trusted(&p, 100).is_err(), "world-writable");
        let link = d.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(read_trusted(&link, 100).is_err(), "symlink");
        assert!(read_trusted(&d, 100).is_err(), "directory");
        assert!(read_trusted(&d.join("absent"), 100).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn appends_until_the_cap() {
        let d = dir("append");
        let p = d.join("c");
        for b in [b'p', b'f', b'p', b'p'] {
            append_byte(&p, b, 3).unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"pfp");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(append_byte(&d.join("no/such/dir"), b'p', 3).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
