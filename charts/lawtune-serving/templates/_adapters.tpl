{{/*
serving.mode=adapters: vLLM runs one base model with LoRA on, and the adapter agent beside it
(python -m shared.serve.agent --role adapters) loads each version the store names at runtime,
under the model name `<model.name>:<version>`. These blocks plug into vllm-deployment.yaml and
_helpers.tpl; in merged mode they render nothing (or what the chart always rendered).
*/}}

{{- define "lawtune-serving.mode" -}}
{{- .Values.serving.mode | default "merged" }}
{{- end }}

{{- define "lawtune-serving.adapters.baseDigest" -}}
{{- required "adapters.baseDigest is required with serving.mode=adapters: the weights digest of the base the adapters were trained on (`lawtune deploy` sets it from the promoted version; `lawtune models list` shows it)" .Values.adapters.baseDigest }}
{{- end }}

{{/* <root>/bases/<digest>: fetch_model downloads and verifies the base like any published folder. */}}
{{- define "lawtune-serving.adapters.baseUri" -}}
{{- $root := required "artifactStore.root is required: the artifact root holding models/, e.g. s3://bucket/lawtune" .Values.artifactStore.root | trimSuffix "/" }}
{{- printf "%s/bases/%s" $root (include "lawtune-serving.adapters.baseDigest" .) }}
{{- end }}

{{- define "lawtune-serving.adapters.baseDir" -}}
{{- printf "/models/base/%s" (include "lawtune-serving.adapters.baseDigest" . | trunc 16) }}
{{- end }}

{{/* --served-model-name: merged mode as always; with the canary each Deployment also answers to `<name>:<version>`
(first, so vLLM's `model` field names the version); adapters mode serves the base as `<name>:base`. */}}
{{- define "lawtune-serving.vllmServedNameArgs" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" -}}
- --served-model-name={{ .Values.model.name }}:base
{{- else if include "lawtune-serving.canary.active" . -}}
- --served-model-name
- {{ printf "%s:%s" .Values.model.name (required "model.version is required with canary.enabled in merged mode: each Deployment serves one pinned version (lawtune deploy pins it)" .Values.model.version) | quote }}
- {{ include "lawtune-serving.servedModelName" . | quote }}
{{- else -}}
- --served-model-name={{ include "lawtune-serving.servedModelName" . }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.adapters.vllmArgs" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" -}}
{{- $a := .Values.adapters -}}
{{- /* Remote code is allowed by the digests a version's manifest records; the shared base of adapters mode has no
       such record, and lawtune deploy's own refusal is bypassed by plain helm, GitOps or a --set after `--`. */ -}}
{{- if .Values.vllm.trustRemoteCode }}{{ fail "vllm.trustRemoteCode=true with serving.mode=adapters is not supported: the shared base's code is not pinned by digest; serve this model merged" }}{{ end }}
- --enable-lora
- --max-loras={{ int $a.maxLoras }}
- --max-lora-rank={{ int $a.maxLoraRank }}
{{- if gt (int $a.maxCpuLoras) 0 }}
{{- if lt (int $a.maxCpuLoras) (int $a.maxLoras) }}{{ fail (printf "adapters.maxCpuLoras (%v) must be at least adapters.maxLoras (%v), or 0" $a.maxCpuLoras $a.maxLoras) }}{{ end }}
- --max-cpu-loras={{ int $a.maxCpuLoras }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lawtune-serving.adapters.vllmEnv" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" -}}
# The adapter agent loads and unloads adapters through /v1/load_lora_adapter (it needs the API key, like every /v1 call).
- name: VLLM_ALLOW_RUNTIME_LORA_UPDATING
  value: "True"
{{- end }}
{{- end }}

{{/* Where the agents read the store: the same settings and credentials as the fetch-model init container. */}}
{{- define "lawtune-serving.storeEnv" -}}
- name: LAWTUNE_ARTIFACT_ROOT
  value: {{ .Values.artifactStore.root | quote }}
- name: LAWTUNE_S3_REGION
  value: {{ .Values.artifactStore.region | quote }}
{{- with .Values.artifactStore.endpointUrl }}
- name: LAWTUNE_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: LAWTUNE_CACHE_DIR
  value: /tmp/lawtune
- name: HOME
  value: /tmp
{{- with .Values.artifactStore.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}

{{/* The adapter agent, a second container of each vLLM pod: the pod is Ready only once every adapter the store names is loaded. */}}
{{- define "lawtune-serving.adapters.agent" -}}
{{- if eq (include "lawtune-serving.mode" .) "adapters" -}}
{{- $a := .Values.adapters -}}
- name: adapter-agent
  image: {{ include "lawtune-serving.fetchModelImage" . | quote }}
  imagePullPolicy: {{ .Values.fetchModel.image.pullPolicy }}
  command: ["python", "-m", "shared.serve.agent"]
  args:
    - --model-name={{ .Values.model.name }}
    - --role=adapters
    - --vllm-url=http://127.0.0.1:{{ .Values.vllm.port }}
    - --base-dir={{ include "lawtune-serving.adapters.baseDir" . }}
    - --adapters-dir=/models/adapters
    - --poll-seconds={{ .Values.canary.pollSeconds }}
    - --settle-seconds={{ .Values.canary.settleSeconds }}
    - --host=0.0.0.0
    - --port={{ $a.agent.port }}
  env:
    {{- include "lawtune-serving.storeEnv" . | nindent 4 }}
    - name: VLLM_API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "lawtune-serving.apiKeySecret" . }}
          key: {{ .Values.apiKey.secretKey }}
  ports:
    - name: agent
      containerPort: {{ $a.agent.port }}
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /ready
      port: agent
    periodSeconds: 2
  livenessProbe:
    httpGet:
      path: /healthz
      port: agent
    periodSeconds: 15
  securityContext:
    {{- toYaml .Values.vllm.securityContext | nindent 4 }}
  resources:
    {{- toYaml $a.agent.resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
