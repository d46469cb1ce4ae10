{{/*
The gateway's whole nginx.conf, rendered from values. The same text runs in the cluster
(ConfigMap) and under `make serve` (shared/serve/gateway.py renders it with helm and points
gateway.upstream, listenAddress, runtimeDir and apiKeysFile at local places).

Order inside a request matters: the maintenance `return` runs in nginx's rewrite phase, so a
switched-off service answers without touching rate-limit state or vLLM. Then limit_req
(preaccess) counts a request in one of two zones, picked by whether its key is valid (a
limit_req key that is empty is not counted): valid keys in the client zone (rateLimit), bad or
missing keys per client IP in their own zone (rateLimit.invalidKey), so guessing keys gets
429s and never spends a real client's budget. Only then does auth_request (access phase)
answer a bad key with 401, and only a valid key reaches vLLM.
*/}}
{{- define "lawtune-serving.nginxConf" -}}
{{- $g := .Values.gateway -}}
{{- $rl := $g.rateLimit -}}
{{- $m := .Values.maintenance -}}
{{- $ui := .Values.ui -}}
{{- $uiAuth := include "lawtune-serving.uiAuth" . -}}
# Rendered by the lawtune-serving chart ({{ include "lawtune-serving.chart" . }}); edit values, not this file.
{{- with include "lawtune-serving.canary.mainContext" . }}{{ . | nindent 0 }}{{- end }}
worker_processes {{ include "lawtune-serving.gatewayWorkers" . }};
pid {{ $g.runtimeDir }}/nginx.pid;
error_log stderr warn;

events {
    worker_connections {{ $g.workerConnections }};
}

