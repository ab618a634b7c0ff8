{{/* The five kefu services, in the order their objects are rendered. */}}
{{- define "kefu.services" -}}
gateway dialogue retrieval inference plugins
{{- end -}}

{{/* The services that seal or open data encrypted at rest (conversation events, LLM jobs, media): they get the master key. */}}
{{- define "kefu.keyServices" -}}
gateway dialogue inference plugins
{{- end -}}

{{/* Name of the chart, truncated for Kubernetes names. */}}
{{- define "kefu.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: fullnameOverride, else release plus chart unless the release already contains it. */}}
{{- define "kefu.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: call with (dict "root" $ "service" "gateway"). */}}
{{- define "kefu.componentName" -}}
{{- printf "%s-%s" (include "kefu.fullname" .root | trunc (int (sub 62 (len .service)))) .service | trimSuffix "-" -}}
{{- end -}}

{{/* chart label value */}}
{{- define "kefu.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object of the release. */}}
{{- define "kefu.labels" -}}
helm.sh/chart: {{ include "kefu.chart" . }}
{{ include "kefu.releaseSelector" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kefu
{{- end -}}

{{/* Labels of one component's objects: call with (dict "root" $ "service" "gateway"). */}}
{{- define "kefu.componentLabels" -}}
{{ include "kefu.labels" .root }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{/* Selects every pod of the release (the services, NATS, the test pod): the NetworkPolicies use it. */}}
{{- define "kefu.releaseSelector" -}}
app.kubernetes.io/name: {{ include "kefu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "service" "gateway"). */}}
{{- define "kefu.selectorLabels" -}}
{{ include "kefu.releaseSelector" .root }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{/* Image of one kefu service: call with (dict "root" $ "image" .Values.gateway.image). */}}
{{- define "kefu.image" -}}
{{- $registry := .image.registry | default .root.Values.image.registry -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The NATS URL every service connects to: nats.url (rendered as a template, so it may name the release),
else the chart's own NATS. Fails when there is neither.
*/}}
{{- define "kefu.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- tpl .Values.nats.url . -}}
{{- else if .Values.nats.embedded.enabled -}}
{{- printf "%s://%s:%d" (ternary "tls" "nats" .Values.tls.nats.enabled) (include "kefu.componentName" (dict "root" . "service" "nats")) (int .Values.nats.embedded.port) -}}
{{- else -}}
{{- fail "kefu needs NATS with JetStream: set nats.url to an existing cluster, or nats.embedded.enabled=true" -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart runs its own NATS: only when no nats.url is given. */}}
{{- define "kefu.natsEmbedded" -}}
{{- if and .Values.nats.embedded.enabled (not .Values.nats.url) -}}true{{- end -}}
{{- end -}}

{{/* The Secret the chart creates for the keys not taken from an existing Secret. */}}
{{- define "kefu.chartSecretName" -}}
{{- printf "%s-secrets" (include "kefu.fullname" .) -}}
{{- end -}}

{{/* The Secret with the admin token and the token-signing key. */}}
{{- define "kefu.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "kefu.chartSecretName" .) -}}
{{- end -}}

{{/* The Secret with the master encryption key. */}}
{{- define "kefu.encryptionSecretName" -}}
{{- .Values.encryption.existingSecret | default (include "kefu.chartSecretName" .) -}}
{{- end -}}

{{/* Whether the chart creates the Secret: some key it holds is not taken from an existing Secret. */}}
{{- define "kefu.createSecret" -}}
{{- if or (not .Values.auth.existingSecret) (and .Values.encryption.enabled (not .Values.encryption.existingSecret)) -}}true{{- end -}}
{{- end -}}

{{/*
Environment variables from a map, sorted by name: a string is a value, a map is merged in as is
(valueFrom). Call with the map.
*/}}
{{- define "kefu.env" -}}
{{- $list := list -}}
{{- range $name, $value := . -}}
{{- if kindIs "map" $value -}}
{{- $list = append $list (merge (dict "name" $name) $value) -}}
{{- else -}}
{{- $list = append $list (dict "name" $name "value" (toString $value)) -}}
{{- end -}}
{{- end -}}
{{- toYaml $list -}}
{{- end -}}

{{/*
The volume a model comes from, or nothing: call with (dict "root" $ "service" "inference" "model" $v.model).
*/}}
{{- define "kefu.modelVolume" -}}
{{- $m := .model -}}
{{- if eq $m.source "existingClaim" }}
- name: models
  persistentVolumeClaim: {claimName: {{ required (printf "%s.model.existingClaim is required with source existingClaim" .service) $m.existingClaim | quote }}, readOnly: true}
{{- else if eq $m.source "pvc" }}
- name: models
  persistentVolumeClaim: {claimName: {{ printf "%s-models" (include "kefu.componentName" (dict "root" .root "service" .service)) | quote }}, readOnly: true}
{{- else if eq $m.source "hostPath" }}
- name: models
  hostPath: {path: {{ required (printf "%s.model.hostPath is required with source hostPath" .service) $m.hostPath | quote }}, type: Directory}
{{- else if $m.source }}
{{- fail (printf "%s.model.source must be empty, existingClaim, pvc or hostPath (got %q)" .service $m.source) }}
{{- end }}
{{- end -}}

{{/* KEFU_STREAM_REPLICAS: streamReplicas, or 3 (the cluster's size up to 3) when the chart runs its own cluster. */}}
{{- define "kefu.streamReplicas" -}}
{{- $c := .Values.nats.embedded.cluster -}}
{{- if .Values.streamReplicas -}}
{{- .Values.streamReplicas -}}
{{- else if and (include "kefu.natsEmbedded" .) $c.enabled -}}
{{- min 3 (int $c.replicas) -}}
{{- else -}}
1
{{- end -}}
{{- end }}
