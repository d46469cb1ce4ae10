{{/*
The canary in the gateway: which version answers each request, champion or challenger, by the
weight `lawtune models canary` set (files/canary.js, njs); on in serving.mode=adapters and with
canary.enabled. These blocks plug into _nginx.conf.tpl; with the canary off they render what the
gateway always rendered.

Each request: `set $lawtune_version $lawtune_pick` (rewrite phase) picks the version from the
routes file the gateway agent keeps current; proxy_set_body rewrites the request's `model` to
`<model>:<version>`; the response carries X-Lawtune-Model-Version and vLLM's `model` names the
version too; a 404 from a replica that has not loaded that version yet is retried on the version
before (@lawtune_fallback); and one syslog line per request feeds the agent's per-version metrics.
*/}}

{{- define "lawtune-serving.canary.active" -}}
{{- if or (eq (include "lawtune-serving.mode" .) "adapters") .Values.canary.enabled }}true{{ end }}
{{- end }}

{{/* merged mode: the challenger runs in a Deployment of its own (vllm-challenger.yaml). */}}
{{- define "lawtune-serving.canary.challengerDeployed" -}}
{{- if and (include "lawtune-serving.canary.active" .) (ne (include "lawtune-serving.mode" .) "adapters") .Values.canary.challengerVersion }}true{{ end }}
{{- end }}

