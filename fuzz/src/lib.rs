//! Shared pieces of the fuzz targets: the plugin-input format (environment lines,
//! a blank line, then stdin), a fake node agent answering fixed data, and the
//! invariants every plugin outcome must keep.
//!
//! Kept in a library so a crash input can be replayed from a unit test.

use std::cell::RefCell;

use ambient_cni::agent::{Agent, AgentError};
use ambient_cni::cmd::Outcome;
use ambient_cni::env::CniEnv;
use ambient_cni_api::plugin as pb;
use serde_json::Value;

/// What the fake agent answers every call with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// ADD: captured; CHECK: ok; STATUS: ready.
    Captured,
    /// ADD: not in mesh; CHECK: redirection missing; STATUS: not ready.
    NotInMesh,
    /// ADD answers a decision value outside the enum.
    BadDecision,
    /// Transport failure.
    Unavailable,
    /// Time budget exceeded.
    Timeout,
    /// The agent refused.
    Refused,
    /// The answer was not the protocol.
    Protocol,
}

impl Answer {
    fn parse(s: &str) -> Self {
        match s {
            "captured" => Self::Captured,
            "not_in_mesh" => Self::NotInMesh,
            "bad_decision" => Self::BadDecision,
            "unavailable" => Self::Unavailable,
            "timeout" => Self::Timeout,
            "refused" => Self::Refused,
            _ => Self::Protocol,
        }
    }

    fn error(self) -> Option<AgentError> {
        match self {
            Self::Unavailable => Some(AgentError::Unavailable("fuzz: gone".into())),
            Self::Timeout => Some(AgentError::Timeout(5)),
            Self::Refused => Some(AgentError::Refused("fuzz: no".into())),
            Self::Protocol => Some(AgentError::Protocol("fuzz: garbled".into())),
            _ => None,
        }
    }

    /// The CNI error code the plugin must print for this answer, if it is a failure.
    pub fn expected_code(self) -> Option<u64> {
        match self {
            Self::Unavailable | Self::Timeout => Some(11),
            Self::Refused => Some(100),
            Self::Protocol => Some(101),
            _ => None,
        }
    }
}

/// One decoded plugin invocation.
#[derive(Debug, Clone)]
pub struct PluginInput<'a> {
    /// The `CNI_*` environment.
    pub env: CniEnv,
    /// The fake agent's answer.
    pub answer: Answer,
    /// The bytes on stdin.
    pub stdin: &'a [u8],
}

/// Splits `data` into `KEY=VALUE` environment lines, a blank line, then stdin.
///
/// Keys: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` and
/// `FAKE` (the agent's answer). Without a blank line everything is stdin.
pub fn split_input(data: &[u8]) -> PluginInput<'_> {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (&data[..0], data),
    };
    let mut env = CniEnv::default();
    let mut answer = Answer::Captured;
    for line in head.split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        // Empty values count as unset, as `CniEnv::from_process` reads them.
        let val = (!v.is_empty()).then(|| v.to_owned());
        match k {
            "CNI_COMMAND" => env.command = val,
            "CNI_CONTAINERID" => env.container_id = val,
            "CNI_NETNS" => env.netns = val,
            "CNI_IFNAME" => env.ifname = val,
            "CNI_ARGS" => env.args = val,
            "FAKE" => answer = Answer::parse(v),
            _ => {}
        }
    }
    PluginInput { env, answer, stdin }
}

/// A request the fake agent saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// ADD.
    Add(pb::AddRequest),
    /// DEL.
    Del(pb::DelRequest),
    /// CHECK.
    Check(pb::CheckRequest),
    /// STATUS.
    Status,
    /// GC.
    Gc(pb::GcRequest),
}

/// An agent answering fixed data and recording what it was asked.
#[derive(Debug)]
pub struct FakeAgent {
    answer: Answer,
    seen: RefCell<Vec<Seen>>,
}

impl FakeAgent {
    /// A fake answering `answer`.
    pub fn new(answer: Answer) -> Self {
        Self {
            answer,
            seen: RefCell::new(Vec::new()),
        }
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.borrow().clone()
    }

    fn record<T>(&self, s: Seen, ok: T) -> Result<T, AgentError> {
        self.seen.borrow_mut().push(s);
        match self.answer.error() {
            Some(e) => Err(e),
            None => Ok(ok),
        }
    }
}

