{{/*
The gateway's whole nginx.conf, rendered from values. The same text runs in the cluster
(ConfigMap) and under `make serve` (shared/serve/gateway.py renders it with helm and points
gateway.upstream, listenAddress, runtimeDir and apiKeysFile at local places).

It is assembled from the named blocks below, one concern each, so a feature touches one block:
  lawtune-serving.nginx.clientAddress   which address a client is (real_ip behind trusted proxies)
  lawtune-serving.nginx.slowClients     timeouts and the per-IP connection limit
  lawtune-serving.nginx.apiKeys         the key check (a hashed lookup, then the exact case)
  lawtune-serving.nginx.rateLimits      limit_req zones (valid keys, bad keys, page calls)
  lawtune-serving.nginx.pageBody        the one request shape a page call may send
  lawtune-serving.nginx.apiLocations    /v1/ (key, limits, vLLM), the catch-all, the error pages
  lawtune-serving.uiLocations           the assistant page and its keyless API (ui.*)
  lawtune-serving.nginx.pageUpstream    the internal hop that adds the key to checked page calls

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
{{- $uiAuth := include "lawtune-serving.uiAuth" . -}}
{{- include "lawtune-serving.validateGateway" . -}}
# Rendered by the lawtune-serving chart ({{ include "lawtune-serving.chart" . }}); edit values, not this file.
{{- with include "lawtune-serving.canary.mainContext" . }}{{ . | nindent 0 }}{{- end }}
worker_processes {{ include "lawtune-serving.gatewayWorkers" . }};
pid {{ $g.runtimeDir }}/nginx.pid;
error_log stderr warn;
# The page-call body check is one regular expression over the body (lawtune-serving.nginx.pageBody).
pcre_jit on;

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
    # No headers and no query strings are logged (a key pasted into a URL is refused first: lawtune-serving.nginx.noKeyInUrl).
    log_format lawtune '$remote_addr [$time_iso8601] "$request_method $uri $server_protocol" $status $body_bytes_sent '
                       'rt=$request_time urt=$upstream_response_time';
    access_log /dev/stdout lawtune;
    {{- else }}
    access_log off;
    {{- end }}

    client_max_body_size {{ $g.maxBodySize }};
    client_body_buffer_size {{ $g.maxBodySize }};
    keepalive_timeout {{ $g.timeouts.keepalive }};
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.clientAddress" 4) }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.slowClients" 4) }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.apiKeys" 4) }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.rateLimits" 4) }}
    {{- if include "lawtune-serving.pageProxy" . }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.pageBody" 4) }}
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

    # The API port{{ if and .Values.ui.enabled (ne $uiAuth "ingress") }} and the assistant page{{ end }}.
    server {
        listen {{ include "lawtune-serving.nginx.listenAddress" . }}{{ $g.containerPort }};
        server_name _;
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.noKeyInUrl" 8) }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.connectionLimit" 8) }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.healthz" 8) }}
        {{- if and .Values.ui.enabled (ne $uiAuth "ingress") }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.uiLocations" 8) }}
        {{- end }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.apiLocations" 8) }}
    }
    {{- if eq $uiAuth "ingress" }}

    # The page port (ui.auth=ingress): the assistant page, its keyless API and the API. Only the
    # ingress controller reaches it (the gateway's NetworkPolicy, ui.ingress.from).
    server {
        listen {{ include "lawtune-serving.nginx.listenAddress" . }}{{ .Values.ui.ingress.containerPort }};
        server_name _;
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.noKeyInUrl" 8) }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.connectionLimit" 8) }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.healthz" 8) }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.uiLocations" 8) }}
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.apiLocations" 8) }}
    }
    {{- end }}
    {{- if include "lawtune-serving.pageProxy" . }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.pageUpstream" 4) }}
    {{- end }}
}
{{- end }}


{{/* One block, indented, on its own lines (nothing when the block renders empty). Usage:
include "lawtune-serving.nginx.insert" (list . "<block name>" <indent>) */}}
{{- define "lawtune-serving.nginx.insert" -}}
{{- $out := include (index . 1) (index . 0) | trim -}}
{{- if $out }}{{ regexReplaceAll "(?m)[ ]+$" ($out | nindent (index . 2)) "" }}{{ end }}
{{- end }}


