//! The installer: plugin binary in the bin dir, our entry in the primary CNI config (or an owned
//! higher-priority conflist), and the cleanup on uninstall.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info, warn};

use crate::discover::{candidates, primary, read_conf_dir, Candidate};
use crate::entry::{PluginEntry, PLUGIN_BINARY, PLUGIN_TYPE};
use crate::error::InstallError;
use crate::fsops::{self, Attrs, Stamp};
use crate::merge::{self, ConfKind, EntryState};

/// Default file name of the owned conflist (sorts before the usual `05-`/`10-` files).
pub const DEFAULT_OWNED_CONF: &str = "02-ambient-cni.conflist";

/// How often a write is retried when another writer changed the file under us.
const GUARD_RETRIES: usize = 8;

/// A short, growing, jittered pause before retrying a write that lost a race, so two writers
/// do not keep colliding in lockstep.
fn backoff(attempt: usize) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter_ms = u64::from(nanos % 5);
    std::thread::sleep(std::time::Duration::from_millis(
        2 * attempt as u64 + jitter_ms,
    ));
}

/// What the installer manages and where.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// Host CNI bin dir (as mounted in the agent).
    pub cni_bin_dir: PathBuf,
    /// Host CNI conf dir (as mounted in the agent).
    pub cni_conf_dir: PathBuf,
    /// The plugin binary to copy.
    pub plugin_source: PathBuf,
    /// Owned mode: name of our own higher-priority conflist; `None` = chain into the primary.
    pub owned_conf: Option<String>,
    /// Use this file as the primary instead of the first valid one (Istio's `CNI_CONF_NAME`).
    pub conf_name: Option<String>,
    /// Our conflist entry.
    pub entry: PluginEntry,
}

/// What happened to the plugin binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOutcome {
    /// Copied (new or changed).
    Copied,
    /// Already identical.
    Unchanged,
}

/// What happened to the CNI config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// Our entry was already in place in this file.
    Unchanged {
        /// The file that holds our entry.
        path: PathBuf,
    },
    /// Our entry was appended to (or refreshed in) this conflist.
    Inserted {
        /// The primary conflist.
        path: PathBuf,
    },
    /// A single-plugin `.conf` was wrapped into a conflist with our entry.
    Converted {
        /// The old `.conf` (now removed).
        from: PathBuf,
        /// The new `.conflist`.
        to: PathBuf,
    },
    /// The owned conflist was (re)written from the primary.
    OwnedWritten {
        /// Our owned file.
        path: PathBuf,
        /// The primary it copies.
        primary: PathBuf,
    },
    /// No primary CNI config yet: nothing to chain onto.
    WaitingForPrimary,
}

/// Result of one install pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    /// The binary step.
    pub binary: BinaryOutcome,
    /// The config step.
    pub config: ConfigOutcome,
}

impl InstallOutcome {
    /// Whether the plugin is now in the kubelet's chain.
    pub fn is_installed(&self) -> bool {
        !matches!(self.config, ConfigOutcome::WaitingForPrimary)
    }

    /// Whether this pass wrote anything.
    pub fn wrote(&self) -> bool {
        self.binary == BinaryOutcome::Copied
            || !matches!(
                self.config,
                ConfigOutcome::Unchanged { .. } | ConfigOutcome::WaitingForPrimary
            )
    }
}

/// What an uninstall removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UninstallOutcome {
    /// Config files our entry was removed from.
    pub edited: Vec<PathBuf>,
    /// Files deleted (owned conflist, plugin binary, temp leftovers).
    pub removed: Vec<PathBuf>,
}

/// Where an installation stands (see [`Installer::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallStatus {
    /// Binary and config in place.
    Installed,
    /// Binary in place, no primary config to chain onto yet: nothing to write.
    WaitingForPrimary,
    /// Something must be written.
    NeedsRepair,
}

