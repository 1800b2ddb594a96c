{{/*
Names. fullname: the release name, or <release>-tandem when it does not hold "tandem";
every object is <fullname>-<part>.
*/}}
{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "tandem.fullname" .) -}}
{{- end -}}

{{/* Labels of every object; `name` is what it is: tandem (a stage), nats, redis, prometheus. */}}
{{- define "tandem.labels" -}}
{{- $root := .root -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
{{ include "tandem.selector" . }}
{{- end -}}

{{/* What selects a part's pods: dict "root" . "name" tandem|nats|... ["component" stage]. */}}
{{- define "tandem.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* A stage's labels and selector: dict "root" . "stage" name. */}}
{{- define "tandem.stageLabels" -}}
{{ include "tandem.labels" (dict "root" .root "name" "tandem" "component" .stage) }}
{{- end -}}
{{- define "tandem.stageSelector" -}}
{{ include "tandem.selector" (dict "root" .root "name" "tandem" "component" .stage) }}
{{- end -}}

{{/* Where NATS and Redis are (host:port, host:port/db). */}}
{{- define "tandem.natsAddress" -}}
{{- if .Values.nats.enabled -}}
{{- printf "%s-nats:4222" (include "tandem.fullname" .) -}}
{{- else -}}
{{- required "externalNats.address (host:port) is needed while nats.enabled is false" .Values.externalNats.address -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis:6379/0" (include "tandem.fullname" .) -}}
{{- else -}}
{{- $host := required "externalRedis.host is needed while redis.enabled is false" .Values.externalRedis.host -}}
{{- printf "%s:%d/%d" $host (int .Values.externalRedis.port) (int .Values.externalRedis.db) -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisAuth" -}}
{{- or .Values.redis.enabled .Values.externalRedis.auth -}}
{{- end -}}

{{- define "tandem.prometheusAddress" -}}
{{- if .Values.keda.prometheusAddress -}}
{{- .Values.keda.prometheusAddress -}}
{{- else if .Values.prometheus.enabled -}}
{{- printf "http://%s-prometheus.%s.svc:9090" (include "tandem.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- fail "keda.prometheusAddress is needed while prometheus.enabled is false and a stage scales with KEDA" -}}
{{- end -}}
{{- end -}}

{{/* image: dict "root" . "image" <override>: the override's keys replace the global ones. */}}
{{- define "tandem.image" -}}
{{- $image := merge (deepCopy (.image | default dict)) .root.Values.image -}}
image: {{ printf "%s:%s" $image.repository $image.tag | quote }}
imagePullPolicy: {{ $image.pullPolicy }}
{{- end -}}

{{/* A Secret value: the one given, else the one the release's Secret already has, else a
new random one (a letter first: NATS' config must not read it as a number). */}}
{{- define "tandem.secretValue" -}}
{{- if .given -}}
{{- .given | b64enc -}}
{{- else if hasKey .existing .key -}}
{{- index .existing .key -}}
{{- else -}}
{{- printf "%s%s" (randAlpha 1) (randAlphaNum 31) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* The model's volume, its mount and its --model flag, for the stages that read it. */}}
{{- define "tandem.modelVolume" -}}
{{- with .Values.model -}}
{{- if .existingClaim -}}
- name: model
  persistentVolumeClaim:
    claimName: {{ .existingClaim }}
    readOnly: true
{{- else if .hostPath -}}
- name: model
  hostPath:
    path: {{ .hostPath }}
    type: Directory
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.modelMount" -}}
{{- if or .Values.model.existingClaim .Values.model.hostPath -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "tandem.modelArgs" -}}
{{- $volume := or .Values.model.existingClaim .Values.model.hostPath -}}
{{- $path := .Values.model.path | default (ternary .Values.model.mountPath "" (not (empty $volume))) -}}
{{- if $path -}}
- --model
- {{ $path | quote }}
{{- end -}}
{{- end -}}

{{/* The pod-level settings every stage shares: dict "root" . "values" <stage values>. */}}
{{- define "tandem.podSpec" -}}
{{- $root := .root -}}
# No <SERVICE>_PORT=tcp://... variables: a Service named `tandem` would set TANDEM_PORT,
# which the CLI reads as a port number.
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A stage container's environment: the shared ConfigMap, its own NATS account, its extra
variables. dict "root" . "stage" name "values" <stage values>. */}}
{{- define "tandem.stageEnv" -}}
{{- $root := .root -}}
envFrom:
  - configMapRef:
      name: {{ include "tandem.fullname" $root }}
env:
{{- if or $root.Values.nats.enabled $root.Values.externalNats.roleAccounts }}
  # Its own NATS account: it may use only the {{ .stage }}'s subjects.
  - name: NATS_USER
    value: {{ .stage }}
  - name: NATS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "tandem.secretName" $root }}
        key: NATS_{{ upper .stage }}_PASSWORD
  - name: NATS_URL
    value: nats://$(NATS_USER):$(NATS_PASSWORD)@$(NATS_ADDRESS)
{{- else }}
  - name: NATS_URL
    value: nats://$(NATS_ADDRESS)
{{- end }}
{{- with .values.extraEnv }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The container-level settings every stage shares. */}}
{{- define "tandem.containerCommon" -}}
resources:
  {{- toYaml .values.resources | nindent 2 }}
securityContext:
  {{- toYaml .root.Values.securityContext | nindent 2 }}
{{- end -}}

{{/* The health endpoint's probes of a stage without an HTTP API: dict "startupSeconds" N. */}}
{{- define "tandem.healthProbes" -}}
startupProbe:
  httpGet:
    path: /health
    port: health
  periodSeconds: {{ .period }}
  failureThreshold: {{ div .startupSeconds .period }}
readinessProbe:
  httpGet:
    path: /ready
    port: health
  periodSeconds: 5
livenessProbe:
  httpGet:
    path: /health
    port: health
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}

{{/* The scrape job: every gateway pod (a Prometheus of your own needs the same). */}}
{{- define "tandem.prometheusConfig" -}}
global:
  scrape_interval: 5s
  evaluation_interval: 5s
scrape_configs:
  - job_name: tandem
    metrics_path: /metrics
    dns_sd_configs:
      - names: [{{ printf "%s-gateway-pods.%s.svc" (include "tandem.fullname" .) .Release.Namespace | quote }}]
        type: A
        port: {{ .Values.gateway.port }}
        refresh_interval: 10s
{{- end -}}
