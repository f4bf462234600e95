{{/* Istio keys this chart accepts in shape but cannot honour: refuse them by name, with the
     reason (values.schema.json refuses unknown keys and wrong types). */}}
{{- define "ambient-cni.validate" -}}
{{- $v := .Values -}}
{{- $g := $v.global | default dict -}}
{{- if $v._internal_defaults_do_not_set -}}
{{- fail "_internal_defaults_do_not_set: Istio's internal key; set its keys directly (e.g. cniBinDir, not _internal_defaults_do_not_set.cniBinDir)" -}}
{{- end -}}
{{- if $v.defaults -}}
{{- fail "defaults: Istio's old prefix; set its keys directly (e.g. --set hub=foo, not --set defaults.hub=foo)" -}}
{{- end -}}
{{- if not $v.chained -}}
{{- fail "chained=false: ambient-cni is always a chained CNI plugin; standalone/Multus mode is not supported" -}}
{{- end -}}
{{- if ne ($v.provider | default "default") "default" -}}
{{- fail (printf "provider=%s: only the default provider (chaining into the node's CNI config) is supported; Multus network attachments are not" $v.provider) -}}
{{- end -}}
{{- range $key := list "profile" -}}
{{- $p := get $v $key | default (get $g $key) | default "" -}}
{{- if not (has $p (list "" "ambient")) -}}
{{- fail (printf "profile=%s: ambient-cni does ambient only; use profile=ambient (or none)" $p) -}}
{{- end -}}
{{- end -}}
{{- $platform := include "ambient-cni.platform" . -}}
{{- if not (has $platform (list "" "gke" "k3d" "k3s" "microk8s" "minikube" "openshift")) -}}
{{- fail (printf "global.platform=%s: unknown platform (known: gke, k3d, k3s, microk8s, minikube, openshift)" $platform) -}}
{{- end -}}
{{- if not $v.ambient.enabled -}}
{{- fail "ambient.enabled=false: ambient-cni does ambient only (for sidecar mode keep istio-cni)" -}}
{{- end -}}
{{- if $v.ambient.configDir -}}
{{- fail "ambient.configDir: not supported; ambient-cni takes its settings from this chart's ConfigMap, not a watched config directory" -}}
{{- end -}}
{{- if not $v.ambient.reconcileIptablesOnStartup -}}
{{- fail "ambient.reconcileIptablesOnStartup=false: not supported; the agent always reconciles running pods' rules at start-up (that is how it takes over after a restart)" -}}
{{- end -}}
{{- if and $v.repair.labelPods (not $v.repair.brokenPodLabelKey) -}}
{{- fail "repair.labelPods=true needs repair.brokenPodLabelKey (the label to set on broken pods)" -}}
{{- end -}}
{{- if dig "networkPolicy" "enabled" false $g -}}
{{- fail "global.networkPolicy.enabled=true: not supported; the agent runs in the host network, where a NetworkPolicy does not apply" -}}
{{- end -}}
{{- if not (has $v.rulesBackend (list "iptables" "nftables" "auto")) -}}
{{- fail (printf "rulesBackend must be iptables, nftables or auto, got %q" $v.rulesBackend) -}}
{{- end -}}
{{- if and (dig "nativeNftables" false $g) (eq $v.rulesBackend "iptables") -}}
{{- fail "global.nativeNftables=true contradicts rulesBackend=iptables: set one" -}}
{{- end -}}
{{- if eq (include "ambient-cni.cniBinDir" .) "" -}}
{{- fail "cniBinDir: empty after platform defaults" -}}
{{- end -}}
{{- end -}}
