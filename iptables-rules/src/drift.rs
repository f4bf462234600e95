//! Drift: how a pod's installed capture differs from what we apply. Pure comparisons of
//! read-back state (rule sections, policy route, probe-set entries) with the expected state;
//! the readback itself is [`crate::redirector::Redirector::verify`] and
//! [`crate::nft::host::NftHostProbe::entries`].

use std::fmt;
use std::net::IpAddr;

use crate::model::Family;
use crate::nft::host::ProbeEntry;
use crate::route::RouteState;

/// One section of installed state, e.g. `ipv4 nat` with its normalized rule lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledSection {
    /// What this is (`ipv4 mangle`, `inet istio-ambient-nat`, ...).
    pub name: String,
    /// Our rules/chains as the kernel reports them, normalized (no counters/handles).
    pub lines: Vec<String>,
}

/// What part of a pod's capture drifted (the `kind` label of the drift-repair metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DriftKind {
    /// The pod's netns is no longer the one held (another inode, or gone).
    Netns,
    /// In-pod rules: a table/chain/rule missing, changed or added.
    Rules,
    /// The `local ... dev lo table 100` policy route.
    Route,
    /// The `fwmark 0x111/0xfff lookup 100` policy rule.
    FwmarkRule,
    /// A pod IP missing from (or owned by another pod in) the host probe set.
    ProbeSet,
}

impl DriftKind {
    /// All kinds, in metric order.
    pub const ALL: [DriftKind; 5] = [
        DriftKind::Netns,
        DriftKind::Rules,
        DriftKind::Route,
        DriftKind::FwmarkRule,
        DriftKind::ProbeSet,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Netns => "netns",
            Self::Rules => "rules",
            Self::Route => "route",
            Self::FwmarkRule => "fwmark_rule",
            Self::ProbeSet => "probe_set",
        }
    }
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One difference between the expected and the installed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A whole section of ours (e.g. `inet istio-ambient-nat`, `ipv4 nat`) is absent.
    SectionMissing {
        /// The section.
        section: String,
    },
    /// A section of ours exists that the config does not want.
    SectionExtra {
        /// The section.
        section: String,
    },
    /// An expected line (chain or rule) is absent.
    LineMissing {
        /// The section.
        section: String,
        /// The expected line.
        line: String,
    },
    /// A line in our state that we did not put there.
    LineExtra {
        /// The section.
        section: String,
        /// The unexpected line.
        line: String,
    },
    /// Where an expected line should be, a different one is.
    LineChanged {
        /// The section.
        section: String,
        /// What we apply.
        expected: String,
        /// What the kernel has.
        found: String,
    },
    /// The policy route of a family is absent.
    RouteMissing {
        /// The family.
        family: Family,
    },
    /// The fwmark rule of a family is absent.
    FwmarkRuleMissing {
        /// The family.
        family: Family,
    },
    /// A pod IP is not in the probe set.
    ProbeMissing {
        /// The IP.
        ip: IpAddr,
    },
    /// A pod IP is in the probe set under another owner (comment).
    ProbeOwner {
        /// The IP.
        ip: IpAddr,
        /// The owner found (None: no comment).
        found: Option<String>,
    },
}

impl Finding {
    /// Which kind of drift this is.
    pub fn kind(&self) -> DriftKind {
        match self {
            Self::SectionMissing { .. }
            | Self::SectionExtra { .. }
            | Self::LineMissing { .. }
            | Self::LineExtra { .. }
            | Self::LineChanged { .. } => DriftKind::Rules,
            Self::RouteMissing { .. } => DriftKind::Route,
            Self::FwmarkRuleMissing { .. } => DriftKind::FwmarkRule,
            Self::ProbeMissing { .. } | Self::ProbeOwner { .. } => DriftKind::ProbeSet,
        }
    }
}

