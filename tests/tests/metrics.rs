//! The agent's health and metrics ports, scraped over HTTP from a real agent while
//! real pods go through the real CNI chain, and checked with a strict exposition
//! parser written here (independent of `ambient_cni_tests::expo`, which the agent's
//! unit tests use).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::*;
use serde_json::json;

// ---- a strict text-format parser (Prometheus 0.0.4 / OpenMetrics 1.0 text) ----

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: bool,
    samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Scrape {
    families: BTreeMap<String, Family>,
    order: Vec<String>,
}

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn label_names(&self, family: &str) -> BTreeSet<String> {
        self.families[family]
            .samples
            .iter()
            .flat_map(|s| s.labels.keys().cloned())
            .filter(|k| k != "le")
            .collect()
    }
}

fn name_ok(s: &str, colon: bool) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_' || (colon && x == ':'))
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || (colon && x == ':'))
}

/// Parses the exposition; panics with the line on anything malformed.
fn parse(text: &str) -> Scrape {
    let mut out = Scrape::default();
    let mut current: Option<String> = None;
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        assert!(!eof, "text after # EOF at {at}");
        if let Some(c) = line.strip_prefix("# ") {
            if c == "EOF" {
                eof = true;
                continue;
            }
            let mut p = c.splitn(3, ' ');
            let (kw, name, rest) = (
                p.next().unwrap(),
                p.next().unwrap_or(""),
                p.next().unwrap_or(""),
            );
            assert!(name_ok(name, true), "bad name at {at}");
            if current.as_deref() != Some(name) {
                assert!(
                    !out.families.contains_key(name),
                    "family declared twice at {at}"
                );
                out.families.insert(name.into(), Family::default());
                out.order.push(name.into());
                current = Some(name.into());
            }
            let f = out.families.get_mut(name).unwrap();
            match kw {
                "HELP" => {
                    assert!(!f.help && !rest.is_empty(), "bad HELP at {at}");
                    f.help = true;
                }
                "TYPE" => {
                    assert!(
                        f.kind.is_empty() && f.samples.is_empty(),
                        "late/duplicate TYPE at {at}"
                    );
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "untyped",
                            "unknown"
                        ]
                        .contains(&rest),
                        "type at {at}"
                    );
                    f.kind = rest.into();
                }
                "UNIT" => assert!(
                    name.ends_with(&format!("_{rest}")),
                    "unit not in the name at {at}"
                ),
                _ => panic!("unknown comment at {at}"),
            }
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.trim().is_empty(),
            "unexpected line at {at}"
        );
        // name{labels} value
        let (name, rest) = match line.find('{') {
            Some(i) if i < line.find(' ').unwrap_or(usize::MAX) => (&line[..i], &line[i..]),
            _ => line.split_at(line.find(' ').unwrap_or_else(|| panic!("no value at {at}"))),
        };
        assert!(name_ok(name, true), "bad sample name at {at}");
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                if let Some(x) = r.strip_prefix('}') {
                    rest = x;
                    break;
                }
                let eq = r
                    .find("=\"")
                    .unwrap_or_else(|| panic!("label without =\" at {at}"));
                let key = &r[..eq];
                assert!(name_ok(key, false), "bad label name {key:?} at {at}");
                let mut val = String::new();
                let mut chars = r[eq + 2..].char_indices();
                let end = loop {
                    match chars.next() {
                        Some((i, '"')) => break i,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => val.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => val.push(c),
                            e => panic!("bad escape {e:?} at {at}"),
                        },
                        Some((_, c)) => val.push(c),
                        None => panic!("unterminated label value at {at}"),
                    }
                };
                assert!(
                    labels.insert(key.to_owned(), val).is_none(),
                    "duplicate label at {at}"
                );
                r = &r[eq + 2 + end + 1..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        assert!(
            matches!(fields.len(), 1 | 2),
            "want value [timestamp] at {at}"
        );
        let value = match fields[0] {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value at {at}")),
        };
        let fam = current
            .clone()
            .unwrap_or_else(|| panic!("sample before any TYPE at {at}"));
        let f = out.families.get_mut(&fam).unwrap();
        let suffixes: &[&str] = match f.kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[""],
        };
        assert!(
            suffixes
                .iter()
                .any(|s| name.strip_suffix(s) == Some(fam.as_str())),
            "sample {name} outside family {fam} ({}) at {at}",
            f.kind
        );
        let s = Sample {
            name: name.into(),
            labels,
            value,
        };
        assert!(!f.samples.contains(&s), "duplicate series at {at}");
        f.samples.push(s);
    }
    assert!(eof, "no # EOF (OpenMetrics) at the end");
    // Histograms: cumulative buckets ending in +Inf == _count, per label set.
    for (name, f) in &out.families {
        if f.kind != "histogram" {
            continue;
        }
        let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in f.samples.iter().filter(|s| s.name.ends_with("_bucket")) {
            let mut l = s.labels.clone();
            let le = l
                .remove("le")
                .unwrap_or_else(|| panic!("{name}: bucket without le"));
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            groups.entry(l).or_default().push((le, s.value));
        }
        for (l, b) in groups {
            assert!(
                b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{name} {l:?}: not cumulative"
            );
            let count = f
                .samples
                .iter()
                .find(|s| s.name == format!("{name}_count") && s.labels == l)
                .map(|s| s.value);
            assert_eq!(
                b.last().map(|x| (x.0.is_infinite(), x.1)),
                Some((true, count.unwrap_or(-1.0))),
                "{name} {l:?}"
            );
        }
    }
    out
}

