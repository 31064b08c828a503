{{- define "kvrelay.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "kvrelay.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* selector labels of one component: frontend, prefill, decode, worker, planner, etcd, nats */}}
{{- define "kvrelay.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kvrelay.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end }}

{{- define "kvrelay.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}{{ printf "%s-etcd:2379" (include "kvrelay.fullname" .) }}
{{- else }}{{ required "etcd.endpoints is required when etcd.enabled is false" .Values.etcd.endpoints }}{{ end }}
{{- end }}

{{- define "kvrelay.natsUrl" -}}
{{- if .Values.nats.enabled }}{{ printf "nats://%s-nats:4222" (include "kvrelay.fullname" .) }}
{{- else }}{{ required "nats.url is required when nats.enabled is false" .Values.nats.url }}{{ end }}
{{- end }}

{{- define "kvrelay.apiKeySecret" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "kvrelay.fullname" .)) }}
{{- end }}

{{/* the worker Deployments of this shape, as "component=role" pairs */}}
{{- define "kvrelay.workerPools" -}}
{{- if eq .Values.mode "aggregated" }}worker=agg
{{- else if eq .Values.mode "disaggregated" }}prefill=prefill decode=decode
{{- else }}{{ fail (printf "mode must be aggregated or disaggregated, got %q" .Values.mode) }}{{ end }}
{{- end }}

{{- define "kvrelay.terminationGrace" -}}
{{ add .Values.drainTimeoutSeconds .Values.preStopSeconds 5 }}
{{- end }}

{{- define "kvrelay.internalTokenSecret" -}}
{{- .Values.internalToken.existingSecret | default (printf "%s-internal-token" (include "kvrelay.fullname" .)) }}
{{- end }}

{{/* env entries every frontend and worker container carries */}}
{{- define "kvrelay.internalTokenEnv" -}}
- name: KVRELAY_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "kvrelay.internalTokenSecret" . }}, key: token}
{{- end }}
