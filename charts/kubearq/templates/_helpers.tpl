{{/* Names, labels and the pieces several templates share. */}}

{{- define "kubearq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name; truncated so `<fullname>-worker-<pool>` stays a valid name. */}}
{{- define "kubearq.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubearq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "kubearq.labels" -}}
helm.sh/chart: {{ include "kubearq.chart" . }}
{{ include "kubearq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubearq
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels selectors use: stable across upgrades (never the chart version). */}}
{{- define "kubearq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubearq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubearq.operator.selectorLabels" -}}
{{ include "kubearq.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* dict "root" $ "pool" $pool */}}
{{- define "kubearq.worker.selectorLabels" -}}
{{ include "kubearq.selectorLabels" .root }}
app.kubernetes.io/component: worker
kubearq.dev/pool: {{ .pool.name }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "kubearq.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "kubearq.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name: name the existing ServiceAccount when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The workers' ServiceAccount. */}}
{{- define "kubearq.workerServiceAccountName" -}}
{{- if .Values.workerServiceAccount.create }}
{{- default (printf "%s-worker" (include "kubearq.fullname" .)) .Values.workerServiceAccount.name }}
{{- else }}
{{- required "workerServiceAccount.name: name the existing ServiceAccount when workerServiceAccount.create is false" .Values.workerServiceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubearq.leaseName" -}}
{{- default (printf "%s-operator" (include "kubearq.fullname" .)) .Values.operator.leaseName }}
{{- end }}

{{- define "kubearq.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The label-safe form of a queue name, as the operator publishes it in `queue_label`
(kubearq.operator.queuestats.label_safe): a valid label value is kept, any other is sanitised, cut to 52
characters and suffixed with 10 hex digits of its SHA-256. tests/test_chart.py checks both agree.
*/}}
{{- define "kubearq.queueLabel" -}}
{{- $queue := . -}}
{{- if and (le (len $queue) 63) (regexMatch "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$" $queue) -}}
{{- $queue -}}
{{- else -}}
{{- $prefix := regexReplaceAll "[^-A-Za-z0-9_.]+" $queue "-" | trimAll "-_." | trunc 52 | trimAll "-_." -}}
{{- $hash := sha256sum $queue | trunc 10 -}}
{{- if $prefix }}{{ printf "%s-%s" $prefix $hash }}{{ else }}{{ $hash }}{{ end -}}
{{- end -}}
{{- end }}

{{/*
Deep merge for values: dict "base" map "over" map → YAML. Maps are merged key by key; anything else in
`over` replaces `base`, false and 0 included (sprig's merge and mergeOverwrite drop those).
*/}}
{{- define "kubearq.merge" -}}
{{- $out := deepCopy .base -}}
{{- range $key, $value := .over -}}
{{- if and (kindIs "map" $value) (kindIs "map" (get $out $key)) -}}
{{- $_ := set $out $key (include "kubearq.merge" (dict "base" (get $out $key) "over" $value) | fromYaml) -}}
{{- else -}}
{{- $_ := set $out $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end }}

{{/*
Every worker pool, merged onto workerDefaults and checked, as YAML: {"pools": [...]}. Each pool also gets
`queueLabel`, `fullname` (its Deployment's name), `target` (busy jobs per replica), `behavior` (the HPA's).
*/}}
{{- define "kubearq.pools" -}}
{{- $root := . -}}
{{- $pools := list -}}
{{- $names := dict -}}
{{- range $index, $item := .Values.workers -}}
{{- $pool := include "kubearq.merge" (dict "base" $root.Values.workerDefaults "over" $item) | fromYaml -}}
{{- $where := printf "workers[%d] (%s)" $index $pool.name -}}
{{- if hasKey $names $pool.name -}}
{{- fail (printf "%s: two worker pools are named %q (workers[%v] and workers[%d]); every pool needs a name of its own" $where $pool.name (get $names $pool.name) $index) -}}
{{- end -}}
{{- $_ := set $names $pool.name $index -}}
{{- $scaling := $pool.autoscaling -}}
{{- if lt (int $scaling.maxReplicas) (int $scaling.minReplicas) -}}
{{- fail (printf "%s: autoscaling.maxReplicas (%d) must be at least autoscaling.minReplicas (%d)" $where (int $scaling.maxReplicas) (int $scaling.minReplicas)) -}}
{{- end -}}
{{- if and $scaling.enabled (eq (int $scaling.minReplicas) 0) (ne $root.Values.autoscaling.provider "keda") -}}
{{- fail (printf "%s: autoscaling.minReplicas 0 needs autoscaling.provider keda (an HPA cannot scale to zero)" $where) -}}
{{- end -}}
{{- $_ := set $pool "queueLabel" (include "kubearq.queueLabel" $pool.queue) -}}
{{- $_ := set $pool "fullname" (printf "%s-worker-%s" (include "kubearq.fullname" $root) $pool.name) -}}
{{- $target := int $scaling.targetBusyJobsPerReplica -}}
{{- $_ := set $pool "target" (ternary (int $pool.maxJobs) $target (eq $target 0)) -}}
{{- $window := min 3600 (max 300 (ceil $pool.jobTimeoutSeconds | int)) -}}
{{- $behavior := dict
  "scaleUp" (dict
    "stabilizationWindowSeconds" 0
    "selectPolicy" "Max"
    "policies" (list (dict "type" "Percent" "value" 100 "periodSeconds" 15) (dict "type" "Pods" "value" 4 "periodSeconds" 15)))
  "scaleDown" (dict
    "stabilizationWindowSeconds" $window
    "selectPolicy" "Max"
    "policies" (list (dict "type" "Pods" "value" 1 "periodSeconds" 60))) -}}
{{- $_ := set $pool "behavior" (ternary $behavior $scaling.behavior (empty $scaling.behavior)) -}}
{{- /*
ARQ's running jobs stay at the queue's head and a worker reads only the first QUEUE_READ_LIMIT due ids, so a
limit below replicas * maxJobs leaves new replicas nothing to run. The worker's default is
max(1000, 20 * maxJobs); a pool that can grow past it gets twice its slots.
*/ -}}
{{- $replicas := ternary (int $scaling.maxReplicas) (int $pool.replicas) $scaling.enabled -}}
{{- $slots := mul $replicas (int $pool.maxJobs) -}}
{{- if gt $slots (max 1000 (mul 20 (int $pool.maxJobs))) -}}
{{- $_ := set $pool "queueReadLimit" (min 100000 (mul 2 $slots)) -}}
{{- end -}}
{{- $pools = append $pools $pool -}}
{{- end -}}
{{- toYaml (dict "pools" $pools) -}}
{{- end }}

{{/* Every queue the pools serve, for the operator's QUEUES (so their gauges exist before any resource names them). */}}
{{- define "kubearq.queues" -}}
{{- $queues := list -}}
{{- range .Values.workers }}{{ $queues = append $queues .queue }}{{ end -}}
{{- concat $queues .Values.operator.extraQueues | uniq | join "," -}}
{{- end }}

{{/* A CA bundle reference: dict "bundle" <values> "what" "redis.tls.caBundle" → "secret", "configMap" or "". */}}
{{- define "kubearq.caSource" -}}
{{- if and .bundle.secretName .bundle.configMapName -}}
{{- fail (printf "%s: set secretName or configMapName, not both" .what) -}}
{{- else if .bundle.secretName -}}secret
{{- else if .bundle.configMapName -}}configMap
{{- end -}}
{{- end }}

{{/* The Redis connection's env items (REDIS_URL and its TLS settings), for both roles. */}}
{{- define "kubearq.redisEnv" -}}
{{- $redis := .Values.redis -}}
{{- $ca := include "kubearq.caSource" (dict "bundle" $redis.tls.caBundle "what" "redis.tls.caBundle") -}}
{{- if $redis.urlKey }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.urlKey }}
{{- else }}
{{- if not $redis.host }}
{{- fail "redis.host: set the Redis host name to build the URL from, or redis.urlKey to the key of redis.existingSecret that holds the whole URL" }}
{{- end }}
{{- if and $ca (not $redis.tls.enabled) }}
{{- fail "redis.tls.caBundle is set but redis.tls.enabled is false: the URL built from redis.host would be redis:// (no TLS) and the CA unused; set redis.tls.enabled" }}
{{- end }}
{{- $auth := "" }}
{{- if $redis.passwordKey }}
- name: KUBEARQ_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.passwordKey }}
{{- $auth = printf "%s:$(KUBEARQ_REDIS_PASSWORD)@" $redis.username }}
{{- else if $redis.username }}
{{- $auth = printf "%s@" $redis.username }}
{{- end }}
- name: REDIS_URL
  value: {{ printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" $redis.tls.enabled) $auth $redis.host (int $redis.port) (int $redis.database) | quote }}
{{- end }}
{{- if $ca }}
- name: REDIS_CA_FILE
  value: /etc/kubearq/redis-ca/{{ $redis.tls.caBundle.key }}
{{- end }}
{{- if $redis.tls.insecureSkipVerify }}
- name: REDIS_TLS_INSECURE
  value: "true"
{{- end }}
{{- end }}

{{/* The workers' DATABASE_URL env items. */}}
{{- define "kubearq.postgresqlEnv" -}}
{{- $pg := .Values.postgresql -}}
{{- if $pg.existingSecret }}
{{- $ca := include "kubearq.caSource" (dict "bundle" $pg.caBundle "what" "postgresql.caBundle") -}}
{{- if $pg.urlKey }}
{{- if $ca }}
{{- fail "postgresql.caBundle is set but postgresql.urlKey names a whole URL: add sslrootcert=/etc/kubearq/postgresql-ca/<key> to that URL yourself, or build the URL from parts (postgresql.urlKey: \"\")" }}
{{- end }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.urlKey }}
{{- else }}
{{- if not $pg.host }}
{{- fail "postgresql.host: set the PostgreSQL host name to build the URL from, or postgresql.urlKey to the key of postgresql.existingSecret that holds the whole URL" }}
{{- end }}
{{- if and $ca (has $pg.sslMode (list "disable" "prefer")) }}
{{- fail (printf "postgresql.caBundle is set but postgresql.sslMode is %s, which verifies no certificate; use verify-full (or verify-ca)" $pg.sslMode) }}
{{- end }}
{{- $query := printf "sslmode=%s" $pg.sslMode }}
{{- if $ca }}
{{- $query = printf "%s&sslrootcert=/etc/kubearq/postgresql-ca/%s" $query $pg.caBundle.key }}
{{- else if has $pg.sslMode (list "verify-ca" "verify-full") }}
{{- /* asyncpg, as libpq, verifies against sslrootcert only: the image's trust store then. */}}
{{- $query = printf "%s&sslrootcert=/etc/ssl/certs/ca-certificates.crt" $query }}
{{- end }}
- name: KUBEARQ_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.passwordKey }}
- name: DATABASE_URL
  value: {{ printf "postgresql://%s:$(KUBEARQ_DATABASE_PASSWORD)@%s:%d/%s?%s" $pg.username $pg.host (int $pg.port) $pg.database $query | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Prometheus scrape annotations, when monitoring.scrapeAnnotations is on. */}}
{{- define "kubearq.scrapeAnnotations" -}}
{{- if .Values.monitoring.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: "8080"
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* The container securityContext (restricted), with the pod's user. */}}
{{- define "kubearq.containerSecurityContext" -}}
{{- $context := deepCopy .Values.securityContext -}}
{{- $_ := set $context "runAsNonRoot" true -}}
{{- $_ := set $context "runAsUser" .Values.podSecurityContext.runAsUser -}}
{{- $_ := set $context "runAsGroup" .Values.podSecurityContext.runAsGroup -}}
{{- toYaml $context -}}
{{- end }}

{{/* A soft spread across nodes: dict "on" <bool> "labels" <selector labels YAML> "extra" <list> */}}
{{- define "kubearq.topologySpread" -}}
{{- if or .on .extra }}
topologySpreadConstraints:
{{- if .on }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- .labels | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- with .extra }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The metric the pools scale on, and the Prometheus matchers of one pool's series. */}}
{{- define "kubearq.busyMetric" -}}kubearq_queue_busy_jobs{{- end }}

{{/* dict "root" $ "pool" $pool → `namespace="ns",queue_label="x"` */}}
{{- define "kubearq.poolMatchers" -}}
{{- $label := .root.Values.autoscaling.namespaceLabel -}}
{{- if $label -}}{{ printf "%s=%q," $label .root.Release.Namespace }}{{- end -}}
{{- printf "queue_label=%q" .pool.queueLabel -}}
{{- end }}
