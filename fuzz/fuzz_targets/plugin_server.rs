//! The agent's plugin socket end to end in one process: arbitrary bytes sent as
//! the gRPC body of each plugin method to the real `plugin_server::serve`, with a
//! recording handler. The agent must answer (never hang or die), refuse what does
//! not decode or speaks another protocol version, and hand the handler exactly
//! what prost decodes.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ambient_cni_agent::plugin_server::{self, PodHandler};
use ambient_cni_api::plugin as pb;
use bytes::{Buf, BufMut};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// Sends and receives raw message bytes (no protobuf on the client side).
#[derive(Clone, Copy, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// What the handler was last handed, per method.
#[derive(Default)]
struct Recorder {
    last: Mutex<Option<Vec<u8>>>,
}

impl Recorder {
    fn put(&self, m: &impl Message) {
        *self.last.lock().unwrap() = Some(m.encode_to_vec());
    }
    fn take(&self) -> Option<Vec<u8>> {
        self.last.lock().unwrap().take()
    }
}

#[tonic::async_trait]
impl PodHandler for Recorder {
    async fn add(&self, req: pb::AddRequest) -> Result<pb::Decision, Status> {
        self.put(&req);
        Ok(pb::Decision::NotInMesh)
    }
    async fn del(&self, req: pb::DelRequest) -> Result<(), Status> {
        self.put(&req);
        Ok(())
    }
    async fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, Status> {
        self.put(&req);
        Ok(pb::CheckResponse {
            ok: true,
            message: String::new(),
        })
    }
    fn ready(&self) -> (bool, String) {
        (true, String::new())
    }
    async fn gc(&self, req: pb::GcRequest) -> Result<(), Status> {
        self.put(&req);
        Ok(())
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    recorder: Arc<Recorder>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("acni-fuzz-{}", std::process::id()));
        let sock = dir.join("plugin.sock");
        let recorder = Arc::new(Recorder::default());
        let uid = nix::unistd::geteuid().as_raw();
        let channel = rt.block_on(async {
            let listener = plugin_server::bind(&sock).expect("bind plugin socket");
            let h = recorder.clone();
            let metrics = Arc::new(plugin_server::metrics::PluginMetrics::new(
                &mut Default::default(),
            ));
            tokio::spawn(async move {
                let _ =
                    plugin_server::serve(listener, h, metrics, uid, std::future::pending()).await;
            });
            let path = sock.clone();
            Endpoint::from_static("http://agent.local")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .expect("connect")
        });
        World {
            rt,
            channel,
            recorder,
        }
    })
}

/// Whether `data` decodes as `M`, and its protocol version if so.
fn decodes<M: Message + Default>(data: &[u8], version: impl Fn(&M) -> i32) -> Option<(M, i32)> {
    M::decode(data).ok().map(|m| {
        let v = version(&m);
        (m, v)
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    let w = world();
    let (path, expect): (&'static str, Option<(Vec<u8>, i32)>) = match sel % 5 {
        0 => (
            "/ambient_cni.plugin.v1.Plugin/Add",
            decodes::<pb::AddRequest>(data, |m| m.protocol_version)
                .map(|(m, v)| (m.encode_to_vec(), v)),
        ),
        1 => (
            "/ambient_cni.plugin.v1.Plugin/Del",
            decodes::<pb::DelRequest>(data, |m| m.protocol_version)
                .map(|(m, v)| (m.encode_to_vec(), v)),
        ),
        2 => (
            "/ambient_cni.plugin.v1.Plugin/Check",
            decodes::<pb::CheckRequest>(data, |m| m.protocol_version)
                .map(|(m, v)| (m.encode_to_vec(), v)),
        ),
        3 => (
            "/ambient_cni.plugin.v1.Plugin/Status",
            decodes::<pb::StatusRequest>(data, |m| m.protocol_version)
                .map(|(_, v)| (Vec::new(), v)),
        ),
        _ => (
            "/ambient_cni.plugin.v1.Plugin/Gc",
            decodes::<pb::GcRequest>(data, |m| m.protocol_version)
                .map(|(m, v)| (m.encode_to_vec(), v)),
        ),
    };
    let body = data.to_vec();
    let mut grpc = tonic::client::Grpc::new(w.channel.clone());
    let res = w.rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(10), async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unknown(e.to_string()))?;
            grpc.unary(
                tonic::Request::new(body),
                PathAndQuery::from_static(path),
                Raw,
            )
            .await
        })
        .await
    });
    let res = res.expect("the agent answers a plugin request within 10 s");
    let seen = w.recorder.take();
    match expect {
        None => {
            let st = res.expect_err("undecodable request must be refused");
            assert_eq!(st.code(), Code::Internal, "{st:?}");
            assert!(seen.is_none(), "handler called with an undecodable request");
        }
        Some((_, v)) if v != pb::ProtocolVersion::ProtocolVersion1 as i32 => {
            let st = res.expect_err("foreign protocol version must be refused");
            assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
            assert!(st.message().contains("different releases"), "{st:?}");
            assert!(seen.is_none(), "handler called for a foreign version");
        }
        Some((bytes, _)) => {
            let resp = res.unwrap_or_else(|s| panic!("valid request refused: {s:?}"));
            if sel % 5 != 3 {
                assert_eq!(seen, Some(bytes), "handler got what prost decodes");
            }
            let _ = resp;
        }
    }
});
