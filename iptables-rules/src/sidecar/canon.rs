//! Pure: what `iptables-save` prints back for Istio's sidecar rules, and our state read
//! from `iptables-save` output, so "exactly these rules are installed" is a text compare.
//!
//! The save form puts `-s`, `-d`, `-i`, `-o`, `-p` first, then the matches in the order
//! given (with the implicit `-m tcp`/`-m udp` of `--dport`/`--sport`), then the target
//! with the options the kernel reports (marks in hex, TPROXY's `--on-ip`, CONNMARK masks).

use std::net::IpAddr;

use super::generate::{declared_chains, is_builtin, Op, Rule, TABLES};
use crate::model::Family;
use crate::normalize::sort_save_lines;

/// Per table (sorted): `:CHAIN` declarations and `-A` lines in save form.
pub type TableLines = Vec<(String, Vec<String>)>;

/// Each chain of `table` with its rules' parameters in kernel order (inserts resolved),
/// chains in order of first use.
pub fn chain_contents(rules: &[Rule], table: &str) -> Vec<(String, Vec<Vec<String>>)> {
    let mut chains: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    for r in rules.iter().filter(|r| r.table == table) {
        let idx = match chains.iter().position(|(c, _)| c == r.chain) {
            Some(i) => i,
            None => {
                chains.push((r.chain.to_owned(), Vec::new()));
                chains.len() - 1
            }
        };
        let list = &mut chains[idx].1;
        match r.op {
            Op::Append => list.push(r.params.clone()),
            Op::Insert(pos) => list.insert(pos.saturating_sub(1).min(list.len()), r.params.clone()),
        }
    }
    chains
}

/// The state `rules` leave in a fresh netns, as [`state_from_save`] reads it.
pub fn expected_state(rules: &[Rule], family: Family) -> TableLines {
    let decls = declared_chains(rules);
    let mut out = Vec::new();
    for table in TABLES {
        let mut lines: Vec<String> = decls
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| format!(":{c}"))
            .collect();
        for (chain, rules) in chain_contents(rules, table) {
            lines.extend(
                rules
                    .iter()
                    .map(|p| format!("-A {chain} {}", save_params(p, family))),
            );
        }
        if !lines.is_empty() {
            out.push((table.to_owned(), sort_save_lines(lines)));
        }
    }
    out
}

