//! An in-process fake Kubernetes API server for the Kube pod source and status writer tests.
//!
//! It speaks the real wire format over HTTP/1.1 on 127.0.0.1, so the real `kube::Client`
//! and `kube::runtime::watcher` drive it: lists (`{"kind":"PodList",...,"metadata":
//! {"resourceVersion":..}}`), chunked watch streams of `{"type":"ADDED",...}` lines from a
//! resourceVersion (replaying history, `410 Gone` as an ERROR event when the history is
//! compacted), BOOKMARK events, GET, merge-patch of `pods/status`, and event creation. Tests
//! script faults: a dropped watch connection, an expired resourceVersion, a restart.
//! Every request is logged for assertions.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

impl Request {
    /// A query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// True for a watch request.
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true") | Some("1"))
    }
}

enum Msg {
    Line(String),
    /// Ends the stream properly (after an ERROR event).
    End,
    /// Closes the connection mid-stream.
    Drop,
}

struct Watch {
    kind: String,
    selector: Option<(String, String)>,
    tx: mpsc::UnboundedSender<Msg>,
}

#[derive(Default)]
struct Collection {
    /// key ("ns/name" or "name") → object.
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, type, object) of every change since `compacted`.
    history: Vec<(u64, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: BTreeMap<String, Collection>,
    watches: Vec<Watch>,
    requests: Vec<Request>,
}

/// The fake API server.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(h) = self.accept.lock().unwrap().take() {
            h.abort();
        }
    }
}

fn key_of(obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "pods" => "Pod",
        "namespaces" => "Namespace",
        "events" => "Event",
        _ => "Unknown",
    }
}

/// `spec.nodeName=node-1` → (path, value).
fn parse_selector(s: &str) -> Option<(String, String)> {
    let (path, value) = s.split_once('=')?;
    Some((path.trim_end_matches('=').to_owned(), value.to_owned()))
}

