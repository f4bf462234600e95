//! What the end-to-end benches share: a captured-pod ADD exec'd like a runtime does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::{exec_plugin, plugin_bin, plugin_entry, Exec, NamedNetns};

/// The `p`th percentile of `v`, in milliseconds.
pub fn pct(v: &[Duration], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1000.0
}

/// Rows showing what the exec harness ([`crate::exec_plugin`]) adds: `/bin/true` and
/// `sleep 0.001` timed by the same code, 200 times each. The second minus the first should be
/// 1 ms plus sleep's own start-up, never a polling quantum. Each row: name, p50, p99, mean (ms).
pub fn harness_rows() -> Vec<(String, f64, f64, f64)> {
    let time = |bin: &str, args: &[&str]| {
        let mut v = Vec::with_capacity(200);
        for _ in 0..220 {
            let mut cmd = std::process::Command::new(bin);
            cmd.args(args);
            let e = crate::exec_timed(cmd, b"", Duration::from_secs(5));
            assert_eq!(e.code, 0, "{bin} {args:?}: {}", e.stderr);
            v.push(e.elapsed);
        }
        v.drain(..20); // warm-up
        v
    };
    let t = time("/bin/true", &[]);
    let s = time("/bin/sleep", &["0.001"]);
    vec![
        ("/bin/true".into(), pct(&t, 50), pct(&t, 99), mean(&t)),
        ("sleep 0.001".into(), pct(&s, 50), pct(&s, 99), mean(&s)),
    ]
}

/// A path as the report shows it: relative to the workspace (the report names no machine's paths).
pub fn shown(p: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let p = p.canonicalize().unwrap_or_else(|_| p.to_owned());
    match p.strip_prefix(&root) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

/// The pod count a bench runs with: `var` when it parses, else `default`.
pub fn pods_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The plugin's conf for a bench ADD: quiet, 1.0.0, with a minimal prevResult.
pub fn plugin_conf(sock: &Path) -> String {
    let mut e = plugin_entry(sock, 5000);
    e["log_level"] = "error".into();
    e["cniVersion"] = "1.0.0".into();
    e["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.97.0.5/24"}]});
    e.to_string()
}

/// One ADD of pod `mesh/name` (`uid`) in `netns` through the plugin binary.
pub fn add(conf: &str, netns: &NamedNetns, name: &str, uid: &str) -> Exec {
    add_in(conf, "mesh", netns, name, uid)
}

/// One ADD of pod `namespace/name` (`uid`) in `netns` through the plugin binary.
pub fn add_in(conf: &str, namespace: &str, netns: &NamedNetns, name: &str, uid: &str) -> Exec {
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
    );
    let path = netns.path();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", uid),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args.as_str()),
    ];
    exec_plugin(
        &plugin_bin(),
        &env,
        conf.as_bytes(),
        Duration::from_secs(10),
    )
}

/// The agent's per-phase ADD histogram (issue 18), read from its `/metrics`.
pub const PHASE_METRIC: &str = "ambient_cni_add_phase_seconds";

/// The phases of one ADD in the order the agent runs them.
pub const PHASES: [&str; 7] = [
    "lookup", "netns", "rules", "record", "ztunnel", "probes", "status",
];

/// The `q` quantile (0..1) of a cumulative histogram given as `(le, count)` buckets, in the
/// buckets' unit, interpolated linearly inside the bucket it falls in (Prometheus'
/// `histogram_quantile`). `None` without observations; the `+Inf` bucket answers its lower bound.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut b = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo_le, mut lo_count) = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(lo_le);
            }
            let width = count - lo_count;
            let frac = if width > 0.0 {
                (rank - lo_count) / width
            } else {
                1.0
            };
            return Some(lo_le + (le - lo_le) * frac);
        }
        (lo_le, lo_count) = (le, count);
    }
    Some(lo_le)
}

/// One phase of the agent's ADD histogram: name, p50, p99 and mean in ms (None without
/// observations), and how many ADDs it counted.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseRow {
    /// The `phase` label.
    pub phase: String,
    /// Median, ms.
    pub p50: Option<f64>,
    /// 99th percentile, ms.
    pub p99: Option<f64>,
    /// Mean (`_sum / _count`), ms: exact, unlike quantiles read from buckets, so means add up.
    pub mean: Option<f64>,
    /// Observations.
    pub count: f64,
}

/// The agent's time to answer a plugin ADD, request decoded to reply (its own clock).
pub const ANSWER_METRIC: &str = "ambient_cni_plugin_add_duration_seconds";

