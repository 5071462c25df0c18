{{/* The release's base name: the release name, unless it lacks the chart name (then "<release>-slam"). */}}
{{- define "slam.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "slam.operator.fullname" -}}
{{- printf "%s-operator" (include "slam.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* MinIO's name is fixed by a value (default "minio") so the examples' endpoint works with the chart too. */}}
{{- define "slam.minio.fullname" -}}
{{- .Values.minio.name -}}
{{- end -}}

{{- define "slam.serviceAccountName" -}}
{{- default (include "slam.operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "slam.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: slam
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The operator's selector labels (its pods only; server pods are app.kubernetes.io/name: slam). */}}
{{- define "slam.operator.selectorLabels" -}}
app.kubernetes.io/name: slam-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "slam.minio.selectorLabels" -}}
app.kubernetes.io/name: minio
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* host:port of the chart's MinIO, as SLAMInference.spec.checkpoint.endpoint takes it. */}}
{{- define "slam.minio.endpoint" -}}
{{- printf "%s.%s.svc:9000" (include "slam.minio.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "slam.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
