{{/*
Sidecar mode: the named templates an application's chart includes in its own pod template.
The application's chart lists this chart as a dependency (with mode: sidecar in its values) and
passes its root context, `.`; for an aliased dependency it passes `(index .Subcharts "ALIAS")`.
helm/examples/example-app is a complete chart that does this:

  template:
    metadata:
      annotations:
        {{- include "openai-resilience-proxy.sidecar.podAnnotations" . | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ include "openai-resilience-proxy.sidecar.terminationGracePeriodSeconds" . }}
      {{- with include "openai-resilience-proxy.sidecar.initContainers" . }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: app
          env:
            - name: OPENAI_BASE_URL
              value: {{ include "openai-resilience-proxy.sidecar.baseURL" . | quote }}
        {{- include "openai-resilience-proxy.sidecar.containers" . | nindent 8 }}
      volumes:
        {{- include "openai-resilience-proxy.sidecar.volumes" . | nindent 8 }}

initContainers holds the proxy as a native sidecar (restartPolicy: Always: it starts and passes
its startup probe before the application's containers start, and stops after they have exited);
containers holds it instead as a classic container on clusters older than 1.29 (sidecar.native).
Exactly one of the two renders something.
*/}}

{{/* This chart's context from the including chart's: `.Subcharts.openai-resilience-proxy`. */}}
{{- define "openai-resilience-proxy.sidecar.check" -}}
{{- if not (and (hasKey . "Values") (hasKey .Values "sidecar") (hasKey .Values "mode")) -}}
{{- fail "openai-resilience-proxy sidecar templates: pass the application chart's root context (with openai-resilience-proxy as a dependency), or (index .Subcharts \"ALIAS\") for an aliased dependency" -}}
{{- end -}}
{{- if ne .Values.mode "sidecar" -}}
{{- fail (printf "openai-resilience-proxy: the sidecar templates need mode: sidecar in the dependency's values (%s.mode), not %q" .Chart.Name .Values.mode) -}}
{{- end -}}
{{- end -}}

{{- define "openai-resilience-proxy.sidecar.initContainers" -}}
{{- $p := . -}}
{{- if and (hasKey . "Subcharts") (hasKey .Subcharts "openai-resilience-proxy") -}}{{- $p = index .Subcharts "openai-resilience-proxy" -}}{{- end -}}
{{- include "openai-resilience-proxy.sidecar.check" $p -}}
{{- if include "openai-resilience-proxy.nativeSidecar" $p -}}
{{- include "openai-resilience-proxy.container" (dict "ctx" $p "native" true) -}}
{{- end -}}
{{- end -}}

{{- define "openai-resilience-proxy.sidecar.containers" -}}
{{- $p := . -}}
{{- if and (hasKey . "Subcharts") (hasKey .Subcharts "openai-resilience-proxy") -}}{{- $p = index .Subcharts "openai-resilience-proxy" -}}{{- end -}}
{{- include "openai-resilience-proxy.sidecar.check" $p -}}
{{- if not (include "openai-resilience-proxy.nativeSidecar" $p) -}}
{{- include "openai-resilience-proxy.container" (dict "ctx" $p "native" false) -}}
{{- end -}}
{{- end -}}

{{- define "openai-resilience-proxy.sidecar.volumes" -}}
{{- $p := . -}}
{{- if and (hasKey . "Subcharts") (hasKey .Subcharts "openai-resilience-proxy") -}}{{- $p = index .Subcharts "openai-resilience-proxy" -}}{{- end -}}
{{- include "openai-resilience-proxy.sidecar.check" $p -}}
{{- include "openai-resilience-proxy.volumes" $p -}}
{{- end -}}

{{/* Pod annotations: the config checksum (a config change rolls the pods) and scrape hints. */}}
{{- define "openai-resilience-proxy.sidecar.podAnnotations" -}}
{{- $p := . -}}
{{- if and (hasKey . "Subcharts") (hasKey .Subcharts "openai-resilience-proxy") -}}{{- $p = index .Subcharts "openai-resilience-proxy" -}}{{- end -}}
{{- include "openai-resilience-proxy.sidecar.check" $p -}}
checksum/openai-resilience-proxy-config: {{ include "openai-resilience-proxy.configChecksum" $p }}
{{- if include "openai-resilience-proxy.scrapeAnnotationsOn" $p }}
{{ include "openai-resilience-proxy.scrapeAnnotations" $p }}
{{- end -}}
{{- end -}}

{{/* At least the proxy's drain; an application with a longer drain of its own takes the max. */}}
{{- define "openai-resilience-proxy.sidecar.terminationGracePeriodSeconds" -}}
{{- $p := . -}}
{{- if and (hasKey . "Subcharts") (hasKey .Subcharts "openai-resilience-proxy") -}}{{- $p = index .Subcharts "openai-resilience-proxy" -}}{{- end -}}
{{- include "openai-resilience-proxy.sidecar.check" $p -}}
{{- include "openai-resilience-proxy.terminationGracePeriodSeconds" $p -}}
{{- end -}}

{{/* What the application sets as OPENAI_BASE_URL. */}}
{{- define "openai-resilience-proxy.sidecar.baseURL" -}}
{{- $p := . -}}
{{- if and (hasKey . "Subcharts") (hasKey .Subcharts "openai-resilience-proxy") -}}{{- $p = index .Subcharts "openai-resilience-proxy" -}}{{- end -}}
{{- include "openai-resilience-proxy.sidecar.check" $p -}}
{{- $host := dig "listen" "host" "127.0.0.1" (default (dict) $p.Values.config) -}}
{{- if has $host (list "0.0.0.0" "::" "") -}}{{- $host = "127.0.0.1" -}}{{- end -}}
{{- if contains ":" $host -}}{{- $host = printf "[%s]" $host -}}{{- end -}}
{{- printf "http://%s:%d/v1" $host (int $p.Values.ports.http) -}}
{{- end -}}
