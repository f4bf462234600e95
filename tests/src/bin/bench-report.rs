//! Writes BENCHMARKS.md: runs the project's benches as child processes (each prints
//! its own markdown table with a baseline measured in the same run), measures the
//! plugin's size and RSS beside Debian's reference CNI plugins (and the agent's size),
//! and assembles one file headed by the machine it ran on. `scripts/bench.sh` is the
//! one command.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Run the benches and write BENCHMARKS.md")]
struct Args {
    /// Output file.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// The workspace root (where `cargo bench` runs).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// The plugin binary to measure (default: the static musl build, else target/release).
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Skip the benches (header and plugin footprint only; for a quick check).
    #[arg(long)]
    no_benches: bool,
    /// The image `scripts/image.sh` wrote (default: target/ambient-cni-image.tar).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Pod-start figures the node lifecycle suite wrote (`NODE_BENCH_OUT`; default:
    /// target/node-pod-start.json).
    #[arg(long)]
    node_results: Option<PathBuf>,
    /// Run only these benches (e.g. `--only kube_add`) and replace their sections in the
    /// existing output file (appended when new), each marked with its own date and commit;
    /// everything else in the file stays as it was.
    #[arg(long)]
    only: Vec<String>,
}

/// One bench: a title, the cargo arguments, and whether it may be skipped.
struct Bench {
    title: &'static str,
    args: Vec<&'static str>,
}

fn benches(root: &Path) -> Vec<Bench> {
    let mut v = vec![
        Bench {
            title: "Plugin ADD latency and footprint (`plugin_add`)",
            args: vec!["bench", "-p", "ambient-cni-tests", "--bench", "plugin_add"],
        },
        Bench {
            title: "Agent enrolment end to end (`agent_enroll`)",
            args: vec![
                "bench",
                "-p",
                "ambient-cni-tests",
                "--bench",
                "agent_enroll",
            ],
        },
        Bench {
            title: "In-pod rules apply, iptables-restore vs nft (`apply`)",
            args: vec!["bench", "-p", "iptables-rules", "--bench", "apply"],
        },
        Bench {
            title: "Native nf_tables backend (`nft_apply`)",
            args: vec!["bench", "-p", "iptables-rules", "--bench", "nft_apply"],
        },
    ];
    v.extend(drift_benches());
    v.push(Bench {
        title: "Sidecar mode: ADD of an injected pod (`sidecar_add`)",
        args: vec!["bench", "-p", "ambient-cni-tests", "--bench", "sidecar_add"],
    });
    // Interop with a real ztunnel only where the bench exists and ztunnel is given.
    if root.join("tests/benches/interop_add.rs").exists()
        && std::env::var_os("ZTUNNEL_BIN").is_some()
    {
        v.push(Bench {
            title: "ADD against a real ztunnel (`interop_add`)",
            args: vec!["bench", "-p", "ambient-cni-tests", "--bench", "interop_add"],
        });
    }
    // The Kubernetes path and Istio's path: stock ztunnel and the kube-apiserver peer.
    if root.join("tests/benches/kube_add.rs").exists() && std::env::var_os("ZTUNNEL_BIN").is_some()
    {
        v.push(Bench {
            title: "The Kubernetes path and Istio's path as the baseline (`kube_add`)",
            args: vec!["bench", "-p", "ambient-cni-tests", "--bench", "kube_add"],
        });
    }
    v
}

/// The drift verifier's cost (issue 19): one pass over 250 held pods.
fn drift_benches() -> Vec<Bench> {
    vec![Bench {
        title: "Drift verification pass over 250 pods (`verify_pass`)",
        args: vec!["bench", "-p", "iptables-rules", "--bench", "verify_pass"],
    }]
}

