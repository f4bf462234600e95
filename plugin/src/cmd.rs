//! The CNI commands: parse, decide, ask the agent, answer.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ambient_cni_api::plugin as pb;
use serde_json::Value;

use crate::agent::{Agent, AgentError};
use crate::conf::{LogLevel, NetConf};
use crate::decide::pass_through;
use crate::env::{parse_args, CniEnv, Command, PodArgs};
use crate::error::*;
use crate::fallback::Fallback;
use crate::log::Log;
use crate::result::CniResult;
use crate::version::{version_info, SpecVersion};

/// What the plugin prints: the result on success (maybe nothing), or an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Text for stdout.
    pub stdout: String,
    /// Process exit code (0 or 1).
    pub exit_code: i32,
}

/// Runs one invocation; `agent` is built lazily from the conf, so pass-through never dials.
pub fn run<A, F>(env: &CniEnv, stdin: &[u8], make_agent: F) -> Outcome
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    match dispatch(env, stdin, make_agent) {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(e) => {
            // The error speaks the conf's version when it has a usable one.
            let version = crate::conf::sniff_version(stdin)
                .filter(|v| SpecVersion::parse(v).is_ok())
                .unwrap_or_else(|| crate::version::IMPLEMENTED.to_owned());
            Outcome {
                stdout: e.to_json(&version),
                exit_code: 1,
            }
        }
    }
}

fn dispatch<A, F>(env: &CniEnv, stdin: &[u8], make_agent: F) -> Result<String, CniError>
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    if env.not_utf8.contains(&"CNI_COMMAND") {
        env.require_utf8()?;
    }
    let cmd = Command::parse(env.command.as_deref())?;
    if cmd == Command::Version {
        return Ok(version_info());
    }
    let conf = NetConf::parse(stdin)?;
    let min = match cmd {
        Command::Check => Some(SpecVersion::V040),
        Command::Status | Command::Gc => Some(SpecVersion::V110),
        _ => None,
    };
    if let Some(min) = min.filter(|m| conf.version < *m) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} does not support {cmd:?} (needs {} or later)",
                conf.version.as_str(),
                min.as_str()
            ),
        ));
    }
    if cmd != Command::Del {
        env.require_utf8()?;
    }
    env.require(cmd)?;
    let log = Log::new(conf.log_level);
    let pod = match env
        .require_utf8()
        .and_then(|()| parse_args(env.args.as_deref()))
    {
        Ok(pod) => pod,
        // DEL must succeed (the spec); without a pod identity there is nothing to tell the agent,
        // which also learns of deletions from its pod source.
        Err(e) if cmd == Command::Del => {
            log.log(
                LogLevel::Warn,
                "DEL: unusable CNI_ARGS or CNI_* variable, agent not told",
                &[("error", &e.msg)],
            );
            return Ok(String::new());
        }
        Err(e) => return Err(e),
    };
    match cmd {
        Command::Add => add(env, &conf, &pod, &log, make_agent),
        Command::Del => Ok(del(env, &conf, &pod, &log, make_agent)),
        Command::Check => check(env, &conf, &pod, make_agent),
        Command::Status => status(&conf, make_agent),
        Command::Gc => gc(&conf, make_agent),
        Command::Version => Ok(version_info()),
    }
}

fn attachment(env: &CniEnv) -> pb::Attachment {
    pb::Attachment {
        container_id: env.container_id.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
    }
}

fn pod_ref(pod: &PodArgs) -> pb::PodRef {
    pb::PodRef {
        namespace: pod.namespace.clone().unwrap_or_default(),
        name: pod.name.clone().unwrap_or_default(),
        uid: pod.uid.clone().unwrap_or_default(),
        infra_container_id: pod.infra_container_id.clone().unwrap_or_default(),
    }
}

fn version() -> i32 {
    pb::ProtocolVersion::ProtocolVersion1 as i32
}

