//! Small pure parsers for `/proc/<pid>` files.

/// `starttime` (field 22 of `/proc/<pid>/stat`, clock ticks since boot).
///
/// `comm` (field 2) may contain spaces and parentheses, so fields are counted
/// from the *last* `)`.
pub fn starttime(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is index 0, so field 22 is index 19.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// True for a `/proc` entry name that is a process id.
pub fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_nasty_comm() {
        let plain = "1234 (sleep) S 1 1234 1234 0 -1 4194304 94 0 0 0 0 0 0 0 20 0 1 0 987654 5816320 196 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(starttime(plain), Some(987654));
        let nasty =
            "99 (a) b (c) d) R 1 99 99 0 -1 4194304 94 0 0 0 0 0 0 0 20 0 1 0 42 5816320 196";
        assert_eq!(starttime(nasty), Some(42));
        assert_eq!(starttime("99 (x) R 1 2"), None);
        assert_eq!(starttime("garbage"), None);
    }

    #[test]
    fn pid_names() {
        assert!(is_pid("1"));
        assert!(is_pid("4242"));
        assert!(!is_pid("self"));
        assert!(!is_pid(""));
        assert!(!is_pid("12a"));
    }

    #[test]
    fn own_stat_parses() {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(starttime(&s).is_some());
    }
}