http {
    default_type application/json;
    server_tokens off;
    charset utf-8;
    # Writable places only under runtimeDir: the root filesystem is read-only.
    client_body_temp_path {{ $g.runtimeDir }}/client_body;
    proxy_temp_path {{ $g.runtimeDir }}/proxy;
    fastcgi_temp_path {{ $g.runtimeDir }}/fastcgi;
    uwsgi_temp_path {{ $g.runtimeDir }}/uwsgi;
    scgi_temp_path {{ $g.runtimeDir }}/scgi;

    {{- if $g.accessLog }}
    # No headers are logged, so API keys never reach the log.
    log_format lawtune '$remote_addr [$time_iso8601] "$request" $status $body_bytes_sent '
                       'rt=$request_time urt=$upstream_response_time';
    access_log /dev/stdout lawtune;
    {{- else }}
    access_log off;
    {{- end }}

    {{- range $g.realIp.trustedCidrs }}
    set_real_ip_from {{ . }};
    {{- end }}
    {{- if $g.realIp.trustedCidrs }}
    real_ip_header {{ $g.realIp.header }};
    real_ip_recursive on;
    {{- end }}

    client_max_body_size {{ $g.maxBodySize }};
    client_body_buffer_size {{ $g.maxBodySize }};
    client_body_timeout {{ $g.timeouts.clientBody }};
    keepalive_timeout {{ $g.timeouts.keepalive }};

    # Accepted keys: lines of `"~^Bearer <key, . and + escaped>$" 1;`, written from the
    # Secret at pod start. Regexes, because plain map strings match case-insensitively.
    map $http_authorization $lawtune_key_ok {
        default 0;
        include {{ $g.apiKeysFile }};
    }

    {{- if $rl.enabled }}
    map $lawtune_key_ok $lawtune_client {
        1 {{ ternary "$http_authorization" "$binary_remote_addr" (eq $rl.key "apiKey") }};
        default "";
    }
    map $lawtune_key_ok $lawtune_guesser {
        0 $binary_remote_addr;
        default "";
    }
    limit_req_zone $lawtune_client zone=lawtune_api:{{ $rl.zoneSize }} rate={{ $rl.requestsPerSecond }}r/s;
    limit_req_zone $lawtune_guesser zone=lawtune_invalid_key:{{ $rl.zoneSize }} rate={{ $rl.invalidKey.requestsPerSecond }}r/s;
    limit_req_status 429;
    limit_req_log_level warn;
    {{- end }}

    {{- if eq $uiAuth "ingress" }}
    # The assistant page (ui.auth=ingress): page calls carry no key, so they are limited per client IP.
    limit_req_zone $binary_remote_addr zone=lawtune_ui:{{ $rl.zoneSize }} rate={{ $ui.rateLimit.requestsPerMinute }}r/m;
    {{- end }}

    {{- with include "lawtune-serving.canary.httpContext" . }}{{ . | nindent 4 }}{{- end }}

    upstream lawtune_vllm {
        server {{ include "lawtune-serving.upstream" . }};
        keepalive {{ $g.upstreamKeepalive }};
        # A kept-alive connection through the vLLM Service stays on one pod, also after that pod
        # left the endpoints to drain: retire connections early, so new requests reach other pods.
        keepalive_time {{ $g.upstreamKeepaliveSeconds }}s;
        keepalive_timeout {{ $g.upstreamKeepaliveSeconds }}s;
    }

    server {
        listen {{ if $g.listenAddress }}{{ $g.listenAddress }}:{{ end }}{{ $g.containerPort }};
        server_name _;

        # The gateway's own health: up even in maintenance, so clients get the 503 JSON
        # from a ready gateway instead of a connection error.
        location = /healthz {
            access_log off;
            return 200 '{"status":"ok","maintenance":{{ $m.enabled }}}';
        }

        {{- if $ui.enabled }}
        {{- include "lawtune-serving.uiLocations" . | nindent 8 }}
        {{- end }}

        {{- if $m.enabled }}

        # Degradation switch on: every API call gets 503 with the configured message.
        location / {
            add_header Retry-After {{ $m.retryAfterSeconds }} always;
            return 503 {{ include "lawtune-serving.openaiError" (list $m.message "service_unavailable" "maintenance") }};
        }
        {{- else }}

        location = /_lawtune_key {
            internal;
            if ($lawtune_key_ok = 0) {
                return 401;
            }
            return 204;
        }

        location /v1/ {
            {{- if $rl.enabled }}
            limit_req zone=lawtune_api burst={{ $rl.burst }} nodelay;
            limit_req zone=lawtune_invalid_key burst={{ $rl.invalidKey.burst }} nodelay;
            {{- end }}
            auth_request /_lawtune_key;

{{ include "lawtune-serving.canary.proxy" . | indent 12 }}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;
            {{- if and .Values.model.version (not (include "lawtune-serving.canary.active" .)) }}
            # The model version this release serves (pinned per release: lawtune deploy / model.version).
            add_header X-Lawtune-Model-Version {{ .Values.model.version | quote }} always;
            {{- end }}
            # Server-sent events: pass every token on at once.
            proxy_buffering off;
            proxy_cache off;
            proxy_request_buffering on;
            proxy_connect_timeout {{ $g.timeouts.connect }};
            proxy_read_timeout {{ $g.timeouts.read }};
            proxy_send_timeout {{ $g.timeouts.send }};
            {{- if not (include "lawtune-serving.canary.active" .) }}
            # An unreachable vLLM (starting, scaled to zero) answers 503 JSON, not nginx HTML.
            proxy_intercept_errors off;
            {{- end }}
        }

        location / {
            return 404 {{ include "lawtune-serving.openaiError" (list "Not found: the API is under /v1/" "invalid_request_error" "not_found") }};
        }
        {{- with include "lawtune-serving.canary.serverContext" . }}{{ . | nindent 8 }}{{- end }}
        {{- end }}

        error_page 401 = @unauthorized;
        error_page 413 = @too_large;
        error_page 429 = @rate_limited;
        error_page 502 503 504 = @upstream_unavailable;

        location @unauthorized {
            add_header WWW-Authenticate Bearer always;
            return 401 {{ include "lawtune-serving.openaiError" (list "Missing or invalid API key: send Authorization: Bearer <key>" "invalid_request_error" "invalid_api_key") }};
        }
        location @too_large {
            return 413 {{ include "lawtune-serving.openaiError" (list (printf "Request body larger than %s" $g.maxBodySize) "invalid_request_error" "request_too_large") }};
        }
        location @rate_limited {
            add_header Retry-After {{ $rl.retryAfterSeconds }} always;
            return 429 {{ include "lawtune-serving.openaiError" (list "Rate limit exceeded: slow down and retry after the Retry-After seconds" "rate_limit_exceeded" "rate_limit_exceeded") }};
        }
        location @upstream_unavailable {
            add_header Retry-After 10 always;
            return 503 {{ include "lawtune-serving.openaiError" (list "The model server is unavailable; retry shortly" "service_unavailable" "upstream_unavailable") }};
        }
    }
}
{{- end }}


