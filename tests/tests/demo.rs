//! `ambient-cni-demo` (the README's `scripts/demo.sh`) end to end, driving the real
//! agent binary: run to completion (pods captured, traffic at the stand-in with its
//! original destination, the released pod direct), and interrupted with SIGINT
//! mid-way; either way nothing may be left on the host.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_cni_tests::*;

/// The demos change host-wide state (links, netns): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn lines_of(program: &str, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(program).args(args).output().expect(program);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What of the host the demo may touch: netns names, link names, host rules.
#[derive(Debug, PartialEq)]
struct Host {
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    rules: BTreeSet<String>,
}

fn host() -> Host {
    let netns = lines_of("ip", &["netns", "list"])
        .into_iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let links = lines_of("ip", &["-o", "link", "show"])
        .into_iter()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        })
        .collect();
    let mut rules = BTreeSet::new();
    for (p, a) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        for l in lines_of(p, a) {
            // Counters and generation comments change on their own.
            if l.starts_with('#') {
                continue;
            }
            let l = match l.find(" [") {
                Some(i) if l.starts_with(':') => l[..i].to_owned(),
                _ => l,
            };
            if !l.contains("counter packets") {
                rules.insert(format!("{p}: {l}"));
            }
        }
    }
    Host {
        netns,
        links,
        rules,
    }
}

/// Asserts the demo (pid `pid`, `subnet`, output `out`) left nothing behind.
fn assert_clean(before: &Host, pid: u32, subnet_prefix: &str, out: &str) {
    let after = host();
    let ours = format!("ambient-demo-{pid}-");
    let leaked_ns: Vec<_> = after
        .netns
        .iter()
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(leaked_ns.is_empty(), "netns left behind: {leaked_ns:?}");
    let new_ns: Vec<_> = after.netns.difference(&before.netns).collect();
    assert!(
        new_ns.iter().all(|n| !n.starts_with("ambient-demo-")),
        "new netns: {new_ns:?}"
    );
    // The bridge and every veth the demo printed must be gone.
    let bridge = format!("acnidemo{:x}", pid & 0xffff);
    let mut printed: Vec<String> = out
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| w.len() == 12 && w.starts_with("veth"))
        .map(str::to_owned)
        .collect();
    printed.push(bridge.clone());
    let leaked: Vec<_> = printed
        .iter()
        .filter(|l| after.links.contains(*l))
        .collect();
    assert!(leaked.is_empty(), "links left behind: {leaked:?}");
    let new_rules: Vec<_> = after.rules.difference(&before.rules).collect();
    assert!(new_rules.is_empty(), "host rules added: {new_rules:?}");
    assert!(
        !after
            .rules
            .iter()
            .any(|r| r.contains(&bridge) || r.contains(subnet_prefix)),
        "host rules mention the demo"
    );
    let tmp = std::env::temp_dir().join(format!("ambient-cni-demo-{pid}"));
    assert!(!tmp.exists(), "{} left behind", tmp.display());
}