/// `prevResult` decoded; required from 0.4.0 on.
fn prev_result(conf: &NetConf) -> Result<CniResult, CniError> {
    match &conf.prev_result {
        Some(v) => CniResult::decode(v),
        None if conf.version < SpecVersion::V040 => Ok(CniResult::empty()),
        None => Err(CniError::new(
            INVALID_CONFIG,
            "prevResult is required: ambient-cni must be chained after an interface plugin",
        )),
    }
}

/// `CNI_NETNS` must name a network namespace on ADD/CHECK: a regular (nsfs) file,
/// opened without blocking, whose kind the kernel reports as net. One stat, one
/// open and two cheap syscalls: this runs for every pod.
fn check_netns(path: &str) -> Result<(), CniError> {
    let invalid = |why: String| CniError::new(INVALID_ENV, format!("CNI_NETNS {path}: {why}"));
    let md = std::fs::metadata(Path::new(path)).map_err(|e| invalid(e.to_string()))?;
    // nsfs files stat as regular files; anything else (FIFO, device, dir) is never opened.
    if !md.file_type().is_file() {
        return Err(invalid("not a network namespace".into()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| invalid(e.to_string()))?;
    if fstatfs_type(&file).map_err(|e| invalid(e.to_string()))? != NSFS_MAGIC {
        return Err(invalid("not a network namespace (not nsfs)".into()));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        let what = match kind {
            libc::CLONE_NEWNS => "a mount namespace",
            libc::CLONE_NEWPID => "a pid namespace",
            libc::CLONE_NEWUSER => "a user namespace",
            _ => "another kind of namespace",
        };
        return Err(invalid(format!("not a network namespace ({what})")));
    }
    Ok(())
}

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// linux/nsfs.h `_IO(0xb7, 0x3)`: the `CLONE_NEW*` kind of an nsfs fd.
const NS_GET_NSTYPE: libc::c_ulong = 0xb7 << 8 | 0x3;

fn fstatfs_type(file: &std::fs::File) -> std::io::Result<i64> {
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: the fd is open and `buf` has room for a `struct statfs`.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it filled the struct.
    let st = unsafe { buf.assume_init() };
    // `f_type` is `long` with glibc and `unsigned long` with musl: cast for both.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

fn agent_error(e: AgentError) -> CniError {
    let code = match e {
        AgentError::Unavailable(_) | AgentError::Busy(_) | AgentError::Timeout(_) => {
            TRY_AGAIN_LATER
        }
        AgentError::Refused(_) => AGENT_REFUSED,
        AgentError::Protocol(_) => AGENT_PROTOCOL,
    };
    CniError::new(code, e.to_string())
}

fn add<A, F>(
    env: &CniEnv,
    conf: &NetConf,
    pod: &PodArgs,
    log: &Log,
    make_agent: F,
) -> Result<String, CniError>
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    let prev = prev_result(conf)?;
    let netns = env.netns.as_deref().unwrap_or_default();
    check_netns(netns)?;
    let output = prev.convert(conf.version).to_string();
    if let Some(reason) = pass_through(conf, pod) {
        log.log(
            LogLevel::Debug,
            "pass-through",
            &[("reason", &format!("{reason:?}"))],
        );
        return Ok(output);
    }
    let req = pb::AddRequest {
        protocol_version: version(),
        attachment: Some(attachment(env)),
        netns: netns.to_owned(),
        pod: Some(pod_ref(pod)),
        ips: prev.ips(),
    };
    let agent = make_agent(conf);
    let resp = match agent.add(req) {
        Ok(resp) => resp,
        // No answer at all: the agent's last decisions may still let a non-mesh pod start.
        Err(e @ (AgentError::Unavailable(_) | AgentError::Timeout(_))) => {
            return fallback(&agent, conf, pod, log, e, output)
        }
        Err(e) => return Err(log_add_error(log, pod, agent_error(e))),
    };
    match pb::Decision::try_from(resp.decision) {
        Ok(pb::Decision::Captured | pb::Decision::NotInMesh | pb::Decision::Sidecar) => Ok(output),
        _ => Err(CniError::new(
            AGENT_PROTOCOL,
            format!("node agent gave no decision (got {})", resp.decision),
        )),
    }
}

fn log_add_error(log: &Log, pod: &PodArgs, err: CniError) -> CniError {
    log.log(
        LogLevel::Error,
        "ADD failed",
        &[
            ("namespace", pod.namespace.as_deref().unwrap_or("")),
            ("pod", pod.name.as_deref().unwrap_or("")),
            ("error", &err.msg),
            ("details", &err.details),
        ],
    );
    err
}

/// ADD with the agent not answering: pass the pod through only on the agent's decisions
/// file (fresh, and naming the pod or its namespace), else fail closed; count either way.
fn fallback<A: Agent>(
    agent: &A,
    conf: &NetConf,
    pod: &PodArgs,
    log: &Log,
    err: AgentError,
    output: String,
) -> Result<String, CniError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Disabled means not even read.
    let file = if conf.decisions_max_age_s == 0 {
        Err("disabled".to_owned())
    } else {
        agent.decisions()
    };
    let verdict = crate::fallback::decide(file, now, conf.decisions_max_age_s, pod);
    let passed = matches!(verdict, Fallback::PassThrough(_));
    if let Err(e) = agent.record_fallback(passed) {
        log.log(LogLevel::Debug, "fallback not counted", &[("error", &e)]);
    }
    match verdict {
        Fallback::PassThrough(why) => {
            log.log(
                LogLevel::Warn,
                "agent did not answer: pod passed through on the agent's decisions file",
                &[
                    ("namespace", pod.namespace.as_deref().unwrap_or("")),
                    ("pod", pod.name.as_deref().unwrap_or("")),
                    ("reason", why),
                    ("error", &err.to_string()),
                ],
            );
            Ok(output)
        }
        Fallback::FailClosed(why) => Err(log_add_error(
            log,
            pod,
            agent_error(err).with_details(format!("failed closed: {why}")),
        )),
    }
}

fn del<A, F>(env: &CniEnv, conf: &NetConf, pod: &PodArgs, log: &Log, make_agent: F) -> String
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    if pass_through(conf, pod).is_some() {
        return String::new();
    }
    let req = pb::DelRequest {
        protocol_version: version(),
        attachment: Some(attachment(env)),
        netns: env.netns.clone().unwrap_or_default(),
        pod: Some(pod_ref(pod)),
    };
    // DEL never fails: the agent also learns of deletions from its pod source.
    if let Err(e) = make_agent(conf).del(req) {
        log.log(
            LogLevel::Warn,
            "DEL: could not tell the agent",
            &[("error", &e.to_string())],
        );
    }
    String::new()
}

