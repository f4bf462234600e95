//! The repair controller's settings: Istio's `REPAIR_*` environment names and defaults
//! (`cni/pkg/cmd/root.go`), which the chart's `repair.*` values set.

use clap::Args;

/// What the controller does with a broken sidecar pod (Istio's three modes; only one acts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Program the rules into the running pod's netns (no RBAC beyond reading pods).
    Repair,
    /// Delete the pod so it is recreated (needs `delete` on pods).
    Delete,
    /// Label the pod `key=value` and leave the rest to the user (needs `patch` on `pods/status`).
    Label {
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
}

impl Mode {
    /// Istio's `type` label of `istio_cni_repair_pods_repaired_total`.
    pub fn metric_type(&self) -> &'static str {
        match self {
            Mode::Repair => "repair",
            Mode::Delete => "delete",
            Mode::Label { .. } => "label",
        }
    }
}

/// Flags of the repair controller (part of `run`).
#[derive(Debug, Clone, Args)]
pub struct RepairArgs {
    /// Watch this node's sidecar pods for a failed `istio-validation` and act on them.
    #[arg(long, env = "REPAIR_ENABLED", default_value = "true", value_parser = go_bool, action = clap::ArgAction::Set)]
    pub repair_enabled: bool,
    /// Act by programming the running pod (first of the three modes that is on wins).
    #[arg(long, env = "REPAIR_REPAIR_PODS", default_value = "true", value_parser = go_bool, action = clap::ArgAction::Set)]
    pub repair_repair_pods: bool,
    /// Act by deleting the pod.
    #[arg(long, env = "REPAIR_DELETE_PODS", default_value = "false", value_parser = go_bool, action = clap::ArgAction::Set)]
    pub repair_delete_pods: bool,
    /// Act by labelling the pod.
    #[arg(long, env = "REPAIR_LABEL_PODS", default_value = "false", value_parser = go_bool, action = clap::ArgAction::Set)]
    pub repair_label_pods: bool,
    /// The label key of the label mode.
    #[arg(
        long,
        env = "REPAIR_BROKEN_POD_LABEL_KEY",
        default_value = "cni.istio.io/uninitialized"
    )]
    pub repair_broken_pod_label_key: String,
    /// The label value of the label mode.
    #[arg(long, env = "REPAIR_BROKEN_POD_LABEL_VALUE", default_value = "true")]
    pub repair_broken_pod_label_value: String,
    /// Only pods with this annotation are looked at (empty: all).
    #[arg(
        long,
        env = "REPAIR_SIDECAR_ANNOTATION",
        default_value = "sidecar.istio.io/status"
    )]
    pub repair_sidecar_annotation: String,
    /// The init container whose failure marks a pod broken (empty: any).
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_NAME",
        default_value = "istio-validation"
    )]
    pub repair_init_container_name: String,
    /// Its termination message must equal this (trimmed; empty: any).
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE",
        default_value = ""
    )]
    pub repair_init_container_termination_message: String,
    /// Its exit code must be this (0: any non-zero).
    #[arg(long, env = "REPAIR_INIT_CONTAINER_EXIT_CODE", default_value_t = 126)]
    pub repair_init_container_exit_code: i32,
}

impl RepairArgs {
    /// The mode that acts, `None` when repair is off (Istio's order: repair, delete, label).
    pub fn mode(&self) -> Option<Mode> {
        if !self.repair_enabled {
            None
        } else if self.repair_repair_pods {
            Some(Mode::Repair)
        } else if self.repair_delete_pods {
            Some(Mode::Delete)
        } else if self.repair_label_pods {
            Some(Mode::Label {
                key: self.repair_broken_pod_label_key.clone(),
                value: self.repair_broken_pod_label_value.clone(),
            })
        } else {
            None
        }
    }

    /// Which pods count as broken.
    pub fn filter(&self) -> super::broken::BrokenFilter {
        super::broken::BrokenFilter {
            sidecar_annotation: self.repair_sidecar_annotation.clone(),
            init_container_name: self.repair_init_container_name.clone(),
            termination_message: self.repair_init_container_termination_message.clone(),
            exit_code: self.repair_init_container_exit_code,
        }
    }
}

/// Go's `strconv.ParseBool`, as Istio's viper reads these (the chart quotes them).
pub fn go_bool(v: &str) -> Result<bool, String> {
    match v.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{v:?}: not a boolean")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        r: RepairArgs,
    }

    fn parse(args: &[&str]) -> RepairArgs {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        T::try_parse_from(argv).unwrap().r
    }

    #[test]
    fn defaults_are_istios() {
        let r = parse(&[]);
        assert_eq!(r.mode(), Some(Mode::Repair));
        let f = r.filter();
        assert_eq!(f.sidecar_annotation, "sidecar.istio.io/status");
        assert_eq!(f.init_container_name, "istio-validation");
        assert_eq!(f.termination_message, "");
        assert_eq!(f.exit_code, 126);
    }

    #[test]
    fn the_first_mode_that_is_on_acts() {
        let label = Mode::Label {
            key: "cni.istio.io/uninitialized".into(),
            value: "true".into(),
        };
        // (flags, mode)
        let table: &[(&[&str], Option<Mode>)] = &[
            (&["--repair-enabled", "false"], None),
            (
                &["--repair-enabled", "False", "--repair-delete-pods", "true"],
                None,
            ),
            (&["--repair-delete-pods", "1"], Some(Mode::Repair)),
            (
                &["--repair-repair-pods", "false", "--repair-delete-pods", "t"],
                Some(Mode::Delete),
            ),
            (
                &[
                    "--repair-repair-pods",
                    "false",
                    "--repair-delete-pods",
                    "true",
                    "--repair-label-pods",
                    "true",
                ],
                Some(Mode::Delete),
            ),
            (
                &[
                    "--repair-repair-pods",
                    "false",
                    "--repair-label-pods",
                    "true",
                ],
                Some(label),
            ),
            (
                &[
                    "--repair-repair-pods",
                    "false",
                    "--repair-label-pods",
                    "TRUE",
                    "--repair-broken-pod-label-key",
                    "k",
                    "--repair-broken-pod-label-value",
                    "v",
                ],
                Some(Mode::Label {
                    key: "k".into(),
                    value: "v".into(),
                }),
            ),
            (&["--repair-repair-pods", "false"], None),
        ];
        for (args, want) in table {
            assert_eq!(&parse(args).mode(), want, "{args:?}");
        }
    }

    #[test]
    fn booleans_are_gos() {
        assert!(T::try_parse_from(["t", "--repair-enabled", "yes"]).is_err());
        assert!(T::try_parse_from(["t", "--repair-init-container-exit-code", "x"]).is_err());
    }
}
