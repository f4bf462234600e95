//! `prevResult` decoding and conversion between result formats.
//!
//! Two formats exist: 0.3.0/0.3.1/0.4.0 (each IP has `version`, interfaces carry
//! only name/mac/sandbox) and 1.0.0/1.1.0 (no `version`; interfaces may carry
//! `mtu`, `socketPath`, `pciID`). Conversion follows libcni's, on JSON values so
//! everything else passes through unchanged.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::error::{CniError, DECODE};
use crate::version::SpecVersion;

/// Interface keys the 0.x result format has.
const LEGACY_INTERFACE_KEYS: [&str; 3] = ["name", "mac", "sandbox"];

/// A decoded, validated result.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    obj: Map<String, Value>,
}

fn bad(msg: impl Into<String>) -> CniError {
    CniError::new(DECODE, format!("cannot decode prevResult: {}", msg.into()))
}

/// Parses "addr/prefix" into the address.
fn parse_cidr(s: &str) -> Option<IpAddr> {
    let (addr, prefix) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(ip)
}

fn array_of_objects<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Vec<&'a Map<String, Value>>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_object()
                    .ok_or_else(|| bad(format!("{key} entries must be objects")))
            })
            .collect(),
        Some(_) => Err(bad(format!("{key} must be an array"))),
    }
}

