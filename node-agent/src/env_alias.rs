//! Istio's environment names for the agent's settings (from Istio's `cni/pkg/cmd/root.go` and
//! `cni/pkg/config`): resolved onto ours before the command line is parsed, so an istio-cni
//! DaemonSet's environment works unchanged. clap's `env` takes one name, hence this step.
//!
//! Our own name, when set, wins over Istio's. Istio settings we cannot honour are refused with
//! the variable's name and why.

/// Istio's name for the same setting under a plain rename (Istio's → ours).
const RENAMES: &[(&str, &str)] = &[
    ("CNI_AGENT_RUN_DIR", "RUN_DIR"),
    ("MOUNTED_CNI_NET_DIR", "CNI_CONF_DIR"),
    ("REPAIR_NODE_NAME", "NODE_NAME"),
    ("KUBERNETES_NODE_NAME", "NODE_NAME"),
];

/// Istio's log levels (its `--log_output_level` / `LOG_LEVEL` scope syntax) as `RUST_LOG` levels.
const ISTIO_LEVELS: &[(&str, &str)] = &[
    ("none", "off"),
    ("fatal", "error"),
    ("error", "error"),
    ("warn", "warn"),
    ("info", "info"),
    ("debug", "debug"),
];

/// The variables to set (ours, value), from a lookup of the environment.
pub fn resolve(get: impl Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>, String> {
    // Unset and empty are one for clap; Istio's empty list is a value, so look at presence.
    let set = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    let mut out: Vec<(String, String)> = Vec::new();
    let put = |ours: &str, value: String, out: &mut Vec<(String, String)>| {
        if set(ours).is_none() && !out.iter().any(|(n, _)| n == ours) {
            out.push((ours.to_string(), value));
        }
    };

    for (istio, ours) in RENAMES {
        if let Some(v) = set(istio) {
            put(ours, v, &mut out);
        }
    }

    if let Some(v) = set("CHAINED_CNI_PLUGIN") {
        if !go_bool("CHAINED_CNI_PLUGIN", &v)? {
            return Err(
                "CHAINED_CNI_PLUGIN=false: ambient-cni is always a chained plugin; \
                 standalone (Multus) mode is not supported"
                    .into(),
            );
        }
    }
    if let Some(v) = set("AMBIENT_ENABLED") {
        if !go_bool("AMBIENT_ENABLED", &v)? {
            return Err("AMBIENT_ENABLED=false: ambient-cni does ambient only \
                 (for sidecar mode keep istio-cni)"
                .into());
        }
    }
    if let Some(v) = set("MONITORING_PORT") {
        let port: u16 = v
            .trim()
            .parse()
            .map_err(|_| format!("MONITORING_PORT={v:?}: not a port number"))?;
        put("METRICS_ADDR", format!("0.0.0.0:{port}"), &mut out);
    }
    if let Some(v) = set("ISTIO_OWNED_CNI_CONFIG") {
        let owned = if go_bool("ISTIO_OWNED_CNI_CONFIG", &v)? {
            set("ISTIO_OWNED_CNI_CONFIG_FILENAME").unwrap_or_else(|| "true".into())
        } else {
            "false".into()
        };
        put("OWNED_CONF", owned, &mut out);
    }
    if let Some(v) = set("NATIVE_NFTABLES") {
        // false is Istio's default (iptables); ours (auto) picks by kernel, so only true maps.
        if go_bool("NATIVE_NFTABLES", &v)? {
            put("RULES_BACKEND", "nftables".into(), &mut out);
        }
    }

    // Istio's empty list excludes nothing; clap would read an empty variable as unset (our
    // default, kube-system), so it becomes our explicit "none".
    if get("EXCLUDE_NAMESPACES").is_some_and(|v| v.trim().is_empty()) {
        out.push(("EXCLUDE_NAMESPACES".into(), "-".into()));
    }
    if let Some(v) = set("LOG_LEVEL") {
        if let Some(level) = istio_log_level(&v) {
            out.push(("LOG_LEVEL".into(), level));
        }
    }
    // The chart gives `$(HOST_IP):PORT`; an IPv6 host IP needs brackets to be an address.
    for name in ["METRICS_ADDR", "HEALTH_ADDR"] {
        if let Some(v) = set(name) {
            if let Some(fixed) = bracket_ipv6(&v) {
                out.push((name.into(), fixed));
            }
        }
    }
    Ok(out)
}

/// Sets [`resolve`]'s variables in this process; call before parsing and before any thread.
pub fn apply() -> Result<(), String> {
    for (name, value) in resolve(|n| std::env::var(n).ok())? {
        std::env::set_var(name, value);
    }
    Ok(())
}

/// Go's `strconv.ParseBool`, as Istio's viper reads these.
fn go_bool(name: &str, v: &str) -> Result<bool, String> {
    match v.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{name}={v:?}: not a boolean")),
    }
}

