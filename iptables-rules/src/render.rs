//! Text forms of a [`Ruleset`]: Istio's `iptables-restore` input, the canonical lines
//! `iptables-save` prints back, and Istio's `nft` transaction text.

use std::fmt::Write as _;

use crate::constants::INPOD_RESTORE_MASK;
use crate::model::{Chain, Family, Match, Rule, Ruleset, Table, Target};

/// `iptables-restore` input for one family, in Istio's builder format: tables sorted,
/// `-N` for chains in order of first rule then undeclared jump targets, rules, `COMMIT`.
/// Empty when the ruleset has no rules for `family`.
pub fn iptables_restore(rs: &Ruleset, family: Family) -> String {
    let mut out = String::new();
    if !rs.has_family(family) {
        return out;
    }
    for table in Table::ALL {
        let rules: Vec<&Rule> = rs.rules_for(family).filter(|r| r.table == table).collect();
        if rules.is_empty() {
            continue;
        }
        let _ = writeln!(out, "* {}", table.iptables_name());
        for c in declared_chains(&rules) {
            let _ = writeln!(out, "-N {}", c.iptables_name());
        }
        for r in &rules {
            let _ = writeln!(out, "{}", iptables_rule_line(r));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Non-builtin chains of a table's rules in Istio's declaration order.
pub fn declared_chains(rules: &[&Rule]) -> Vec<Chain> {
    let mut chains: Vec<Chain> = Vec::new();
    for r in rules {
        if !r.chain.is_builtin() && !chains.contains(&r.chain) {
            chains.push(r.chain);
        }
    }
    for r in rules {
        if let Target::Jump(c) = r.target {
            if !chains.contains(&c) {
                chains.push(c);
            }
        }
    }
    chains
}

/// One rule as Istio writes it: `-A CHAIN <matches> -j <target>` (or `-I CHAIN 1 ...`).
pub fn iptables_rule_line(r: &Rule) -> String {
    let head = if r.insert_first {
        format!("-I {} 1", r.chain.iptables_name())
    } else {
        format!("-A {}", r.chain.iptables_name())
    };
    let spec = iptables_rule_spec(r);
    format!("{head} {spec}")
}

/// The rule's matches and target in Istio's text (no chain), e.g. for `iptables -D`.
pub fn iptables_rule_spec(r: &Rule) -> String {
    let l4 = r.l4proto().map(|p| p.as_str()).unwrap_or("tcp");
    let mut parts: Vec<String> = Vec::new();
    let mut prev_proto = false;
    for m in &r.matches {
        let neg = |n: bool| if n { "! " } else { "" };
        let s = match m {
            Match::Proto(p) => format!("-p {}", p.as_str()),
            Match::ProtoModule(p) => format!("-m {}", p.as_str()),
            Match::Saddr { net, neg: n } => format!("{}-s {net}", neg(*n)),
            Match::Daddr { net, neg: n } => format!("{}-d {net}", neg(*n)),
            // Right after `-p` the protocol module loads implicitly (Istio's text).
            Match::Dport { port, neg: n } if prev_proto => format!("{}--dport {port}", neg(*n)),
            Match::Dport { port, neg: n } => format!("-m {l4} {}--dport {port}", neg(*n)),
            Match::Sport { port } if prev_proto => format!("--sport {port}"),
            Match::Sport { port } => format!("-m {l4} --sport {port}"),
            Match::Iif(i) => format!("-i {i}"),
            Match::Oif { name, neg: n } => format!("{}-o {name}", neg(*n)),
            Match::Mark {
                value,
                mask,
                neg: n,
            } => format!("-m mark {}--mark {value:#x}/{mask:#x}", neg(*n)),
            Match::ConnMark { value, mask } => format!("-m connmark --mark {value:#x}/{mask:#x}"),
            Match::SetDaddr(s) => format!("-m set --match-set {s} dst"),
            Match::SocketExists => "-m owner --socket-exists".to_string(),
            Match::SkUid(u) => format!("-m owner --uid-owner {u}"),
        };
        prev_proto = matches!(m, Match::Proto(_));
        parts.push(s);
    }
    parts.push(iptables_target(&r.target));
    parts.join(" ")
}

fn iptables_target(t: &Target) -> String {
    match t {
        Target::Jump(c) => format!("-j {}", c.iptables_name()),
        Target::Accept => "-j ACCEPT".into(),
        Target::Return => "-j RETURN".into(),
        Target::Redirect(p) => format!("-j REDIRECT --to-ports {p}"),
        Target::ConnmarkSetXmark { value, mask } => {
            format!("-j CONNMARK --set-xmark {value:#x}/{mask:#x}")
        }
        Target::ConnmarkRestore { nfmask, ctmask } => {
            format!("-j CONNMARK --restore-mark --nfmask {nfmask:#x} --ctmask {ctmask:#x}")
        }
        Target::CtZone(z) => format!("-j CT --zone {z}"),
        Target::Snat(ip) => format!("-j SNAT --to-source {ip}"),
    }
}

/// The rule as `iptables-save` prints it back: `-s/-d/-i/-o/-p` first, full prefixes,
/// explicit `-m tcp`/`-m udp` for port matches, then extensions in rule order.
pub fn iptables_save_rule(r: &Rule) -> String {
    let l4 = r.l4proto().map(|p| p.as_str()).unwrap_or("tcp");
    let neg = |n: bool| if n { "! " } else { "" };
    let mut head: [Option<String>; 5] = Default::default();
    let mut ext: Vec<String> = Vec::new();
    for m in &r.matches {
        match m {
            Match::Saddr { net, neg: n } => {
                head[0] = Some(format!("{}-s {}/{}", neg(*n), net.addr, net.prefix_len()))
            }
            Match::Daddr { net, neg: n } => {
                head[1] = Some(format!("{}-d {}/{}", neg(*n), net.addr, net.prefix_len()))
            }
            Match::Iif(i) => head[2] = Some(format!("-i {i}")),
            Match::Oif { name, neg: n } => head[3] = Some(format!("{}-o {name}", neg(*n))),
            Match::Proto(p) => head[4] = Some(format!("-p {}", p.as_str())),
            Match::ProtoModule(p) => ext.push(format!("-m {}", p.as_str())),
            Match::Dport { port, neg: n } => ext.push(format!("-m {l4} {}--dport {port}", neg(*n))),
            Match::Sport { port } => ext.push(format!("-m {l4} --sport {port}")),
            Match::Mark {
                value,
                mask,
                neg: n,
            } => ext.push(format!("-m mark {}--mark {value:#x}/{mask:#x}", neg(*n))),
            Match::ConnMark { value, mask } => {
                ext.push(format!("-m connmark --mark {value:#x}/{mask:#x}"))
            }
            Match::SetDaddr(s) => ext.push(format!("-m set --match-set {s} dst")),
            Match::SocketExists => ext.push("-m owner --socket-exists".into()),
            Match::SkUid(u) => ext.push(format!("-m owner --uid-owner {u}")),
        }
    }
    let mut parts: Vec<String> = vec![format!("-A {}", r.chain.iptables_name())];
    parts.extend(head.into_iter().flatten());
    parts.extend(ext);
    parts.push(iptables_target(&r.target));
    parts.join(" ")
}

/// Expected normalized `iptables-save` content of our rules per table (see
/// [`crate::normalize::iptables_save`]), for one family.
pub fn iptables_save_expected(rs: &Ruleset, family: Family) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    if !rs.has_family(family) {
        return out;
    }
    for table in Table::ALL {
        let rules: Vec<&Rule> = rs.rules_for(family).filter(|r| r.table == table).collect();
        if rules.is_empty() {
            continue;
        }
        let mut lines: Vec<String> = declared_chains(&rules)
            .into_iter()
            .map(|c| format!(":{}", c.iptables_name()))
            .collect();
        lines.extend(rules.iter().map(|r| iptables_save_rule(r)));
        out.push((
            table.iptables_name().to_string(),
            crate::normalize::sort_save_lines(lines),
        ));
    }
    out
}

/// Istio's `nft` transaction text for the ruleset (family `inet`), in the goldens' layout.
pub fn nft_text(rs: &Ruleset) -> String {
    let mut out = String::new();
    for table in rs.tables_in(&Table::NFT_ORDER) {
        let t = table.nft_name();
        let rules: Vec<&Rule> = rs.rules.iter().filter(|r| r.table == table).collect();
        let _ = writeln!(out, "add table inet {t}");
        let _ = writeln!(out, "flush table inet {t}");
        for c in [Chain::Prerouting, Chain::Output, Chain::Postrouting] {
            if rules.iter().any(|r| r.chain == c) {
                if let Some(b) = crate::model::nft_base_chain(table, c) {
                    let _ = writeln!(
                        out,
                        "add chain inet {t} {} {{ type {} hook {} priority {} ; }}",
                        c.nft_name(),
                        b.kind.as_str(),
                        b.hook,
                        b.priority
                    );
                }
            }
        }
        for c in [Chain::IstioPrert, Chain::IstioOutput, Chain::IstioPostrt] {
            if rules
                .iter()
                .any(|r| r.chain == c || r.target == Target::Jump(c))
            {
                let _ = writeln!(out, "add chain inet {t} {}", c.nft_name());
            }
        }
        for r in &rules {
            let _ = writeln!(
                out,
                "add rule inet {t} {} {}",
                r.chain.nft_name(),
                nft_rule_body(r)
            );
        }
    }
    out
}

/// A rule's nft expressions and verdict, e.g. `meta l4proto tcp ip saddr 1.2.3.4 counter accept`.
pub fn nft_rule_body(r: &Rule) -> String {
    let l4 = r.l4proto().map(|p| p.as_str()).unwrap_or("tcp");
    let ms = r.nft_matches();
    let mut parts: Vec<String> = Vec::new();
    let ne = |n: bool| if n { "!= " } else { "" };
    for (i, m) in ms.iter().enumerate() {
        let next_is_port = matches!(
            ms.get(i + 1),
            Some(Match::Dport { .. } | Match::Sport { .. })
        );
        let s = match m {
            // `tcp dport` carries the protocol check itself.
            Match::Proto(_) if next_is_port => continue,
            Match::Proto(p) => format!("meta l4proto {}", p.as_str()),
            Match::ProtoModule(_) => continue,
            Match::Saddr { net, neg } => {
                format!("{} saddr {}{net}", nft_ip(net.family()), ne(*neg))
            }
            Match::Daddr { net, neg } => {
                format!("{} daddr {}{net}", nft_ip(net.family()), ne(*neg))
            }
            Match::Dport { port, neg } => format!("{l4} dport {}{port}", ne(*neg)),
            Match::Sport { port } => format!("{l4} sport {port}"),
            Match::Iif(i) => format!("iifname {i}"),
            Match::Oif { name, neg } => format!("oifname {}{name}", ne(*neg)),
            Match::Mark { value, mask, neg } => {
                format!(
                    "meta mark & {mask:#x} {} {value:#x}",
                    if *neg { "!=" } else { "==" }
                )
            }
            Match::ConnMark { value, mask } => format!("ct mark & {mask:#x} == {value:#x}"),
            Match::SetDaddr(s) => format!("{} daddr @{s}", nft_ip(r.family.unwrap_or(Family::V4))),
            Match::SkUid(u) => format!("meta skuid {u}"),
            // No nft equivalent; Istio's nft backend uses skuid instead (HostProbeConfig::kubelet_uid).
            Match::SocketExists => "<socket-exists: not expressible in nft>".into(),
        };
        parts.push(s);
    }
    let verdict = match &r.target {
        Target::Jump(c) => return join_nonempty(parts, format!("jump {}", c.nft_name())),
        Target::Accept => "accept".to_string(),
        Target::Return => "return".to_string(),
        Target::Redirect(p) => format!("redirect to :{p}"),
        Target::ConnmarkSetXmark { value, mask } => {
            format!("ct mark set ct mark & {:#x} | {value:#x}", !mask)
        }
        Target::ConnmarkRestore { nfmask, ctmask }
            if *nfmask == INPOD_RESTORE_MASK && *ctmask == INPOD_RESTORE_MASK =>
        {
            "meta mark set ct mark".to_string()
        }
        Target::ConnmarkRestore { ctmask, .. } => format!("meta mark set ct mark & {ctmask:#x}"),
        Target::CtZone(z) => format!("ct zone set {z}"),
        Target::Snat(ip) => format!("snat to {ip}"),
    };
    join_nonempty(parts, format!("counter {verdict}"))
}

fn join_nonempty(mut parts: Vec<String>, last: String) -> String {
    parts.push(last);
    parts.join(" ")
}

fn nft_ip(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}
