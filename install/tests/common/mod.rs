//! Shared helpers: temp node dirs built from fixtures, dir snapshots, goldens.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambient_cni_install::{InstallConfig, Installer, PluginEntry};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "acni-install-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fake node: `conf/` (a copy of fixture `case`), `bin/`, and a test plugin binary.
pub struct Node {
    pub dir: TempDir,
    pub conf: PathBuf,
    pub bin: PathBuf,
    pub plugin: PathBuf,
}

impl Node {
    pub fn new(case: &str) -> Node {
        let dir = TempDir::new(case);
        let conf = dir.path().join("conf");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&bin).unwrap();
        for e in fs::read_dir(fixtures().join(case)).unwrap() {
            let e = e.unwrap();
            if e.file_name() == ".gitkeep" {
                continue;
            }
            fs::copy(e.path(), conf.join(e.file_name())).unwrap();
            // A non-default mode, to see that it is preserved.
            fs::set_permissions(conf.join(e.file_name()), fs::Permissions::from_mode(0o640))
                .unwrap();
        }
        let plugin = dir.path().join("ambient-cni-src");
        fs::write(&plugin, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).unwrap();
        Node {
            dir,
            conf,
            bin,
            plugin,
        }
    }

    pub fn config(&self, owned: Option<&str>) -> InstallConfig {
        InstallConfig {
            cni_bin_dir: self.bin.clone(),
            cni_conf_dir: self.conf.clone(),
            plugin_source: self.plugin.clone(),
            owned_conf: owned.map(str::to_string),
            conf_name: None,
            entry: PluginEntry::default(),
        }
    }

    pub fn installer(&self, owned: Option<&str>) -> Installer {
        Installer::new(self.config(owned)).unwrap()
    }

    pub fn read(&self, name: &str) -> String {
        fs::read_to_string(self.conf.join(name)).unwrap()
    }

    pub fn write(&self, name: &str, text: &str) {
        fs::write(self.conf.join(name), text).unwrap();
    }

    /// Every file of the conf dir with its mode and content, in name order.
    pub fn snapshot(&self) -> String {
        snapshot(&self.conf)
    }
}

pub fn snapshot(dir: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut out = String::new();
    for n in names {
        let p = dir.join(&n);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        out.push_str(&format!("=== {n} (mode {mode:o})\n"));
        out.push_str(&fs::read_to_string(&p).unwrap());
        out.push_str("\n=== end\n");
    }
    out
}

/// Compare with `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites it.
pub fn golden(name: &str, actual: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, actual).unwrap();
        return;
    }
    let want = fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "golden {} missing ({e}); run with UPDATE_GOLDEN=1",
            p.display()
        )
    });
    assert_eq!(actual, want, "output differs from golden {}", p.display());
}

/// Poll `f` until it is true or `limit` passes; returns the time it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f().then(|| t0.elapsed())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skip (return true) a root-only test when not root, fail under CI.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI is set"
    );
    eprintln!("skipping {test}: needs root");
    true
}