{{/* `listen` prefix: gateway.listenAddress (an IPv6 address in brackets) or all addresses. */}}
{{- define "lawtune-serving.nginx.listenAddress" -}}
{{- with .Values.gateway.listenAddress }}{{ if contains ":" . }}[{{ trimAll "[]" . }}]{{ else }}{{ . }}{{ end }}:{{ end }}
{{- end }}


{{/*
Which address a client is. Only a peer in gateway.realIp.trustedCidrs may say who the client
is (its realIp.header); anyone else's X-Forwarded-For is ignored, so a client cannot pick
another client's rate-limit bucket. Behind an ingress without trustedCidrs every client is the
ingress controller's address and shares one bucket and one connection limit (values.yaml).
*/}}
{{- define "lawtune-serving.nginx.clientAddress" -}}
{{- $r := .Values.gateway.realIp -}}
{{- if $r.trustedCidrs }}
# Client addresses from trusted proxies only (gateway.realIp).
{{- range $r.trustedCidrs }}
set_real_ip_from {{ . }};
{{- end }}
real_ip_header {{ $r.header }};
real_ip_recursive on;
{{- end }}
{{- end }}


{{/*
Slow clients. A connection costs a worker slot (worker_connections; a proxied stream holds
two) and, once its headers are in, up to maxBodySize of body buffer. Slow headers are cut after
timeouts.clientHeader; a client address may hold at most connectionLimit.perClientIp
connections with a request in progress, and further ones are closed at once (444, no answer),
without waiting for a body a slow client would only trickle. limit_req runs before limit_conn,
so a slow request the rate limit refuses is answered 429 first and its body then read and dropped
(nginx's lingering): timeouts.discardBody bounds how long that holds the slot (nginx's default
is 30s, long enough for one address's refused connections to fill worker_connections).
*/}}
{{- define "lawtune-serving.nginx.slowClients" -}}
{{- $g := .Values.gateway -}}
# Slow clients: bounded waits, and a per-address share of the connections.
client_header_timeout {{ $g.timeouts.clientHeader }};
client_body_timeout {{ $g.timeouts.clientBody }};
send_timeout {{ $g.timeouts.clientSend }};
reset_timedout_connection on;
# A request answered before its body is in still has the body read and dropped, on its slot.
lingering_time {{ $g.timeouts.discardBody }};
lingering_timeout {{ $g.timeouts.discardBody }};
limit_conn_zone $binary_remote_addr zone=lawtune_conn:{{ $g.rateLimit.zoneSize }};
limit_conn_status 444;
limit_conn_log_level warn;
{{- end }}

{{/*
A key pasted into a URL. The access log leaves query strings out, but nginx's error log prints the
request line, query string included, for every rate-limited, connection-limited or upstream-failed
request, and vLLM's access log prints the request line it is sent. So a query string holding a
run of 32 or more of a key's characters (apiKeyMinLength; %-encoded or not) is answered 400 here,
in the server's rewrite phase: before the limits, the key check and vLLM, none of which then sees it.
*/}}
{{- define "lawtune-serving.nginx.noKeyInUrl" -}}
if ($args ~ "[A-Za-z0-9._~+/=%-]{ {{- include "lawtune-serving.apiKeyMinLength" . -}} ,}") {
    return 400 {{ include "lawtune-serving.openaiError" (list "An API key does not go in the URL (logs would keep it): send it as Authorization: Bearer <key>" "invalid_request_error" "key_in_url") }};
}
{{- end }}

{{- define "lawtune-serving.nginx.connectionLimit" -}}
limit_conn lawtune_conn {{ .Values.gateway.connectionLimit.perClientIp }};
{{- end }}


