{{/* Names are fixed: the plugin recognises the agent's own pods by the DaemonSet name. */}}
{{- define "ambient-cni.labels" -}}
app.kubernetes.io/name: ambient-cni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ambient-cni.selectorLabels" -}}
app.kubernetes.io/name: ambient-cni
app.kubernetes.io/component: node
{{- end -}}

{{- define "ambient-cni.ownedConf" -}}
{{- if .Values.istioOwnedCNIConfig -}}
{{- default "02-ambient-cni.conflist" .Values.istioOwnedCNIConfigFileName -}}
{{- else -}}
false
{{- end -}}
{{- end -}}

{{/* Istio's platform names; `platform` or `global.platform`. */}}
{{- define "ambient-cni.platform" -}}
{{- .Values.platform | default (dig "platform" "" (.Values.global | default dict)) | default "" -}}
{{- end -}}

{{/* Host paths: the value when set, else the platform's, else the usual one (Istio's
     profiles/platform-*.yaml; GKE also detected from the server version, as Istio does). */}}
{{- define "ambient-cni.cniBinDir" -}}
{{- $byPlatform := dict "gke" "/home/kubernetes/bin" "k3d" "/bin" "k3s" "/var/lib/rancher/k3s/data/cni" "microk8s" "/var/snap/microk8s/current/opt/cni/bin" "openshift" "/var/lib/cni/bin" -}}
{{- $detected := ternary "/home/kubernetes/bin" "/opt/cni/bin" (contains "-gke" .Capabilities.KubeVersion.GitVersion) -}}
{{- .Values.cniBinDir | default (get $byPlatform (include "ambient-cni.platform" .)) | default $detected -}}
{{- end -}}

{{- define "ambient-cni.cniConfDir" -}}
{{- $byPlatform := dict "k3d" "/var/lib/rancher/k3s/agent/etc/cni/net.d" "k3s" "/var/lib/rancher/k3s/agent/etc/cni/net.d" "microk8s" "/var/snap/microk8s/current/args/cni-network" "openshift" "/etc/kubernetes/cni/net.d" -}}
{{- .Values.cniConfDir | default (get $byPlatform (include "ambient-cni.platform" .)) | default "/etc/cni/net.d" -}}
{{- end -}}

{{- define "ambient-cni.cniNetnsDir" -}}
{{- $byPlatform := dict "minikube" "/var/run/docker/netns" -}}
{{- .Values.cniNetnsDir | default (get $byPlatform (include "ambient-cni.platform" .)) | default "/var/run/netns" -}}
{{- end -}}

{{/* seLinuxOptions: the value, else OpenShift's spc_t (as Istio's openshift profile). */}}
{{- define "ambient-cni.seLinuxOptions" -}}
{{- $o := deepCopy (.Values.seLinuxOptions | default dict) -}}
{{- if and (not $o) (eq (include "ambient-cni.platform" .) "openshift") -}}
{{- $o = dict "type" "spc_t" -}}
{{- end -}}
{{- if $o -}}
{{- toYaml (merge $o (dict "type" "spc_t")) -}}
{{- end -}}
{{- end -}}

{{/* The GKE ResourceQuota: resourceQuotas.enabled when set, else on for platform gke. */}}
{{- define "ambient-cni.resourceQuota" -}}
{{- $rq := .Values.resourceQuotas | default dict -}}
{{- if hasKey $rq "enabled" -}}
{{- if $rq.enabled }}true{{ end -}}
{{- else if eq (include "ambient-cni.platform" .) "gke" -}}
true
{{- end -}}
{{- end -}}