// ---- HTTP ----

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over a raw socket: (status, lower-cased headers, body).
fn get(port: u16, path: &str) -> Option<(u16, String, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_ascii_lowercase(), body.to_owned()))
}

fn scrape(port: u16) -> Scrape {
    let (code, head, body) = get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    parse(&body)
}

/// Every family, its type, and its label names (Istio's names kept where dashboards use them).
const FAMILIES: [(&str, &str, &[&str]); 15] = [
    (
        "ambient_cni_plugin_requests",
        "counter",
        &["command", "result"],
    ),
    ("istio_cni_plugin_requests", "counter", &["response_code"]),
    ("ambient_cni_plugin_add_duration_seconds", "histogram", &[]),
    ("ambient_cni_enrolments", "counter", &["result"]),
    (
        "ambient_cni_rules_apply_duration_seconds",
        "histogram",
        &["backend"],
    ),
    ("ambient_cni_add_phase_seconds", "histogram", &["phase"]),
    ("ztunnel_connected", "gauge", &[]),
    ("ambient_cni_pods", "gauge", &["state"]),
    ("ambient_cni_reconcile_runs", "counter", &[]),
    ("ambient_cni_reconcile_duration_seconds", "histogram", &[]),
    ("nodeagent_reconcile_events", "counter", &["type"]),
    ("ambient_cni_install_repairs", "counter", &[]),
    ("istio_cni_installs", "counter", &["result"]),
    ("istio_cni_install_ready", "gauge", &[]),
    ("ambient_cni_plugin_fallback", "counter", &["outcome"]),
];