{{/*
The key check. The init container writes two files from the Secret: api-keys.map, whose
`"Bearer <key>" <id>;` lines nginx looks up in a hash table (map strings: a hashed lookup, so
timing tells nothing of how much of a guess was right; but case-insensitive), and
api-keys-exact.map, whose `"~^<id> Bearer <key, . and + escaped>$" 1;` lines then require the
exact case. A request passes only when both agree.
*/}}
{{- define "lawtune-serving.nginx.apiKeys" -}}
{{- $g := .Values.gateway -}}
# Accepted keys: a hashed lookup, then the exact case (files written from the Secret at pod start).
# A bucket holds a whole "Bearer <key>" string (keys are at most lawtune-serving.apiKeyMaxLength long).
map_hash_bucket_size 512;
map $http_authorization $lawtune_key_id {
    default "";
    include {{ $g.apiKeysFile }};
}
map "$lawtune_key_id $http_authorization" $lawtune_key_ok {
    default 0;
    include {{ include "lawtune-serving.apiKeysExactFile" . }};
}
{{- end }}


{{- define "lawtune-serving.nginx.rateLimits" -}}
{{- $g := .Values.gateway -}}
{{- $rl := $g.rateLimit -}}
{{- if $rl.enabled }}
# Per-client request rates: valid keys in lawtune_api, bad or missing keys per address in their own zone.
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
{{- if include "lawtune-serving.pageProxy" . }}
# The assistant page's calls carry no key, so they are limited per client address.
limit_req_zone $binary_remote_addr zone=lawtune_ui:{{ $rl.zoneSize }} rate={{ .Values.ui.rateLimit.requestsPerMinute }}r/m;
{{- end }}
{{- end }}


{{/*
Page calls (ui.auth=ingress or loopback) carry no key: the gateway adds it. So that such a
call can buy nothing but an answer to its conversation, the gateway forwards a body it builds
itself: the page's messages (roles system/user/assistant, string contents), the served model,
stream on and max_tokens = ui.maxTokens. A body of any other shape (another field, n, a larger
max_tokens, a duplicate key, nested content) matches nothing and is refused with 400. The
expression is the JSON grammar of exactly that shape, with possessive quantifiers, so it runs
in linear time over bodies up to gateway.maxBodySize.
*/}}
{{- define "lawtune-serving.nginx.pageBody" -}}
{{- $ws := `[ \t\r\n]*` -}}
{{- $str := `"(?:[^"\\\\\x00-\x1f]++|\\\\["\\\\/bfnrt]|\\\\u[0-9a-fA-F]{4})*+"` -}}
{{- $msg := printf `\{%s"role"%s:%s"(?:system|user|assistant)"%s,%s"content"%s:%s%s%s\}` $ws $ws $ws $ws $ws $ws $ws $str $ws -}}
{{- $msgs := printf `\[%s%s(?:%s,%s%s)*+%s\]` $ws $msg $ws $ws $msg $ws -}}
{{- $shape := printf `~^%s\{%s"model"%s:%s%s%s,%s"messages"%s:%s(?<lawtune_page_messages>%s)%s,%s"stream"%s:%strue%s,%s"max_tokens"%s:%s[0-9]{1,9}%s\}%s$` $ws $ws $ws $ws $str $ws $ws $ws $ws $msgs $ws $ws $ws $ws $ws $ws $ws $ws $ws $ws -}}
# Page calls: the body forwarded is built here from the page's messages; any other shape is refused.
map $request_body $lawtune_page_body {
    default "";
    '{{ $shape }}' '{"model":"{{ include "lawtune-serving.servedModelName" . }}","messages":$lawtune_page_messages,"stream":true,"max_tokens":{{ int .Values.ui.maxTokens }}}';
}
map $lawtune_page_body $lawtune_page_body_ok {
    "" 0;
    default 1;
}
{{- end }}


