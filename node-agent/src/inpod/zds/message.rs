//! ZDS messages: building requests, encoding them within the 1024-byte packet limit,
//! decoding ztunnel's hello and acks. Pure: no I/O.

use ambient_cni_api::zds::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
    MAX_MESSAGE_LEN,
};
use prost::Message;

use super::error::ZdsError;

/// An encoded request, ready for one `sendmsg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The protobuf bytes (at most [`MAX_MESSAGE_LEN`]).
    pub bytes: Vec<u8>,
    /// A short description for logs and errors, e.g. `AddWorkload uid=...`.
    pub what: String,
}

/// `AddWorkload` for a pod (the netns fd travels beside it).
pub fn add(uid: &str, info: WorkloadInfo) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info),
        })),
    }
}

/// `KeepWorkload`: only inside a snapshot, for a pod whose netns is unknown.
pub fn keep(uid: &str) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Keep(KeepWorkload {
            uid: uid.to_owned(),
        })),
    }
}

/// `DelWorkload` (uid is field 2 on the wire).
pub fn del(uid: &str) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Del(DelWorkload {
            uid: uid.to_owned(),
        })),
    }
}

/// `SnapshotSent`: exactly once per connection, after the snapshot.
pub fn snapshot_sent() -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::SnapshotSent(SnapshotSent {})),
    }
}

/// A one-line description of a request for logs.
pub fn describe(req: &WorkloadRequest) -> String {
    match &req.payload {
        Some(Payload::Add(a)) => format!("AddWorkload uid={}", a.uid),
        Some(Payload::Keep(k)) => format!("KeepWorkload uid={}", k.uid),
        Some(Payload::Del(d)) => format!("DelWorkload uid={}", d.uid),
        Some(Payload::SnapshotSent(_)) => "SnapshotSent".to_owned(),
        None => "empty WorkloadRequest".to_owned(),
    }
}

/// Encodes a request, refusing (before anything is sent) one over the packet limit.
pub fn encode(req: &WorkloadRequest) -> Result<Encoded, ZdsError> {
    let what = describe(req);
    let len = req.encoded_len();
    if len > MAX_MESSAGE_LEN {
        return Err(ZdsError::TooLarge { what, len });
    }
    Ok(Encoded {
        bytes: req.encode_to_vec(),
        what,
    })
}

/// Decodes ztunnel's first packet; returns the announced version.
pub fn decode_hello(buf: &[u8]) -> Result<Version, String> {
    let hello = ZdsHello::decode(buf).map_err(|e| format!("bad ZdsHello: {e}"))?;
    match Version::try_from(hello.version) {
        // 0 is protobuf's unset value: a hello that names no version is no hello.
        Ok(Version::NotUsed) => Err("ZdsHello without a version (0)".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("unknown ZDS version {}", hello.version)),
    }
}

/// Decodes an ack: `Ok(None)` for success, `Ok(Some(text))` for a nack.
pub fn decode_ack(buf: &[u8]) -> Result<Option<String>, String> {
    let resp = WorkloadResponse::decode(buf).map_err(|e| format!("bad WorkloadResponse: {e}"))?;
    match resp.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(None),
        Some(workload_response::Payload::Ack(ack)) => Ok(Some(ack.error)),
        None => Err("WorkloadResponse without payload".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_cni_api::zds::Ack;

    fn info(name: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "demo".into(),
            service_account: "default".into(),
        }
    }

    #[test]
    fn del_uses_field_two() {
        // WorkloadRequest.del = 2 (0x12), DelWorkload.uid = 2 (0x12).
        let e = encode(&del("u")).unwrap();
        assert_eq!(e.bytes, vec![0x12, 3, 0x12, 1, b'u']);
        assert_eq!(e.what, "DelWorkload uid=u");
    }

    #[test]
    fn keep_and_snapshot_sent_wire_bytes() {
        assert_eq!(
            encode(&keep("u")).unwrap().bytes,
            vec![0x2a, 3, 0x0a, 1, b'u']
        );
        assert_eq!(encode(&snapshot_sent()).unwrap().bytes, vec![0x1a, 0]);
    }

    #[test]
    fn add_round_trips() {
        let e = encode(&add("uid-1", info("web"))).unwrap();
        let back = WorkloadRequest::decode(e.bytes.as_slice()).unwrap();
        assert_eq!(back, add("uid-1", info("web")));
    }

    #[test]
    fn refuses_oversize_before_sending() {
        let long = "x".repeat(1000);
        let err = encode(&add("uid-1", info(&long))).unwrap_err();
        match &err {
            ZdsError::TooLarge { what, len } => {
                assert_eq!(what, "AddWorkload uid=uid-1");
                assert!(*len > MAX_MESSAGE_LEN);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("1024-byte limit"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn exactly_at_the_limit_is_accepted() {
        // Grow the name until the message is exactly 1024 bytes.
        let mut n = 900;
        loop {
            let req = add("u", info(&"x".repeat(n)));
            let len = req.encoded_len();
            if len == MAX_MESSAGE_LEN {
                assert!(encode(&req).is_ok());
                let over = add("u", info(&"x".repeat(n + 1)));
                assert!(encode(&over).is_err());
                break;
            }
            assert!(len < MAX_MESSAGE_LEN, "stepped over the limit at {n}");
            n += 1;
        }
    }

    #[test]
    fn decodes_acks_and_hello() {
        let ok = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack::default())),
        }
        .encode_to_vec();
        assert_eq!(decode_ack(&ok), Ok(None));
        let nack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: "boom".into(),
            })),
        }
        .encode_to_vec();
        assert_eq!(decode_ack(&nack), Ok(Some("boom".into())));
        assert!(decode_ack(&[]).is_err(), "no payload is a protocol error");
        assert!(decode_ack(&[0xff, 0xff]).is_err());
        let hello = ZdsHello {
            version: Version::V1 as i32,
        }
        .encode_to_vec();
        assert_eq!(decode_hello(&hello), Ok(Version::V1));
    }
}
