{{/*
The vLLM pod's metrics sidecar: nginx on vllm.metricsProxy.port answering GET /metrics from
vLLM on the pod's loopback, and 404 for everything else. vLLM requires its key only on /v1,
/v2, /inference and /cohere: /invocations, /tokenize, /classify, /pooling and the like answer
anyone who reaches its port. So the scraper (networkPolicy.metricsFrom) is admitted to this
port only, never to vLLM's.
*/}}
{{- define "lawtune-serving.metricsProxyConf" -}}
{{- $p := .Values.vllm.metricsProxy -}}
# Rendered by the lawtune-serving chart ({{ include "lawtune-serving.chart" . }}); edit values, not this file.
worker_processes 1;
pid {{ $p.runtimeDir }}/nginx.pid;
error_log stderr warn;

events {
    worker_connections 64;
}

http {
    server_tokens off;
    access_log off;
    client_body_temp_path {{ $p.runtimeDir }}/client_body;
    proxy_temp_path {{ $p.runtimeDir }}/proxy;
    fastcgi_temp_path {{ $p.runtimeDir }}/fastcgi;
    uwsgi_temp_path {{ $p.runtimeDir }}/uwsgi;
    scgi_temp_path {{ $p.runtimeDir }}/scgi;
    client_max_body_size 0;

    server {
        listen {{ with $p.listenAddress }}{{ if contains ":" . }}[{{ trimAll "[]" . }}]{{ else }}{{ . }}{{ end }}:{{ end }}{{ $p.port }};
        location = /metrics {
            limit_except GET { deny all; }
            proxy_pass http://{{ default (printf "127.0.0.1:%v" .Values.vllm.port) $p.upstream }}/metrics;
            proxy_set_header Authorization "";
            proxy_pass_request_body off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 30s;
        }
        location / {
            default_type application/json;
            return 404 '{"error":"the metrics port serves /metrics only"}';
        }
    }
}
{{- end }}
