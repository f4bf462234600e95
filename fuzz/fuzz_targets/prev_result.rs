//! prevResult decoding and conversion between the 0.x and 1.x result formats.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = ambient_cni_fuzz::check_prev_result(data) {
        panic!("prevResult invariant broken: {broken}");
    }
});