{{- define "lawtune-serving.nginx.healthz" -}}
# The gateway's own health: up even in maintenance, so clients get the 503 JSON
# from a ready gateway instead of a connection error.
location = /healthz {
    access_log off;
    return 200 '{"status":"ok","maintenance":{{ .Values.maintenance.enabled }}}';
}
{{- end }}


{{/* Settings every proxied call to vLLM shares (streaming, timeouts). */}}
{{- define "lawtune-serving.nginx.proxyToVllm" -}}
{{- $g := .Values.gateway -}}
proxy_http_version 1.1;
proxy_set_header Connection "";
# Server-sent events: pass every token on at once.
proxy_buffering off;
proxy_cache off;
proxy_request_buffering on;
proxy_connect_timeout {{ $g.timeouts.connect }};
proxy_read_timeout {{ $g.timeouts.read }};
proxy_send_timeout {{ $g.timeouts.send }};
{{- end }}


{{- define "lawtune-serving.nginx.modelVersionHeader" -}}
{{- /* With the canary on, the version that answered is named per request (lawtune-serving.canary.proxy). */}}
{{- if and .Values.model.version (not (include "lawtune-serving.canary.active" .)) }}
# The model version this release serves (pinned per release: lawtune deploy / model.version).
add_header X-Lawtune-Model-Version {{ .Values.model.version | quote }} always;
{{- end }}
{{- end }}


{{/* /v1/ behind the key and the limits, the catch-all, and the JSON error pages. */}}
{{- define "lawtune-serving.nginx.apiLocations" -}}
{{- $g := .Values.gateway -}}
{{- $rl := $g.rateLimit -}}
{{- $m := .Values.maintenance -}}
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
    # nginx refuses burst=0: 0 (the schema's minimum) means no burst, as for ui.rateLimit.
    limit_req zone=lawtune_api{{ if gt (int $rl.burst) 0 }} burst={{ $rl.burst }}{{ end }} nodelay;
    limit_req zone=lawtune_invalid_key{{ if gt (int $rl.invalidKey.burst) 0 }} burst={{ $rl.invalidKey.burst }}{{ end }} nodelay;
    {{- end }}
    auth_request /_lawtune_key;

    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.canary.proxy" 4) }}
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Request-Id $request_id;
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.modelVersionHeader" 4) }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.proxyToVllm" 4) }}
    {{- if not (include "lawtune-serving.canary.active" .) }}
    # An unreachable vLLM (starting, scaled to zero) answers 503 JSON, not nginx HTML.
    proxy_intercept_errors off;
    {{- end }}
}

