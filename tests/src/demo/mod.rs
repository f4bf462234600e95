//! `ambient-cni-demo`: the local demo of the README, on a plain Linux host.
//!
//! Network namespaces play the pods; Debian's `bridge` + `host-local` and our
//! `ambient-cni` plugin are exec'd exactly as a runtime does (`CNI_*` env +
//! stdin, `prevResult` chaining); the real `ambient-cni-agent run` runs as a child
//! with a local pod source and a ztunnel stand-in takes the pods over ZDS. The
//! demo shows each pod captured, its traffic arriving at the stand-in with the
//! original destination, a pod released by relabelling going direct, and then
//! removes everything it made (also on Ctrl-C and on errors).
//!
//! It knows the agent only from outside: its command line, `/readyz`, `/metrics`
//! and `status --json`; nothing of the agent is linked in.

mod agent;
mod chain;
mod cleanup;
mod interrupt;
mod pods;
mod prereq;
mod subnet;
mod table;
mod traffic;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use iptables_rules::netns::Netns;

use cleanup::Env;
use interrupt::{checkpoint, wait_until};
use pods::Pod;

/// The CNI version of the demo's primary conflist (Debian 12's plugins speak up to 1.0.0).
const CNI_VERSION: &str = "1.0.0";
/// The demo pods' namespace (labelled for ambient).
const NAMESPACE: &str = "demo";
/// The port the peer listens on.
const PEER_PORT: u16 = 8080;
/// PATH for every child: the tools the agent and plugins exec live here.
const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which in-pod rules backend the agent is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// iptables-restore batches.
    Iptables,
    /// Native nf_tables over netlink.
    Nftables,
    /// nftables when the kernel has nf_tables, else iptables.
    Auto,
}

/// The demo's flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "ambient-cni-demo",
    version,
    about = "The local demo: netns pods, the real CNI chain, the agent, a ztunnel stand-in"
)]
pub struct DemoArgs {
    /// The `ambient-cni-agent` binary [default: next to this binary].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// The `ambient-cni` plugin binary [default: `ambient-cni` next to this binary].
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The ztunnel stand-in binary [default: `ztunnel-standin` next to this binary].
    #[arg(long)]
    pub standin: Option<PathBuf>,
    /// In-pod rules backend the agent uses.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Number of pods.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub pods: u8,
    /// Leave everything running at the end (prints how to remove it).
    #[arg(long)]
    pub keep: bool,
    /// The demo bridge's IPv4 subnet (a /24 not routed on this host).
    #[arg(long, default_value = "10.200.0.0/24")]
    pub subnet: String,
}

fn heading(n: usize, title: &str) {
    println!("\n== {n}. {title}");
}

/// Runs the demo; everything it made is removed before it returns (unless `--keep`).
pub fn run(args: DemoArgs) -> Result<()> {
    interrupt::install_handlers()?;
    let mut env = Env::default();
    let result = steps(&args, &mut env);
    if env.is_empty() {
        // Nothing was made (e.g. a prerequisite is missing): the error says it all.
        env.done = true;
        return result;
    }
    if let Err(e) = &result {
        println!("\nThe demo stopped: {e:#}");
    }
    if args.keep && result.is_ok() {
        env.keep();
        return result;
    }
    heading(8, "Clean up");
    let failures = env.cleanup();
    match (result, failures.is_empty()) {
        (Ok(()), true) => {
            println!("\nnothing left behind.");
            Ok(())
        }
        (Ok(()), false) => bail!("cleanup failed: {}", failures.join("; ")),
        (Err(e), _) => Err(e),
    }
}

fn steps(args: &DemoArgs, env: &mut Env) -> Result<()> {
    let pid = std::process::id();
    println!(
        "ambient-cni demo: {} pods on a bridge, the real CNI chain, the agent, a ztunnel stand-in",
        args.pods
    );

    heading(1, "Prerequisites");
    let pre = prereq::check(args)?;
    checkpoint()?;
    let host = Netns::host_id(Path::new("/proc")).context("cannot identify the host netns")?;
    let tmp = std::env::temp_dir().join(format!("ambient-cni-demo-{pid}"));
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    env.tmp = Some(tmp.clone());
    let mut pods: Vec<Pod> = (0..args.pods).map(|i| Pod::new(pid, i)).collect();

    heading(
        2,
        "Start the agent (it installs the plugin) and the ztunnel stand-in",
    );
    let st = agent::start(args, &pre, env, &tmp, &pods)?;
    checkpoint()?;

    heading(
        3,
        &format!(
            "Create the pods: a netns each, then the CNI chain {} ({})",
            chain::describe(&st.chain),
            args.subnet
        ),
    );
    let (peer_ns, peer_addr) = pods::create(env, &st, host, pid, &mut pods)?;

    heading(4, "What the agent did in each pod");
    let status = st.agent.status()?;
    let captured = pods::status_table(&pods, &status, &pre.redirector, &st.events)?;
    let all: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    if captured != all {
        bail!("expected every pod captured, captured: {captured:?}");
    }
    println!(
        "  captured = the agent reports the pod enabled with its rules complete and ztunnel's \
         ack (ambient-cni-agent status), and the stand-in, handed the netns over ZDS, listens inside it"
    );

    heading(
        5,
        &format!("Traffic: each pod connects to the peer {peer_addr}, the peer to each pod"),
    );
    let expect_all: Vec<bool> = vec![true; pods.len()];
    traffic::traffic(&pods, &peer_ns, peer_addr, &expect_all)?;
    println!(
        "  outbound TCP is redirected to :15001 in the pod and the stand-in reads the original \
         destination; inbound is redirected to :15006 (and the reply routed back by the connmark + policy route)"
    );

    let rel = &pods[0];
    heading(
        6,
        &format!(
            "Release {NAMESPACE}/{}: relabel it istio.io/dataplane-mode=none",
            rel.name
        ),
    );
    let pods_dir = tmp.join("pods");
    pods::write_json(
        &rel.file(&pods_dir),
        &pods::pod_json(&rel.name, &rel.uid, Some("none")),
    )?;
    let rel_ns = rel.netns.as_ref().context("released pod has no netns")?;
    wait_until(
        Duration::from_secs(20),
        "the agent to release the pod",
        || {
            let status = st.agent.status()?;
            Ok(pods::released(
                &status,
                &pre.redirector,
                rel_ns,
                &rel.uid,
                &st.events,
            ))
        },
    )?;
    let status = st.agent.status()?;
    let captured = pods::status_table(&pods, &status, &pre.redirector, &st.events)?;
    println!(
        "  the agent removed {}'s rules and sent DelWorkload; the stand-in closed its listeners",
        rel.name
    );
    if captured != all[1..] {
        bail!(
            "expected {} released and the others captured, captured: {captured:?}",
            rel.name
        );
    }

    heading(
        7,
        "Traffic again: the released pod goes direct, the others still through the stand-in",
    );
    let mut expect = expect_all;
    expect[0] = false;
    traffic::traffic(&pods, &peer_ns, peer_addr, &expect)?;

    println!(
        "\n  the agent's metrics (http://{}/metrics):",
        st.agent.metrics
    );
    st.agent.show_metrics()?;
    println!(
        "\ndemo passed: {} pods captured, their traffic reached the stand-in with its original destination; \
         {NAMESPACE}/{} released and its traffic went direct.",
        pods.len(),
        rel.name
    );
    Ok(())
}