/// Every series of histogram `name` in an OpenMetrics text, keyed by the value of label `by`
/// (summed over any other label; "" when `by` is absent); `None` when there is no such family.
fn histograms(metrics: &str, name: &str, by: &str) -> Option<BTreeMap<String, PhaseRow>> {
    let family = crate::expo::parse(metrics)
        .ok()
        .and_then(|e| e.family(name).cloned())?;
    #[derive(Default)]
    struct Acc {
        buckets: BTreeMap<u64, f64>,
        sum: f64,
        count: f64,
    }
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    for s in &family.samples {
        let key = s.labels.get(by).cloned().unwrap_or_default();
        let a = acc.entry(key).or_default();
        if s.name == format!("{name}_sum") {
            a.sum += s.value;
        } else if s.name == format!("{name}_count") {
            a.count += s.value;
        } else if s.name == format!("{name}_bucket") {
            let le: f64 = match s.labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(le) => match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                None => continue,
            };
            *a.buckets.entry(le.to_bits()).or_default() += s.value;
        }
    }
    Some(
        acc.into_iter()
            .map(|(k, a)| {
                let buckets: Vec<(f64, f64)> = a
                    .buckets
                    .iter()
                    .map(|(le, v)| (f64::from_bits(*le), *v))
                    .collect();
                let q = |q| histogram_quantile(&buckets, q).map(|s| s * 1e3);
                let count = buckets.iter().map(|b| b.1).fold(a.count, f64::max);
                let row = PhaseRow {
                    p50: q(0.5),
                    p99: q(0.99),
                    mean: (a.count > 0.0).then(|| a.sum / a.count * 1e3),
                    count,
                    phase: k.clone(),
                };
                (k, row)
            })
            .collect(),
    )
}

/// The phases of [`PHASE_METRIC`] in an OpenMetrics text, in [`PHASES`] order (then any other
/// phase the agent reports); `None` when the agent has no such histogram (or the text does
/// not parse).
pub fn phases(metrics: &str) -> Option<Vec<PhaseRow>> {
    let mut by_phase = histograms(metrics, PHASE_METRIC, "phase")?;
    by_phase.remove("");
    let mut rows: Vec<PhaseRow> = PHASES
        .iter()
        .map(|p| {
            by_phase.remove(*p).unwrap_or(PhaseRow {
                phase: p.to_string(),
                p50: None,
                p99: None,
                mean: None,
                count: 0.0,
            })
        })
        .collect();
    rows.extend(by_phase.into_values());
    Some(rows)
}

/// The agent's answer to plugin ADDs ([`ANSWER_METRIC`]); `None` when it exports none.
pub fn answer(metrics: &str) -> Option<PhaseRow> {
    let mut h = histograms(metrics, ANSWER_METRIC, "")?;
    let mut row = h.remove("")?;
    row.phase = "answer".into();
    Some(row)
}

/// The per-phase table (p50, p99 in ms, count) from an OpenMetrics text, one row per phase in
/// [`PHASES`] order (then any other phase the agent reports); every row says "n/a" when the
/// agent has no [`PHASE_METRIC`] (or the text does not parse).
pub fn phase_table(metrics: &str) -> String {
    let mut out = String::from("| phase | p50 ms | p99 ms | ADDs |\n|---|---|---|---|\n");
    let Some(rows) = phases(metrics) else {
        for p in PHASES {
            out.push_str(&format!("| {p} | n/a | n/a | n/a |\n"));
        }
        out.push_str(&format!(
            "\n(n/a: the agent exports no `{PHASE_METRIC}` histogram)\n"
        ));
        return out;
    };
    let ms = |v: Option<f64>| v.map_or_else(|| "n/a".into(), |v| format!("{v:.3}"));
    for r in rows {
        let n = if r.p50.is_none() && r.count == 0.0 {
            "n/a".to_owned()
        } else {
            format!("{:.0}", r.count)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {n} |\n",
            r.phase,
            ms(r.p50),
            ms(r.p99)
        ));
    }
    out
}

/// "Where the time goes" for one measured ADD path, from the same run, in means (which add
/// up, unlike medians): the exec floor (`/bin/true` timed the same way), the agent's answer
/// (its phases, largest first, and the gaps between them), and what lies outside the answer
/// (the plugin's start-up beyond the floor, connect, HTTP/2 + gRPC framing, the wake-up of the
/// agent's handler). The p50 is shown beside it for reference.
pub fn where_time_goes(
    what: &str,
    times: &[Duration],
    floor_mean: f64,
    rows: &[PhaseRow],
    answer: Option<&PhaseRow>,
) -> String {
    let total = mean(times);
    let mut named: Vec<(&str, f64)> = rows
        .iter()
        .filter_map(|r| r.mean.map(|v| (r.phase.as_str(), v)))
        .collect();
    named.sort_by(|a, b| b.1.total_cmp(&a.1));
    let sum: f64 = named.iter().map(|p| p.1).sum();
    let parts: Vec<String> = named
        .iter()
        .filter(|p| p.1 >= 0.05)
        .map(|(p, v)| format!("{p} {v:.2}"))
        .collect();
    let parts = if parts.is_empty() {
        "each under 0.05 ms".to_owned()
    } else {
        parts.join(", ")
    };
    let head = format!(
        "{what}: mean {total:.2} ms (p50 {:.2}) = exec floor {floor_mean:.2} ms",
        if times.is_empty() {
            f64::NAN
        } else {
            pct(times, 50)
        }
    );
    match answer.and_then(|a| a.mean) {
        Some(ans) => format!(
            "{head} + the agent's answer {ans:.2} ms (its phases {sum:.2}: {parts}; between \
             them {:.2}) + outside the answer {:.2} ms (the plugin's start-up beyond the floor, \
             connect, HTTP/2 + gRPC framing, the wake-up of the agent's handler).",
            ans - sum,
            total - floor_mean - ans
        ),
        None => format!(
            "{head} + the agent's phases {sum:.2} ms ({parts}) + the rest {:.2} ms (plugin \
             start-up beyond the floor, UDS + gRPC, scheduling between phases).",
            total - floor_mean - sum
        ),
    }
}

