//! Finding the primary CNI config: the first valid file in lexical order, as the kubelet does.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::InstallError;
use crate::merge::{classify, only_ours, ConfKind, CONF_EXTENSIONS};

/// A config file read from the conf dir.
#[derive(Debug, Clone)]
pub struct ConfFile {
    /// File name (no directory).
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// Content, or why it could not be read.
    pub text: Result<String, String>,
}

/// A config file the kubelet would load.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// File name.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// Content.
    pub text: String,
    /// List or single plugin.
    pub kind: ConfKind,
}

/// Every `.conf` / `.conflist` / `.json` file of `dir`, sorted byte-wise by name (Go's
/// `sort.Strings`, as libcni). A missing dir is empty.
pub fn read_conf_dir(dir: &Path) -> Result<Vec<ConfFile>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(InstallError::io("list", dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| InstallError::io("list", dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !CONF_EXTENSIONS.iter().any(|ext| name.ends_with(ext)) {
            continue;
        }
        let path = entry.path();
        let text = fs::read_to_string(&path).map_err(|e| e.to_string());
        files.push(ConfFile { name, path, text });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The valid files in order, and the skipped ones with the reason.
pub fn candidates(files: &[ConfFile]) -> (Vec<Candidate>, Vec<(String, String)>) {
    let mut valid = Vec::new();
    let mut skipped = Vec::new();
    for f in files {
        let kind = match &f.text {
            Ok(t) if only_ours(t) => {
                Err("holds only our own plugin: not a primary network config".to_string())
            }
            Ok(t) => classify(&f.name, t).map(|k| (k, t)),
            Err(e) => Err(format!("unreadable: {e}")),
        };
        match kind {
            Ok((kind, text)) => valid.push(Candidate {
                name: f.name.clone(),
                path: f.path.clone(),
                text: text.clone(),
                kind,
            }),
            Err(reason) => skipped.push((f.name.clone(), reason)),
        }
    }
    (valid, skipped)
}

/// The primary among `valid`: the file named `conf_name` when set, else the first one whose
/// name is not `exclude` (our owned file).
pub fn primary<'a>(
    valid: &'a [Candidate],
    conf_name: Option<&str>,
    exclude: Option<&str>,
) -> Option<&'a Candidate> {
    match conf_name {
        Some(n) => valid.iter().find(|c| c.name == n),
        None => valid.iter().find(|c| Some(c.name.as_str()) != exclude),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, text: &str) -> ConfFile {
        ConfFile {
            name: name.into(),
            path: PathBuf::from(name),
            text: Ok(text.into()),
        }
    }

    #[test]
    fn first_valid_in_lexical_order_wins() {
        let files = vec![
            f("00-broken.conflist", "{"),
            f("01-notype.conf", r#"{"name":"x"}"#),
            f("02-empty.conflist", r#"{"name":"x","plugins":[]}"#),
            f("03-ours.conf", r#"{"type":"ambient-cni"}"#),
            f(
                "04-ours.conflist",
                r#"{"name":"o","plugins":[{"type":"ambient-cni"}]}"#,
            ),
            f("10-b.conflist", r#"{"name":"b","plugins":[{"type":"b"}]}"#),
            f("20-a.conf", r#"{"type":"a"}"#),
        ];
        let (valid, skipped) = candidates(&files);
        assert_eq!(skipped.len(), 5);
        assert!(skipped[3].1.contains("only our own plugin"), "{skipped:?}");
        assert_eq!(primary(&valid, None, None).unwrap().name, "10-b.conflist");
        assert_eq!(
            primary(&valid, None, Some("10-b.conflist")).unwrap().name,
            "20-a.conf"
        );
        assert_eq!(
            primary(&valid, Some("20-a.conf"), None).unwrap().kind,
            ConfKind::Single
        );
        assert!(primary(&valid, Some("nope.conf"), None).is_none());
    }
}
