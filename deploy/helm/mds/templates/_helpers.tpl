{{/* Names, labels and the pieces the server and worker Deployments share. */}}

{{- define "mds.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mds.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: pass (list $ "server"). */}}
{{- define "mds.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "mds.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "mds.credentialsSecret" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "mds.fullname" .)) -}}
{{- end -}}

{{/* Seconds Kubernetes waits for a server to stop: more than its drain plus its shutdown grace. */}}
{{- define "mds.serverTerminationGrace" -}}
{{- $needed := addf .Values.server.drainSeconds .Values.server.shutdownGraceSeconds -}}
{{- with .Values.server.terminationGracePeriodSeconds -}}
{{- if le (float64 .) $needed -}}
{{- fail (printf "server.terminationGracePeriodSeconds (%v) must exceed server.drainSeconds + server.shutdownGraceSeconds (%v)" . $needed) -}}
{{- end -}}
{{- int . -}}
{{- else -}}
{{- add (ceil $needed | int) 5 -}}
{{- end -}}
{{- end -}}

{{/* Refusals: settings that would deploy something broken. */}}
{{- define "mds.checks" -}}
{{- $scaled := or (gt (int .Values.server.replicas) 1) .Values.autoscaling.enabled .Values.worker.enabled -}}
{{- if and $scaled (not .Values.sharedStorage) -}}
{{- fail "several servers, autoscaling or workers need shared storage: set MDS_MONGO_URI (credentials) and MDS_S3_ENDPOINT (settings), then sharedStorage=true" -}}
{{- end -}}
{{- if and .Values.worker.enabled (not .Values.credentials.existingSecret) (not (hasKey .Values.credentials.values "MDS_REDIS_URL")) -}}
{{- fail "worker.enabled needs MDS_REDIS_URL: put it in credentials.values or in credentials.existingSecret" -}}
{{- end -}}
{{- if has (lower (toString (get .Values.settings "MDS_AUTH_OPEN_PROBES"))) (list "false" "0" "no" "off") -}}
{{- fail "MDS_AUTH_OPEN_PROBES=false would fail the gRPC probes: Kubernetes sends them without an API key" -}}
{{- end -}}
{{- end -}}

{{/* Environment of servers and workers: the settings, then what the chart decides. */}}
{{- define "mds.env" -}}
{{- range $name, $value := .Values.settings }}
{{- if and (kindIs "float64" $value) (eq (floor $value) $value) }}{{ $value = int64 $value }}{{ end }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
- name: MDS_AUTH
  value: {{ .Values.auth.mode | quote }}
- name: MDS_DATA_DIR
  value: /var/lib/mds/data
- name: MDS_LOG_DIR
  value: /var/lib/mds/logs
- name: HOME  # onnxruntime writes a small file under ~/.cache
  value: /tmp
{{- end -}}

{{/* Writable folders under a read-only root filesystem. */}}
{{- define "mds.workVolumes" -}}
- name: work
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "mds.workMounts" -}}
- name: work
  mountPath: /var/lib/mds
- name: tmp
  mountPath: /tmp
{{- end -}}
