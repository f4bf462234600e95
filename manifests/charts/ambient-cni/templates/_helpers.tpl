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
