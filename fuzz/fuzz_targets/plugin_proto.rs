//! The plugin↔agent wire types (`ambient_cni.plugin.v1`) decoded from arbitrary
//! bytes: every message decodes or errors, and what decodes re-encodes stably.
#![no_main]

use ambient_cni_api::plugin as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let bytes = m.encode_to_vec();
        assert_eq!(bytes.len(), m.encoded_len());
        let back = M::decode(bytes.as_slice()).expect("re-encoded message decodes");
        assert_eq!(back, m);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<pb::AddRequest>(data);
    round_trip::<pb::AddResponse>(data);
    round_trip::<pb::DelRequest>(data);
    round_trip::<pb::DelResponse>(data);
    round_trip::<pb::CheckRequest>(data);
    round_trip::<pb::CheckResponse>(data);
    round_trip::<pb::StatusRequest>(data);
    round_trip::<pb::StatusResponse>(data);
    round_trip::<pb::GcRequest>(data);
    round_trip::<pb::GcResponse>(data);
});