fn sh(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine: nproc, CPU model, memory, kernel, date.
fn header() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut h = String::new();
    let _ = writeln!(h, "| machine | |\n|---|---|");
    let _ = writeln!(
        h,
        "| date (UTC) | {} |",
        sh("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    let _ = writeln!(h, "| nproc | {nproc} |");
    let _ = writeln!(h, "| CPU | {model} |");
    let _ = writeln!(
        h,
        "| memory | {:.1} GiB |",
        mem_kib as f64 / (1024.0 * 1024.0)
    );
    let _ = writeln!(h, "| kernel | {} |", sh("uname", &["-r"]));
    let _ = writeln!(h, "| rustc | {} |", sh("rustc", &["--version"]));
    let _ = writeln!(
        h,
        "| commit | {} |",
        sh("git", &["rev-parse", "--short", "HEAD"])
    );
    h
}

/// Peak RSS (KiB) of one exec of `bin args` with `env`, via wait4.
fn peak_rss(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<i64> {
    let child = Command::new(bin)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter for wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; std never reaps it (the handle is forgotten).
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    std::mem::forget(child);
    if pid <= 0 {
        bail!(
            "wait4 {}: {}",
            bin.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(usage.ru_maxrss)
}

/// Best of `n` (RSS varies a little with the loader's luck).
fn min_rss(bin: &Path, args: &[&str], env: &[(&str, &str)], n: usize) -> Result<i64> {
    let mut best = i64::MAX;
    for _ in 0..n {
        best = best.min(peak_rss(bin, args, env)?);
    }
    Ok(best)
}

/// The plugin beside Debian's reference plugins (static Go binaries): size, and the
/// RSS of answering VERSION, the one command every plugin answers with no setup.
fn footprint(plugin: &Path) -> Result<String> {
    let mut s = String::new();
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let ours = size(plugin);
    if ours == 0 {
        bail!("plugin {} not found: build it first", plugin.display());
    }
    let env = [("CNI_COMMAND", "VERSION")];
    let our_rss = min_rss(plugin, &[], &env, 20)?;
    let _ = writeln!(s, "plugin: `{}`\n", ambient_cni_tests::bench::shown(plugin));
    let _ = writeln!(
        s,
        "Baselines are Debian's reference CNI plugins in `/usr/lib/cni`, measured in the same run.\n"
    );
    let _ = writeln!(s, "| binary | size MiB | ambient-cni size ratio | VERSION peak RSS MiB | ambient-cni RSS ratio |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| ambient-cni | {:.2} | - | {:.1} | - |",
        mib(ours),
        our_rss as f64 / 1024.0
    );
    for name in ["loopback", "bridge", "portmap"] {
        let p = Path::new("/usr/lib/cni").join(name);
        let sz = size(&p);
        if sz == 0 {
            continue;
        }
        let rss = min_rss(&p, &[], &env, 20)?;
        let _ = writeln!(
            s,
            "| {name} (baseline) | {:.2} | {:.2}x | {:.1} | {:.2}x |",
            mib(sz),
            ours as f64 / sz as f64,
            rss as f64 / 1024.0,
            our_rss as f64 / rss.max(1) as f64
        );
    }
    let truth = min_rss(Path::new("/bin/true"), &[], &[], 20)?;
    let _ = writeln!(
        s,
        "| /bin/true (floor) | - | - | {:.1} | {:.2}x |",
        truth as f64 / 1024.0,
        our_rss as f64 / truth.max(1) as f64
    );
    Ok(s)
}

/// The agent's size: the binary every bench ran, beside the workspace's glibc build of the
/// same commit (the same binary when no musl build was made).
fn agent_size(root: &Path, agent: &Path, glibc: &Path) -> String {
    let shown = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    let mib = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / (1u64 << 20) as f64);
    match (mib(agent), mib(glibc)) {
        (Ok(a), Ok(g)) if agent != glibc => format!(
            "ambient-cni-agent (stripped release build, `{}`, the one every bench below ran): \
             {a:.2} MiB; the glibc build of the same commit (`{}`): {g:.2} MiB, {:.2}x that.\n",
            shown(agent),
            shown(glibc),
            a / g
        ),
        (Ok(a), _) => format!(
            "ambient-cni-agent (stripped release build, `{}`, the one every bench below ran): \
             {a:.2} MiB.\n",
            shown(agent)
        ),
        (Err(e), _) => format!("ambient-cni-agent `{}`: not measured: {e}\n", shown(agent)),
    }
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// The image's size (its one layer, uncompressed, and the tar as shipped) and the pod-start
/// figures of the node lifecycle suite: mesh pods beside plain pods of the same run.
fn node_section(image: &Path, results: &Path) -> String {
    let mut s = String::new();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    match std::fs::metadata(image) {
        Ok(m) => {
            let _ = writeln!(
                s,
                "Image: `scripts/image.sh` (static musl binaries on an empty base, one layer), \
                 `{}`: **{:.2} MiB** uncompressed (goal: under 15 MiB).\n",
                ambient_cni_tests::bench::shown(image),
                mib(m.len())
            );
        }
        Err(_) => {
            let _ = writeln!(
                s,
                "Image: not measured (`scripts/image.sh {}` first).\n",
                image.display()
            );
        }
    }
    let Ok(text) = std::fs::read_to_string(results) else {
        let _ = writeln!(
            s,
            "Pod start: not measured (the node lifecycle suite writes `{}`; `scripts/test.sh` runs it).",
            results.display()
        );
        return s;
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let f = |k: &str, p: &str| v[k][p].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "Pod start through the kubelet (`node.sh`: kubelet v1.20.2, containerd 1.6, bridge CNI; \
         our chart installed): created (API call) to Ready (polled every 10 ms; \
         no readiness probe, so Ready follows the container start, which the kubelet notices on \
         its 1 s PLEG relist), {} mesh pods and {} plain pods alternating, one at a time. \
         Baseline: the plain pods of the same run (bridge + host-local + portmap, our plugin \
         passes them through).\n",
        v["pods_each"], v["pods_each"]
    );
    let _ = writeln!(
        s,
        "| pods | p50 ms | p99 ms | p50 over plain | p99 over plain |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let (m50, m99, p50, p99) = (
        f("mesh_ms", "p50"),
        f("mesh_ms", "p99"),
        f("plain_ms", "p50"),
        f("plain_ms", "p99"),
    );
    let _ = writeln!(s, "| plain (baseline) | {p50:.0} | {p99:.0} | - | - |");
    let _ = writeln!(
        s,
        "| mesh (captured) | {m50:.0} | {m99:.0} | {:+.0} ms ({:.2}x) | {:+.0} ms ({:.2}x) |",
        m50 - p50,
        m50 / p50,
        m99 - p99,
        m99 / p99
    );
    s
}

fn default_plugin(root: &Path) -> PathBuf {
    let target = target_dir(root);
    let musl = target.join("x86_64-unknown-linux-musl/release/ambient-cni");
    if musl.exists() {
        musl
    } else {
        target.join("release/ambient-cni")
    }
}

/// Runs one bench; returns its stdout (tables and notes) and wall time.
fn run_bench(root: &Path, b: &Bench) -> Result<(String, f64)> {
    eprintln!("bench-report: cargo {}", b.args.join(" "));
    let t0 = Instant::now();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&b.args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run cargo {}", b.args.join(" ")))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "cargo {} failed ({}):\n{text}",
            b.args.join(" "),
            out.status
        );
    }
    Ok((text, t0.elapsed().as_secs_f64()))
}

/// Keeps a bench's own output, dropping cargo/harness noise lines.
fn clean(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_end();
        if t.starts_with("running ") || t.starts_with("test result:") {
            continue;
        }
        out.push_str(t);
        out.push('\n');
    }
    out.trim().to_owned()
}

/// `doc` with the section titled `title` (a `## ` heading up to the next one) replaced by
/// `body`, or `body` appended when there is no such section.
fn splice(doc: &str, title: &str, body: &str) -> String {
    let head = format!("## {title}\n");
    let Some(start) = doc.find(&head) else {
        return format!("{}\n\n{}", doc.trim_end(), body);
    };
    let rest = &doc[start + head.len()..];
    let end = rest
        .find("\n## ")
        .map_or(doc.len(), |i| start + head.len() + i + 1);
    format!("{}{}{}", &doc[..start], body, &doc[end..])
}

/// Runs the benches named in `--only` and splices their sections into the existing file.
fn only(args: &Args, root: &Path) -> Result<()> {
    let mut doc = std::fs::read_to_string(&args.out)
        .with_context(|| format!("read {} (--only updates it)", args.out.display()))?;
    let mut failed = Vec::new();
    for name in &args.only {
        let Some(b) = benches(root)
            .into_iter()
            .find(|b| b.args.last() == Some(&name.as_str()))
        else {
            bail!("--only {name}: no such bench here (is ZTUNNEL_BIN set for the interop ones?)");
        };
        let mut body = format!("## {}\n\n`cargo {}`\n\n", b.title, b.args.join(" "));
        // The load says how far this section's figures are from a quiet machine's.
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into());
        let _ = writeln!(
            body,
            "(this section alone was rerun: {} UTC, commit {}, 1-minute load average {load} \
             at its start)\n",
            sh("date", &["-u", "+%Y-%m-%d %H:%M"]),
            sh(
                "git",
                &[
                    "-C",
                    &root.display().to_string(),
                    "rev-parse",
                    "--short",
                    "HEAD"
                ]
            )
        );
        match run_bench(root, &b) {
            Ok((text, secs)) => {
                body.push_str(&clean(&text));
                let _ = writeln!(body, "\n\n(ran in {secs:.0} s)\n");
            }
            Err(e) => {
                let _ = writeln!(body, "FAILED: {e:#}\n");
                failed.push(b.title);
            }
        }
        doc = splice(&doc, b.title, &body);
    }
    std::fs::write(&args.out, &doc).with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("bench-report: updated {}", args.out.display());
    if !failed.is_empty() {
        bail!("benches failed: {}", failed.join(", "));
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = args.root.canonicalize().context("workspace root")?;
    if !args.only.is_empty() {
        return only(&args, &root);
    }
    let plugin = args.plugin.clone().unwrap_or_else(|| default_plugin(&root));
    let mut doc = String::new();
    let _ = writeln!(doc, "# Benchmarks\n");
    let _ = writeln!(
        doc,
        "Generated by `scripts/bench.sh` (do not edit by hand). Every figure is shown beside a \
         baseline measured in the same run on the same machine, with the ratio; this machine is \
         shared and noisy, so compare within a run, not across runs.\n"
    );
    doc.push_str(&header());
    doc.push('\n');
    let _ = writeln!(doc, "## Plugin size and memory\n");
    match footprint(&plugin) {
        Ok(s) => doc.push_str(&s),
        Err(e) => {
            let _ = writeln!(doc, "not measured: {e:#}");
        }
    }
    doc.push('\n');
    // The agent every bench ran (scripts/bench.sh: the shipped static musl build).
    let agent = std::env::var_os("AMBIENT_CNI_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir(&root).join("release/ambient-cni-agent"));
    let glibc = target_dir(&root).join("release/ambient-cni-agent");
    doc.push_str(&agent_size(&root, &agent, &glibc));
    doc.push('\n');
    let _ = writeln!(doc, "## Image and pod start on a real kubelet node\n");
    let target = target_dir(&root);
    doc.push_str(&node_section(
        &args
            .image
            .clone()
            .unwrap_or_else(|| target.join("ambient-cni-image.tar")),
        &args
            .node_results
            .clone()
            .unwrap_or_else(|| target.join("node-pod-start.json")),
    ));
    doc.push('\n');
    let mut failed = Vec::new();
    if !args.no_benches {
        for b in benches(&root) {
            let _ = writeln!(doc, "## {}\n", b.title);
            let _ = writeln!(doc, "`cargo {}`\n", b.args.join(" "));
            match run_bench(&root, &b) {
                Ok((text, secs)) => {
                    doc.push_str(&clean(&text));
                    let _ = writeln!(doc, "\n\n(ran in {secs:.0} s)\n");
                }
                Err(e) => {
                    let _ = writeln!(doc, "FAILED: {e:#}\n");
                    failed.push(b.title);
                }
            }
        }
    }
    std::fs::write(&args.out, &doc).with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("bench-report: wrote {}", args.out.display());
    if !failed.is_empty() {
        bail!("benches failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn splice_replaces_one_section_or_appends() {
        let doc = "# B\n\n## one\n\nold\n\n## two\n\nkeep\n";
        assert_eq!(
            splice(doc, "one", "## one\n\nnew\n\n"),
            "# B\n\n## one\n\nnew\n\n## two\n\nkeep\n"
        );
        assert_eq!(
            splice(doc, "two", "## two\n\nnew\n"),
            "# B\n\n## one\n\nold\n\n## two\n\nnew\n"
        );
        assert_eq!(
            splice(doc, "three", "## three\n\nx\n"),
            "# B\n\n## one\n\nold\n\n## two\n\nkeep\n\n## three\n\nx\n"
        );
    }
}
