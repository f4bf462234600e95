//! The policy route on its blocking netlink socket (root): install is idempotent, removal
//! takes exactly what install added, and both run in one fresh netns per test thread.

mod common;

use iptables_rules::route::{self, RouteState};

#[test]
fn install_twice_then_remove_twice() {
    if !common::root_or_skip("route") {
        return;
    }
    common::in_fresh_netns(|| {
        assert!(route::state().unwrap().is_empty());
        for ipv6 in [false, true] {
            route::install(ipv6).unwrap();
            // Again: the route is replaced, the existing rule (EEXIST) kept.
            route::install(ipv6).unwrap();
            let st = route::state().unwrap();
            assert!(
                st.is_complete(ipv6, route::ipv6_route_wanted(ipv6)),
                "{st:?}"
            );
            route::remove().unwrap();
            assert_eq!(route::state().unwrap(), RouteState::default());
            // Absent is fine.
            route::remove().unwrap();
        }
    });
}

/// Sidecar TPROXY's route has no preference of its own: the kernel would give each add a
/// new one, so a repeated or partial install must not stack a second rule.
#[test]
fn tproxy_route_without_a_preference_never_stacks_rules() {
    use iptables_rules::sidecar::route as tproxy;
    if !common::root_or_skip("route") {
        return;
    }
    common::in_fresh_netns(|| {
        let rules = || {
            let out = std::process::Command::new("ip")
                .args(["-4", "rule", "list"])
                .output()
                .expect("exec ip");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("lookup 133"))
                .count()
        };
        tproxy::install(false).unwrap();
        tproxy::install(false).unwrap();
        assert_eq!(rules(), 1);
        assert!(tproxy::is_complete(false).unwrap());
        // The route alone went missing: install puts it back, the rule stays single.
        let del = std::process::Command::new("ip")
            .args([
                "route",
                "del",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "133",
            ])
            .status()
            .expect("exec ip");
        assert!(del.success());
        assert!(!tproxy::is_complete(false).unwrap());
        tproxy::install(false).unwrap();
        assert_eq!(rules(), 1);
        assert!(tproxy::is_complete(false).unwrap());
        tproxy::remove().unwrap();
        assert_eq!(rules(), 0);
        assert_eq!(tproxy::state().unwrap(), RouteState::default());
    });
}