{{- define "lawtune-serving.vllmChallenger.fullname" -}}
{{- printf "%s-vllm-challenger" (include "lawtune-serving.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{- define "lawtune-serving.canary.routesFile" -}}
{{- printf "%s/routes.json" (.Values.canary.routesDir | trimSuffix "/") }}
{{- end }}

{{- define "lawtune-serving.canary.upstream" -}}
{{- ternary "$lawtune_upstream" "lawtune_vllm" (eq (include "lawtune-serving.canary.challengerDeployed" .) "true") }}
{{- end }}

{{- define "lawtune-serving.canary.accessLog" -}}
access_log syslog:server=127.0.0.1:{{ .Values.canary.agent.syslogPort }},tag=lawtune_canary,nohostname lawtune_canary;
{{- if .Values.gateway.accessLog }}
access_log /dev/stdout lawtune;
{{- end }}
{{- end }}

{{- define "lawtune-serving.canary.mainContext" -}}
{{- if include "lawtune-serving.canary.active" . -}}
# The canary split runs in njs (files/canary.js).
load_module {{ .Values.canary.njsModule }};
{{- end }}
{{- end }}

{{- define "lawtune-serving.canary.httpContext" -}}
{{- if include "lawtune-serving.canary.active" . -}}
# The canary: the routes file (champion, challenger, weight) is read on every request.
js_path {{ .Values.canary.scriptDir }};
js_import lawtune_canary from canary.js;
js_var $lawtune_routes_file {{ include "lawtune-serving.canary.routesFile" . }};
js_var $lawtune_model;
js_var $lawtune_arm;
js_var $lawtune_served;
js_var $lawtune_fallback_version;
js_var $lawtune_client_id;
js_set $lawtune_pick lawtune_canary.pick;
js_set $lawtune_body lawtune_canary.body;
js_set $lawtune_fallback_body lawtune_canary.fallbackBody;
# One line per request to the gateway agent (per-version metrics); no headers, so no keys.
log_format lawtune_canary escape=json '{"model":"$lawtune_model","picked":"$lawtune_version","served":"$lawtune_served",'
                                      '"arm":"$lawtune_arm","status":$status,"request_time":$request_time}';
{{- if include "lawtune-serving.canary.challengerDeployed" . }}

# merged mode: the challenger's own Deployment (canary.challengerVersion).
upstream lawtune_vllm_challenger {
    server {{ .Values.canary.challengerUpstream | default (printf "%s:%v" (include "lawtune-serving.vllmChallenger.fullname" .) .Values.vllm.service.port) }};
    keepalive {{ .Values.gateway.upstreamKeepalive }};
    keepalive_time {{ .Values.gateway.upstreamKeepaliveSeconds }}s;
    keepalive_timeout {{ .Values.gateway.upstreamKeepaliveSeconds }}s;
}
map $lawtune_version $lawtune_upstream {
    default lawtune_vllm;
    {{ .Values.canary.challengerVersion | quote }} lawtune_vllm_challenger;
}
map $lawtune_fallback_version $lawtune_fallback_upstream {
    default lawtune_vllm;
    {{ .Values.canary.challengerVersion | quote }} lawtune_vllm_challenger;
}
{{- end }}
{{- end }}
{{- end }}

{{/* In `location /v1/`, in place of its proxy_pass. */}}
{{- define "lawtune-serving.canary.proxy" -}}
{{- if include "lawtune-serving.canary.active" . -}}
# The canary picks the version (files/canary.js) and names it in the request's model and the response.
set $lawtune_version $lawtune_pick;
proxy_pass http://{{ include "lawtune-serving.canary.upstream" . }};
proxy_set_body $lawtune_body;
add_header X-Lawtune-Model-Version $lawtune_served always;
# A replica that has not loaded the picked version yet answers 404: the version before answers instead.
proxy_intercept_errors on;
error_page 404 = @lawtune_fallback;
# A location's error_page replaces the server's: the same ones again.
error_page 401 = @unauthorized;
error_page 413 = @too_large;
error_page 429 = @rate_limited;
error_page 502 503 504 = @upstream_unavailable;
{{ include "lawtune-serving.canary.accessLog" . }}
{{- else -}}
proxy_pass http://lawtune_vllm;
{{- end }}
{{- end }}

{{/* In the page calls' second hop (lawtune-serving.nginx.pageUpstream, ui.auth=ingress or loopback), in place of
its proxy_pass. Page calls carry no key of their own: they stick to a side by the user the ingress names
(ui.ingress.identityHeader), else by the client's address, or by the page's conversation id. */}}
{{- define "lawtune-serving.canary.uiProxy" -}}
{{- if include "lawtune-serving.canary.active" . -}}
{{- if eq (include "lawtune-serving.uiAuth" .) "ingress" }}
set $lawtune_client_id "u:{{ include "lawtune-serving.headerVariable" .Values.ui.ingress.identityHeader }}";
{{- else }}
set $lawtune_client_id "a:$http_x_forwarded_for";
{{- end }}
set $lawtune_version $lawtune_pick;
proxy_pass http://{{ include "lawtune-serving.canary.upstream" . }}/v1/chat/completions;
proxy_set_body $lawtune_body;
add_header X-Lawtune-Model-Version $lawtune_served always;
proxy_intercept_errors on;
error_page 404 = @lawtune_ui_fallback;
error_page 502 503 504 = @upstream_unavailable;
{{ include "lawtune-serving.canary.accessLog" . }}
{{- else -}}
proxy_pass http://lawtune_vllm/v1/chat/completions;
{{- end }}
{{- end }}

{{/* The retry on the version before, shared by the API and the page (their URIs differ). */}}
{{- define "lawtune-serving.canary.fallbackBody" -}}
{{- $g := .root.Values.gateway -}}
# Only versions the gateway picked are retried elsewhere; a pinned or unknown model keeps its 404.
if ($lawtune_arm !~ "^(champion|challenger)$") {
    return 404 {{ include "lawtune-serving.openaiError" (list "Not found: no such model or path (the models are NAME and NAME:VERSION)" "invalid_request_error" "not_found") }};
}
if ($lawtune_fallback_version = "") {
    add_header Retry-After 1 always;
    return 503 {{ include "lawtune-serving.openaiError" (list "The model version is loading on this replica; retry shortly" "service_unavailable" "version_loading") }};
}
{{- if .uri }}
rewrite ^ {{ .uri }} break;
{{- end }}
proxy_pass http://{{ ternary "$lawtune_fallback_upstream" "lawtune_vllm" (eq (include "lawtune-serving.canary.challengerDeployed" .root) "true") }};
proxy_http_version 1.1;
proxy_set_header Connection "";
proxy_set_header Host $host;
{{- if .page }}
proxy_set_header X-Forwarded-For $http_x_forwarded_for;
proxy_set_header X-Forwarded-Proto $http_x_forwarded_proto;
proxy_set_header X-Request-Id $http_x_request_id;
proxy_set_header X-Lawtune-Page-Body "";
include {{ include "lawtune-serving.uiUpstreamAuthFile" .root }};
{{- else }}
proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
proxy_set_header X-Forwarded-Proto $scheme;
proxy_set_header X-Request-Id $request_id;
{{- end }}
proxy_set_body $lawtune_fallback_body;
add_header X-Lawtune-Model-Version $lawtune_served always;
proxy_buffering off;
proxy_cache off;
proxy_connect_timeout {{ $g.timeouts.connect }};
proxy_read_timeout {{ $g.timeouts.read }};
proxy_send_timeout {{ $g.timeouts.send }};
{{ include "lawtune-serving.canary.accessLog" .root }}
{{- end }}

{{/* Named locations of the server block. */}}
{{- define "lawtune-serving.canary.serverContext" -}}
{{- if and (include "lawtune-serving.canary.active" .) (not .Values.maintenance.enabled) -}}
location @lawtune_fallback {
    {{- include "lawtune-serving.canary.fallbackBody" (dict "root" . "uri" "" "page" false) | nindent 4 }}
}
{{- end }}
{{- end }}

{{/* Named location of the page calls' second hop (lawtune-serving.nginx.pageUpstream). */}}
{{- define "lawtune-serving.canary.pageServerContext" -}}
{{- if include "lawtune-serving.canary.active" . -}}
location @lawtune_ui_fallback {
    {{- include "lawtune-serving.canary.fallbackBody" (dict "root" . "uri" "/v1/chat/completions" "page" true) | nindent 4 }}
}
{{- end }}
{{- end }}

{{/* The gateway ConfigMap's canary.js (mounted with nginx.conf at canary.scriptDir). */}}
{{- define "lawtune-serving.canary.configData" -}}
{{- if include "lawtune-serving.canary.active" . -}}
canary.js: |
  {{- .Files.Get "files/canary.js" | nindent 2 }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.canary.podAnnotations" -}}
{{- if include "lawtune-serving.canary.active" . -}}
checksum/canary: {{ .Files.Get "files/canary.js" | sha256sum }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.canary.nginxMounts" -}}
{{- if include "lawtune-serving.canary.active" . -}}
- name: routes
  mountPath: {{ .Values.canary.routesDir }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "lawtune-serving.canary.volumes" -}}
{{- if include "lawtune-serving.canary.active" . -}}
- name: routes
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: agent-tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end }}
{{- end }}

{{/* The gateway agent: keeps the routes file current and exports per-version metrics. */}}
{{- define "lawtune-serving.canary.agent" -}}
{{- if include "lawtune-serving.canary.active" . -}}
{{- $c := .Values.canary -}}
- name: canary-agent
  image: {{ include "lawtune-serving.fetchModelImage" . | quote }}
  imagePullPolicy: {{ .Values.fetchModel.image.pullPolicy }}
  command: ["python", "-m", "shared.serve.agent"]
  args:
    - --model-name={{ .Values.model.name }}
    - --role=gateway
    - --routes-file={{ include "lawtune-serving.canary.routesFile" . }}
    - --syslog-port={{ $c.agent.syslogPort }}
    - --poll-seconds={{ $c.pollSeconds }}
    - --settle-seconds={{ $c.settleSeconds }}
    - --host=0.0.0.0
    - --port={{ $c.agent.port }}
  env:
    {{- include "lawtune-serving.storeEnv" . | nindent 4 }}
  ports:
    - name: metrics
      containerPort: {{ $c.agent.port }}
      protocol: TCP
  # The gateway takes traffic once the routes are written.
  readinessProbe:
    httpGet:
      path: /ready
      port: metrics
    periodSeconds: 2
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: 15
  securityContext:
    {{- toYaml .Values.gateway.securityContext | nindent 4 }}
  resources:
    {{- toYaml $c.agent.resources | nindent 4 }}
  volumeMounts:
    - name: routes
      mountPath: {{ $c.routesDir }}
    - name: agent-tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{- define "lawtune-serving.canary.servicePorts" -}}
{{- if include "lawtune-serving.canary.active" . -}}
- name: metrics
  port: {{ .Values.canary.agent.port }}
  targetPort: metrics
  protocol: TCP
{{- end }}
{{- end }}
