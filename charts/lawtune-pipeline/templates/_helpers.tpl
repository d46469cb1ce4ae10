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

{{/*
Job name (dict: root, stage). With hooks, Helm deletes the old Job before creating the new one
(before-hook-creation), so the name stays. Without hooks (Argo CD / GitOps plain mode) a Job's pod
template is immutable: a changed config or stage spec must make a new Job, so the name carries
the spec hash (8 hex) and Helm / Argo CD prune the old one. <= 60 characters: "-<index>" fits.
*/}}
{{- define "lawtune-pipeline.jobName" -}}
{{- if .root.Values.hooks.enabled }}
{{- printf "%s-%s" (include "lawtune-pipeline.runName" .root) .stage }}
{{- else }}
{{- $run := include "lawtune-pipeline.runName" .root | trunc 40 | trimSuffix "-" }}
{{- printf "%s-%s-%s" $run .stage (include "lawtune-pipeline.specHash" . | trunc 8) }}
{{- end }}
{{- end }}

{{/*
What one stage Job runs (dict: root, stage): the config, this stage's values, the global values
(other stages' values left out) and the chart version. A change re-creates the Job in plain mode
and is what "completed with the same spec" compares in hook mode.
*/}}
{{- define "lawtune-pipeline.specHash" -}}
{{- $values := omit .root.Values "stages" }}
{{- $stage := get .root.Values.stages .stage }}
{{- printf "%s|%s|%s|%s" (toJson $values) .stage (toJson $stage) .root.Chart.Version | sha256sum }}
{{- end }}

{{/* Image of a stage (dict: root, s): <registry>/<repository>@<digest> when pinned, else :<tag>. */}}
{{- define "lawtune-pipeline.image" -}}
{{- $v := .root.Values }}
{{- $digest := get ($v.image.digests | default dict) .s.repository }}
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

{{/* Size of a stage's cache emptyDir (dict: root, s): its own cacheSizeLimit, else cache.sizeLimit. */}}
{{- define "lawtune-pipeline.cacheSize" -}}
{{- .s.cacheSizeLimit | default .root.Values.cache.sizeLimit }}
{{- end }}

{{/* Ephemeral storage a stage's scratch emptyDirs may fill (dict: root, s): cache + tmp + home (1Gi). */}}
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

{{- define "lawtune-pipeline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lawtune-pipeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "lawtune-pipeline.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lawtune
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
lawtune.io/spec-hash: {{ include "lawtune-pipeline.specHash" . | trunc 16 | quote }}
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
- name: LAWTUNE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
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