/// `s` cut to `max` characters (an ellipsis marks the cut).
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl Finding {
    /// The finding with each rule line cut to `max` characters, for Events and log lines.
    pub fn brief(&self, max: usize) -> String {
        let c = |s: &String| cut(s, max);
        match self {
            Self::LineMissing { section, line } => Self::LineMissing {
                section: section.clone(),
                line: c(line),
            },
            Self::LineExtra { section, line } => Self::LineExtra {
                section: section.clone(),
                line: c(line),
            },
            Self::LineChanged {
                section,
                expected,
                found,
            } => Self::LineChanged {
                section: section.clone(),
                expected: c(expected),
                found: c(found),
            },
            other => other.clone(),
        }
        .to_string()
    }
}

fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SectionMissing { section } => write!(f, "{section}: missing"),
            Self::SectionExtra { section } => write!(f, "{section}: present but not wanted"),
            Self::LineMissing { section, line } => write!(f, "{section}: missing {line:?}"),
            Self::LineExtra { section, line } => write!(f, "{section}: unexpected {line:?}"),
            Self::LineChanged {
                section,
                expected,
                found,
            } => write!(f, "{section}: {expected:?} replaced by {found:?}"),
            Self::RouteMissing { family } => {
                write!(f, "{} local route table 100: missing", fam(*family))
            }
            Self::FwmarkRuleMissing { family } => {
                write!(f, "{} fwmark rule: missing", fam(*family))
            }
            Self::ProbeMissing { ip } => write!(f, "probe set: {ip} missing"),
            Self::ProbeOwner { ip, found } => write!(
                f,
                "probe set: {ip} owned by {}",
                found.as_deref().unwrap_or("nobody")
            ),
        }
    }
}

/// The distinct kinds among `findings`, sorted.
pub fn kinds(findings: &[Finding]) -> Vec<DriftKind> {
    let mut k: Vec<DriftKind> = findings.iter().map(Finding::kind).collect();
    k.sort_unstable();
    k.dedup();
    k
}

/// Compares installed rule sections with the expected ones, exactly: same sections, and in each
/// the same lines in the same order. A line replaced by another is reported as changed.
pub fn compare_sections(expected: &[InstalledSection], found: &[InstalledSection]) -> Vec<Finding> {
    let mut out = Vec::new();
    for e in expected {
        match found.iter().find(|f| f.name == e.name) {
            None => out.push(Finding::SectionMissing {
                section: e.name.clone(),
            }),
            Some(f) => out.extend(compare_lines(&e.name, &e.lines, &f.lines)),
        }
    }
    for f in found {
        if !f.lines.is_empty() && !expected.iter().any(|e| e.name == f.name) {
            out.push(Finding::SectionExtra {
                section: f.name.clone(),
            });
        }
    }
    out
}

/// Line diff of one section (longest common subsequence; sections are tens of lines). A run of
/// missing lines next to a run of extra ones pairs up as changes.
pub fn compare_lines(section: &str, expected: &[String], found: &[String]) -> Vec<Finding> {
    if expected == found {
        return Vec::new();
    }
    let (n, m) = (expected.len(), found.len());
    // lcs[i][j] = LCS length of expected[i..] and found[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == found[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let (mut missing, mut extra): (Vec<&String>, Vec<&String>) = (Vec::new(), Vec::new());
    let flush = |missing: &mut Vec<&String>, extra: &mut Vec<&String>, out: &mut Vec<Finding>| {
        let paired = missing.len().min(extra.len());
        for k in 0..paired {
            out.push(Finding::LineChanged {
                section: section.to_owned(),
                expected: missing[k].clone(),
                found: extra[k].clone(),
            });
        }
        for l in &missing[paired..] {
            out.push(Finding::LineMissing {
                section: section.to_owned(),
                line: (*l).clone(),
            });
        }
        for l in &extra[paired..] {
            out.push(Finding::LineExtra {
                section: section.to_owned(),
                line: (*l).clone(),
            });
        }
        missing.clear();
        extra.clear();
    };
    while i < n || j < m {
        if i < n && j < m && expected[i] == found[j] {
            flush(&mut missing, &mut extra, &mut out);
            i += 1;
            j += 1;
        } else if j >= m || (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
            missing.push(&expected[i]);
            i += 1;
        } else {
            extra.push(&found[j]);
            j += 1;
        }
    }
    flush(&mut missing, &mut extra, &mut out);
    out
}