fn selected(obj: &Value, sel: &Option<(String, String)>) -> bool {
    let Some((path, want)) = sel else { return true };
    let mut v = obj;
    for part in path.split('.') {
        v = &v[part];
    }
    v.as_str().unwrap_or_default() == want
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(c) => {
                        out.push(c);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl State {
    fn coll(&mut self, kind: &str) -> &mut Collection {
        self.collections.entry(kind.to_owned()).or_default()
    }

    /// Records a change and (unless `quiet`) sends it to the live watches.
    fn record(&mut self, kind: &str, ty: &'static str, obj: Value, quiet: bool) {
        let rv = self.rv;
        self.coll(kind).history.push((rv, ty, obj.clone()));
        if quiet {
            return;
        }
        let line = json!({"type": ty, "object": obj}).to_string();
        self.watches.retain(|w| {
            if w.kind != kind || !selected(&obj, &w.selector) {
                return true;
            }
            w.tx.send(Msg::Line(line.clone())).is_ok()
        });
    }

    fn put(&mut self, kind: &str, mut obj: Value, quiet: bool) -> Value {
        self.rv += 1;
        obj["kind"] = json!(kind_name(kind));
        obj["apiVersion"] = json!("v1");
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{}", key_of(&obj).replace('/', "-")));
        }
        let key = key_of(&obj);
        let ty = if self.coll(kind).objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.coll(kind).objects.insert(key, obj.clone());
        self.record(kind, ty, obj.clone(), quiet);
        obj
    }

    fn delete(&mut self, kind: &str, key: &str, quiet: bool) -> Option<Value> {
        let mut obj = self.coll(kind).objects.remove(key)?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(kind, "DELETED", obj.clone(), quiet);
        Some(obj)
    }

    fn end_watches(&mut self, kind: &str, last: Option<String>, msg: fn() -> Msg) {
        self.watches.retain(|w| {
            if w.kind != kind {
                return true;
            }
            if let Some(l) = &last {
                let _ = w.tx.send(Msg::Line(l.clone()));
            }
            let _ = w.tx.send(msg());
            false
        });
    }
}

impl FakeApi {
    /// Starts a fake on a free loopback port.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let h = tokio::spawn(accept_loop(listener, state.clone()));
        FakeApi {
            addr,
            state,
            accept: Mutex::new(Some(h)),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A real kube client talking to this fake over plain HTTP.
    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object ("pods", "namespaces"); returns it as stored.
    pub fn put(&self, kind: &str, obj: Value) -> Value {
        self.lock().put(kind, obj, false)
    }

    /// Like `put`, but live watches miss it (as if the event was lost with a broken watch).
    pub fn put_quiet(&self, kind: &str, obj: Value) -> Value {
        self.lock().put(kind, obj, true)
    }

    /// Deletes `key` ("ns/name" or "name"); returns the last object.
    pub fn delete(&self, kind: &str, key: &str) -> Value {
        self.lock()
            .delete(kind, key, false)
            .expect("no such object")
    }

    /// Like `delete`, but live watches miss it.
    pub fn delete_quiet(&self, kind: &str, key: &str) -> Value {
        self.lock().delete(kind, key, true).expect("no such object")
    }

    /// The stored object.
    pub fn get(&self, kind: &str, key: &str) -> Option<Value> {
        self.lock().coll(kind).objects.get(key).cloned()
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.lock().rv
    }

    /// Sends a BOOKMARK at the current resourceVersion to the live watches of `kind`.
    pub fn bookmark(&self, kind: &str) {
        let mut s = self.lock();
        let line =
            json!({"type": "BOOKMARK", "object": {"kind": kind_name(kind), "apiVersion": "v1",
            "metadata": {"resourceVersion": s.rv.to_string()}}})
            .to_string();
        s.watches
            .retain(|w| w.kind != kind || w.tx.send(Msg::Line(line.clone())).is_ok());
    }

    /// Forgets the history of `kind`: watches from an older resourceVersion get 410.
    pub fn compact(&self, kind: &str) {
        let mut s = self.lock();
        let rv = s.rv;
        let c = s.coll(kind);
        c.history.clear();
        c.compacted = rv;
    }

    /// Compacts, then ends the live watches of `kind` with a `410 Gone` ERROR event.
    pub fn expire(&self, kind: &str) {
        self.compact(kind);
        let mut s = self.lock();
        let err =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        s.end_watches(kind, Some(err.to_string()), || Msg::End);
    }

    /// Closes the live watch connections of `kind` mid-stream.
    pub fn drop_watches(&self, kind: &str) {
        self.lock().end_watches(kind, None, || Msg::Drop);
    }

    /// Number of live watches of `kind`.
    pub fn live_watches(&self, kind: &str) -> usize {
        let mut s = self.lock();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.iter().filter(|w| w.kind == kind).count()
    }

    /// Goes away (listener closed, every watch dropped) for `down`, then comes back on the same port.
    pub async fn restart(&self, down: Duration) {
        let accept = self.accept.lock().unwrap().take();
        if let Some(h) = accept {
            h.abort();
            let _ = h.await;
        }
        {
            let mut s = self.lock();
            for w in s.watches.drain(..) {
                let _ = w.tx.send(Msg::Drop);
            }
        }
        tokio::time::sleep(down).await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        *self.accept.lock().unwrap() =
            Some(tokio::spawn(accept_loop(listener, self.state.clone())));
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// List (not watch) requests on a collection path such as `/api/v1/pods`.
    pub fn lists(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path == path && !r.is_watch())
            .collect()
    }

    /// Watch requests on a collection path.
    pub fn watches(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path == path && r.is_watch())
            .collect()
    }

    /// Waits until `f` holds (polling), panicking after 10 s.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&FakeApi) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve(sock, state.clone()));
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let mut len = 0usize;
    let mut content_type = None;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "content-type" => content_type = Some(v.trim().to_owned()),
            "transfer-encoding" => {
                panic!("fake API server: chunked request bodies are not supported")
            }
            _ => {}
        }
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        content_type,
        body: if len > 0 {
            serde_json::from_slice(&body).ok()
        } else {
            None
        },
    })
}

