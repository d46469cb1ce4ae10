{{/*
Names. Jobs are named <release>-<runId>-<stage> so several runs (and releases) live side by side;
the run id is lower-cased with '_' and '.' turned into '-' because names are DNS labels.
*/}}
{{- define "lawtune-pipeline.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lawtune-pipeline.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "lawtune-pipeline.runId" -}}
{{- required "runId is required: --set runId=<id> (1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit; the same id resumes that run)" .Values.runId }}
{{- end }}

{{/* <release>-<runId>, at most 42 characters so "-<stage>" and an index suffix fit a 63-character label. */}}
{{- define "lawtune-pipeline.runName" -}}
{{- $run := include "lawtune-pipeline.runId" . | lower | replace "_" "-" | replace "." "-" }}
{{- printf "%s-%s" .Release.Name $run | trunc 42 | trimSuffix "-" }}
{{- end }}

{{/* The hook-mode name of a stage's Job (dict: root, stage): <release>-<runId>-<stage>. */}}
{{- define "lawtune-pipeline.baseJobName" -}}
{{- printf "%s-%s" (include "lawtune-pipeline.runName" .root) .stage }}
{{- end }}

{{/*
Job name (dict: root, stage). With hooks, Helm deletes the old Job before creating the new one
(before-hook-creation), so the name stays. Without hooks (Argo CD / GitOps plain mode) a Job's pod
template is immutable: a changed spec must make a new Job, so the name carries the spec hash
(8 hex) and Helm / Argo CD prune the old one. <= 60 characters: "-<index>" fits.
*/}}
{{- define "lawtune-pipeline.jobName" -}}
{{- if .root.Values.hooks.enabled }}
{{- include "lawtune-pipeline.baseJobName" . }}
{{- else }}
{{- $run := include "lawtune-pipeline.runName" .root | trunc 40 | trimSuffix "-" }}
{{- printf "%s-%s-%s" $run .stage (include "lawtune-pipeline.specHash" . | trunc 8) }}
{{- end }}
{{- end }}

{{/*
The spec hash (dict: root, stage): 16 hex of the sha256 of the Job's spec as rendered (with the
hook-mode name where the spec names its own Job: the multi-node rendezvous address). Only what the
stage's pods run moves it; a changed spec re-creates the Job in plain mode and is what "completed
with the same spec" compares in hook mode. The log level is read from the run's ConfigMap, not
written into the spec, so changing it re-runs nothing.
*/}}
{{- define "lawtune-pipeline.specHash" -}}
{{- include "lawtune-pipeline.jobSpec" (dict "root" .root "stage" .stage "jobName" (include "lawtune-pipeline.baseJobName" .)) | sha256sum | trunc 16 }}
{{- end }}

{{/* Image of a stage (dict: root, s): <registry>/<repository>@<digest> when pinned for this device, else :<tag>. */}}
{{- define "lawtune-pipeline.image" -}}
{{- $v := .root.Values }}
{{- $digests := get ($v.image.digests | default dict) $v.device | default dict }}
{{- $digest := get $digests .s.repository }}
{{- if $digest }}
{{- printf "%s/%s@%s" $v.image.registry .s.repository $digest }}
{{- else }}
{{- printf "%s/%s:%s" $v.image.registry .s.repository (include "lawtune-pipeline.stageTag" .root) }}
{{- end }}
{{- end }}

{{/* The stage images' tag: CPU mode runs the `make images DEVICE=cpu` build (<tag><cpuTagSuffix>). */}}
{{- define "lawtune-pipeline.stageTag" -}}
{{- $tag := include "lawtune-pipeline.imageTag" . }}
{{- if eq .Values.device "cpu" }}{{ printf "%s%s" $tag .Values.image.cpuTagSuffix }}{{ else }}{{ $tag }}{{ end }}
{{- end }}

{{/* "50Gi" / "512Mi" -> mebibytes (the schema allows only these two units for sizes). */}}
{{- define "lawtune-pipeline.mebibytes" -}}
{{- if hasSuffix "Gi" . }}{{ mul (trimSuffix "Gi" . | int) 1024 }}{{ else }}{{ trimSuffix "Mi" . | int }}{{ end }}
{{- end }}

{{/*
GiB the base model's 16-bit weights take, from the parameter count in its name (the last path
segment of the config's base_model: Qwen2.5-7B-Instruct 7B, chatglm3-6b 6B, smollm2-135m 135M),
with 10% to spare for names that round down (Qwen2.5-7B has 7.6B). 0 when the name says nothing.
*/}}
{{- define "lawtune-pipeline.modelGiB" -}}
{{- $config := fromYaml (.Values.config | default "") | default dict }}
{{- $model := get $config "base_model" | default "" | toString | lower | trimSuffix "/" }}
{{- $name := last (splitList "/" $model) | default "" }}
{{- $size := regexFind "(^|[-_.:])[0-9]+([.][0-9]+)?[bm]([-_.]|$)" $name }}
{{- if $size }}
{{- $billions := regexFind "[0-9]+([.][0-9]+)?" $size | float64 }}
{{- if contains "m" (regexFind "[bm]" $size) }}{{ $billions = divf $billions 1000 }}{{ end }}
{{- max 1 (ceil (mulf $billions 2.2 (divf 1000000000 1073741824)) | int) }}
{{- else }}0{{ end }}
{{- end }}

{{/*
Size of a stage's cache emptyDir (dict: root, s, stage): the stage's own cacheSizeLimit, else
cache.sizeLimit, else sized from the model: finetune holds the base model, evaluate the base and
the promoted model it is compared with, publish the base and the merged model; 2Gi for tokenizer,
data and work files on top. A model whose name gives no size gets 10Gi, which fits a stock 20 GiB
node disk with tmp and HOME.
*/}}
{{- define "lawtune-pipeline.cacheSize" -}}
{{- $explicit := .s.cacheSizeLimit | default .root.Values.cache.sizeLimit }}
{{- if $explicit }}{{ $explicit }}
{{- else }}
{{- $model := include "lawtune-pipeline.modelGiB" .root | int }}
{{- if eq $model 0 }}10Gi
{{- else }}
{{- $copies := ternary 1 2 (eq .stage "finetune") }}
{{- printf "%dGi" (add (mul $copies $model) 2) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Ephemeral storage a stage's scratch emptyDirs may fill (dict: root, s, stage): cache + tmp + home (1Gi). */}}
{{- define "lawtune-pipeline.scratchMi" -}}
{{- add (include "lawtune-pipeline.mebibytes" (include "lawtune-pipeline.cacheSize" .) | int) (include "lawtune-pipeline.mebibytes" .root.Values.tmp.sizeLimit | int) 1024 }}
{{- end }}

{{- define "lawtune-pipeline.rendezvousName" -}}
{{- printf "%s-rdzv" (include "lawtune-pipeline.runName" .) }}
{{- end }}

{{- define "lawtune-pipeline.configMapName" -}}
{{- printf "%s-config" (include "lawtune-pipeline.runName" .) }}
{{- end }}

{{- define "lawtune-pipeline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lawtune-pipeline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lawtune-pipeline.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "lawtune-pipeline.chartLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lawtune-pipeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "lawtune-pipeline.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lawtune
{{- end }}

{{- define "lawtune-pipeline.labels" -}}
{{ include "lawtune-pipeline.chartLabels" . }}
lawtune.io/run-id: {{ include "lawtune-pipeline.runId" . | quote }}
{{- end }}

{{/* Stage order: Helm hook weight and Argo CD sync wave are the same number. */}}
{{- define "lawtune-pipeline.stageOrder" -}}
preprocess: 10
finetune: 20
evaluate: 30
publish: 40
{{- end }}

{{/*
Ordering annotations of one stage Job (dict: root, stage).
*/}}
{{- define "lawtune-pipeline.orderAnnotations" -}}
{{- $weight := get (include "lawtune-pipeline.stageOrder" .root | fromYaml) .stage | toString -}}
argocd.argoproj.io/sync-wave: {{ $weight | quote }}
lawtune.io/spec-hash: {{ include "lawtune-pipeline.specHash" . | quote }}
{{- if .root.Values.hooks.enabled }}
helm.sh/hook: post-install,post-upgrade
helm.sh/hook-weight: {{ $weight | quote }}
{{- /* A re-install with the same runId replaces the Job; the stage skips committed work.
`helm uninstall` removes hook Jobs through the pre-delete cleanup hook (cleanup.yaml). */}}
helm.sh/hook-delete-policy: before-hook-creation
{{- end }}
{{- end }}

{{/*
Environment every stage shares: where artifacts live, caches on the mounted emptyDirs,
credentials by secretKeyRef only.
*/}}
{{- define "lawtune-pipeline.env" -}}
- name: LAWTUNE_ARTIFACT_ROOT
  value: {{ required "artifactRoot is required: --set artifactRoot=s3://<bucket>/<prefix>" .Values.artifactRoot | quote }}
- name: LAWTUNE_RUN_ID
  value: {{ include "lawtune-pipeline.runId" . | quote }}
{{- with .Values.s3.endpoint }}
- name: LAWTUNE_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: LAWTUNE_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
- name: LAWTUNE_S3_ADDRESSING_STYLE
  value: {{ .Values.s3.addressingStyle | quote }}
- name: LAWTUNE_CODE_VERSION
  value: {{ include "lawtune-pipeline.imageTag" . | quote }}
{{- /* From the run's ConfigMap: the log level is no part of the pod spec, so changing it re-runs no
completed stage (nor renames one in plain mode); the next pod of a running stage picks it up. */}}
- name: LAWTUNE_LOG_LEVEL
  valueFrom:
    configMapKeyRef:
      name: {{ include "lawtune-pipeline.configMapName" . }}
      key: logLevel
- name: LAWTUNE_CACHE_DIR
  value: /var/cache/lawtune
- name: HF_HOME
  value: /var/cache/lawtune/huggingface
- name: XDG_CACHE_HOME
  value: /var/cache/lawtune/xdg
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: TMPDIR
  value: /tmp
- name: HOME
  value: /home/lawtune
{{- /* Always set: the images default to offline, so "online" must be said explicitly. */}}
- name: HF_HUB_OFFLINE
  value: {{ ternary "1" "0" .Values.huggingface.offline | quote }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.huggingface.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.huggingface.tokenSecretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lawtune-pipeline.volumeMounts" -}}
- name: config
  mountPath: /etc/lawtune
  readOnly: true
- name: cache
  mountPath: /var/cache/lawtune
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/lawtune
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{- /* (dict: root, s) */}}
{{- define "lawtune-pipeline.volumes" -}}
{{- $v := .root.Values }}
- name: config
  configMap:
    name: {{ include "lawtune-pipeline.configMapName" .root }}
    items:
      - {key: config.yaml, path: config.yaml}
- name: cache
  emptyDir:
    sizeLimit: {{ include "lawtune-pipeline.cacheSize" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmp.sizeLimit }}
- name: home
  emptyDir:
    sizeLimit: 1Gi
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.shm.sizeLimit }}
{{- end }}