/// What the agent does with the installed files when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Upgrade or reboot: leave binary and config in place (new ambient pods fail closed until
    /// the next agent is up).
    Upgrade,
    /// Uninstall: remove our entry (or owned file) and our binary.
    Uninstall,
}

/// Counters of the installer's work (for metrics and tests).
#[derive(Debug, Default)]
pub struct InstallerStats {
    /// Install passes that wrote something.
    pub writes: AtomicU64,
    /// Install passes run by the watch loop.
    pub reconciles: AtomicU64,
    /// Repairs the throttle delayed.
    pub throttled: AtomicU64,
    /// Watch-loop passes that had to put something back (the primary CNI or someone removed it).
    pub repairs: AtomicU64,
    /// Install passes that ended with our config in place or waiting for a primary.
    pub successes: AtomicU64,
    /// Install passes that failed.
    pub failures: AtomicU64,
}

/// The action one pass must take on the config.
#[derive(Debug)]
enum ConfigPlan {
    Current(PathBuf),
    Waiting,
    Write {
        path: PathBuf,
        content: String,
        attrs: Attrs,
        guard: Option<Stamp>,
        outcome: ConfigOutcome,
    },
    Convert {
        from: PathBuf,
        to: PathBuf,
        content: String,
        attrs: Attrs,
        from_stamp: Option<Stamp>,
        write_to: bool,
    },
}

/// The installer for one node.
#[derive(Debug)]
pub struct Installer {
    cfg: InstallConfig,
    stats: InstallerStats,
    /// Why the watch loop's last pass failed; `None` once a pass succeeds (for `/readyz`).
    failing: std::sync::Mutex<Option<String>>,
}

impl Installer {
    /// An installer for `cfg` (validates the settings, touches nothing).
    pub fn new(cfg: InstallConfig) -> Result<Self, InstallError> {
        for (what, name) in [
            ("--owned-conf", &cfg.owned_conf),
            ("--cni-conf-name", &cfg.conf_name),
        ] {
            if let Some(n) = name {
                if n.is_empty() || n.contains('/') {
                    return Err(InstallError::Setting(format!(
                        "{what} must be a plain file name, got {n:?}"
                    )));
                }
            }
        }
        if let Some(n) = &cfg.owned_conf {
            if !n.ends_with(".conflist") {
                return Err(InstallError::Setting(format!(
                    "--owned-conf must end in .conflist, got {n:?}"
                )));
            }
        }
        if cfg.entry.plugin_type != PLUGIN_TYPE {
            return Err(InstallError::Setting(format!(
                "entry type must be {PLUGIN_TYPE}"
            )));
        }
        Ok(Installer {
            cfg,
            stats: InstallerStats::default(),
            failing: std::sync::Mutex::new(None),
        })
    }

    /// The settings.
    pub fn config(&self) -> &InstallConfig {
        &self.cfg
    }

    /// The work counters.
    pub fn stats(&self) -> &InstallerStats {
        &self.stats
    }

