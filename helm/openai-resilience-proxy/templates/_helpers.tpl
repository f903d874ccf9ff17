{{/*
Helpers. Each takes this chart's own context (.Values, .Chart, .Release, .Capabilities): the
root context when this chart renders its templates, or `.Subcharts.openai-resilience-proxy` when
an application chart includes the sidecar templates (_sidecar.tpl). The default name is a
constant, so names come out the same either way, aliased or not.
*/}}

{{- define "openai-resilience-proxy.name" -}}
{{- default "openai-resilience-proxy" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "openai-resilience-proxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "openai-resilience-proxy.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "openai-resilience-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openai-resilience-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "openai-resilience-proxy.labels" -}}
helm.sh/chart: {{ printf "openai-resilience-proxy-%s" .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "openai-resilience-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{- define "openai-resilience-proxy.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The proxy's config file: values.config over the addresses the mode needs. */}}
{{- define "openai-resilience-proxy.configYAML" -}}
{{- $v := .Values -}}
{{- $host := ternary "0.0.0.0" "127.0.0.1" (eq $v.mode "gateway") -}}
{{- $cfg := dict
      "listen" (dict "host" $host "port" (int $v.ports.http))
      "admin" (dict "host" "0.0.0.0" "port" (int $v.ports.admin)) -}}
{{- if include "openai-resilience-proxy.reloadOn" . -}}
{{- $_ := set $cfg "reload" (dict "watch" true) -}}
{{- end -}}
{{- $cfg = mergeOverwrite $cfg (deepCopy (default (dict) $v.config)) -}}
{{- if and (eq $v.mode "gateway") (has $cfg.listen.host (list "127.0.0.1" "localhost" "::1")) -}}
{{- fail (printf "config.listen.host: %s is unreachable through the Service in gateway mode; leave it unset (0.0.0.0)" $cfg.listen.host) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* configReload: auto is on in sidecar mode (a roll restarts the application too), off in gateway mode. */}}
{{- define "openai-resilience-proxy.reloadOn" -}}
{{- $r := toString .Values.configReload -}}
{{- if not (has $r (list "auto" "true" "false")) -}}
{{- fail (printf "configReload: expected auto, true or false, got %q" $r) -}}
{{- end -}}
{{- if or (eq $r "true") (and (eq $r "auto") (eq .Values.mode "sidecar")) -}}true{{- end -}}
{{- end -}}

{{/* The pods' config checksum: of the whole file, or with configReload of only what the proxy cannot
     reload in place (its listeners, log setup, workers, drain time), so routes and upstreams reload. */}}
{{- define "openai-resilience-proxy.configChecksum" -}}
{{- if include "openai-resilience-proxy.reloadOn" . -}}
{{- pick (include "openai-resilience-proxy.configYAML" . | fromYaml) "listen" "admin" "log" "workers" "shutdown_grace" | toYaml | sha256sum -}}
{{- else -}}
{{- include "openai-resilience-proxy.configYAML" . | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* config.shutdown_grace in whole seconds, rounded up (the proxy's duration syntax). */}}
{{- define "openai-resilience-proxy.shutdownGraceSeconds" -}}
{{- $raw := toString (dig "shutdown_grace" "30s" (default (dict) .Values.config)) | trim -}}
{{- $re := "^([0-9]+(\\.[0-9]+)?)\\s*(ms|s|m|h)$" -}}
{{- if not (regexMatch $re $raw) -}}
{{- fail (printf "config.shutdown_grace: expected a duration like \"30s\" or \"2m\", got %q" $raw) -}}
{{- end -}}
{{- $n := regexReplaceAll $re $raw "${1}" | float64 -}}
{{- $unit := regexReplaceAll $re $raw "${3}" -}}
{{- $factor := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit -}}
{{- mulf $n $factor | ceil | int -}}
{{- end -}}

{{/*
The pod's terminationGracePeriodSeconds: above the proxy's drain (preStop pause + shutdown_grace),
computed when not set, refused when set too short.
*/}}
{{- define "openai-resilience-proxy.terminationGracePeriodSeconds" -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (include "openai-resilience-proxy.shutdownGraceSeconds" . | int) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $drain 10 -}}
{{- else if le (int .Values.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "terminationGracePeriodSeconds: %d is not above the proxy's drain (preStopSleepSeconds + config.shutdown_grace = %d s); leave it null to compute it" (int .Values.terminationGracePeriodSeconds) $drain) -}}
{{- else -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Prometheus scrape annotations (a map, one per line). */}}
{{- define "openai-resilience-proxy.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.admin | int | quote }}
prometheus.io/path: /metrics
{{- end -}}

{{/* Whether the preStop pause is Kubernetes' own sleep action (1.30+, no binary needed): "true" or "". */}}
{{- define "openai-resilience-proxy.preStopSleepAction" -}}
{{- $a := .Values.preStopAction -}}
{{- if or (eq $a "sleep") (and (eq $a "auto") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) -}}true{{- end -}}
{{- end -}}

{{/* Scrape hints on the pods, unless a ServiceMonitor or PodMonitor scrapes them: "true" or "". */}}
{{- define "openai-resilience-proxy.scrapeAnnotationsOn" -}}
{{- if and .Values.metrics.scrapeAnnotations (not .Values.serviceMonitor.enabled) (not .Values.podMonitor.enabled) -}}true{{- end -}}
{{- end -}}

{{/* The fewest replicas the gateway runs: the autoscaler's minimum, or replicaCount. */}}
{{- define "openai-resilience-proxy.minReplicas" -}}
{{- ternary .Values.autoscaling.minReplicas .Values.replicaCount .Values.autoscaling.enabled | int -}}
{{- end -}}

{{/* A name unique to this release and namespace, at most 40 characters (a Grafana uid). */}}
{{- define "openai-resilience-proxy.releaseUID" -}}
{{- $full := include "openai-resilience-proxy.fullname" . -}}
{{- printf "%s-%s" ($full | trunc 27 | trimSuffix "-") (printf "%s/%s" .Release.Namespace $full | sha256sum | trunc 12) -}}
{{- end -}}

{{/* Whether the proxy runs as a native sidecar: "true" or "". */}}
{{- define "openai-resilience-proxy.nativeSidecar" -}}
{{- $n := .Values.sidecar.native -}}
{{- if eq (toString $n) "auto" -}}
{{- if semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- else if eq (toString $n) "true" -}}true
{{- end -}}
{{- end -}}

{{/*
The proxy container, for both modes (a list item). Context: a dict with "ctx" (the helper
context) and "native" ("true" renders restartPolicy: Always and no preStop pause).
*/}}
{{- define "openai-resilience-proxy.container" -}}
{{- $ := .ctx -}}
{{- $v := $.Values -}}
- name: {{ $v.containerName }}
  image: {{ include "openai-resilience-proxy.image" $ | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  env:
    - name: PROXY_CONFIG
      value: /etc/openai-resilience-proxy/config.yaml
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: proxy-http
      containerPort: {{ $v.ports.http | int }}
      protocol: TCP
    - name: proxy-admin
      containerPort: {{ $v.ports.admin | int }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: {{ $v.ports.admin | int }}
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $v.ports.admin | int }}
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $v.ports.admin | int }}
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
  {{- if and (not .native) (gt (int $v.preStopSleepSeconds) 0) }}
  lifecycle:
    preStop:
      {{- if include "openai-resilience-proxy.preStopSleepAction" $ }}
      sleep:
        seconds: {{ $v.preStopSleepSeconds | int }}
      {{- else }}
      exec:
        command: ["sleep", {{ $v.preStopSleepSeconds | int | toString | quote }}]
      {{- end }}
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ $v.containerName }}-config
      mountPath: /etc/openai-resilience-proxy
      readOnly: true
    - name: {{ $v.containerName }}-tmp
      mountPath: /tmp
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The proxy's volumes (list items): its ConfigMap and a small writable /tmp. */}}
{{- define "openai-resilience-proxy.volumes" -}}
- name: {{ .Values.containerName }}-config
  configMap:
    name: {{ include "openai-resilience-proxy.fullname" . }}
- name: {{ .Values.containerName }}-tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end -}}

{{/* PromQL label matchers for a metric: {extra,selector}, or nothing when both are empty. */}}
{{- define "openai-resilience-proxy.promSelector" -}}
{{- $m := compact (list .extra .selector) -}}
{{- if $m -}}{{- printf "{%s}" (join "," $m) -}}{{- end -}}
{{- end -}}