fn check<A, F>(
    env: &CniEnv,
    conf: &NetConf,
    pod: &PodArgs,
    make_agent: F,
) -> Result<String, CniError>
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    prev_result(conf)?;
    let netns = env.netns.as_deref().unwrap_or_default();
    check_netns(netns)?;
    if pass_through(conf, pod).is_some() {
        return Ok(String::new());
    }
    let req = pb::CheckRequest {
        protocol_version: version(),
        attachment: Some(attachment(env)),
        netns: netns.to_owned(),
        pod: Some(pod_ref(pod)),
    };
    let resp = make_agent(conf).check(req).map_err(agent_error)?;
    if resp.ok {
        Ok(String::new())
    } else {
        Err(
            CniError::new(REDIRECTION_MISSING, "pod redirection is missing")
                .with_details(resp.message),
        )
    }
}

fn status<A, F>(conf: &NetConf, make_agent: F) -> Result<String, CniError>
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    // By default STATUS only vouches for our conf: containerd 2.x reports the node's network
    // not ready when STATUS fails, and the kubelet then evicts every pod on the node; an agent
    // outage must stay with the pods that need the agent (their ADDs fail closed, retried).
    if !conf.status_requires_agent {
        return Ok(String::new());
    }
    let resp = make_agent(conf)
        .status(pb::StatusRequest {
            protocol_version: version(),
        })
        .map_err(|e| CniError::new(NOT_AVAILABLE, e.to_string()))?;
    if resp.ready {
        Ok(String::new())
    } else {
        Err(CniError::new(NOT_AVAILABLE, "node agent not ready").with_details(resp.message))
    }
}