impl Agent for &FakeAgent {
    fn add(&self, req: pb::AddRequest) -> Result<pb::AddResponse, AgentError> {
        let decision = match self.answer {
            Answer::NotInMesh => pb::Decision::NotInMesh as i32,
            Answer::BadDecision => 77,
            _ => pb::Decision::Captured as i32,
        };
        self.record(
            Seen::Add(req),
            pb::AddResponse {
                decision,
                message: String::new(),
            },
        )
    }
    fn del(&self, req: pb::DelRequest) -> Result<pb::DelResponse, AgentError> {
        self.record(Seen::Del(req), pb::DelResponse {})
    }
    fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, AgentError> {
        let ok = self.answer != Answer::NotInMesh;
        self.record(
            Seen::Check(req),
            pb::CheckResponse {
                ok,
                message: "fuzz".into(),
            },
        )
    }
    fn status(&self, _: pb::StatusRequest) -> Result<pb::StatusResponse, AgentError> {
        let ready = self.answer != Answer::NotInMesh;
        self.record(
            Seen::Status,
            pb::StatusResponse {
                ready,
                message: String::new(),
            },
        )
    }
    fn gc(&self, req: pb::GcRequest) -> Result<pb::GcResponse, AgentError> {
        self.record(Seen::Gc(req), pb::GcResponse {})
    }
}

/// Error codes the plugin may print (docs/contract.md).
pub const KNOWN_CODES: [u64; 9] = [1, 4, 6, 7, 11, 50, 100, 101, 102];
/// Versions the plugin may speak.
pub const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Runs the plugin on one input with the fake agent and checks every invariant;
/// returns a description of the first broken one.
pub fn check_plugin(data: &[u8]) -> Result<(), String> {
    let input = split_input(data);
    let agent = FakeAgent::new(input.answer);
    let out: Outcome = ambient_cni::cmd::run(&input.env, input.stdin, |_| &agent);
    check_outcome(&input, &agent.seen(), &out)
}