location / {
    return 404 {{ include "lawtune-serving.openaiError" (list "Not found: the API is under /v1/" "invalid_request_error" "not_found") }};
}
{{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.canary.serverContext" 0) }}
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
{{- include "lawtune-serving.nginx.upstreamUnavailable" . }}
{{- end }}

{{- define "lawtune-serving.nginx.upstreamUnavailable" }}
location @upstream_unavailable {
    add_header Retry-After 10 always;
    return 503 {{ include "lawtune-serving.openaiError" (list "The model server is unavailable; retry shortly" "service_unavailable" "upstream_unavailable") }};
}
{{- end }}


{{/*
The assistant page (ui.enabled): `/` and `/ui/*` from ui.filesDir, `/ui/status` for the page's
poll of the switch, and with ui.auth=ingress or loopback `/ui/api/v1/chat/completions`, where
the gateway adds the API key itself. These exact and longer-prefix locations win over the
catch-all `location /`, so the page still loads in maintenance (and shows the message).
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
{{- if include "lawtune-serving.pageProxy" . }}
# Page calls: {{ if eq $uiAuth "ingress" }}the ingress has authenticated the user (it sets {{ $ui.ingress.identityHeader }}){{ else }}only this machine reaches the gateway (loopback){{ end }};
# the gateway adds the key. Only chat completions, only POST, only with the page's header (a
# cross-site form or fetch cannot send it without a CORS preflight, which nothing here
# approves), and only the body shape lawtune-serving.nginx.pageBody rebuilds.
location = /ui/api/v1/chat/completions {
    {{- if $m.enabled }}
    add_header Retry-After {{ $m.retryAfterSeconds }} always;
    return 503 {{ include "lawtune-serving.openaiError" (list $m.message "service_unavailable" "maintenance") }};
    {{- else }}
    if ($http_x_lawtune_page != "1") {
        return 403 {{ include "lawtune-serving.openaiError" (list "Page calls only: send X-Lawtune-Page: 1" "invalid_request_error" "forbidden") }};
    }
    {{- if eq $uiAuth "ingress" }}
    if ({{ include "lawtune-serving.headerVariable" $ui.ingress.identityHeader }} = "") {
        return 401 {{ include "lawtune-serving.openaiError" (list (printf "No authenticated user: the ingress sets %s on page calls" $ui.ingress.identityHeader) "invalid_request_error" "unauthenticated") }};
    }
    {{- end }}
    limit_except POST { deny all; }
    limit_req zone=lawtune_ui{{ if gt (int $ui.rateLimit.burst) 0 }} burst={{ $ui.rateLimit.burst }}{{ end }} nodelay;
    error_page 413 = @too_large;
    error_page 429 = @ui_rate_limited;
    error_page 502 503 504 = @upstream_unavailable;

    # The body must be in one memory buffer for the shape check (client_body_buffer_size = maxBodySize).
    client_body_in_single_buffer on;
    proxy_pass http://unix:{{ include "lawtune-serving.pageSocket" . }}:/v1/chat/completions;
    proxy_set_body $lawtune_page_body;
    proxy_set_header Content-Type application/json;
    proxy_set_header X-Lawtune-Page-Body $lawtune_page_body_ok;
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Request-Id $request_id;
    # Whatever credentials the browser sent (the SSO session cookie) stay at the gateway.
    proxy_set_header Cookie "";
    proxy_set_header Authorization "";
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.modelVersionHeader" 4) }}
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.proxyToVllm" 4) }}
    {{- end }}
}
location @ui_rate_limited {
    add_header Retry-After {{ $ui.rateLimit.retryAfterSeconds }} always;
    return 429 {{ include "lawtune-serving.openaiError" (list "Too many questions: wait for the Retry-After seconds" "rate_limit_exceeded" "rate_limit_exceeded") }};
}
{{- end }}
{{- end }}


{{/*
The internal hop of page calls, on a unix socket in runtimeDir that only this pod's nginx
reaches: it refuses a body the shape check rejected (400) and otherwise adds the key and
passes the rebuilt body to vLLM.
*/}}
{{- define "lawtune-serving.nginx.pageUpstream" -}}

# Page calls, second hop: only checked bodies reach vLLM, with the key the gateway adds.
server {
    listen unix:{{ include "lawtune-serving.pageSocket" . }};
    access_log off;
    location = /v1/chat/completions {
        if ($http_x_lawtune_page_body != "1") {
            return 400 {{ include "lawtune-serving.openaiError" (list "Page calls send only {\"model\", \"messages\" (role and text content), \"stream\": true, \"max_tokens\"}, in that order" "invalid_request_error" "invalid_page_request") }};
        }
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.canary.uiProxy" 8) }}
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $http_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $http_x_forwarded_proto;
        proxy_set_header X-Request-Id $http_x_request_id;
        proxy_set_header X-Lawtune-Page-Body "";
        include {{ include "lawtune-serving.uiUpstreamAuthFile" . }};
        {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.proxyToVllm" 8) }}
    }
    location / {
        return 404;
    }
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.canary.pageServerContext" 4) }}
    error_page 502 503 504 = @upstream_unavailable;
    {{- include "lawtune-serving.nginx.insert" (list . "lawtune-serving.nginx.upstreamUnavailable" 4) }}
}
{{- end }}