fn gc<A, F>(conf: &NetConf, make_agent: F) -> Result<String, CniError>
where
    A: Agent,
    F: FnOnce(&NetConf) -> A,
{
    let valid = match conf.raw.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|a| {
                let get = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
                match (get("containerID"), get("ifname")) {
                    (Some(container_id), Some(ifname)) => Ok(pb::Attachment {
                        container_id,
                        ifname,
                    }),
                    _ => Err(CniError::new(
                        INVALID_CONFIG,
                        "cni.dev/valid-attachments entries need containerID and ifname",
                    )),
                }
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(CniError::new(
                INVALID_CONFIG,
                "cni.dev/valid-attachments must be an array",
            ))
        }
    };
    make_agent(conf)
        .gc(pb::GcRequest {
            protocol_version: version(),
            valid_attachments: valid,
        })
        .map_err(agent_error)?;
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// An agent answering ADD with a fixed error and serving a fixed decisions file.
    struct Down {
        add: AgentError,
        file: Result<Vec<u8>, String>,
        read: Cell<bool>,
        counted: RefCell<Vec<bool>>,
    }

    impl Agent for &Down {
        fn add(&self, _: pb::AddRequest) -> Result<pb::AddResponse, AgentError> {
            Err(self.add.clone())
        }
        fn del(&self, _: pb::DelRequest) -> Result<pb::DelResponse, AgentError> {
            Err(self.add.clone())
        }
        fn check(&self, _: pb::CheckRequest) -> Result<pb::CheckResponse, AgentError> {
            Err(self.add.clone())
        }
        fn status(&self, _: pb::StatusRequest) -> Result<pb::StatusResponse, AgentError> {
            Err(self.add.clone())
        }
        fn gc(&self, _: pb::GcRequest) -> Result<pb::GcResponse, AgentError> {
            Err(self.add.clone())
        }
        fn decisions(&self) -> Result<Vec<u8>, String> {
            self.read.set(true);
            self.file.clone()
        }
        fn record_fallback(&self, pass_through: bool) -> Result<(), String> {
            self.counted.borrow_mut().push(pass_through);
            Ok(())
        }
    }

    fn file() -> Vec<u8> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        ambient_cni_api::decisions::Decisions {
            version: ambient_cni_api::decisions::VERSION,
            written_at: now,
            namespaces: vec![],
            pods: vec![ambient_cni_api::decisions::PodKey {
                namespace: "plain".into(),
                name: "web".into(),
                uid: "u1".into(),
            }],
        }
        .to_json()
    }

    fn env(cmd: &str) -> CniEnv {
        CniEnv {
            command: Some(cmd.into()),
            container_id: Some("c1".into()),
            netns: Some("/proc/self/ns/net".into()),
            ifname: Some("eth0".into()),
            args: Some("K8S_POD_NAMESPACE=plain;K8S_POD_NAME=web;K8S_POD_UID=u1".into()),
            not_utf8: vec![],
        }
    }

    const CONF: &str = r#"{"cniVersion":"1.1.0","name":"k","type":"ambient-cni","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.5/24"}]}"#;

    fn run_down(add: AgentError, extra: &str) -> (Outcome, bool, Vec<bool>) {
        let agent = Down {
            add,
            file: Ok(file()),
            read: Cell::new(false),
            counted: RefCell::new(vec![]),
        };
        let out = run(&env("ADD"), format!("{CONF}{extra}}}").as_bytes(), |_| {
            &agent
        });
        let counted = agent.counted.borrow().clone();
        (out, agent.read.get(), counted)
    }

    #[test]
    fn only_an_agent_that_does_not_answer_falls_back() {
        let code = |o: &Outcome| {
            serde_json::from_str::<Value>(&o.stdout).unwrap()["code"]
                .as_u64()
                .unwrap_or(0)
        };
        for e in [
            AgentError::Unavailable("refused".into()),
            AgentError::Timeout(5),
        ] {
            let (out, read, counted) = run_down(e.clone(), "");
            assert_eq!(out.exit_code, 0, "{e:?}: {}", out.stdout);
            assert!(read && counted == vec![true], "{e:?}");
        }
        // Turned off: the file is not even read; counted as failed closed.
        let (out, read, counted) = run_down(AgentError::Timeout(5), r#","decisions_max_age_s":0"#);
        assert_eq!((out.exit_code, code(&out)), (1, 11));
        assert!(!read && counted == vec![false]);
        // An answer is never second-guessed by the file.
        for (e, want) in [
            (AgentError::Busy("ztunnel not connected".into()), 11),
            (AgentError::Refused("no".into()), 100),
            (AgentError::Protocol("garbled".into()), 101),
        ] {
            let (out, read, counted) = run_down(e.clone(), "");
            assert_eq!((out.exit_code, code(&out)), (1, want), "{e:?}");
            assert!(!read && counted.is_empty(), "{e:?}");
        }
    }

    /// An agent answering every ADD with one decision.
    struct Decides(pb::Decision);

    impl Agent for &Decides {
        fn add(&self, _: pb::AddRequest) -> Result<pb::AddResponse, AgentError> {
            Ok(pb::AddResponse {
                decision: self.0 as i32,
                message: String::new(),
            })
        }
        fn del(&self, _: pb::DelRequest) -> Result<pb::DelResponse, AgentError> {
            Ok(pb::DelResponse {})
        }
        fn check(&self, _: pb::CheckRequest) -> Result<pb::CheckResponse, AgentError> {
            unreachable!()
        }
        fn status(&self, _: pb::StatusRequest) -> Result<pb::StatusResponse, AgentError> {
            unreachable!()
        }
        fn gc(&self, _: pb::GcRequest) -> Result<pb::GcResponse, AgentError> {
            unreachable!()
        }
        fn decisions(&self) -> Result<Vec<u8>, String> {
            unreachable!()
        }
        fn record_fallback(&self, _: bool) -> Result<(), String> {
            unreachable!()
        }
    }

    #[test]
    fn every_decision_but_unspecified_returns_prev_result() {
        let conf = format!("{CONF}}}");
        for (d, ok) in [
            (pb::Decision::Captured, true),
            (pb::Decision::NotInMesh, true),
            (pb::Decision::Sidecar, true),
            (pb::Decision::Unspecified, false),
        ] {
            let agent = Decides(d);
            let out = run(&env("ADD"), conf.as_bytes(), |_| &agent);
            let v: Value = serde_json::from_str(&out.stdout).unwrap();
            if ok {
                assert_eq!(out.exit_code, 0, "{d:?}: {}", out.stdout);
                assert_eq!(v["ips"][0]["address"], "10.0.0.5/24", "{d:?}");
            } else {
                assert_eq!((out.exit_code, v["code"].as_u64()), (1, Some(101)));
            }
        }
    }

    #[test]
    fn status_by_default_never_builds_an_agent() {
        let conf = r#"{"cniVersion":"1.1.0","name":"k","type":"ambient-cni"}"#;
        let out = run(&env("STATUS"), conf.as_bytes(), |_| -> &'static Down {
            panic!("STATUS dialled the agent")
        });
        assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
    }
}