/// Istio's scope syntax (`debug`, `default:debug,cni-agent:info`) as a `RUST_LOG` level: the
/// `default` scope's level (other scopes are Istio's names, not ours). `None` when the value is
/// not in Istio's syntax (it is ours, `RUST_LOG` syntax, and is kept).
fn istio_log_level(v: &str) -> Option<String> {
    let level = |l: &str| {
        ISTIO_LEVELS
            .iter()
            .find(|(i, _)| *i == l)
            .map(|(_, r)| (*r).to_string())
    };
    let items: Vec<&str> = v.split(',').map(str::trim).collect();
    // A bare level is the same word in both syntaxes except Istio's none/fatal.
    if let [one] = items.as_slice() {
        if !one.contains(':') {
            return matches!(*one, "none" | "fatal")
                .then(|| level(one))
                .flatten();
        }
    }
    let mut default = None;
    for item in &items {
        let (scope, l) = item.split_once(':')?;
        // `a::b=debug` (a Rust path) is ours.
        if scope.is_empty() || l.contains(':') || l.contains('=') {
            return None;
        }
        let l = level(l)?;
        if scope == "default" {
            default = Some(l);
        }
    }
    Some(default.unwrap_or_else(|| "info".into()))
}

/// `fd00::1:15014` → `[fd00::1]:15014`; `None` when already an address form.
fn bracket_ipv6(v: &str) -> Option<String> {
    if v.starts_with('[') || v.matches(':').count() < 2 {
        return None;
    }
    let (host, port) = v.rsplit_once(':')?;
    host.parse::<std::net::Ipv6Addr>().ok()?;
    Some(format!("[{host}]:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(env: &[(&str, &str)]) -> Result<Vec<(String, String)>, String> {
        resolve(|n| {
            env.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
    }

    fn set(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn istio_names_fill_in_ours() {
        // (environment, what is set)
        type Env<'a> = &'a [(&'a str, &'a str)];
        let table: &[(Env, Env)] = &[
            (&[], &[]),
            (
                &[("CNI_AGENT_RUN_DIR", "/var/run/istio-cni")],
                &[("RUN_DIR", "/var/run/istio-cni")],
            ),
            (
                &[("MOUNTED_CNI_NET_DIR", "/host/etc/cni/net.d")],
                &[("CNI_CONF_DIR", "/host/etc/cni/net.d")],
            ),
            (&[("REPAIR_NODE_NAME", "n1")], &[("NODE_NAME", "n1")]),
            (
                &[("KUBERNETES_NODE_NAME", "n2"), ("REPAIR_NODE_NAME", "n1")],
                &[("NODE_NAME", "n1")],
            ),
            (
                &[("MONITORING_PORT", "15020")],
                &[("METRICS_ADDR", "0.0.0.0:15020")],
            ),
            (
                &[("ISTIO_OWNED_CNI_CONFIG", "true")],
                &[("OWNED_CONF", "true")],
            ),
            (
                &[
                    ("ISTIO_OWNED_CNI_CONFIG", "true"),
                    ("ISTIO_OWNED_CNI_CONFIG_FILENAME", "02-istio-cni.conflist"),
                ],
                &[("OWNED_CONF", "02-istio-cni.conflist")],
            ),
            (
                &[("ISTIO_OWNED_CNI_CONFIG", "false")],
                &[("OWNED_CONF", "false")],
            ),
            (
                &[("NATIVE_NFTABLES", "true")],
                &[("RULES_BACKEND", "nftables")],
            ),
            (&[("NATIVE_NFTABLES", "false")], &[]),
            (&[("CHAINED_CNI_PLUGIN", "true")], &[]),
            (&[("AMBIENT_ENABLED", "true")], &[]),
            // Ours wins over Istio's.
            (&[("CNI_AGENT_RUN_DIR", "/a"), ("RUN_DIR", "/b")], &[]),
            (
                &[("MONITORING_PORT", "1"), ("METRICS_ADDR", "127.0.0.1:2")],
                &[],
            ),
            (
                &[("NATIVE_NFTABLES", "1"), ("RULES_BACKEND", "iptables")],
                &[],
            ),
            // An empty Istio value counts as unset.
            (&[("CNI_AGENT_RUN_DIR", "")], &[]),
        ];
        for (env, want) in table {
            assert_eq!(run(env).unwrap(), set(want), "{env:?}");
        }
    }

    #[test]
    fn an_empty_exclude_list_excludes_nothing_as_in_istio() {
        for (env, want) in [
            ("", Some("-")),
            ("  ", Some("-")),
            ("kube-system", None),
            (",", None), // ours already reads it as no namespace
        ] {
            let got = run(&[("EXCLUDE_NAMESPACES", env)]).unwrap();
            let want = want
                .map(|w| set(&[("EXCLUDE_NAMESPACES", w)]))
                .unwrap_or_default();
            assert_eq!(got, want, "{env:?}");
        }
        // Unset: our default (kube-system, as Istio's chart sets it).
        assert_eq!(run(&[]).unwrap(), vec![]);
    }

    #[test]
    fn istio_log_levels_become_rust_log_levels() {
        for (v, want) in [
            ("info", None),
            ("debug", None),
            ("none", Some("off")),
            ("fatal", Some("error")),
            ("default:debug", Some("debug")),
            ("cni-agent:debug,default:warn", Some("warn")),
            ("cni-agent:debug", Some("info")),
            ("default:none", Some("off")),
            // Ours (RUST_LOG syntax) is kept.
            ("info,ambient_cni_agent::mesh=debug", None),
            ("ambient_cni_agent::mesh=debug", None),
            ("default:verbose", None),
        ] {
            let got = run(&[("LOG_LEVEL", v)]).unwrap();
            let want = want.map(|w| set(&[("LOG_LEVEL", w)])).unwrap_or_default();
            assert_eq!(got, want, "{v:?}");
        }
    }

    #[test]
    fn an_ipv6_host_ip_gets_brackets() {
        for (v, want) in [
            ("10.0.0.1:15014", None),
            ("[fd00::1]:15014", None),
            ("fd00::1:15014", Some("[fd00::1]:15014")),
            ("$(HOST_IP):15014", None),
        ] {
            let got = run(&[("METRICS_ADDR", v), ("HEALTH_ADDR", v)]).unwrap();
            let want = want
                .map(|w| set(&[("METRICS_ADDR", w), ("HEALTH_ADDR", w)]))
                .unwrap_or_default();
            assert_eq!(got, want, "{v:?}");
        }
    }

    #[test]
    fn what_we_cannot_honour_is_refused_by_name() {
        for (env, needle) in [
            (("CHAINED_CNI_PLUGIN", "false"), "CHAINED_CNI_PLUGIN=false"),
            (("AMBIENT_ENABLED", "false"), "AMBIENT_ENABLED=false"),
            (
                ("AMBIENT_ENABLED", "yes"),
                "AMBIENT_ENABLED=\"yes\": not a boolean",
            ),
            (
                ("MONITORING_PORT", "http"),
                "MONITORING_PORT=\"http\": not a port",
            ),
            (("MONITORING_PORT", "70000"), "MONITORING_PORT=\"70000\""),
            (
                ("ISTIO_OWNED_CNI_CONFIG", "on"),
                "ISTIO_OWNED_CNI_CONFIG=\"on\"",
            ),
        ] {
            let e = run(&[env]).unwrap_err();
            assert!(e.contains(needle), "{env:?}: {e}");
        }
    }
}