/// Our state in one family's `iptables-save` output: in `mangle`, `nat` and `raw`, every
/// user chain declared and every rule (a sidecar pod's netns holds only Istio's rules
/// there), chain declarations sorted, rules grouped by chain in kernel order.
pub fn state_from_save(text: &str) -> TableLines {
    let mut out: TableLines = Vec::new();
    let mut cur: Option<(String, Vec<String>)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            let t = t.trim();
            cur = TABLES.contains(&t).then(|| (t.to_owned(), Vec::new()));
        } else if line == "COMMIT" {
            if let Some((t, lines)) = cur.take() {
                if !lines.is_empty() {
                    out.push((t, sort_save_lines(lines)));
                }
            }
        } else if let Some(cur) = cur.as_mut() {
            if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or("");
                if !is_builtin(chain) {
                    cur.1.push(format!(":{chain}"));
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                // `iptables-save -c` style counters are not asked for; strip any anyway.
                cur.1.push(format!("-A {}", rest.trim()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One rule's parameters (Istio's order) in `iptables-save` form.
pub fn save_params(params: &[String], family: Family) -> String {
    let mut core: [Option<String>; 5] = Default::default(); // -s -d -i -o -p
    let mut matches: Vec<String> = Vec::new();
    let mut target: Vec<String> = Vec::new();
    let mut module: Option<String> = None;
    let mut proto: Option<String> = None;
    let mut neg = false;
    let mut it = params.iter().map(String::as_str);
    while let Some(tok) = it.next() {
        let bang = if neg { "! " } else { "" };
        if tok == "!" {
            neg = true;
            continue;
        }
        neg = false;
        match tok {
            "-s" | "-d" => {
                let v = it.next().map(|a| addr(a, family)).unwrap_or_default();
                core[if tok == "-s" { 0 } else { 1 }] = Some(format!("{bang}{tok} {v}"));
            }
            "-i" | "-o" => {
                let v = it.next().unwrap_or("");
                core[if tok == "-i" { 2 } else { 3 }] = Some(format!("{bang}{tok} {v}"));
            }
            "-p" => {
                let v = it.next().unwrap_or("");
                proto = Some(v.to_owned());
                core[4] = Some(format!("{bang}-p {v}"));
            }
            "-m" => {
                let m = it.next().unwrap_or("");
                module = Some(m.to_owned());
                matches.push(format!("-m {m}"));
            }
            "--dport" | "--sport" => {
                let v = it.next().unwrap_or("");
                let p = proto.clone().unwrap_or_default();
                if module.as_deref() != Some(p.as_str()) {
                    matches.push(format!("-m {p}"));
                    module = Some(p);
                }
                matches.push(format!("{bang}{tok} {v}"));
            }
            "--mark" => {
                let v = it.next().unwrap_or("");
                matches.push(format!("{bang}--mark {}", hex_mark(v)));
            }
            "-j" => {
                let t = it.next().unwrap_or("");
                target = save_target(t, &mut it, family);
                break;
            }
            other => {
                // Options of the current module pass through unchanged.
                let v = it.next().unwrap_or("");
                matches.push(format!("{bang}{other} {v}"));
            }
        }
    }
    core.into_iter()
        .flatten()
        .chain(matches)
        .chain(target)
        .collect::<Vec<_>>()
        .join(" ")
}

fn save_target<'a>(
    target: &str,
    rest: &mut impl Iterator<Item = &'a str>,
    family: Family,
) -> Vec<String> {
    let opts: Vec<&str> = rest.collect();
    let opt = |name: &str| {
        opts.iter()
            .position(|o| *o == name)
            .and_then(|i| opts.get(i + 1))
            .copied()
            .unwrap_or("")
    };
    let all = "0xffffffff";
    let t = match target {
        "REDIRECT" => {
            let port = if opts.contains(&"--to-port") {
                opt("--to-port")
            } else {
                opt("--to-ports")
            };
            format!("-j REDIRECT --to-ports {port}")
        }
        "TPROXY" => {
            let on_ip = match family {
                Family::V4 => "0.0.0.0",
                Family::V6 => "::",
            };
            let (mark, mask) = opt("--tproxy-mark").split_once('/').unwrap_or(("0", all));
            format!(
                "-j TPROXY --on-port {} --on-ip {on_ip} --tproxy-mark {}/{mask}",
                opt("--on-port"),
                hex_mark(mark)
            )
        }
        "MARK" => format!("-j MARK --set-xmark {}/{all}", hex_mark(opt("--set-mark"))),
        "CONNMARK" => {
            let what = opts.first().copied().unwrap_or("");
            format!("-j CONNMARK {what} --nfmask {all} --ctmask {all}")
        }
        _ => std::iter::once(format!("-j {target}"))
            .chain(opts.iter().map(|s| s.to_string()))
            .collect::<Vec<_>>()
            .join(" "),
    };
    vec![t]
}

fn hex_mark(v: &str) -> String {
    v.parse::<u32>()
        .map(|n| format!("{n:#x}"))
        .unwrap_or_else(|_| v.to_owned())
}

/// An address as the kernel prints it: the network of a prefix, with its length.
fn addr(v: &str, family: Family) -> String {
    let (a, len) = v.split_once('/').unwrap_or((v, ""));
    let Ok(ip) = a.parse::<IpAddr>() else {
        return v.to_owned();
    };
    let max = match family {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    let len: u32 = len.parse().unwrap_or(max);
    let net = match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::from((u32::from(v4) & m).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::from((u128::from(v6) & m).to_be_bytes())
        }
    };
    format!("{net}/{len}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &str) -> String {
        let v: Vec<String> = p.split_whitespace().map(str::to_owned).collect();
        save_params(&v, Family::V4)
    }

    #[test]
    fn save_form_of_istios_parameters() {
        let cases = [
            (
                "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
                "! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            ),
            (
                "-o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
                "! -d 127.0.0.1/32 -o lo -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            ),
            (
                "-p udp --dport 53 -j REDIRECT --to-port 15053",
                "-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
            ),
            (
                "! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
                "! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff",
            ),
            (
                "-p tcp -i lo -m mark ! --mark 1338 -j RETURN",
                "-i lo -p tcp -m mark ! --mark 0x53a -j RETURN",
            ),
            (
                "-p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
                "-p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            ),
            ("-d 10.1.2.3/8 -j RETURN", "-d 10.0.0.0/8 -j RETURN"),
            (
                "-j MARK --set-mark 1337",
                "-j MARK --set-xmark 0x539/0xffffffff",
            ),
        ];
        for (istio, save) in cases {
            assert_eq!(s(istio), save, "{istio}");
        }
    }

    #[test]
    fn state_reads_every_rule_of_our_tables_only() {
        let text = "# x\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n\
                    *nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n\
                    -A ISTIO_OUTPUT -j RETURN\nCOMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(
            state_from_save(text),
            vec![(
                "nat".to_string(),
                vec![
                    ":ISTIO_OUTPUT".to_string(),
                    "-A ISTIO_OUTPUT -j RETURN".to_string(),
                    "-A OUTPUT -j ISTIO_OUTPUT".to_string()
                ]
            )]
        );
    }
}