fn check_outcome(input: &PluginInput<'_>, seen: &[Seen], out: &Outcome) -> Result<(), String> {
    let cmd = input.env.command.as_deref().unwrap_or("");
    if out.exit_code == 1 {
        let v: Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("error output is not JSON ({e}): {:?}", out.stdout))?;
        let obj = v.as_object().ok_or("error output is not an object")?;
        for k in obj.keys() {
            if !["cniVersion", "code", "msg", "details"].contains(&k.as_str()) {
                return Err(format!("extra key {k} in error {v}"));
            }
        }
        let code = v["code"].as_u64().ok_or("error without numeric code")?;
        if !KNOWN_CODES.contains(&code) {
            return Err(format!("unknown error code {code}: {v}"));
        }
        if v["msg"].as_str().is_none_or(str::is_empty) {
            return Err(format!("error without msg: {v}"));
        }
        let ver = v["cniVersion"].as_str().unwrap_or("");
        if !VERSIONS.contains(&ver) {
            return Err(format!("error speaks unsupported cniVersion {ver:?}"));
        }
    } else if out.exit_code != 0 {
        return Err(format!("exit code {}", out.exit_code));
    }
    // The agent is asked at most once per exec, and only for the command run.
    if seen.len() > 1 {
        return Err(format!("agent asked {} times", seen.len()));
    }
    let answer = input.answer;
    match (cmd, seen.first()) {
        ("ADD", Some(Seen::Add(req))) => {
            if Some(req.netns.as_str()) != input.env.netns.as_deref() {
                return Err(format!("ADD netns {:?} not CNI_NETNS", req.netns));
            }
            let pod = req.pod.as_ref().ok_or("ADD without pod")?;
            if pod.namespace.is_empty() || pod.name.is_empty() {
                return Err("a pod without namespace/name was sent to the agent".into());
            }
            if req.protocol_version != pb::ProtocolVersion::ProtocolVersion1 as i32 {
                return Err("ADD without protocol version 1".into());
            }
            let want = match answer {
                Answer::Captured | Answer::NotInMesh => None,
                Answer::BadDecision => Some(101),
                other => other.expected_code(),
            };
            match want {
                None if out.exit_code != 0 => {
                    return Err(format!("agent said yes, ADD failed: {}", out.stdout))
                }
                None => check_add_result(input.stdin, &out.stdout)?,
                Some(code) => {
                    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_default();
                    if out.exit_code != 1 || v["code"].as_u64() != Some(code) {
                        return Err(format!("agent {answer:?}: want code {code}, got {v}"));
                    }
                }
            }
        }
        ("DEL", Some(Seen::Del(_))) if out.exit_code != 0 || !out.stdout.is_empty() => {
            return Err(format!(
                "DEL failed after reaching the agent: {}",
                out.stdout
            ));
        }
        ("STATUS", Some(Seen::Status)) => {
            let fail = answer != Answer::Captured && answer != Answer::BadDecision;
            if fail != (out.exit_code == 1) {
                return Err(format!("STATUS {answer:?}: {:?}", out));
            }
            if fail && !out.stdout.contains("\"code\":50") {
                return Err(format!("STATUS failure is not code 50: {}", out.stdout));
            }
        }
        ("ADD", None) if out.exit_code == 0 => check_add_result(input.stdin, &out.stdout)?,
        ("VERSION", _) if out.exit_code == 0 => {
            let v: Value = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("VERSION output not JSON: {e}"))?;
            if !v["supportedVersions"].is_array() {
                return Err(format!("VERSION output: {v}"));
            }
        }
        (c, Some(s)) => {
            let matches = matches!(
                (c, s),
                ("ADD", Seen::Add(_))
                    | ("DEL", Seen::Del(_))
                    | ("CHECK", Seen::Check(_))
                    | ("STATUS", Seen::Status)
                    | ("GC", Seen::Gc(_))
            );
            if !matches {
                return Err(format!("command {c} asked the agent {s:?}"));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A successful ADD prints the prevResult converted to the conf's version.
fn check_add_result(stdin: &[u8], stdout: &str) -> Result<(), String> {
    let conf: Value =
        serde_json::from_slice(stdin).map_err(|e| format!("ADD ok on bad conf: {e}"))?;
    let out: Value =
        serde_json::from_str(stdout).map_err(|e| format!("ADD output not JSON ({e}): {stdout}"))?;
    let version = conf["cniVersion"].as_str().unwrap_or("0.1.0");
    if out["cniVersion"].as_str() != Some(version) {
        return Err(format!(
            "ADD output version {} != conf {version}",
            out["cniVersion"]
        ));
    }
    // Converting the output again to the same version changes nothing.
    if let Some(prev) = conf.get("prevResult").filter(|p| !p.is_null()) {
        let v = ambient_cni::version::SpecVersion::parse(version)
            .map_err(|e| format!("ADD ok with unsupported version: {}", e.msg))?;
        let again = ambient_cni::result::CniResult::decode(&out)
            .map_err(|e| format!("ADD output does not decode: {}", e.msg))?
            .convert(v);
        if again != out {
            return Err(format!("conversion not idempotent: {out} vs {again}"));
        }
        let _ = prev;
    }
    Ok(())
}

/// prevResult conversion invariants: decode → convert to every version → decode again,
/// IPs preserved, legacy/1.x round trip stable.
pub fn check_prev_result(data: &[u8]) -> Result<(), String> {
    use ambient_cni::result::CniResult;
    use ambient_cni::version::SpecVersion;
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return Ok(());
    };
    let Ok(r) = CniResult::decode(&v) else {
        return Ok(());
    };
    let ips = r.ips();
    for ver in VERSIONS {
        let sv = SpecVersion::parse(ver).map_err(|e| e.msg)?;
        let out = r.convert(sv);
        if out["cniVersion"] != ver {
            return Err(format!("convert to {ver} says {}", out["cniVersion"]));
        }
        let back = CniResult::decode(&out)
            .map_err(|e| format!("converted {ver} result does not decode: {}", e.msg))?;
        if back.ips() != ips {
            return Err(format!("IPs changed converting to {ver}"));
        }
        if back.convert(sv) != out {
            return Err(format!("conversion to {ver} not idempotent"));
        }
        // The printed output parses again (what the runtime caches). Not compared for
        // equality: serde_json's float parsing is not exact for numbers like 1e39
        // (fuzz/regressions/prev_result/), which no real result carries.
        let text = out.to_string();
        serde_json::from_str::<Value>(&text).map_err(|e| format!("output does not parse: {e}"))?;
    }
    // 1.x → legacy → 1.x keeps the IP objects.
    let v1 = r.convert(SpecVersion::parse("1.0.0").map_err(|e| e.msg)?);
    let legacy = CniResult::decode(&r.convert(SpecVersion::parse("0.4.0").map_err(|e| e.msg)?))
        .map_err(|e| e.msg)?;
    let v1_again = legacy.convert(SpecVersion::parse("1.0.0").map_err(|e| e.msg)?);
    if v1["ips"] != v1_again["ips"] {
        return Err(format!(
            "ips changed over a legacy round trip: {} vs {}",
            v1["ips"], v1_again["ips"]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_hold_the_invariants() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/plugin_cmd");
        for e in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            check_plugin(&data).unwrap();
        }
    }

    #[test]
    fn split_reads_env_then_stdin() {
        let i = split_input(b"CNI_COMMAND=ADD\nFAKE=refused\n\n{}");
        assert_eq!(i.env.command.as_deref(), Some("ADD"));
        assert_eq!(i.answer, Answer::Refused);
        assert_eq!(i.stdin, b"{}");
    }
}