{{/*
The assistant page (ui.enabled): `/` and `/ui/*` from ui.filesDir, `/ui/status` for the page's
poll of the switch, and with ui.auth=ingress `/ui/api/v1/chat/completions`, where the gateway
adds the API key itself. These exact and longer-prefix locations win over the catch-all
`location /`, so the page still loads in maintenance (and shows the message).
*/}}
{{- define "lawtune-serving.uiLocations" -}}
{{- $g := .Values.gateway -}}
{{- $m := .Values.maintenance -}}
{{- $ui := .Values.ui -}}
{{- $uiAuth := include "lawtune-serving.uiAuth" . -}}
{{- $headers := list
  "add_header Content-Security-Policy \"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\" always;"
  "add_header X-Content-Type-Options nosniff always;"
  "add_header Referrer-Policy no-referrer always;"
  "add_header Cache-Control no-cache always;" -}}

# The assistant page. No inline script or style anywhere, so the CSP allows only the page's own files.
location = / {
    root {{ $ui.filesDir }};
    try_files /index.html =404;
    types { text/html html; }
    {{- range $headers }}
    {{ . }}
    {{- end }}
}
location /ui/ {
    alias {{ $ui.filesDir }}/;
    types { text/html html; text/css css; text/javascript js; application/json json; }
    charset_types text/css text/javascript application/json;
    limit_except GET { deny all; }
    {{- range $headers }}
    {{ . }}
    {{- end }}
}
# The switch, cheap enough to poll: the page hides its input while maintenance is on.
location = /ui/status {
    access_log off;
    default_type application/json;
    add_header Cache-Control no-store always;
    return 200 {{ printf "'%s'" ((dict "maintenance" $m.enabled "message" (ternary $m.message "" $m.enabled) "retryAfterSeconds" $m.retryAfterSeconds) | toJson | replace "\\" "\\\\" | replace "'" "\\'") }};
}
{{- if eq $uiAuth "ingress" }}
# Page calls: the ingress has authenticated the user, the gateway adds the key. Only chat
# completions, only POST, only with the page's header (a cross-site form or fetch cannot send
# it without a CORS preflight, which nothing here approves).
location = /ui/api/v1/chat/completions {
    {{- if $m.enabled }}
    add_header Retry-After {{ $m.retryAfterSeconds }} always;
    return 503 {{ include "lawtune-serving.openaiError" (list $m.message "service_unavailable" "maintenance") }};
    {{- else }}
    if ($http_x_lawtune_page != "1") {
        return 403 {{ include "lawtune-serving.openaiError" (list "Page calls only: send X-Lawtune-Page: 1" "invalid_request_error" "forbidden") }};
    }
    limit_except POST { deny all; }
    limit_req zone=lawtune_ui{{ if gt (int $ui.rateLimit.burst) 0 }} burst={{ $ui.rateLimit.burst }}{{ end }} nodelay;
    error_page 413 = @too_large;
    error_page 429 = @ui_rate_limited;
    error_page 502 503 504 = @upstream_unavailable;

{{ include "lawtune-serving.canary.uiProxy" . | indent 4 }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Request-Id $request_id;
    # The SSO session cookie stays at the gateway; vLLM gets the key instead.
    proxy_set_header Cookie "";
    include {{ include "lawtune-serving.uiUpstreamAuthFile" . }};
    {{- if and .Values.model.version (not (include "lawtune-serving.canary.active" .)) }}
    add_header X-Lawtune-Model-Version {{ .Values.model.version | quote }} always;
    {{- end }}
    proxy_buffering off;
    proxy_cache off;
    proxy_request_buffering on;
    proxy_connect_timeout {{ $g.timeouts.connect }};
    proxy_read_timeout {{ $g.timeouts.read }};
    proxy_send_timeout {{ $g.timeouts.send }};
    {{- end }}
}
location @ui_rate_limited {
    add_header Retry-After {{ $ui.rateLimit.retryAfterSeconds }} always;
    return 429 {{ include "lawtune-serving.openaiError" (list "Too many questions: wait for the Retry-After seconds" "rate_limit_exceeded" "rate_limit_exceeded") }};
}
{{- end }}
{{- end }}