fn demo_cmd(subnet: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(demo_bin());
    c.arg("--agent")
        .arg(agent_bin())
        .arg("--plugin")
        .arg(plugin_bin())
        .arg("--standin")
        .arg(standin_bin())
        .args(["--subnet", subnet])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// The rows of one numbered section of the output.
fn section(out: &str, n: u32) -> Vec<&str> {
    let start = format!("== {n}.");
    let next = format!("== {}.", n + 1);
    out.lines()
        .skip_while(|l| !l.starts_with(&start))
        .skip(1)
        .take_while(|l| !l.starts_with(&next))
        .collect()
}

#[test]
fn demo_runs_to_completion_and_leaves_nothing_behind() {
    if !require_root("demo_runs_to_completion_and_leaves_nothing_behind") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = host();
    let child = demo_cmd("10.213.0.0/24", &["--pods", "3"])
        .spawn()
        .expect("spawn demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // Every pod captured: rules complete and the stand-in listening in it.
    let status = section(&stdout, 4);
    for p in 0..3 {
        let row = status
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("demo/web-{p} ")))
            .unwrap_or_else(|| panic!("no row for web-{p}:\n{stdout}"));
        assert!(
            row.contains(" yes ") && row.contains("complete") && row.contains("15001"),
            "{row}"
        );
    }
    // Traffic reached the stand-in with its original destination, both ways.
    let traffic = section(&stdout, 5).join("\n");
    let peer = traffic
        .split_whitespace()
        .find_map(|w| w.strip_prefix("orig=").filter(|a| a.ends_with(":8080")))
        .expect("an original destination")
        .to_owned();
    assert!(peer.starts_with("10.213.0."), "{peer}");
    assert_eq!(
        traffic
            .matches(&format!("standin port=15001 orig={peer}"))
            .count(),
        3,
        "{traffic}"
    );
    assert_eq!(
        traffic.matches("standin port=15006 orig=10.213.0.").count(),
        3,
        "{traffic}"
    );
    // The released pod: no rules, no stand-in; its traffic went direct to the peer.
    let released = section(&stdout, 6);
    let row0 = released
        .iter()
        .find(|l| l.contains("demo/web-0"))
        .expect("web-0 row");
    assert!(row0.contains(" no ") && row0.contains("none"), "{row0}");
    let again = section(&stdout, 7);
    let t0 = again
        .iter()
        .find(|l| l.trim_start().starts_with("demo/web-0"))
        .expect("web-0 traffic");
    assert!(
        t0.contains("peer (direct)") && t0.contains(&format!("peer {peer} answered")),
        "{t0}"
    );
    for p in 1..3 {
        let t = again
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("demo/web-{p}")))
            .expect("traffic row");
        assert!(
            t.contains(&format!("standin port=15001 orig={peer}")),
            "{t}"
        );
    }
    assert!(stdout.contains("demo passed:"), "{stdout}");
    assert!(stdout.contains("nothing left behind."), "{stdout}");
    assert_clean(&before, pid, "10.213.0.", &stdout);
}

#[test]
fn demo_interrupted_by_sigint_cleans_up() {
    if !require_root("demo_interrupted_by_sigint_cleans_up") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = host();
    let mut child = demo_cmd("10.214.0.0/24", &["--pods", "4"])
        .spawn()
        .expect("spawn demo");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let seen = Arc::new(Mutex::new(String::new()));
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    // Interrupt once pods exist (netns, veths, enrolments): the worst moment to stop.
    let reached = wait_for(Duration::from_secs(60), || {
        seen.lock().unwrap().contains("== 4.")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let code = wait_limited(&mut child, Duration::from_secs(60));
    let _ = reader.join();
    let out = seen.lock().unwrap().clone();
    assert!(reached, "the demo did not reach step 4:\n{out}");
    // It may have finished step 4 before the signal landed; either way it stops and cleans up.
    assert_ne!(code, 0, "an interrupted demo fails:\n{out}");
    assert!(out.contains("The demo stopped: interrupted"), "{out}");
    let cleanup = section(&out, 8).join("\n");
    assert!(
        cleanup.contains("CNI DEL") && !cleanup.contains("FAILED"),
        "{cleanup}"
    );
    assert_clean(&before, pid, "10.214.0.", &out);
}

#[test]
fn the_agent_offers_only_operator_commands() {
    // The demo left the shipped agent: `--help` lists what an operator runs, nothing else.
    let out = Command::new(agent_bin())
        .arg("--help")
        .output()
        .expect("agent --help");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let commands: BTreeSet<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for want in [
        "run",
        "install",
        "uninstall",
        "redirect",
        "status",
        "doctor",
        "log-level",
    ] {
        assert!(commands.contains(want), "no {want}:\n{help}");
    }
    assert!(!commands.contains("demo"), "{help}");
    let demo = Command::new(agent_bin())
        .arg("demo")
        .output()
        .expect("agent demo");
    assert!(
        !demo.status.success(),
        "`ambient-cni-agent demo` still runs"
    );
}