/// What of the policy route is missing, given what `install(ipv6)` puts in place
/// (`v6_route`: whether the IPv6 local route is wanted, see [`crate::route::ipv6_route_wanted`]).
pub fn compare_route(st: &RouteState, ipv6: bool, v6_route: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    if !st.route_v4 {
        out.push(Finding::RouteMissing { family: Family::V4 });
    }
    if !st.rule_v4 {
        out.push(Finding::FwmarkRuleMissing { family: Family::V4 });
    }
    if ipv6 {
        if v6_route && !st.route_v6 {
            out.push(Finding::RouteMissing { family: Family::V6 });
        }
        if !st.rule_v6 {
            out.push(Finding::FwmarkRuleMissing { family: Family::V6 });
        }
    }
    out
}

/// Which of pod `uid`'s IPs are not in the probe set as its own.
pub fn compare_probe(entries: &[ProbeEntry], uid: &str, ips: &[IpAddr]) -> Vec<Finding> {
    ips.iter()
        .filter_map(|ip| match entries.iter().find(|e| e.ip == *ip) {
            None => Some(Finding::ProbeMissing { ip: *ip }),
            Some(e) if e.uid.as_deref() != Some(uid) => Some(Finding::ProbeOwner {
                ip: *ip,
                found: e.uid.clone(),
            }),
            Some(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(name: &str, lines: &[&str]) -> InstalledSection {
        InstalledSection {
            name: name.into(),
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn sections_table() {
        let nat = sec("inet nat", &["chain a", "  a r1", "  a r2", "  a r3"]);
        let raw = sec("inet raw", &["chain b", "  b r1"]);
        let cases: Vec<(&str, Vec<InstalledSection>, Vec<Finding>)> = vec![
            ("identical", vec![nat.clone(), raw.clone()], vec![]),
            (
                "table flushed",
                vec![raw.clone()],
                vec![Finding::SectionMissing {
                    section: s("inet nat"),
                }],
            ),
            (
                "rule deleted",
                vec![
                    sec("inet nat", &["chain a", "  a r1", "  a r3"]),
                    raw.clone(),
                ],
                vec![Finding::LineMissing {
                    section: s("inet nat"),
                    line: s("  a r2"),
                }],
            ),
            (
                "rule replaced by another",
                vec![
                    sec("inet nat", &["chain a", "  a r1", "  a accept", "  a r3"]),
                    raw.clone(),
                ],
                vec![Finding::LineChanged {
                    section: s("inet nat"),
                    expected: s("  a r2"),
                    found: s("  a accept"),
                }],
            ),
            (
                "rule inserted at the head",
                vec![
                    sec(
                        "inet nat",
                        &["chain a", "  a accept", "  a r1", "  a r2", "  a r3"],
                    ),
                    raw.clone(),
                ],
                vec![Finding::LineExtra {
                    section: s("inet nat"),
                    line: s("  a accept"),
                }],
            ),
            (
                "rules reordered",
                vec![
                    sec("inet nat", &["chain a", "  a r2", "  a r1", "  a r3"]),
                    raw.clone(),
                ],
                vec![
                    Finding::LineMissing {
                        section: s("inet nat"),
                        line: s("  a r1"),
                    },
                    Finding::LineExtra {
                        section: s("inet nat"),
                        line: s("  a r1"),
                    },
                ],
            ),
            (
                "unwanted section of ours",
                vec![nat.clone(), raw.clone(), sec("inet mangle", &["chain c"])],
                vec![Finding::SectionExtra {
                    section: s("inet mangle"),
                }],
            ),
            (
                "empty extra section is nothing",
                vec![nat.clone(), raw.clone(), sec("inet mangle", &[])],
                vec![],
            ),
        ];
        for (name, found, want) in cases {
            let got = compare_sections(&[nat.clone(), raw.clone()], &found);
            assert_eq!(got, want, "{name}");
            assert!(got.iter().all(|f| f.kind() == DriftKind::Rules), "{name}");
        }
    }

    #[test]
    fn route_table() {
        let full = RouteState {
            rule_v4: true,
            rule_v6: true,
            route_v4: true,
            route_v6: true,
        };
        let cases = [
            (full, true, true, vec![]),
            (
                RouteState {
                    route_v4: false,
                    ..full
                },
                false,
                false,
                vec![Finding::RouteMissing { family: Family::V4 }],
            ),
            (
                RouteState {
                    rule_v4: false,
                    ..full
                },
                false,
                false,
                vec![Finding::FwmarkRuleMissing { family: Family::V4 }],
            ),
            // IPv6 off: v6 state is not looked at.
            (RouteState::default().with_v4(), false, false, vec![]),
            // IPv6 on but lo has IPv6 disabled: no v6 route wanted, the rule still is.
            (
                RouteState {
                    route_v6: false,
                    rule_v6: false,
                    ..full
                },
                true,
                false,
                vec![Finding::FwmarkRuleMissing { family: Family::V6 }],
            ),
            (
                RouteState {
                    route_v6: false,
                    ..full
                },
                true,
                true,
                vec![Finding::RouteMissing { family: Family::V6 }],
            ),
        ];
        for (i, (st, ipv6, v6_route, want)) in cases.into_iter().enumerate() {
            assert_eq!(compare_route(&st, ipv6, v6_route), want, "case {i}");
        }
        assert_eq!(
            kinds(&compare_route(&RouteState::default(), false, false)),
            vec![DriftKind::Route, DriftKind::FwmarkRule]
        );
    }

    impl RouteState {
        fn with_v4(mut self) -> Self {
            self.rule_v4 = true;
            self.route_v4 = true;
            self
        }
    }

    #[test]
    fn probe_table() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "fd00::1".parse().unwrap();
        let e = |ip, uid: Option<&str>| ProbeEntry {
            ip,
            uid: uid.map(str::to_owned),
        };
        let cases = [
            (vec![e(a, Some("u1")), e(b, Some("u1"))], vec![]),
            (
                vec![e(b, Some("u1"))],
                vec![Finding::ProbeMissing { ip: a }],
            ),
            (
                vec![e(a, Some("u2")), e(b, None)],
                vec![
                    Finding::ProbeOwner {
                        ip: a,
                        found: Some(s("u2")),
                    },
                    Finding::ProbeOwner { ip: b, found: None },
                ],
            ),
            (
                vec![],
                vec![
                    Finding::ProbeMissing { ip: a },
                    Finding::ProbeMissing { ip: b },
                ],
            ),
        ];
        for (i, (entries, want)) in cases.into_iter().enumerate() {
            let got = compare_probe(&entries, "u1", &[a, b]);
            assert_eq!(got, want, "case {i}");
            assert!(got.iter().all(|f| f.kind() == DriftKind::ProbeSet));
        }
    }

    #[test]
    fn findings_name_what_drifted() {
        let f = Finding::LineChanged {
            section: s("inet istio-ambient-nat"),
            expected: s("x"),
            found: s("y"),
        };
        assert_eq!(
            f.to_string(),
            "inet istio-ambient-nat: \"x\" replaced by \"y\""
        );
        assert_eq!(DriftKind::FwmarkRule.to_string(), "fwmark_rule");
        let long = Finding::LineChanged {
            section: s("t"),
            expected: "a".repeat(10),
            found: "b".repeat(3),
        };
        assert_eq!(long.brief(4), "t: \"aaaa…\" replaced by \"bbb\"");
    }
}
