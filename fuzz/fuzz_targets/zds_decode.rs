//! What ztunnel sends the agent (hello, acks) and what the agent sends ztunnel
//! (WorkloadRequest), decoded from arbitrary packets.
#![no_main]

use ambient_cni_agent::inpod::zds::message::{decode_ack, decode_hello, describe, encode};
use ambient_cni_api::zds::{WorkloadRequest, MAX_MESSAGE_LEN};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // A packet is at most 1024 bytes on the wire; the decoders must not care.
    let _ = decode_hello(data);
    if let Ok(Some(nack)) = decode_ack(data) {
        assert!(!nack.is_empty(), "a nack carries its error text");
    }
    if let Ok(req) = WorkloadRequest::decode(data) {
        let _ = describe(&req);
        match encode(&req) {
            Ok(enc) => {
                assert!(enc.bytes.len() <= MAX_MESSAGE_LEN);
                let back = WorkloadRequest::decode(enc.bytes.as_slice())
                    .expect("our own encoding decodes");
                assert_eq!(back, req, "encode/decode round trip");
            }
            Err(e) => assert!(
                req.encoded_len() > MAX_MESSAGE_LEN,
                "refused below the limit: {e}"
            ),
        }
    }
});