#[test]
fn parser_rejects_what_prometheus_would() {
    let ok = "# HELP a_total x\n# TYPE a counter\na_total{k=\"v\"} 1\n# EOF\n";
    parse(ok);
    for bad in [
        "# TYPE a counter\na_total 1\n",                         // no EOF
        "# TYPE a counter\na_total{k=\"v\",k=\"w\"} 1\n# EOF\n", // duplicate label
        "# TYPE a counter\nb_total 1\n# EOF\n",                  // outside family
        "# TYPE a gauge\na one\n# EOF\n",                        // bad value
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n# EOF\n", // +Inf != count
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

#[test]
fn metrics_and_health_follow_pods_through_the_real_chain() {
    if !require_root("metrics_and_health_follow_pods_through_the_real_chain") {
        return;
    }
    let dir = TempDir::new("acni-metrics");
    let pods = dir.join("pods");
    write_namespace(&pods, "shop", json!({"istio.io/dataplane-mode": "ambient"}));
    write_namespace(&pods, "plain", json!({}));
    let standin = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin.jsonl"), &[]);
    let (hp, mp) = (free_port(), free_port());
    let (h, m) = (format!("127.0.0.1:{hp}"), format!("127.0.0.1:{mp}"));
    let agent = AgentProcess::start(&dir.0, &["--health-addr", &h, "--metrics-addr", &m]);
    assert!(standin.wait_count("snapshot_sent", 1, Duration::from_secs(10)));

    assert_eq!(
        get(hp, "/healthz").map(|r| (r.0, r.2)),
        Some((200, "ok\n".into()))
    );
    assert_eq!(
        get(hp, "/readyz").map(|r| (r.0, r.2)),
        Some((200, "ready\n".into()))
    );
    assert_eq!(get(hp, "/nope").map(|r| r.0), Some(404));

    // Before any pod: every family is there with its type and help; gauges at 0.
    // (The rules histogram is per backend: it appears with the first pod.)
    let s = scrape(mp);
    let check_families = |s: &Scrape, skip: &[&str]| {
        let names: Vec<&str> = s.order.iter().map(String::as_str).collect();
        for (name, kind, _) in FAMILIES.iter().filter(|f| !skip.contains(&f.0)) {
            assert!(names.contains(name), "missing family {name}; got {names:?}");
            assert_eq!(s.families[*name].kind, *kind, "{name}");
            assert!(s.families[*name].help, "{name} has no HELP");
        }
    };
    check_families(&s, &["ambient_cni_rules_apply_duration_seconds"]);
    assert_eq!(s.value("ztunnel_connected", &[]), Some(1.0));
    assert_eq!(
        s.value("ambient_cni_pods", &[("state", "enabled")]),
        Some(0.0)
    );
    assert_eq!(
        s.value("istio_cni_install_ready", &[]),
        Some(1.0),
        "installer off: nothing to wait for"
    );
    assert_eq!(s.value("ambient_cni_reconcile_runs_total", &[]), Some(1.0));

    // A mesh pod and a non-mesh pod, through bridge + host-local + ambient-cni.
    let uid = unique("uid-");
    write_pod(&pods, "shop", "web-0", &uid, None, json!({}));
    write_pod(&pods, "plain", "db-0", "uid-db", None, json!({}));
    let bridge = unique("acbr");
    let _link = HostLink(bridge.clone());
    let chain = Chain::bridge_then(
        "1.0.0",
        &bridge,
        "10.98.7.0/24",
        &dir.0,
        plugin_entry(&agent.socket, 5000),
    );
    let (ns_web, ns_db) = (NamedNetns::new(), NamedNetns::new());
    let att_web = Attachment::pod(&ns_web.path(), "shop", "web-0", &uid);
    let att_db = Attachment::pod(&ns_db.path(), "plain", "db-0", "uid-db");
    let web = chain
        .add(&att_web)
        .unwrap_or_else(|(i, e)| panic!("web ADD plugin {i}: {e:?}\n{}", agent.log_text()));
    let db = chain
        .add(&att_db)
        .unwrap_or_else(|(i, e)| panic!("db ADD plugin {i}: {e:?}"));
    chain
        .check(&att_web, &web[1])
        .unwrap_or_else(|(i, e)| panic!("CHECK plugin {i}: {e:?}"));

    let s = scrape(mp);
    check_families(&s, &[]);
    for (name, _, labels) in FAMILIES {
        let got = s.label_names(name);
        let want: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
        assert!(
            got.is_empty() || got == want,
            "{name}: labels {got:?}, want {want:?}"
        );
    }
    let v = |n: &str, l: &[(&str, &str)]| s.value(n, l).unwrap_or_else(|| panic!("no {n} {l:?}"));
    // Each phase of the captured ADD timed by the agent (the bench reads these names).
    for phase in [
        "lookup", "netns", "rules", "record", "ztunnel", "probes", "status",
    ] {
        assert!(
            v("ambient_cni_add_phase_seconds_count", &[("phase", phase)]) >= 1.0,
            "phase {phase} not timed"
        );
    }
    assert_eq!(
        v(
            "ambient_cni_plugin_requests_total",
            &[("command", "ADD"), ("result", "captured")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "ambient_cni_plugin_requests_total",
            &[("command", "ADD"), ("result", "not_in_mesh")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "ambient_cni_plugin_requests_total",
            &[("command", "CHECK"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "istio_cni_plugin_requests_total",
            &[("response_code", "200")]
        ),
        2.0
    );
    assert_eq!(
        v(
            "istio_cni_plugin_requests_total",
            &[("response_code", "503")]
        ),
        0.0
    );
    assert_eq!(v("ambient_cni_plugin_add_duration_seconds_count", &[]), 2.0);
    let add_sum = v("ambient_cni_plugin_add_duration_seconds_sum", &[]);
    assert!(add_sum > 0.0 && add_sum < 10.0, "ADD latency sum {add_sum}");
    assert_eq!(
        v("ambient_cni_enrolments_total", &[("result", "enabled")]),
        1.0
    );
    let backend = s.families["ambient_cni_rules_apply_duration_seconds"]
        .samples
        .iter()
        .find_map(|x| x.labels.get("backend").cloned())
        .expect("a rules apply was observed");
    assert!(backend == "iptables" || backend == "nftables", "{backend}");
    assert_eq!(
        v(
            "ambient_cni_rules_apply_duration_seconds_count",
            &[("backend", &backend)]
        ),
        1.0
    );
    assert_eq!(v("ambient_cni_pods", &[("state", "enabled")]), 1.0);
    assert_eq!(v("ambient_cni_pods", &[("state", "pending")]), 0.0);
    assert!(v("nodeagent_reconcile_events_total", &[("type", "add")]) >= 2.0);

    // DEL: the pod leaves; the gauge follows at the next scrape.
    chain
        .del(&att_web, Some(&web[1]))
        .unwrap_or_else(|(i, e)| panic!("DEL plugin {i}: {e:?}"));
    chain
        .del(&att_db, Some(&db[1]))
        .unwrap_or_else(|(i, e)| panic!("DEL plugin {i}: {e:?}"));
    let s = scrape(mp);
    assert_eq!(
        s.value(
            "ambient_cni_plugin_requests_total",
            &[("command", "DEL"), ("result", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        s.value("ambient_cni_pods", &[("state", "enabled")]),
        Some(0.0)
    );
}

/// Starts `run` with the installer on, over `dir`'s CNI dirs.
fn agent_with_installer(dir: &TempDir, hp: u16, mp: u16) -> Child {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    Command::new(agent_bin())
        .arg("run")
        .args([
            "--node-name",
            "test-node",
            "--pod-source",
            "local",
            "--install-cni=true",
        ])
        .arg("--local-pods-dir")
        .arg(dir.join("pods"))
        .arg("--agent-socket")
        .arg(dir.join("plugin.sock"))
        .arg("--ztunnel-uds-address")
        .arg(dir.join("ztunnel.sock"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--cni-bin-dir")
        .arg(dir.join("bin"))
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .arg("--plugin-binary")
        .arg(plugin_bin())
        .arg(format!("--health-addr=127.0.0.1:{hp}"))
        .arg(format!("--metrics-addr=127.0.0.1:{mp}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn agent")
}

#[test]
fn readyz_waits_for_the_installer() {
    if !require_root("readyz_waits_for_the_installer") {
        return;
    }
    let dir = TempDir::new("acni-ready");
    std::fs::create_dir_all(dir.join("net.d")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let (hp, mp) = (free_port(), free_port());
    let mut agent = agent_with_installer(&dir, hp, mp);
    let log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    // No primary CNI config yet: alive, but not ready, and it says why.
    assert!(
        wait_for(Duration::from_secs(20), || get(hp, "/healthz")
            .is_some_and(|r| r.0 == 200)),
        "{}",
        log()
    );
    let (code, _, body) = get(hp, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("install_in_place"), "{body}");
    assert!(!body.contains("plugin_socket_serving"), "{body}");
    assert_eq!(scrape(mp).value("istio_cni_install_ready", &[]), Some(0.0));
    // The primary CNI writes its config: the installer chains us in, the agent turns ready.
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge", "bridge": "none0"}]});
    std::fs::write(dir.join("net.d").join("10-k8s.conflist"), conf.to_string()).unwrap();
    let ready = wait_for(Duration::from_secs(20), || {
        get(hp, "/readyz").is_some_and(|r| r.0 == 200)
    });
    let text =
        std::fs::read_to_string(dir.join("net.d").join("10-k8s.conflist")).unwrap_or_default();
    let gauge = ready.then(|| scrape(mp).value("istio_cni_install_ready", &[]));
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        ready,
        "not ready after the conflist appeared; conflist: {text}\nlog:\n{}",
        log()
    );
    assert!(text.contains("ambient-cni"), "{text}");
    assert_eq!(gauge, Some(Some(1.0)));
}

/// Opens `idle` connections that say nothing and `busy` ones that sent one keep-alive
/// request (`GET path`) and never read the answer, all held open.
fn hold(port: u16, idle: usize, busy: usize, path: &str) -> Vec<TcpStream> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut held = Vec::with_capacity(idle + busy);
    for i in 0..idle + busy {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        if i >= idle {
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        }
        held.push(s);
    }
    held
}

/// The slowest of `n` rounds of GET /healthz and GET /readyz; each must answer 200.
fn slowest_probe(hp: u16, n: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        for path in ["/healthz", "/readyz"] {
            let t = std::time::Instant::now();
            let got = get(hp, path);
            let took = t.elapsed();
            assert_eq!(got.map(|r| r.0), Some(200), "{path} while flooded");
            slowest = slowest.max(took);
        }
    }
    slowest
}

#[test]
fn probes_answer_within_100ms_while_connections_are_held_on_both_ports() {
    if !require_root("probes_answer_within_100ms_while_connections_are_held_on_both_ports") {
        return;
    }
    let dir = TempDir::new("acni-flood");
    let (hp, mp) = (free_port(), free_port());
    let agent = AgentProcess::start(
        &dir.0,
        &[
            &format!("--health-addr=127.0.0.1:{hp}"),
            &format!("--metrics-addr=127.0.0.1:{mp}"),
        ],
    );
    assert!(
        wait_for(Duration::from_secs(20), || get(hp, "/readyz")
            .is_some_and(|r| r.0 == 200)),
        "{}",
        agent.log_text()
    );

    // Anything that reaches the metrics port (hostNetwork: the node IP) holds connections.
    let on_metrics = hold(mp, 500, 100, "/metrics");
    let slowest = slowest_probe(hp, 20);
    assert!(
        slowest < Duration::from_millis(100),
        "a probe took {slowest:?} with 600 connections held on the metrics port"
    );
    // The metrics port itself still serves a newcomer (the oldest held ones make room).
    assert_eq!(get(mp, "/metrics").map(|r| r.0), Some(200));

    // And on the health port itself: 500 silent, 100 with an unanswered request.
    let on_health = hold(hp, 500, 100, "/healthz");
    let slowest = slowest_probe(hp, 20);
    assert!(
        slowest < Duration::from_millis(100),
        "a probe took {slowest:?} with 600 connections held on the health port\n{}",
        agent.log_text()
    );
    drop((on_metrics, on_health));
}
