//! The plugin's whole invocation: `CNI_*` environment and stdin from the input,
//! a fake agent answering fixed data; every outcome must be the spec's.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = ambient_cni_fuzz::check_plugin(data) {
        panic!("plugin invariant broken: {broken}");
    }
});