{{/* Image: our map form, or Istio's string form (NAME → HUB/NAME:TAG; with a slash, as is). */}}
{{- define "ambient-cni.image" -}}
{{- $g := .Values.global | default dict -}}
{{- $hub := .Values.hub | default $g.hub | default "" -}}
{{- $tag := coalesce .Values.tag $g.tag .Chart.AppVersion | toString -}}
{{- $img := .Values.image -}}
{{- if kindIs "string" $img -}}
{{- if contains "/" $img -}}
{{- $img -}}
{{- else -}}
{{- printf "%s/%s:%s" ($hub | default "localhost") ($img | default "ambient-cni") $tag -}}
{{- end -}}
{{- else -}}
{{- $img = $img | default dict -}}
{{- $repo := $img.repository | default (printf "%s/ambient-cni" ($hub | default "localhost")) -}}
{{- printf "%s:%s" $repo (($img.tag | default "" | toString) | default $tag) -}}
{{- end -}}
{{- end -}}

{{- define "ambient-cni.pullPolicy" -}}
{{- $fromMap := "" -}}
{{- if kindIs "map" .Values.image }}{{ $fromMap = .Values.image.pullPolicy | default "" }}{{ end -}}
{{- coalesce $fromMap .Values.pullPolicy (dig "imagePullPolicy" "" (.Values.global | default dict)) "IfNotPresent" -}}
{{- end -}}

{{/* imagePullSecrets: ours ({name: x}) or Istio's global list of names. */}}
{{- define "ambient-cni.pullSecrets" -}}
{{- $out := list -}}
{{- range (concat (.Values.imagePullSecrets | default list) (dig "imagePullSecrets" list (.Values.global | default dict))) -}}
{{- if kindIs "string" . }}{{ $out = append $out (dict "name" .) }}{{ else }}{{ $out = append $out . }}{{ end -}}
{{- end -}}
{{- if $out }}{{ toYaml $out }}{{ end -}}
{{- end -}}

{{/* LOG_LEVEL: logLevel, else Istio's logging.level / global.logging.level (a bare level, or
     scope:level pairs of which the `default` scope counts), else info. */}}
{{- define "ambient-cni.logLevel" -}}
{{- $istio := .Values.logging.level | default (dig "logging" "level" "" (.Values.global | default dict)) | default "" -}}
{{- if .Values.logLevel -}}
{{- .Values.logLevel -}}
{{- else if $istio -}}
{{- $lvl := "" -}}
{{- range (splitList "," $istio) -}}
{{- $kv := splitList ":" (trim .) -}}
{{- if eq (len $kv) 1 }}{{ $lvl = index $kv 0 }}{{ else if eq (index $kv 0) "default" }}{{ $lvl = index $kv 1 }}{{ end -}}
{{- end -}}
{{- $lvl = $lvl | default "info" -}}
{{- $map := dict "none" "off" "fatal" "error" "error" "error" "warn" "warn" "info" "info" "debug" "debug" -}}
{{- if not (hasKey $map $lvl) -}}
{{- fail (printf "logging.level: %q is not an Istio log level (none, fatal, error, warn, info, debug)" $istio) -}}
{{- end -}}
{{- get $map $lvl -}}
{{- else -}}
info
{{- end -}}
{{- end -}}

{{/* IP:PORT for a bind choice; $(HOST_IP) is the downward API's status.hostIP (the agent
     brackets an IPv6 one). Args: list bind port. */}}
{{- define "ambient-cni.bindAddr" -}}
{{- $bind := index . 0 -}}
{{- $port := index . 1 | int -}}
{{- if eq $bind "loopback" }}127.0.0.1:{{ $port }}{{ else if eq $bind "all" }}0.0.0.0:{{ $port }}{{ else }}$(HOST_IP):{{ $port }}{{ end -}}
{{- end -}}

{{/* Which objects this release renders (Istio's global.resourceScope). */}}
{{- define "ambient-cni.scope.namespace" -}}
{{- if has (dig "resourceScope" "all" (.Values.global | default dict)) (list "all" "namespace") }}true{{ end -}}
{{- end -}}
{{- define "ambient-cni.scope.cluster" -}}
{{- if has (dig "resourceScope" "all" (.Values.global | default dict)) (list "all" "cluster") }}true{{ end -}}
{{- end -}}
