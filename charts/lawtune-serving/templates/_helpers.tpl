{{/* Names: Kubernetes names are DNS labels, so everything is cut at 63 characters. */}}
{{- define "lawtune-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lawtune-serving.fullname" -}}
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

{{/* Component names leave room for the suffix within 63 characters. */}}
{{- define "lawtune-serving.vllm.fullname" -}}
{{- printf "%s-vllm" (include "lawtune-serving.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{- define "lawtune-serving.gateway.fullname" -}}
{{- printf "%s-gateway" (include "lawtune-serving.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "lawtune-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lawtune-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lawtune-serving.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.labels" -}}
helm.sh/chart: {{ include "lawtune-serving.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lawtune
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (Deployment selectors are immutable). */}}
{{- define "lawtune-serving.vllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lawtune-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: vllm
{{- end }}

{{- define "lawtune-serving.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lawtune-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "lawtune-serving.vllm.labels" -}}
{{ include "lawtune-serving.labels" . }}
{{ include "lawtune-serving.vllm.selectorLabels" . }}
{{- end }}

{{- define "lawtune-serving.gateway.labels" -}}
{{ include "lawtune-serving.labels" . }}
{{ include "lawtune-serving.gateway.selectorLabels" . }}
{{- end }}

{{/* Mandatory values fail with a message naming the key. */}}
{{- define "lawtune-serving.apiKeySecret" -}}
{{- required "apiKey.existingSecret is required: the name of an existing Secret holding the API key (kubectl create secret generic <name> --from-literal=api-key=...)" .Values.apiKey.existingSecret }}
{{- end }}

{{- define "lawtune-serving.servedModelName" -}}
{{- default .Values.model.name .Values.model.servedModelName }}
{{- end }}

{{/* s3://bucket/prefix/models/<name>[/<version>]: fetch_model resolves PROMOTED when no version is given. */}}
{{- define "lawtune-serving.modelUri" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" }}{{ include "lawtune-serving.adapters.baseUri" . }}{{ else }}
{{- $root := required "artifactStore.root is required: the artifact root holding models/, e.g. s3://bucket/lawtune" .Values.artifactStore.root | trimSuffix "/" }}
{{- $uri := printf "%s/models/%s" $root .Values.model.name }}
{{- if .Values.model.version }}{{ $uri = printf "%s/%s" $uri .Values.model.version }}{{ end }}
{{- $uri }}
{{- end }}
{{- end }}

{{/* A pinned version gets its own folder, so vLLM's /v1/models shows it (`root`) and a shared
claim never swaps files under a running server. */}}
{{- define "lawtune-serving.modelDir" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" }}
{{- include "lawtune-serving.adapters.baseDir" . }}
{{- else if .Values.model.version }}
{{- printf "/models/%s/%s" .Values.model.name .Values.model.version }}
{{- else }}
{{- printf "/models/%s" .Values.model.name }}
{{- end }}
{{- end }}

{{/* A warning while model.version floats and an autoscaler adds pods: empty when pinned or scaled by hand. */}}
{{- define "lawtune-serving.floatingVersionWarning" -}}
{{- if and (not .Values.model.version) (include "lawtune-serving.autoscalerActive" .) -}}
model.version is empty while autoscaling is on: each vLLM pod serves the version models/{{ .Values.model.name }}/PROMOTED names when it starts, so a scale-up after the next promotion serves a newer model beside older pods. Pin model.version (lawtune deploy, or a commit that changes it in git).
{{- end }}
{{- end }}

{{/* The version this release serves, as the pods' annotation carries it. */}}
{{- define "lawtune-serving.modelVersionLabel" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" }}
{{- /* Adapters follow the store at runtime: a promotion must not roll the pods. */}}
{{- printf "adapters-on-base-%s" (include "lawtune-serving.adapters.baseDigest" . | trunc 16) }}
{{- else }}
{{- default "PROMOTED-at-pod-start" .Values.model.version }}
{{- end }}
{{- end }}

{{/*
Changes whenever the keys would: the Secret's name and keys, the Secret object itself where Helm
can read it (helm install/upgrade; its uid and resourceVersion, which every change of the Secret
moves, a previous key added or dropped included; `helm template` and Argo CD cannot, and then
apiKey.revision is what rolls the pods), and apiKey.revision. Nothing derived from a key's value:
pod annotations are readable by anyone who may read Deployments, and an unsalted hash of a short
key gives the key away. Where Helm can read the Secret it also refuses a key (current, or the
previous one when set) shorter than the minimum, at install.
*/}}
{{- define "lawtune-serving.apiKeyChecksum" -}}
{{- $name := include "lawtune-serving.apiKeySecret" . }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace $name }}
{{- $version := "" }}
{{- if $secret }}
{{- $version = printf "%s/%s" (toString $secret.metadata.uid) (toString $secret.metadata.resourceVersion) }}
{{- $data := default dict $secret.data }}
{{- $min := int (include "lawtune-serving.apiKeyMinLength" .) }}
{{- $value := index $data .Values.apiKey.secretKey | default "" | b64dec }}
{{- if lt (len $value) $min }}
{{- fail (printf "apiKey: the key in Secret %s (key %s) is %d characters; at least %d are required (e.g. openssl rand -hex 24)" $name .Values.apiKey.secretKey (len $value) $min) }}
{{- end }}
{{- $previous := index $data .Values.apiKey.previousSecretKey | default "" | b64dec }}
{{- if and $previous (lt (len $previous) $min) }}
{{- fail (printf "apiKey: the previous key in Secret %s (key %s) is %d characters; at least %d are required, for it too while the rotation lasts" $name .Values.apiKey.previousSecretKey (len $previous) $min) }}
{{- end }}
{{- end }}
{{- printf "%s/%s/%s/%s/%s" $name .Values.apiKey.secretKey .Values.apiKey.previousSecretKey $version (toString .Values.apiKey.revision) | sha256sum }}
{{- end }}

{{/* The shortest and longest API key the gateway and vLLM accept (shared/serve/gateway.py says the same). */}}
{{- define "lawtune-serving.apiKeyMinLength" -}}32{{- end }}
{{- define "lawtune-serving.apiKeyMaxLength" -}}256{{- end }}

{{/*
The Secret's current and previous key as container env (LAWTUNE_API_KEY, LAWTUNE_PREVIOUS_API_KEY;
the previous one optional: no rotation under way). Read by the init containers only.
*/}}
{{- define "lawtune-serving.apiKeyEnv" -}}
- name: LAWTUNE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lawtune-serving.apiKeySecret" . }}
      key: {{ .Values.apiKey.secretKey }}
- name: LAWTUNE_PREVIOUS_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lawtune-serving.apiKeySecret" . }}
      key: {{ .Values.apiKey.previousSecretKey }}
      optional: true
{{- end }}

{{/* vLLM's config file holding the accepted API keys (the api-keys init container writes it). */}}
{{- define "lawtune-serving.vllmKeysFile" -}}
/etc/lawtune-keys/vllm-api-keys.yaml
{{- end }}

{{/*
Shell lines that refuse (exit 2) an empty key, one with characters outside A-Za-z0-9._~+/=-, or
one outside apiKeyMinLength..apiKeyMaxLength characters, for both keys (the previous one when set).
*/}}
{{- define "lawtune-serving.apiKeyCheck" -}}
{{- $secret := include "lawtune-serving.apiKeySecret" . -}}
{{- $min := include "lawtune-serving.apiKeyMinLength" . -}}
{{- $max := include "lawtune-serving.apiKeyMaxLength" . -}}
check_key() {
  case "$1" in
    ""|*[!A-Za-z0-9._~+/=-]*)
      echo "api-keys: the key in Secret {{ $secret }} (key $2) is empty or has characters outside A-Za-z0-9._~+/=-" >&2
      exit 2;;
  esac
  if [ "${#1}" -lt {{ $min }} ] || [ "${#1}" -gt {{ $max }} ]; then
    echo "api-keys: the key in Secret {{ $secret }} (key $2) is ${#1} characters; {{ $min }} to {{ $max }} are accepted" >&2
    exit 2
  fi
}
check_key "$LAWTUNE_API_KEY" {{ .Values.apiKey.secretKey }}
if [ -n "$LAWTUNE_PREVIOUS_API_KEY" ]; then check_key "$LAWTUNE_PREVIOUS_API_KEY" {{ .Values.apiKey.previousSecretKey }}; fi
umask 077
{{- end }}

{{/* vLLM's image: the CUDA build (with its variant suffix) or, with vllm.device=cpu, the CPU build of the same release. */}}
{{- define "lawtune-serving.vllmImage" -}}
{{- $v := .Values.vllm }}
{{- if eq $v.device "cpu" }}
{{- printf "%s:%s" $v.cpu.image.repository (default $v.image.tag $v.cpu.image.tag) }}
{{- else if $v.image.cudaVariant }}
{{- printf "%s:%s-%s" $v.image.repository $v.image.tag $v.image.cudaVariant }}
{{- else }}
{{- printf "%s:%s" $v.image.repository $v.image.tag }}
{{- end }}
{{- end }}

{{/* The fetch-model init container's image: CPU mode asks for the `-cpu` tag `make images DEVICE=cpu` builds. */}}
{{- define "lawtune-serving.fetchModelImage" -}}
{{- $i := .Values.fetchModel.image }}
{{- printf "%s:%s%s" $i.repository $i.tag (ternary $i.cpuTagSuffix "" (eq .Values.vllm.device "cpu")) }}
{{- end }}

{{/* Whole cores of a CPU quantity, at least 1: "100m" -> 1, "2500m" -> 2, 4 -> 4. */}}
{{- define "lawtune-serving.wholeCores" -}}
{{- $q := toString . }}
{{- $milli := 0 }}
{{- if hasSuffix "m" $q }}{{ $milli = trimSuffix "m" $q | atoi }}
{{- else if $q }}{{ $milli = mulf (float64 $q) 1000 | int }}{{ end }}
{{- max 1 (div $milli 1000) }}
{{- end }}

{{/* Whole cores of the vLLM container on CPU: its CPU limit (or request). */}}
{{- define "lawtune-serving.cpuCores" -}}
{{- $res := default dict .Values.vllm.cpu.resources }}
{{- include "lawtune-serving.wholeCores" ((default dict $res.limits).cpu | default (default dict $res.requests).cpu) }}
{{- end }}

{{/* vLLM's worker processes per replica: tensor x pipeline parallel size. */}}
{{- define "lawtune-serving.parallelWorkers" -}}
{{- mul (int (include "lawtune-serving.tensorParallelSize" .)) (int (include "lawtune-serving.pipelineParallelSize" .)) }}
{{- end }}

{{/* OpenMP threads per vLLM worker on CPU: vllm.cpu.threads, else the whole cores of the CPU limit
divided among the workers (each TP/PP worker inherits OMP_NUM_THREADS; with threads unbound,
vLLM sets no per-worker count), at least 1. */}}
{{- define "lawtune-serving.cpuThreads" -}}
{{- $c := .Values.vllm.cpu }}
{{- if gt (int $c.threads) 0 }}{{ int $c.threads }}
{{- else }}
{{- max 1 (div (include "lawtune-serving.cpuCores" . | int) (include "lawtune-serving.parallelWorkers" . | int)) }}
{{- end }}
{{- end }}

{{/* nginx workers: gateway.workerProcesses, else one per whole core of the gateway's CPU request
(never `auto`, which counts the node's cores and multiplies memory on a large node). */}}
{{- define "lawtune-serving.gatewayWorkers" -}}
{{- $g := .Values.gateway }}
{{- if gt (int $g.workerProcesses) 0 }}{{ int $g.workerProcesses }}
{{- else }}
{{- include "lawtune-serving.wholeCores" (default dict (default dict $g.resources).requests).cpu }}
{{- end }}
{{- end }}

{{/*
The parallel size as vLLM will see it, whether it comes from a value or from extraArgs
(`--tensor-parallel-size N`, `--tensor-parallel-size=N`, `-tp N`, `-tp=N`; the last one
wins, as in vLLM's argparse). Usage: include "lawtune-serving.parallelArg" (list . "tensor")
*/}}
{{- define "lawtune-serving.parallelArg" -}}
{{- $root := index . 0 }}
{{- $kind := index . 1 }}
{{- $long := printf "--%s-parallel-size" $kind }}
{{- $short := ternary "-tp" "-pp" (eq $kind "tensor") }}
{{- $value := "" }}
{{- $args := $root.Values.vllm.extraArgs }}
{{- range $i, $arg := $args }}
{{- $arg = toString $arg }}
{{- if or (eq $arg $long) (eq $arg $short) }}
{{- if lt (add1 $i) (len $args) }}{{ $value = toString (index $args (add1 $i)) }}{{ end }}
{{- else if or (hasPrefix (printf "%s=" $long) $arg) (hasPrefix (printf "%s=" $short) $arg) }}
{{- $value = regexReplaceAll "^[^=]*=" $arg "" }}
{{- end }}
{{- end }}
{{- $value }}
{{- end }}

{{- define "lawtune-serving.tensorParallelSize" -}}
{{- $fromArgs := include "lawtune-serving.parallelArg" (list . "tensor") }}
{{- if $fromArgs }}
{{- if not (regexMatch "^[1-9][0-9]*$" $fromArgs) }}{{ fail (printf "vllm.extraArgs: --tensor-parallel-size %q is not a positive integer" $fromArgs) }}{{ end }}
{{- if and (ne (int .Values.vllm.tensorParallelSize) 1) (ne (int .Values.vllm.tensorParallelSize) (int $fromArgs)) }}
{{- fail (printf "vllm.tensorParallelSize=%v contradicts --tensor-parallel-size %s in vllm.extraArgs: set one of them" .Values.vllm.tensorParallelSize $fromArgs) }}
{{- end }}
{{- $fromArgs }}
{{- else }}
{{- int .Values.vllm.tensorParallelSize }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.pipelineParallelSize" -}}
{{- $fromArgs := include "lawtune-serving.parallelArg" (list . "pipeline") }}
{{- if $fromArgs }}
{{- if not (regexMatch "^[1-9][0-9]*$" $fromArgs) }}{{ fail (printf "vllm.extraArgs: --pipeline-parallel-size %q is not a positive integer" $fromArgs) }}{{ end }}
{{- $fromArgs }}
{{- else }}1{{ end }}
{{- end }}

{{/* GPUs per replica: explicit, or one per tensor x pipeline shard. */}}
{{- define "lawtune-serving.gpuCount" -}}
{{- if gt (int .Values.vllm.gpu.count) 0 }}
{{- int .Values.vllm.gpu.count }}
{{- else }}
{{- mul (int (include "lawtune-serving.tensorParallelSize" .)) (int (include "lawtune-serving.pipelineParallelSize" .)) }}
{{- end }}
{{- end }}

{{/* Workers of a sharded model talk through shared memory: /dev/shm whenever more than one. */}}
{{- define "lawtune-serving.needsShm" -}}
{{- if gt (include "lawtune-serving.parallelWorkers" . | int) 1 }}true{{ end }}
{{- end }}

{{/* vLLM replicas: zero under maintenance.scaleVllmToZero; left to the autoscaler otherwise when on. */}}
{{- define "lawtune-serving.autoscalerActive" -}}
{{- if and .Values.autoscaling.enabled (not (and .Values.maintenance.enabled .Values.maintenance.scaleVllmToZero)) }}true{{ end }}
{{- end }}

{{- define "lawtune-serving.upstream" -}}
{{- default (printf "%s:%v" (include "lawtune-serving.vllm.fullname" .) .Values.vllm.service.port) .Values.gateway.upstream }}
{{- end }}

{{/* An OpenAI-shaped error body, single-quoted for nginx's `return`. Usage: include "lawtune-serving.openaiError" (list message type code) */}}
{{- define "lawtune-serving.openaiError" -}}
{{- $body := dict "error" (dict "message" (index . 0) "type" (index . 1) "param" nil "code" (index . 2)) | toJson }}
{{- printf "'%s'" ($body | replace "\\" "\\\\" | replace "'" "\\'") }}
{{- end }}

{{/* The assistant page (ui.*): its auth mode, refused when missing, so ui.enabled alone never opens a proxy. */}}
{{- define "lawtune-serving.uiAuth" -}}
{{- if .Values.ui.enabled }}
{{- if not (has .Values.ui.auth (list "ingress" "pasteKey" "loopback")) }}
{{- fail "ui.auth is required with ui.enabled: `ingress` (your ingress authenticates users; the gateway adds the API key to page calls), `pasteKey` (users paste a key, kept in the tab only) or `loopback` (the gateway listens on 127.0.0.1 only, as under make serve); see the chart README, \"The assistant page\"" }}
{{- end }}
{{- .Values.ui.auth }}
{{- end }}
{{- end }}

{{/* Whether page calls go through the gateway's keyless proxy (ui.auth=ingress or loopback): "true" or empty. */}}
{{- define "lawtune-serving.pageProxy" -}}
{{- if has (include "lawtune-serving.uiAuth" .) (list "ingress" "loopback") }}true{{ end }}
{{- end }}

{{/* The unix socket of the page calls' internal hop (lawtune-serving.nginx.pageUpstream). */}}
{{- define "lawtune-serving.pageSocket" -}}
{{- printf "%s/lawtune-page.sock" .Values.gateway.runtimeDir }}
{{- end }}

{{/* nginx's variable for a request header: X-Auth-Request-Email -> $http_x_auth_request_email. */}}
{{- define "lawtune-serving.headerVariable" -}}
{{- printf "$http_%s" (. | lower | replace "-" "_") }}
{{- end }}

{{/*
What the gateway refuses to render, naming the key: a keyless page proxy that could be reached
from anywhere (ui.auth=ingress on a Service other than ClusterIP; without the peers of its
NetworkPolicy or the header the ingress sets; ui.auth=loopback on a non-loopback address).
*/}}
{{- define "lawtune-serving.validateGateway" -}}
{{- $ui := .Values.ui -}}
{{- $uiAuth := include "lawtune-serving.uiAuth" . -}}
{{- if eq $uiAuth "ingress" }}
{{- if ne .Values.gateway.service.type "ClusterIP" }}
{{- fail (printf "ui.auth=ingress with gateway.service.type=%s: the gateway adds the API key to page calls, so its page port must be reached through your authenticating ingress only; keep gateway.service.type ClusterIP (expose it with ingress.enabled or your own Ingress)" .Values.gateway.service.type) }}
{{- end }}
{{- if not $ui.ingress.identityHeader }}
{{- fail "ui.ingress.identityHeader is required with ui.auth=ingress: the request header your ingress sets to the authenticated user (e.g. X-Auth-Request-Email from oauth2-proxy through ingress-nginx's auth-response-headers); page calls without it get 401" }}
{{- end }}
{{- if not $ui.ingress.from }}
{{- fail "ui.ingress.from is required with ui.auth=ingress: your ingress controller's pods (a NetworkPolicyPeer list, e.g. [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}}]); only they may reach the page port" }}
{{- end }}
{{- if eq (int $ui.ingress.containerPort) (int .Values.gateway.containerPort) }}
{{- fail (printf "ui.ingress.containerPort (%v) must differ from gateway.containerPort: the page port is the one only the ingress reaches" $ui.ingress.containerPort) }}
{{- end }}
{{- end }}
{{- if and (eq $uiAuth "loopback") (not (regexMatch "^(127\\.[0-9.]+|::1|\\[::1\\]|localhost)$" (toString .Values.gateway.listenAddress))) }}
{{- fail (printf "ui.auth=loopback needs gateway.listenAddress on loopback (127.0.0.1, ::1), got %q: the gateway adds the API key to page calls, which only this machine may make" (toString .Values.gateway.listenAddress)) }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.ui.fullname" -}}
{{- printf "%s-ui" (include "lawtune-serving.gateway.fullname" . | trunc 60 | trimSuffix "-") }}
{{- end }}

{{/* nginx include holding `proxy_set_header Authorization "Bearer <key>"`, written by the api-keys init container (ui.auth=ingress or loopback). */}}
{{- define "lawtune-serving.uiUpstreamAuthFile" -}}
{{- printf "%s/ui-upstream-auth.conf" (dir .Values.gateway.apiKeysFile) }}
{{- end }}

{{/* The exact-case half of the key check (lawtune-serving.nginx.apiKeys), beside gateway.apiKeysFile. */}}
{{- define "lawtune-serving.apiKeysExactFile" -}}
{{- printf "%s/api-keys-exact.map" (dir .Values.gateway.apiKeysFile) }}
{{- end }}

{{/* What the page reads at start (/ui/config.json): nothing secret. */}}
{{- define "lawtune-serving.uiConfig" -}}
{{- $ui := .Values.ui -}}
{{- dict "title" $ui.title "notice" $ui.notice "auth" $ui.auth "model" (include "lawtune-serving.servedModelName" .) "modelVersion" .Values.model.version "statusPollSeconds" $ui.statusPollSeconds "maxTokens" $ui.maxTokens "apiPath" (ternary "/ui/api/v1/chat/completions" "/v1/chat/completions" (eq (include "lawtune-serving.pageProxy" .) "true")) | toPrettyJson }}
{{- end }}

{{/* The vLLM pod's metrics sidecar (templates/_metrics-proxy.conf.tpl): the scraper's only way in. */}}
{{- define "lawtune-serving.metricsProxyContainer" -}}
{{- $p := .Values.vllm.metricsProxy -}}
{{- $g := .Values.gateway -}}
- name: metrics-proxy
  image: "{{ $g.image.repository }}:{{ $g.image.tag }}"
  imagePullPolicy: {{ $g.image.pullPolicy }}
  command: ["nginx", "-e", "stderr", "-c", "/etc/lawtune/metrics-proxy.conf", "-g", "daemon off;"]
  ports:
    - name: metrics
      containerPort: {{ $p.port }}
      protocol: TCP
  securityContext:
    {{- toYaml .Values.vllm.securityContext | nindent 4 }}
  resources:
    {{- toYaml $p.resources | nindent 4 }}
  volumeMounts:
    - name: drain
      mountPath: /etc/lawtune
      readOnly: true
    - name: metrics-proxy-runtime
      mountPath: {{ $p.runtimeDir }}
{{- end }}
