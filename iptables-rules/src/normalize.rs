//! Normalizers for what the kernel prints back (`iptables-save`, `nft list ruleset`) and
//! for Istio's hand-written nft text, so faithful comparisons ignore counters, handles,
//! comments and spelling variants.

/// Our state in `iptables-save` output: per table (sorted), `:ISTIO_*` chain declarations
/// and every rule in or jumping to an `ISTIO_*` chain, counters stripped, sorted by
/// chain (rule order within a chain kept). Tables without our state are omitted.
pub fn iptables_save(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut cur: Option<(String, Vec<String>)> = None;
    for raw in text.lines() {
        let line = strip_counters(raw.trim());
        if let Some(t) = line.strip_prefix('*') {
            cur = Some((t.trim().to_string(), Vec::new()));
        } else if line == "COMMIT" {
            if let Some((t, lines)) = cur.take() {
                if !lines.is_empty() {
                    out.push((t, sort_save_lines(lines)));
                }
            }
        } else if let Some(decl) = line.strip_prefix(":ISTIO_") {
            if let (Some(c), Some(cur)) = (decl.split_whitespace().next(), cur.as_mut()) {
                cur.1.push(format!(":ISTIO_{c}"));
            }
        } else if line.starts_with("-A ") && line.contains("ISTIO_") {
            if let Some(cur) = cur.as_mut() {
                cur.1.push(line.to_string());
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whole `iptables-save` output without comments and counters, for before/after equality.
pub fn iptables_save_all(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let l = strip_counters(l);
            // Chain policy lines carry `[packets:bytes]`.
            match l.find(" [") {
                Some(i) if l.starts_with(':') => l[..i].to_string(),
                _ => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Chain declarations (sorted) then rules stably sorted by chain name.
pub fn sort_save_lines(lines: Vec<String>) -> Vec<String> {
    let (mut decls, mut rules): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|l| l.starts_with(':'));
    decls.sort();
    rules.sort_by(|a, b| chain_of(a).cmp(chain_of(b)));
    decls.extend(rules);
    decls
}

fn chain_of(rule: &str) -> &str {
    rule.split_whitespace().nth(1).unwrap_or("")
}

/// Drops a leading `[packets:bytes] ` (from `iptables-save -c`).
fn strip_counters(line: &str) -> &str {
    if line.starts_with('[') {
        if let Some(i) = line.find("] ") {
            return &line[i + 2..];
        }
    }
    line
}

/// Istio's nft transaction text in one spelling: single spaces, `&` for `and`,
/// `mark` for `meta mark`, `skuid` for `meta skuid`, no blank lines.
pub fn nft_text(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.replace(" and ", " & ")
                .replace("meta mark", "mark")
                .replace("meta skuid", "skuid")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `nft list ruleset` output without handles and counter values.
pub fn nft_list(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = match l.find(" # handle") {
                Some(i) => &l[..i],
                None => l,
            };
            strip_nft_counter(l.trim_end())
        })
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn strip_nft_counter(l: &str) -> String {
    let toks: Vec<&str> = l.split(' ').collect();
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == "packets" || toks[i] == "bytes" {
            i += 2;
            continue;
        }
        out.push(toks[i]);
        i += 1;
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_keeps_only_ours_and_strips_counters() {
        let text = "# Generated\n*nat\n:PREROUTING ACCEPT [3:4]\n:ISTIO_PRERT - [0:0]\n[1:2] -A PREROUTING -j ISTIO_PRERT\n-A PREROUTING -j KUBE\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(
            iptables_save(text),
            vec![(
                "nat".to_string(),
                vec![
                    ":ISTIO_PRERT".to_string(),
                    "-A PREROUTING -j ISTIO_PRERT".to_string()
                ]
            )]
        );
    }

    #[test]
    fn nft_list_drops_handles_and_counters() {
        assert_eq!(
            nft_list("\t\tip saddr 1.2.3.4 counter packets 5 bytes 300 accept # handle 7\n"),
            "\t\tip saddr 1.2.3.4 counter accept"
        );
    }

    #[test]
    fn nft_text_unifies_spellings() {
        assert_eq!(
            nft_text("x mark and 0xfff  != 0x539 y\n\n"),
            "x mark & 0xfff != 0x539 y"
        );
        assert_eq!(
            nft_text("meta mark & 0xfff == 0x539 meta skuid 1"),
            "mark & 0xfff == 0x539 skuid 1"
        );
    }
}
