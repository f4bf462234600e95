//! The `CNI_*` environment a runtime passes, and `CNI_ARGS`.

use crate::error::{CniError, INVALID_ENV};

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// ADD
    Add,
    /// DEL
    Del,
    /// CHECK
    Check,
    /// VERSION
    Version,
    /// STATUS
    Status,
    /// GC
    Gc,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: Option<&str>) -> Result<Self, CniError> {
        Ok(match s {
            Some("ADD") => Self::Add,
            Some("DEL") => Self::Del,
            Some("CHECK") => Self::Check,
            Some("VERSION") => Self::Version,
            Some("STATUS") => Self::Status,
            Some("GC") => Self::Gc,
            None => return Err(CniError::new(INVALID_ENV, "CNI_COMMAND is not set")),
            Some(other) => {
                return Err(CniError::new(
                    INVALID_ENV,
                    format!("unknown CNI_COMMAND {other:?}"),
                ))
            }
        })
    }
}

/// The environment, as read (empty values count as missing).
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: Option<String>,
    /// Variables that were set but are not valid UTF-8 (read as unset above).
    pub not_utf8: Vec<&'static str>,
}

/// The variables [`CniEnv`] reads.
const VARS: [&str; 5] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
];

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// Reads the variables from `get`; a value that is not UTF-8 is noted, never dropped
    /// silently (it would turn a pod into "not a pod" and pass it through).
    pub fn from_vars(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let mut env = Self::default();
        for name in VARS {
            let value = match get(name).map(std::ffi::OsString::into_string) {
                None => None,
                Some(Ok(v)) => Some(v).filter(|v| !v.is_empty()),
                Some(Err(_)) => {
                    env.not_utf8.push(name);
                    None
                }
            };
            match name {
                "CNI_COMMAND" => env.command = value,
                "CNI_CONTAINERID" => env.container_id = value,
                "CNI_NETNS" => env.netns = value,
                "CNI_IFNAME" => env.ifname = value,
                _ => env.args = value,
            }
        }
        env
    }

    /// Code 4 naming the variables that are not UTF-8, if any.
    pub fn require_utf8(&self) -> Result<(), CniError> {
        if self.not_utf8.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                INVALID_ENV,
                format!("not valid UTF-8: {}", self.not_utf8.join(", ")),
            ))
        }
    }

    /// Checks the variables the spec requires for a command.
    pub fn require(&self, cmd: Command) -> Result<(), CniError> {
        let mut missing = Vec::new();
        let need_netns = matches!(cmd, Command::Add | Command::Check);
        if matches!(cmd, Command::Add | Command::Del | Command::Check) {
            if self.container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            if self.ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
        }
        if need_netns && self.netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                INVALID_ENV,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ))
        }
    }
}

/// The pod identity carried in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub name: Option<String>,
    /// `K8S_POD_UID`.
    pub uid: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`.
    pub infra_container_id: Option<String>,
}

/// Parses `CNI_ARGS` (`K=V;K=V`); unknown keys are ignored, malformed pairs are errors.
pub fn parse_args(args: Option<&str>) -> Result<PodArgs, CniError> {
    let mut out = PodArgs::default();
    let Some(args) = args else { return Ok(out) };
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                INVALID_ENV,
                format!("CNI_ARGS: invalid pair {pair:?} (want KEY=VALUE)"),
            ));
        };
        if k.is_empty() {
            return Err(CniError::new(
                INVALID_ENV,
                format!("CNI_ARGS: empty key in {pair:?}"),
            ));
        }
        let v = (!v.is_empty()).then(|| v.to_owned());
        match k {
            "K8S_POD_NAMESPACE" => out.namespace = v,
            "K8S_POD_NAME" => out.name = v,
            "K8S_POD_UID" => out.uid = v,
            "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = v,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubelet_args() {
        let a = parse_args(Some(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        ))
        .unwrap();
        assert_eq!(a.namespace.as_deref(), Some("shop"));
        assert_eq!(a.name.as_deref(), Some("web-0"));
        assert_eq!(a.uid.as_deref(), Some("u-1"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
    }

    #[test]
    fn malformed_args_are_code_4() {
        for bad in ["K8S_POD_NAME", "=x", "A=1;broken"] {
            assert_eq!(parse_args(Some(bad)).unwrap_err().code, 4, "{bad}");
        }
    }

    #[test]
    fn commands_parse_and_unknown_is_code_4() {
        assert_eq!(Command::parse(Some("GC")).unwrap(), Command::Gc);
        assert_eq!(Command::parse(None).unwrap_err().code, 4);
        assert_eq!(Command::parse(Some("add")).unwrap_err().code, 4);
    }

    #[test]
    fn invalid_utf8_is_noted_not_dropped() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let env = CniEnv::from_vars(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_ARGS" => Some(OsString::from_vec(
                b"K8S_POD_NAMESPACE=shop;K8S_POD_NAME=w\xff".to_vec(),
            )),
            "CNI_IFNAME" => Some(OsString::new()),
            _ => None,
        });
        assert_eq!(env.command.as_deref(), Some("ADD"));
        assert_eq!(env.args, None);
        assert_eq!(env.ifname, None, "empty counts as unset");
        assert_eq!(env.not_utf8, vec!["CNI_ARGS"]);
        let e = env.require_utf8().unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_ARGS"), "{}", e.msg);
        assert!(CniEnv::default().require_utf8().is_ok());
    }

    #[test]
    fn add_requires_netns_but_del_does_not() {
        let env = CniEnv {
            container_id: Some("c".into()),
            ifname: Some("eth0".into()),
            ..Default::default()
        };
        assert_eq!(env.require(Command::Add).unwrap_err().code, 4);
        assert!(env.require(Command::Del).is_ok());
        assert!(env.require(Command::Status).is_ok());
    }
}
