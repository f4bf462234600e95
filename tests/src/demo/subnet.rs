//! The demo bridge's IPv4 subnet: parsing it and finding host routes it would clash with.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A parsed IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The address as given (host bits may be set).
    pub addr: std::net::Ipv4Addr,
    /// The prefix length, 0..=32.
    pub len: u8,
}

impl Prefix {
    /// Parses `A.B.C.D/N`; the error names the text.
    pub fn parse(s: &str) -> Result<Self> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("subnet {s}: expected A.B.C.D/N"))?;
        let addr = a
            .parse()
            .with_context(|| format!("subnet {s}: bad address"))?;
        let len: u8 = l
            .parse()
            .with_context(|| format!("subnet {s}: bad length"))?;
        if len > 32 {
            bail!("subnet {s}: length over 32");
        }
        Ok(Self { addr, len })
    }

    /// How many addresses it spans.
    pub fn size(self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    fn network(self, len: u8) -> u32 {
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        u32::from(self.addr) & mask
    }

    /// True if the two prefixes share an address.
    pub fn overlaps(self, other: Prefix) -> bool {
        let len = self.len.min(other.len);
        self.network(len) == other.network(len)
    }
}

/// The routes of `ip -4 -j route show table all` (its JSON text) whose destination
/// overlaps `subnet`, default routes aside, as `DST dev DEV`.
pub fn overlapping_routes(routes_json: &str, subnet: Prefix) -> Result<Vec<String>> {
    let routes: Value = serde_json::from_str(routes_json).context("ip -j route: not JSON")?;
    let mut hits = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        if dst == "default" {
            continue;
        }
        let p = if dst.contains('/') {
            Prefix::parse(dst)
        } else {
            Prefix::parse(&format!("{dst}/32"))
        };
        if let Ok(p) = p {
            if p.len > 0 && p.overlaps(subnet) {
                hits.push(format!("{dst} dev {}", r["dev"].as_str().unwrap_or("?")));
            }
        }
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap() {
        let p = |s| Prefix::parse(s).unwrap();
        assert!(p("10.200.0.0/24").overlaps(p("10.200.0.7/32")));
        assert!(p("10.200.0.0/24").overlaps(p("10.0.0.0/8")));
        assert!(!p("10.200.0.0/24").overlaps(p("10.201.0.0/24")));
        assert_eq!(p("10.200.0.0/24").size(), 256);
        for bad in ["10.0.0.0/33", "10.0.0.0", "10.0.0/24", "10.0.0.0/x"] {
            assert!(Prefix::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_clashing_routes_but_not_the_default() {
        let routes = r#"[
            {"dst": "default", "gateway": "10.0.0.1", "dev": "eth0"},
            {"dst": "10.200.0.0/16", "dev": "br0"},
            {"dst": "10.200.0.9", "dev": "tun0", "table": "local"},
            {"dst": "192.168.1.0/24", "dev": "eth1"}
        ]"#;
        let subnet = Prefix::parse("10.200.0.0/24").unwrap();
        assert_eq!(
            overlapping_routes(routes, subnet).unwrap(),
            ["10.200.0.0/16 dev br0", "10.200.0.9 dev tun0"]
        );
        assert!(overlapping_routes("not json", subnet).is_err());
    }
}