    /// Why the watch loop's last install pass failed (`None` while passes succeed), e.g. that
    /// Istio's istio-cni is still chained: what `/readyz` shows beside its condition.
    pub fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_failing(&self, why: Option<String>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Where the plugin binary goes.
    pub fn binary_path(&self) -> PathBuf {
        self.cfg.cni_bin_dir.join(PLUGIN_BINARY)
    }

    fn owned_path(&self) -> Option<PathBuf> {
        self.cfg
            .owned_conf
            .as_ref()
            .map(|n| self.cfg.cni_conf_dir.join(n))
    }

    /// Whether binary and config are in place, without writing anything.
    pub fn is_installed(&self) -> Result<bool, InstallError> {
        Ok(self.status()? == InstallStatus::Installed)
    }

    /// Where the installation stands, without writing anything.
    pub fn status(&self) -> Result<InstallStatus, InstallError> {
        let binary_ok = fsops::binary_current(&self.cfg.plugin_source, &self.binary_path());
        let plan = self.plan()?;
        let stale_owned = self.stale_owned()?.is_some();
        Ok(match plan {
            ConfigPlan::Current(_) if binary_ok && !stale_owned => InstallStatus::Installed,
            ConfigPlan::Waiting if binary_ok && !stale_owned => InstallStatus::WaitingForPrimary,
            _ => InstallStatus::NeedsRepair,
        })
    }

    /// One install pass: copy the binary (first, so a config never names a missing binary),
    /// then put our entry in place. Writes only what differs.
    pub fn install_once(&self) -> Result<InstallOutcome, InstallError> {
        let res = self.install_pass();
        let counter = if res.is_ok() {
            &self.stats.successes
        } else {
            &self.stats.failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
        res
    }

    fn install_pass(&self) -> Result<InstallOutcome, InstallError> {
        let bin_dir = &self.cfg.cni_bin_dir;
        if !bin_dir.is_dir() {
            return Err(InstallError::io(
                "use CNI bin dir",
                bin_dir,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        let binary = if fsops::copy_binary(&self.cfg.plugin_source, &self.binary_path())? {
            info!(path = %self.binary_path().display(), "installed plugin binary");
            BinaryOutcome::Copied
        } else {
            BinaryOutcome::Unchanged
        };
        if let Some(stale) = self.stale_owned()? {
            // An owned conflist left from an earlier owned-mode install would shadow the primary.
            info!(path = %stale.display(), "removing owned CNI config left from owned mode");
            fsops::remove_if_exists(&stale)?;
        }
        for attempt in 0..GUARD_RETRIES {
            if attempt > 0 {
                backoff(attempt);
            }
            let plan = self.plan()?;
            match self.apply(plan)? {
                Some(config) => {
                    let outcome = InstallOutcome { binary, config };
                    if outcome.wrote() {
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(outcome);
                }
                None => debug!("CNI config changed while we edited it; retrying"),
            }
        }
        Err(InstallError::io(
            "edit (it keeps changing under us)",
            &self.cfg.cni_conf_dir,
            std::io::Error::from_raw_os_error(libc::EAGAIN),
        ))
    }

    /// The default-named owned file in chained mode, when it holds our entry.
    fn stale_owned(&self) -> Result<Option<PathBuf>, InstallError> {
        if self.cfg.owned_conf.is_some() {
            return Ok(None);
        }
        let p = self.cfg.cni_conf_dir.join(DEFAULT_OWNED_CONF);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(merge::entry_state(&t, &self.cfg.entry)
                .ok()
                .filter(|s| *s != EntryState::Absent)
                .map(|_| p)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(InstallError::io("read", p, e)),
        }
    }

    fn plan(&self) -> Result<ConfigPlan, InstallError> {
        let files = read_conf_dir(&self.cfg.cni_conf_dir)?;
        let (valid, skipped) = candidates(&files);
        for (name, reason) in &skipped {
            debug!(file = %name, %reason, "skipping CNI config");
        }
        let owned = self.cfg.owned_conf.as_deref();
        let Some(prim) = primary(&valid, self.cfg.conf_name.as_deref(), owned) else {
            if let Some(n) = &self.cfg.conf_name {
                if let Some((_, reason)) = skipped.iter().find(|(s, _)| s == n) {
                    return Err(InstallError::NamedConf {
                        path: self.cfg.cni_conf_dir.join(n),
                        reason: reason.clone(),
                    });
                }
            }
            return Ok(ConfigPlan::Waiting);
        };
        match self.owned_path() {
            None => self.plan_chained(prim),
            Some(owned_path) => self.plan_owned(&valid, prim, owned_path),
        }
    }

    fn plan_chained(&self, prim: &Candidate) -> Result<ConfigPlan, InstallError> {
        let cfg_err = |source| InstallError::Config {
            path: prim.path.clone(),
            source,
        };
        let guard = fsops::stamp(&prim.path)?;
        let attrs = fsops::attrs(&prim.path)?;
        match prim.kind {
            ConfKind::List => {
                if merge::entry_state(&prim.text, &self.cfg.entry).map_err(cfg_err)?
                    == EntryState::Current
                {
                    return Ok(ConfigPlan::Current(prim.path.clone()));
                }
                Ok(ConfigPlan::Write {
                    path: prim.path.clone(),
                    content: merge::insert(&prim.text, &self.cfg.entry).map_err(cfg_err)?,
                    attrs,
                    guard: Some(guard).flatten(),
                    outcome: ConfigOutcome::Inserted {
                        path: prim.path.clone(),
                    },
                })
            }
            ConfKind::Single => {
                let to = prim.path.with_extension("conflist");
                let content = merge::convert(&prim.text, &self.cfg.entry).map_err(cfg_err)?;
                // An existing X.conflist is only ours to keep if it is exactly our conversion
                // (a conversion interrupted before the .conf was removed).
                let to_guard = fsops::stamp(&to)?;
                if to_guard.is_some() {
                    let existing = std::fs::read_to_string(&to)
                        .map_err(|e| InstallError::io("read", &to, e))?;
                    if existing != content {
                        return Err(InstallError::Config {
                            path: prim.path.clone(),
                            source: merge::MergeError::Invalid(format!(
                                "cannot convert to {}: a different file of that name exists",
                                to.display()
                            )),
                        });
                    }
                }
                Ok(ConfigPlan::Convert {
                    from: prim.path.clone(),
                    to,
                    content,
                    attrs,
                    from_stamp: guard,
                    write_to: to_guard.is_none(),
                })
            }
        }
    }

    fn plan_owned(
        &self,
        valid: &[Candidate],
        prim: &Candidate,
        owned_path: PathBuf,
    ) -> Result<ConfigPlan, InstallError> {
        let owned_name = self.cfg.owned_conf.as_deref().unwrap_or(DEFAULT_OWNED_CONF);
        // The owned file only works if the kubelet picks it: nothing valid may sort before it.
        if let Some(first) = valid.iter().find(|c| c.name != owned_name) {
            if first.name.as_str() < owned_name {
                return Err(InstallError::OwnedNotFirst {
                    owned: owned_path,
                    first: first.path.clone(),
                });
            }
        }
        let content = merge::chain(prim.kind, &prim.text, &self.cfg.entry).map_err(|source| {
            InstallError::Config {
                path: prim.path.clone(),
                source,
            }
        })?;
        if valid
            .first()
            .is_some_and(|c| c.name == owned_name && c.text == content)
        {
            return Ok(ConfigPlan::Current(owned_path));
        }
        let attrs = fsops::attrs(&prim.path)?;
        Ok(ConfigPlan::Write {
            guard: None,
            outcome: ConfigOutcome::OwnedWritten {
                path: owned_path.clone(),
                primary: prim.path.clone(),
            },
            path: owned_path,
            content,
            attrs: Attrs {
                owner: None,
                ..attrs
            },
        })
    }

    /// Carry out a plan; `None` when a concurrent writer got in the way (re-plan).
    fn apply(&self, plan: ConfigPlan) -> Result<Option<ConfigOutcome>, InstallError> {
        match plan {
            ConfigPlan::Current(path) => Ok(Some(ConfigOutcome::Unchanged { path })),
            ConfigPlan::Waiting => Ok(Some(ConfigOutcome::WaitingForPrimary)),
            ConfigPlan::Write {
                path,
                content,
                attrs,
                guard,
                outcome,
            } => {
                fsops::remove_stale_temps(&path, fsops::STALE_TEMP_AGE)?;
                let guard = guard.map(Some);
                if !fsops::atomic_write(&path, content.as_bytes(), attrs, guard)? {
                    return Ok(None);
                }
                info!(path = %path.display(), "chained {PLUGIN_TYPE} into CNI config");
                Ok(Some(outcome))
            }
            ConfigPlan::Convert {
                from,
                to,
                content,
                attrs,
                from_stamp,
                write_to,
            } => {
                // Write the .conflist first, then drop the .conf: there is never a moment
                // without a valid primary (X.conf sorts before X.conflist).
                fsops::remove_stale_temps(&to, fsops::STALE_TEMP_AGE)?;
                if write_to && !fsops::atomic_write(&to, content.as_bytes(), attrs, Some(None))? {
                    return Ok(None);
                }
                if fsops::stamp(&from)? != from_stamp {
                    // The .conf was rewritten meanwhile: undo and re-plan from the new content.
                    fsops::remove_if_exists(&to)?;
                    return Ok(None);
                }
                fsops::remove_if_exists(&from)?;
                info!(from = %from.display(), to = %to.display(), "converted CNI config to a conflist with {PLUGIN_TYPE}");
                Ok(Some(ConfigOutcome::Converted { from, to }))
            }
        }
    }

    /// Remove everything we installed: the owned file, our entry from every conflist in the
    /// conf dir (not only the primary: a leftover entry breaks every later sandbox), then the
    /// binary and our temp leftovers.
    pub fn uninstall(&self) -> Result<UninstallOutcome, InstallError> {
        let mut out = UninstallOutcome::default();
        let owned = self.owned_path().into_iter().chain(std::iter::once(
            self.cfg.cni_conf_dir.join(DEFAULT_OWNED_CONF),
        ));
        for p in owned {
            let ours = std::fs::read_to_string(&p).ok().is_some_and(|t| {
                merge::plugin_types(&t).is_ok_and(|ts| ts.iter().any(|t| t == PLUGIN_TYPE))
            });
            if ours && fsops::remove_if_exists(&p)? {
                out.removed.push(p);
            }
        }
        for f in read_conf_dir(&self.cfg.cni_conf_dir)? {
            let Ok(text) = &f.text else { continue };
            if merge::classify(&f.name, text) != Ok(ConfKind::List) {
                continue;
            }
            if self.remove_entry_from(&f.path, text)? {
                out.edited.push(f.path.clone());
            }
        }
        let bin = self.binary_path();
        if fsops::remove_if_exists(&bin)? {
            out.removed.push(bin.clone());
        }
        out.removed
            .extend(fsops::remove_stale_temps(&bin, std::time::Duration::ZERO)?);
        info!(edited = ?out.edited, removed = ?out.removed, "uninstalled {PLUGIN_TYPE}");
        Ok(out)
    }

    fn remove_entry_from(&self, path: &Path, first_text: &str) -> Result<bool, InstallError> {
        let mut text = first_text.to_string();
        for attempt in 0..GUARD_RETRIES {
            if attempt > 0 {
                backoff(attempt);
            }
            let cfg_err = |source| InstallError::Config {
                path: path.to_path_buf(),
                source,
            };
            if merge::entry_state(&text, &self.cfg.entry).map_err(cfg_err)? == EntryState::Absent {
                return Ok(false);
            }
            let stamp = fsops::stamp(path)?;
            let content = merge::remove(&text).map_err(cfg_err)?;
            let attrs = fsops::attrs(path)?;
            if fsops::atomic_write(path, content.as_bytes(), attrs, Some(stamp))? {
                return Ok(true);
            }
            text = std::fs::read_to_string(path).map_err(|e| InstallError::io("read", path, e))?;
        }
        warn!(path = %path.display(), "CNI config kept changing; our entry may remain");
        Ok(false)
    }

    /// Apply the shutdown decision: nothing on upgrade, [`Installer::uninstall`] on uninstall.
    pub fn shutdown(&self, mode: ShutdownMode) -> Result<UninstallOutcome, InstallError> {
        match mode {
            ShutdownMode::Upgrade => {
                info!("agent stopping for upgrade/reboot: leaving {PLUGIN_TYPE} installed");
                Ok(UninstallOutcome::default())
            }
            ShutdownMode::Uninstall => self.uninstall(),
        }
    }
}
