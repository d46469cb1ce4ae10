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
Changes whenever the key would: the Secret's name and key, the key's value where Helm can read
the Secret (helm install/upgrade; `helm template` and Argo CD cannot, and then
apiKey.revision is what rolls the pods), and apiKey.revision.
*/}}
{{- define "lawtune-serving.apiKeyChecksum" -}}
{{- $name := include "lawtune-serving.apiKeySecret" . }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace $name }}
{{- $value := "" }}
{{- if $secret }}{{ $value = index (default dict $secret.data) .Values.apiKey.secretKey | default "" }}{{ end }}
{{- printf "%s/%s/%s/%s" $name .Values.apiKey.secretKey $value (toString .Values.apiKey.revision) | sha256sum }}
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

{{/* Whole cores of a CPU quantity, at least 1: "100m" -> 1, "2500m" -> 2, 4 -> 4. */}}
{{- define "lawtune-serving.wholeCores" -}}
{{- $q := toString . }}
{{- $milli := 0 }}
{{- if hasSuffix "m" $q }}{{ $milli = trimSuffix "m" $q | atoi }}
{{- else if $q }}{{ $milli = mulf (float64 $q) 1000 | int }}{{ end }}
{{- max 1 (div $milli 1000) }}
{{- end }}

{{/* OpenMP threads of vLLM on CPU: vllm.cpu.threads, else the whole cores of the CPU limit (or request). */}}
{{- define "lawtune-serving.cpuThreads" -}}
{{- $c := .Values.vllm.cpu }}
{{- if gt (int $c.threads) 0 }}{{ int $c.threads }}
{{- else }}
{{- $res := default dict $c.resources }}
{{- $cpu := (default dict $res.limits).cpu | default (default dict $res.requests).cpu }}
{{- include "lawtune-serving.wholeCores" $cpu }}
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
{{- if gt (mul (int (include "lawtune-serving.tensorParallelSize" .)) (int (include "lawtune-serving.pipelineParallelSize" .))) 1 }}true{{ end }}
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
{{- if not (has .Values.ui.auth (list "ingress" "pasteKey")) }}
{{- fail "ui.auth is required with ui.enabled: `ingress` (your ingress authenticates users; the gateway adds the API key to page calls) or `pasteKey` (users paste a key, kept in the tab only); see the chart README, \"The assistant page\"" }}
{{- end }}
{{- .Values.ui.auth }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.ui.fullname" -}}
{{- printf "%s-ui" (include "lawtune-serving.gateway.fullname" . | trunc 60 | trimSuffix "-") }}
{{- end }}

{{/* nginx include holding `proxy_set_header Authorization "Bearer <key>"`, written by the api-keys init container (ui.auth=ingress). */}}
{{- define "lawtune-serving.uiUpstreamAuthFile" -}}
{{- printf "%s/ui-upstream-auth.conf" (dir .Values.gateway.apiKeysFile) }}
{{- end }}

{{/* What the page reads at start (/ui/config.json): nothing secret. */}}
{{- define "lawtune-serving.uiConfig" -}}
{{- $ui := .Values.ui -}}
{{- dict "title" $ui.title "notice" $ui.notice "auth" $ui.auth "model" (include "lawtune-serving.servedModelName" .) "modelVersion" .Values.model.version "statusPollSeconds" $ui.statusPollSeconds "maxTokens" $ui.maxTokens "apiPath" (ternary "/ui/api/v1/chat/completions" "/v1/chat/completions" (eq $ui.auth "ingress")) | toPrettyJson }}
{{- end }}