/// User + system CPU of process `pid` so far, ms (0 when it cannot be read).
pub fn proc_cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz
}

/// The mean of `v`, in milliseconds (NaN when empty).
pub fn mean(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / v.len() as f64
}

/// "met" or "NOT met" for a figure against an upper bound.
pub fn verdict(value: f64, at_most: f64) -> &'static str {
    if value <= at_most {
        "met"
    } else {
        "NOT met"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let b = [
            (0.001, 50.0),
            (0.002, 90.0),
            (0.005, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(&b, 0.5), Some(0.001));
        let p75 = histogram_quantile(&b, 0.75).unwrap();
        assert!((p75 - 0.001625).abs() < 1e-9, "{p75}");
        let p99 = histogram_quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.0047).abs() < 1e-9, "{p99}");
        assert_eq!(histogram_quantile(&[(1.0, 0.0)], 0.5), None);
        assert_eq!(histogram_quantile(&[], 0.5), None);
        // Everything above the last finite bound: the answer is that bound.
        assert_eq!(
            histogram_quantile(&[(0.1, 0.0), (f64::INFINITY, 3.0)], 0.5),
            Some(0.1)
        );
    }

    #[test]
    fn where_time_goes_splits_the_mean_exactly() {
        let row = |phase: &str, mean| PhaseRow {
            phase: phase.into(),
            p50: mean,
            p99: mean,
            mean,
            count: 10.0,
        };
        let rows = [
            row("rules", Some(0.4)),
            row("ztunnel", Some(0.6)),
            row("status", Some(0.01)),
            row("lookup", None),
        ];
        let times = [Duration::from_millis(2), Duration::from_millis(2)];
        let ans = row("answer", Some(1.21));
        let s = where_time_goes("x", &times, 0.5, &rows, Some(&ans));
        assert!(s.contains("mean 2.00 ms (p50 2.00)"), "{s}");
        assert!(
            s.contains(
                "answer 1.21 ms (its phases 1.01: ztunnel 0.60, rules 0.40; between them 0.20)"
            ),
            "{s}"
        );
        assert!(s.contains("outside the answer 0.29 ms"), "{s}");
        let s = where_time_goes("x", &times, 0.5, &rows, None);
        assert!(
            s.contains("phases 1.01 ms (ztunnel 0.60, rules 0.40)"),
            "{s}"
        );
        assert!(s.contains("the rest 0.49 ms"), "{s}");
    }

    #[test]
    fn the_answer_histogram_gives_quantiles_and_an_exact_mean() {
        let text = "# TYPE ambient_cni_plugin_add_duration_seconds histogram\n\
            ambient_cni_plugin_add_duration_seconds_bucket{le=\"0.001\"} 1\n\
            ambient_cni_plugin_add_duration_seconds_bucket{le=\"0.002\"} 4\n\
            ambient_cni_plugin_add_duration_seconds_bucket{le=\"+Inf\"} 4\n\
            ambient_cni_plugin_add_duration_seconds_sum 0.006\n\
            ambient_cni_plugin_add_duration_seconds_count 4\n\
            # EOF\n";
        let a = answer(text).expect("answer histogram");
        assert_eq!(a.count, 4.0);
        assert!((a.mean.unwrap() - 1.5).abs() < 1e-9, "{a:?}");
        let p50 = a.p50.unwrap();
        assert!((p50 - 1.333_333).abs() < 1e-3, "{a:?}");
        assert!(answer("# EOF\n").is_none());
    }

    #[test]
    fn phase_table_reads_the_histogram_or_says_na() {
        let text = "# TYPE ambient_cni_add_phase_seconds histogram\n\
            ambient_cni_add_phase_seconds_bucket{phase=\"rules\",le=\"0.0005\"} 1\n\
            ambient_cni_add_phase_seconds_bucket{phase=\"rules\",le=\"0.001\"} 2\n\
            ambient_cni_add_phase_seconds_bucket{phase=\"rules\",le=\"+Inf\"} 2\n\
            ambient_cni_add_phase_seconds_count{phase=\"rules\"} 2\n\
            ambient_cni_add_phase_seconds_sum{phase=\"rules\"} 0.0012\n\
            # EOF\n";
        let t = phase_table(text);
        assert!(t.contains("| rules | 0.500 | 0.990 | 2 |"), "{t}");
        assert!(t.contains("| lookup | n/a | n/a | n/a |"), "{t}");
        let none = phase_table("# EOF\n");
        assert!(none.contains("| status | n/a | n/a | n/a |"), "{none}");
        assert!(none.contains("exports no"), "{none}");
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(1.0, 1.0), "met");
        assert_eq!(verdict(1.01, 1.0), "NOT met");
    }
}
