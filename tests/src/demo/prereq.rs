//! Step 1: what the demo needs on this host, each checked and shown, with the
//! `apt-get` line (or build command) that fixes what is missing.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use iptables_rules::backend::{self, BackendKind};
use iptables_rules::Redirector;

use super::subnet::{overlapping_routes, Prefix};
use super::table::Table;
use super::{BackendChoice, DemoArgs, CHILD_PATH};
use crate::{try_ip, DEBIAN_CNI_DIR};

/// What the later steps use.
pub struct Prereqs {
    /// The agent binary.
    pub agent: PathBuf,
    /// The plugin binary the agent installs.
    pub plugin: PathBuf,
    /// The ztunnel stand-in binary.
    pub standin: PathBuf,
    /// The rules backend for the agent, and the demo's reader of what is in a pod.
    pub redirector: Redirector,
}

/// `name` in one of the directories of [`CHILD_PATH`].
pub fn on_path(name: &str) -> Option<PathBuf> {
    CHILD_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A regular file with an execute bit.
pub fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The backend `choice` names on this host (`auto`: native nftables when it works,
/// as the agent picks it); the demo passes the result to the agent explicitly.
fn backend_for(choice: BackendChoice) -> Result<Redirector> {
    let kind = match choice {
        BackendChoice::Iptables => BackendKind::Iptables,
        BackendChoice::Nftables => BackendKind::Nftables,
        BackendChoice::Auto => match backend::make(BackendKind::Nftables) {
            Ok(b) => return Ok(Redirector::new(b)),
            Err(_) => BackendKind::Iptables,
        },
    };
    let b = backend::make(kind).map_err(|e| anyhow::anyhow!("rules backend {kind}: {e}"))?;
    Ok(Redirector::new(b))
}

/// Checks and prints everything; an error lists every fix.
pub fn check(args: &DemoArgs) -> Result<Prereqs> {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    let pick =
        |given: &Option<PathBuf>, name: &str| given.clone().unwrap_or_else(|| here.join(name));
    let agent = pick(&args.agent, "ambient-cni-agent");
    let plugin = pick(&args.plugin, "ambient-cni");
    let standin = pick(&args.standin, "ztunnel-standin");
    let mut t = Table::new(&["CHECK", "STATUS"]);
    let mut apt: BTreeSet<&str> = BTreeSet::new();
    let mut other: Vec<String> = Vec::new();
    let mut check =
        |t: &mut Table, what: String, ok: bool, fix: Option<&'static str>, hint: Option<String>| {
            t.row(vec![what, if ok { "ok".into() } else { "MISSING".into() }]);
            if !ok {
                apt.extend(fix);
                other.extend(hint);
            }
        };
    let root = nix::unistd::geteuid().is_root();
    check(
        &mut t,
        "running as root".into(),
        root,
        None,
        Some("run the demo as root (sudo)".into()),
    );
    for p in ["bridge", "host-local"] {
        let path = Path::new(DEBIAN_CNI_DIR).join(p);
        check(
            &mut t,
            path.display().to_string(),
            executable(&path),
            Some("containernetworking-plugins"),
            None,
        );
    }
    check(
        &mut t,
        "ip (iproute2)".into(),
        on_path("ip").is_some(),
        Some("iproute2"),
        None,
    );
    if args.backend == BackendChoice::Iptables {
        for tool in [
            "iptables-restore",
            "iptables-save",
            "ip6tables-restore",
            "ip6tables-save",
        ] {
            check(
                &mut t,
                tool.into(),
                on_path(tool).is_some(),
                Some("iptables"),
                None,
            );
        }
    }
    for (what, path, build, flag) in [
        (
            "ambient-cni-agent",
            &agent,
            "-p ambient-cni-agent",
            "--agent",
        ),
        ("ambient-cni plugin", &plugin, "-p ambient-cni", "--plugin"),
        (
            "ztunnel stand-in",
            &standin,
            "-p ambient-cni-tests --bin ztunnel-standin",
            "--standin",
        ),
    ] {
        check(
            &mut t,
            format!("{what} {}", path.display()),
            executable(path),
            None,
            Some(format!(
                "build it (`cargo build --release {build}`) and pass {flag} PATH (looked at {})",
                path.display()
            )),
        );
    }
    let subnet = Prefix::parse(&args.subnet)?;
    if subnet.len > 29 {
        bail!(
            "subnet {}: too small for a gateway, {} pods and a peer",
            args.subnet,
            args.pods
        );
    }
    if subnet.size() < u64::from(args.pods) + 4 {
        bail!("subnet {}: too small for {} pods", args.subnet, args.pods);
    }
    let clashes = if on_path("ip").is_some() {
        let routes =
            try_ip(&["-4", "-j", "route", "show", "table", "all"]).map_err(anyhow::Error::msg)?;
        overlapping_routes(&routes, subnet)?
    } else {
        Vec::new()
    };
    check(
        &mut t,
        format!("subnet {} unused on this host", args.subnet),
        clashes.is_empty(),
        None,
        Some(format!(
            "subnet {} overlaps routes here ({}): pass --subnet with a free /24",
            args.subnet,
            clashes.join(", ")
        )),
    );
    let what = format!("in-pod rules backend ({:?})", args.backend);
    let redirector = if root {
        match backend_for(args.backend) {
            Ok(r) => {
                t.row(vec![what, format!("ok: {}", r.kind())]);
                Some(r)
            }
            Err(e) => {
                t.row(vec![what, "MISSING".into()]);
                apt.insert(if args.backend == BackendChoice::Nftables {
                    "nftables"
                } else {
                    "iptables"
                });
                other.push(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    t.print();
    let redirector = match redirector {
        Some(r) if apt.is_empty() && other.is_empty() => r,
        _ => {
            let mut msg = String::from("prerequisites missing:");
            if !apt.is_empty() {
                let pkgs: Vec<&str> = apt.into_iter().collect();
                msg.push_str(&format!("\n  apt-get install -y {}", pkgs.join(" ")));
            }
            for o in other {
                msg.push_str(&format!("\n  {o}"));
            }
            bail!(msg);
        }
    };
    Ok(Prereqs {
        agent,
        plugin,
        standin,
        redirector,
    })
}
