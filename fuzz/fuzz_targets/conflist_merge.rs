//! The installer's conflist edits on arbitrary config text: whatever is chained
//! is valid JSON with our entry current and last; removing it restores the text.
#![no_main]

use ambient_cni_install::merge::{self, ConfKind, EntryState};
use ambient_cni_install::PluginEntry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entry = PluginEntry::default();
    let _ = merge::plugin_types(text);
    let _ = merge::entry_state(text, &entry);
    for name in ["10-x.conflist", "10-x.conf"] {
        let Ok(kind) = merge::classify(name, text) else {
            continue;
        };
        let Ok(out) = merge::chain(kind, text, &entry) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("chained {kind:?} is not JSON ({e}): {out}"));
        assert_eq!(
            merge::classify("10-x.conflist", &out),
            Ok(ConfKind::List),
            "chained text is a loadable conflist: {out}"
        );
        assert_eq!(
            merge::entry_state(&out, &entry).ok(),
            Some(EntryState::Current),
            "entry current after chaining: {out}"
        );
        // Idempotent: a repair (insert again) of a chained file changes nothing.
        let again = merge::insert(&out, &entry).expect("re-insert");
        assert_eq!(again, out, "insert is idempotent");
        let removed = merge::remove(&out).expect("remove");
        assert_eq!(
            merge::entry_state(&removed, &entry).ok(),
            Some(EntryState::Absent)
        );
        if kind == ConfKind::List
            && merge::entry_state(text, &entry).ok() == Some(EntryState::Absent)
        {
            assert_eq!(removed, text, "remove(insert(x)) == x");
        }
        let _ = v;
    }
});
