//! The /proc scan's cgroup-file parser on arbitrary text: an answer is always a
//! canonical lower-case UUID, and it does not depend on blank lines.
#![no_main]

use ambient_cni_agent::discovery::cgroup::pod_uid;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let got = pod_uid(text);
    if let Ok(Some(uid)) = &got {
        assert_eq!(uid.len(), 36, "{uid}");
        for (i, c) in uid.chars().enumerate() {
            if [8, 13, 18, 23].contains(&i) {
                assert_eq!(c, '-', "{uid}");
            } else {
                assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{uid}");
            }
        }
    }
    // Blank lines are ignored: doubling every newline gives the same answer.
    let spaced = text.replace('\n', "\n\n");
    assert_eq!(pod_uid(&spaced), got, "blank lines changed the answer");
});