impl CniResult {
    /// Validates a raw `prevResult` value.
    pub fn decode(value: &Value) -> Result<Self, CniError> {
        let obj = value
            .as_object()
            .ok_or_else(|| bad("not a JSON object"))?
            .clone();
        let interfaces = array_of_objects(&obj, "interfaces")?;
        for ip in array_of_objects(&obj, "ips")? {
            let addr = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("an ip has no address"))?;
            let parsed =
                parse_cidr(addr).ok_or_else(|| bad(format!("invalid address {addr:?}")))?;
            if let Some(gw) = ip.get("gateway").filter(|g| !g.is_null()) {
                gw.as_str()
                    .and_then(|g| g.parse::<IpAddr>().ok())
                    .ok_or_else(|| bad(format!("invalid gateway {gw}")))?;
            }
            if let Some(v) = ip.get("version") {
                let want = if parsed.is_ipv4() { "4" } else { "6" };
                if v.as_str() != Some(want) {
                    return Err(bad(format!("ip {addr} has version {v}, expected {want:?}")));
                }
            }
            if let Some(idx) = ip.get("interface").filter(|i| !i.is_null()) {
                let i = idx
                    .as_u64()
                    .ok_or_else(|| bad(format!("interface index {idx} is not a number")))?;
                if i as usize >= interfaces.len() {
                    return Err(bad(format!("interface index {i} out of range")));
                }
            }
        }
        for route in array_of_objects(&obj, "routes")? {
            route
                .get("dst")
                .and_then(Value::as_str)
                .and_then(parse_cidr)
                .ok_or_else(|| bad("a route has no valid dst"))?;
        }
        if let Some(dns) = obj.get("dns").filter(|d| !d.is_null()) {
            dns.as_object()
                .ok_or_else(|| bad("dns must be an object"))?;
        }
        Ok(Self { obj })
    }

    /// An empty result (for a 0.3.x ADD with no prevResult).
    pub fn empty() -> Self {
        Self { obj: Map::new() }
    }

    /// The IP addresses, as CIDR strings.
    pub fn ips(&self) -> Vec<String> {
        array_of_objects(&self.obj, "ips")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|ip| ip.get("address").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// The result converted to `version`, as JSON text.
    pub fn convert(&self, version: SpecVersion) -> Value {
        let mut obj = self.obj.clone();
        obj.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if let Some(Value::Array(ips)) = obj.get_mut("ips") {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if version.is_legacy_result() {
                    let v4 = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(parse_cidr)
                        .is_some_and(|a| a.is_ipv4());
                    ip.insert(
                        "version".into(),
                        Value::String(if v4 { "4" } else { "6" }.into()),
                    );
                } else {
                    ip.remove("version");
                }
            }
        }
        if version.is_legacy_result() {
            if let Some(Value::Array(ifs)) = obj.get_mut("interfaces") {
                for i in ifs.iter_mut().filter_map(Value::as_object_mut) {
                    i.retain(|k, _| LEGACY_INTERFACE_KEYS.contains(&k.as_str()));
                }
            }
        }
        Value::Object(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec's example result (1.1.0, trimmed to what bridge + host-local produce).
    fn spec_example_1x() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue", "mtu": 1500}
            ],
            "ips": [
                {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2},
                {"address": "2001:db8::5/64", "gateway": "2001:db8::1", "interface": 2}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    /// Fuzz finding (fuzz/regressions/prev_result/huge-number.json): a number beyond f64's
    /// exact range in prevResult decodes, converts to every version and prints valid JSON.
    #[test]
    fn huge_number_in_prev_result_converts() {
        let text = include_str!("../../fuzz/regressions/prev_result/huge-number.json");
        let v: Value = serde_json::from_str(text).unwrap();
        let r = CniResult::decode(&v).unwrap();
        for ver in [SpecVersion::V040, SpecVersion::parse("1.1.0").unwrap()] {
            let out = r.convert(ver);
            let back: Value = serde_json::from_str(&out.to_string()).unwrap();
            // Not compared for equality: serde_json's float parsing may land 1 ulp off.
            assert_eq!(CniResult::decode(&back).unwrap().ips(), r.ips());
        }
    }

    #[test]
    fn converts_1x_to_legacy_adding_versions_and_dropping_new_interface_keys() {
        let r = CniResult::decode(&spec_example_1x()).unwrap();
        let out = r.convert(SpecVersion::V040);
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["ips"][0]["version"], "4");
        assert_eq!(out["ips"][1]["version"], "6");
        assert!(out["interfaces"][2].get("mtu").is_none());
        assert_eq!(out["interfaces"][2]["sandbox"], "/var/run/netns/blue");
        assert_eq!(out["routes"], spec_example_1x()["routes"]);
        assert_eq!(out["dns"], spec_example_1x()["dns"]);
    }

    #[test]
    fn legacy_to_1x_drops_versions_and_round_trips() {
        let legacy = CniResult::decode(&spec_example_1x())
            .unwrap()
            .convert(SpecVersion::V031);
        let back = CniResult::decode(&legacy)
            .unwrap()
            .convert(SpecVersion::V100);
        assert!(back["ips"][0].get("version").is_none());
        assert_eq!(back["ips"], spec_example_1x()["ips"]);
        assert_eq!(back["cniVersion"], "1.0.0");
    }

    #[test]
    fn same_version_is_unchanged() {
        let v = spec_example_1x();
        assert_eq!(CniResult::decode(&v).unwrap().convert(SpecVersion::V110), v);
    }

    #[test]
    fn extracts_ips() {
        let r = CniResult::decode(&spec_example_1x()).unwrap();
        assert_eq!(r.ips(), vec!["10.1.0.5/16", "2001:db8::5/64"]);
    }

    #[test]
    fn malformed_results_are_code_6() {
        let cases = [
            json!("string"),
            json!({"ips": "x"}),
            json!({"ips": [{"gateway": "10.0.0.1"}]}),
            json!({"ips": [{"address": "10.0.0.300/24"}]}),
            json!({"ips": [{"address": "10.0.0.3/33"}]}),
            json!({"ips": [{"address": "10.0.0.3/24", "version": "6"}]}),
            json!({"ips": [{"address": "10.0.0.3/24", "interface": 3}]}),
            json!({"ips": [{"address": "10.0.0.3/24", "gateway": "nope"}]}),
            json!({"routes": [{"gw": "10.0.0.1"}]}),
            json!({"interfaces": [1]}),
            json!({"dns": []}),
        ];
        for c in cases {
            assert_eq!(CniResult::decode(&c).unwrap_err().code, 6, "{c}");
        }
    }
}