async fn respond(sock: &mut TcpStream, code: u16, body: &Value) {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        415 => "Unsupported Media Type",
        _ => "Error",
    };
    let msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = sock.write_all(msg.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// A request path: (namespace, kind, name, subresource).
type Route<'a> = (Option<&'a str>, &'a str, Option<&'a str>, Option<&'a str>);

/// Splits `/api/v1/...` into its route.
fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/api/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    Some(match parts.as_slice() {
        [kind] => (None, *kind, None, None),
        ["namespaces", name] => (None, "namespaces", Some(*name), None),
        ["namespaces", ns, kind] => (Some(*ns), *kind, None, None),
        ["namespaces", ns, kind, name] => (Some(*ns), *kind, Some(*name), None),
        ["namespaces", ns, kind, name, sub] => (Some(*ns), *kind, Some(*name), Some(*sub)),
        _ => return None,
    })
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let Some(req) = read_request(&mut sock).await else {
        return;
    };
    state.lock().unwrap().requests.push(req.clone());
    let Some((ns, kind, name, sub)) = route(&req.path) else {
        return respond(&mut sock, 404, &status(404, "NotFound", "no such path")).await;
    };
    let key = |n: &str| match ns {
        Some(ns) if kind != "namespaces" => format!("{ns}/{n}"),
        _ => n.to_owned(),
    };
    match (req.method.as_str(), name, sub) {
        ("GET", None, None) if req.is_watch() => watch(sock, state, &req, kind, ns).await,
        ("GET", None, None) => {
            let sel = req.param("fieldSelector").and_then(parse_selector);
            let body = {
                let mut s = state.lock().unwrap();
                let rv = s.rv;
                let items: Vec<Value> = s
                    .coll(kind)
                    .objects
                    .values()
                    .filter(|o| ns.is_none_or(|n| o["metadata"]["namespace"] == n))
                    .filter(|o| selected(o, &sel))
                    .cloned()
                    .collect();
                json!({"kind": format!("{}List", kind_name(kind)), "apiVersion": "v1",
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items})
            };
            respond(&mut sock, 200, &body).await
        }
        ("GET", Some(n), None) => {
            let obj = state
                .lock()
                .unwrap()
                .coll(kind)
                .objects
                .get(&key(n))
                .cloned();
            match obj {
                Some(o) => respond(&mut sock, 200, &o).await,
                None => {
                    respond(
                        &mut sock,
                        404,
                        &status(404, "NotFound", &format!("{kind} \"{n}\" not found")),
                    )
                    .await
                }
            }
        }
        ("PATCH", Some(n), Some("status")) if kind == "pods" => {
            if req.content_type.as_deref() != Some("application/merge-patch+json") {
                return respond(
                    &mut sock,
                    415,
                    &status(415, "UnsupportedMediaType", "want a merge patch"),
                )
                .await;
            }
            let res =
                {
                    let mut s = state.lock().unwrap();
                    match s.coll(kind).objects.get(&key(n)).cloned() {
                        // A UID in the patch is a precondition (409 when it is not the pod's).
                        Some(o)
                            if req.body.as_ref().is_some_and(|p| {
                                p["metadata"]["uid"].is_string()
                                    && p["metadata"]["uid"] != o["metadata"]["uid"]
                            }) =>
                        {
                            Err(format!(
                            "Operation cannot be fulfilled on pods \"{n}\": Precondition failed: \
                             UID in precondition: {}, UID in object meta: {}",
                            req.body.as_ref().map_or(&Value::Null, |p| &p["metadata"]["uid"]),
                            o["metadata"]["uid"]
                        ))
                        }
                        Some(mut o) => {
                            // pods/status only takes metadata (annotations, labels) and status.
                            if let Some(p) = req.body.as_ref() {
                                for part in ["metadata", "status"] {
                                    if !p[part].is_null() {
                                        merge(&mut o[part], &p[part]);
                                    }
                                }
                            }
                            Ok(Some(s.put(kind, o, false)))
                        }
                        None => Ok(None),
                    }
                };
            match res {
                Ok(Some(o)) => respond(&mut sock, 200, &o).await,
                Err(msg) => respond(&mut sock, 409, &status(409, "Conflict", &msg)).await,
                Ok(None) => {
                    respond(
                        &mut sock,
                        404,
                        &status(404, "NotFound", &format!("pods \"{n}\" not found")),
                    )
                    .await
                }
            }
        }
        ("POST", None, None) if kind == "events" => {
            let mut obj = req.body.clone().unwrap_or(Value::Null);
            obj["metadata"]["namespace"] = json!(ns);
            let stored = state.lock().unwrap().put(kind, obj, false);
            respond(&mut sock, 201, &stored).await
        }
        _ => {
            respond(
                &mut sock,
                404,
                &status(404, "NotFound", "not implemented by the fake"),
            )
            .await
        }
    }
}

async fn watch(
    mut sock: TcpStream,
    state: Arc<Mutex<State>>,
    req: &Request,
    kind: &str,
    ns: Option<&str>,
) {
    let sel = req.param("fieldSelector").and_then(parse_selector);
    let from: u64 = req
        .param("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut s = state.lock().unwrap();
        let c = s.coll(kind);
        if from < c.compacted {
            let err = json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from} ({})", c.compacted))});
            let _ = tx.send(Msg::Line(err.to_string()));
            let _ = tx.send(Msg::End);
        } else {
            for (rv, ty, obj) in &c.history {
                let in_ns = ns.is_none_or(|n| obj["metadata"]["namespace"] == n);
                if *rv > from && in_ns && selected(obj, &sel) {
                    let _ = tx.send(Msg::Line(json!({"type": ty, "object": obj}).to_string()));
                }
            }
            s.watches.push(Watch {
                kind: kind.to_owned(),
                selector: sel,
                tx,
            });
        }
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Line(mut l) => {
                l.push('\n');
                let chunk = format!("{:x}\r\n{l}\r\n", l.len());
                if sock.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            Msg::End => {
                let _ = sock.write_all(b"0\r\n\r\n").await;
                let _ = sock.shutdown().await;
                return;
            }
            // Dropping the socket without the last chunk: the client sees a broken body.
            Msg::Drop => return,
        }
    }
}
