{{/* Names */}}
{{- define "authopt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "authopt.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The server's objects keep the full name; the workers' get a suffix. */}}
{{- define "authopt.workerName" -}}
{{- printf "%s-worker" (include "authopt.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "authopt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "authopt.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Labels. Called with (dict "ctx" $ "component" "server"|"worker"). Selectors hold only the stable
name/instance/component labels: never helm.sh/chart or the version, which change on upgrade.
*/}}
{{- define "authopt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "authopt.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "authopt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "authopt.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: authopt
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Images */}}
{{- define "authopt.imageRef" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "authopt.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- include "authopt.imageRef" (dict "repository" .Values.image.repository "tag" $tag "digest" .Values.image.digest) }}
{{- end }}

{{/* The server's image: the CUDA variant (Dockerfile.cuda, tag "<tag>-cuda") when gpu.enabled. */}}
{{- define "authopt.serverImage" -}}
{{- if .Values.gpu.enabled }}
{{- $g := .Values.gpu.image }}
{{- $tag := default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) $g.tag }}
{{- include "authopt.imageRef" (dict "repository" (default .Values.image.repository $g.repository) "tag" $tag "digest" $g.digest) }}
{{- else }}
{{- include "authopt.image" . }}
{{- end }}
{{- end }}

{{/*
A settings value as an environment string. Helm reads numbers as float64, so a whole number would
print as 1e+06; print it as an integer (a float setting parses "3600" as well).
*/}}
{{- define "authopt.envValue" -}}
{{- $v := . }}
{{- if kindIs "float64" $v }}
{{- if eq $v (floor $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "slice" $v) (kindIs "map" $v) }}
{{- toJson $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* AUTHOPT_<PREFIX>_<SNAKE_CASE> entries of a settings map. Called with (dict "prefix" "SERVER" "settings" map). */}}
{{- define "authopt.settingsEnv" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .settings }}
{{- if not (kindIs "invalid" $value) }}
{{ printf "AUTHOPT_%s_%s" $prefix ($key | snakecase | upper) }}: {{ include "authopt.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Kafka settings every process reads (AUTHOPT_KAFKA_*), minus the Secret-held password. */}}
{{- define "authopt.kafkaEnv" -}}
{{- $k := .Values.kafka }}
AUTHOPT_KAFKA_BOOTSTRAP: {{ $k.bootstrap | quote }}
AUTHOPT_KAFKA_SECURITY_PROTOCOL: {{ $k.securityProtocol | quote }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
AUTHOPT_KAFKA_SASL_MECHANISM: {{ $k.sasl.mechanism | quote }}
AUTHOPT_KAFKA_SASL_USERNAME: {{ $k.sasl.username | quote }}
{{- end }}
{{- if $k.tls.secretName }}
AUTHOPT_KAFKA_SSL_CAFILE: "/etc/authopt/kafka-tls/ca.crt"
{{- if $k.tls.certKey }}
AUTHOPT_KAFKA_SSL_CERTFILE: "/etc/authopt/kafka-tls/tls.crt"
AUTHOPT_KAFKA_SSL_KEYFILE: "/etc/authopt/kafka-tls/tls.key"
{{- end }}
{{- end }}
{{- end }}

{{/* Environment from Secrets and the downward API, shared by the server and the workers. */}}
{{- define "authopt.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.version={{ .Chart.AppVersion }}"
{{- if .Values.kafka.sasl.passwordSecret.name }}
- name: AUTHOPT_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.passwordSecret.name }}
      key: {{ .Values.kafka.sasl.passwordSecret.key }}
{{- end }}
{{- if .Values.otel.headersSecret.name }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.otel.headersSecret.name }}
      key: {{ .Values.otel.headersSecret.key }}
{{- end }}
{{- end }}

{{/* Kafka TLS material, mounted from its Secret. */}}
{{- define "authopt.kafkaTlsVolume" -}}
{{- $t := .Values.kafka.tls }}
{{- if $t.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ $t.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $t.caKey }}
        path: ca.crt
      {{- if $t.certKey }}
      - key: {{ $t.certKey }}
        path: tls.crt
      - key: {{ required "kafka.tls.keyKey is required with kafka.tls.certKey" $t.keyKey }}
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "authopt.kafkaTlsMount" -}}
{{- if .Values.kafka.tls.secretName }}
- name: kafka-tls
  mountPath: /etc/authopt/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The container security context: the same for every container of the chart. */}}
{{- define "authopt.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "authopt.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Checks the schema cannot express (it cannot compare two values). */}}
{{- define "authopt.validate" -}}
{{- $w := .Values.workers }}
{{- if and $w.enabled (gt (int $w.replicas) (int $w.partitions)) }}
{{- fail (printf "workers.replicas (%d) is more than workers.partitions (%d): a worker gets at most one partition, the extra ones would sit idle" (int $w.replicas) (int $w.partitions)) }}
{{- end }}
{{- $a := .Values.server.autoscaling }}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- fail (printf "server.autoscaling.minReplicas (%d) is more than maxReplicas (%d)" (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- end }}

{{/* OpenTelemetry exporter settings (the SDK's own variables). */}}
{{- define "authopt.otelEnv" -}}
{{- with .Values.otel }}
OTEL_TRACES_EXPORTER: {{ ternary "otlp" "none" (ne .endpoint "") | quote }}
{{- if .endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ .endpoint | quote }}
{{- end }}
{{- if .sampler }}
OTEL_TRACES_SAMPLER: {{ .sampler | quote }}
{{- end }}
{{- if .samplerArg }}
OTEL_TRACES_SAMPLER_ARG: {{ .samplerArg | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The online store's URL and password file for one process kind (prefix SERVER or WORKER). */}}
{{- define "authopt.onlineStoreEnv" -}}
{{- $o := .ctx.Values.onlineStore }}
{{- if $o.url }}
- name: AUTHOPT_{{ .prefix }}_ONLINE_STORE
  value: {{ $o.url | quote }}
{{- if $o.passwordSecret.name }}
- name: AUTHOPT_{{ .prefix }}_ONLINE_STORE_PASSWORD_FILE
  value: /etc/authopt/online-store/password
{{- end }}
{{- end }}
{{- end }}

{{- define "authopt.onlineStoreMount" -}}
{{- if and .Values.onlineStore.url .Values.onlineStore.passwordSecret.name }}
- name: online-store
  mountPath: /etc/authopt/online-store
  readOnly: true
{{- end }}
{{- end }}

{{- define "authopt.onlineStoreVolume" -}}
{{- $o := .Values.onlineStore }}
{{- if and $o.url $o.passwordSecret.name }}
- name: online-store
  secret:
    secretName: {{ $o.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $o.passwordSecret.key }}
        path: password
{{- end }}
{{- end }}
