{{- /*
The spec of one stage's Job (dict: root, stage, jobName): everything its pods run, and nothing
else. job.yaml hashes this text for the spec hash (`lawtune.io/spec-hash`, and the name in plain
mode), so a value that changes no pod (rerunCompleted, cleanup, driverRbac, hooks) changes no hash.
Every stage runs its image's ENTRYPOINT (`python -m jobs.<stage>`); finetune switches to torchrun
when distributed.
*/}}
{{- define "lawtune-pipeline.jobSpec" -}}
{{- $root := .root }}
{{- $stage := .stage }}
{{- $jobName := .jobName }}
{{- $s := get $root.Values.stages $stage }}
{{- $config := "/etc/lawtune/config.yaml" }}
{{- $gpuMode := eq $root.Values.device "gpu" }}
{{- $gpus := ternary (int $s.gpus) 0 $gpuMode }}
{{- $dist := dict "nprocPerNode" 1 "nodes" 1 "port" 29500 "maxRestarts" 0 "joinTimeoutSeconds" 600 }}
{{- if eq $stage "finetune" }}{{ $dist = $s.distributed }}{{ end }}
{{- $nodes := int $dist.nodes }}
{{- $nproc := int $dist.nprocPerNode }}
{{- if and (gt $gpus 0) (gt $nproc $gpus) }}
{{- fail (printf "stages.%s.distributed.nprocPerNode (%d) exceeds stages.%s.gpus (%d): one process per GPU" $stage $nproc $stage $gpus) }}
{{- end }}
{{- $args := list }}
{{- if eq $stage "preprocess" }}
{{- $args = list "--input" (required "input.uri is required when stages.preprocess.enabled: --set input.uri=s3://<bucket>/<key>.csv" $root.Values.input.uri) "--config" $config }}
{{- else if eq $stage "publish" }}
{{- $args = list "--config" $config "--model-name" (required "modelName is required" $root.Values.modelName) }}
{{- if $s.force }}{{ $args = append $args "--force" }}{{ end }}
{{- /* the publish image has no vLLM: only the parity check's static part runs, and says so */}}
{{- if not $s.servedParity }}{{ $args = concat $args (list "--set" "publish.served_parity=false") }}{{ end }}
{{- /* remote code is the operator's switch: the config's trust_remote_code, as finetune and evaluate read it */}}
{{- if (fromYaml $root.Values.config).trust_remote_code }}{{ $args = append $args "--trust-remote-code" }}{{ end }}
{{- else if and (eq $stage "evaluate") $root.Values.modelName }}
{{- /* champion/challenger: evaluate also scores the model's PROMOTED version */}}
{{- $args = list "--config" $config "--model-name" $root.Values.modelName }}
{{- else }}
{{- $args = list "--config" $config }}
{{- end }}
{{- $args = concat $args ($s.extraArgs | default list) }}
{{- $torchrun := or (gt $nproc 1) (gt $nodes 1) }}
{{- $image := include "lawtune-pipeline.image" (dict "root" $root "s" $s) }}
{{- $resources := deepCopy (ternary ($s.resources | default dict) ($s.cpuResources | default $s.resources | default dict) $gpuMode) }}
{{- $requests := $resources.requests | default dict }}
{{- $limits := $resources.limits | default dict }}
{{- /* The scratch emptyDirs live on the node's disk: request what they may fill, so the scheduler
places the pod where it fits and the kubelet does not pick it first under disk pressure. */}}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" (printf "%sMi" (include "lawtune-pipeline.scratchMi" (dict "root" $root "s" $s "stage" $stage))) }}
{{- end }}
{{- if gt $gpus 0 }}
{{- $_ := set $limits $root.Values.gpuResourceName $gpus }}
{{- end }}
{{- /* Every stage requests the memory it may use: the kubelet evicts pods above their request first
under memory pressure, and a stage killed halfway loses its uncommitted work (hours on a GPU). */}}
{{- if hasKey $limits "memory" }}{{ $_ := set $requests "memory" $limits.memory }}{{ end }}
{{- $_ := set $resources "requests" $requests }}
{{- if $limits }}{{ $_ := set $resources "limits" $limits }}{{ end }}
{{- $tolerations := empty $s.tolerations | ternary $root.Values.tolerations $s.tolerations | default list }}
{{- if gt $gpus 0 }}
{{- $tolerations = concat $tolerations ($root.Values.gpuTolerations | default list) | uniq }}
{{- end }}
{{- /* Multi-node: a pod lost costs one pod failure, and losing the rendezvous host (index 0)
costs one per node, so the Job's budget counts whole attempts, not pods. */}}
{{- $backoff := int (ternary $root.Values.backoffLimit $s.backoffLimit (kindIs "invalid" $s.backoffLimit)) }}
  backoffLimit: {{ mul $backoff $nodes }}
  activeDeadlineSeconds: {{ ternary $root.Values.activeDeadlineSeconds $s.activeDeadlineSeconds (kindIs "invalid" $s.activeDeadlineSeconds) }}
  {{- if not (kindIs "invalid" $root.Values.ttlSecondsAfterFinished) }}
  ttlSecondsAfterFinished: {{ $root.Values.ttlSecondsAfterFinished }}
  {{- end }}
  {{- if gt $nodes 1 }}
  completionMode: Indexed
  completions: {{ $nodes }}
  parallelism: {{ $nodes }}
  {{- end }}
  podFailurePolicy:
    rules:
      # Exit code 2 = shared/core/errors.py EXIT_CONFIG: bad input or configuration, retrying cannot help.
      - action: FailJob
        onExitCodes:
          containerName: {{ $stage }}
          operator: In
          values: [2]
      {{- if $torchrun }}
      # torchrun reports a worker's exit code 2 as its own 1: the config is checked before it starts.
      - action: FailJob
        onExitCodes:
          containerName: check-config
          operator: In
          values: [2]
      {{- end }}
      {{- if not $root.Values.countDisruptions }}
      # Preemption, API eviction, node drain or shutdown: retry without counting against backoffLimit.
      # The condition's reason cannot be matched here, so a kubelet node-pressure eviction
      # (TerminationByKubelet) is ignored too; see the README ("Evictions").
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
      {{- end }}
  template:
    metadata:
      labels:
        {{- include "lawtune-pipeline.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $stage }}
        lawtune.io/stage: {{ $stage }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Pods restart with a new config when it changes under the same run id.
        checksum/config: {{ $root.Values.config | sha256sum }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "lawtune-pipeline.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      {{- if gt $nodes 1 }}
      # Pods resolve as <job>-<index>.<subdomain>: index 0 hosts the torchrun rendezvous.
      subdomain: {{ include "lawtune-pipeline.rendezvousName" $root }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with (empty $s.nodeSelector | ternary $root.Values.nodeSelector $s.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (empty $s.affinity | ternary $root.Values.affinity $s.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $torchrun }}
      initContainers:
        # Exits 2 with one line naming every bad key (shared.core.job.run_main), which the
        # podFailurePolicy turns into an immediate failure.
        - name: check-config
          image: {{ $image | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-c"]
          args:
            - "import sys; from shared.core.config import load_config; from shared.core.job import run_main; sys.exit(run_main('{{ $stage }}', lambda: load_config('{{ $config }}')))"
          env:
            {{- include "lawtune-pipeline.env" $root | nindent 12 }}
          resources:
            requests: {cpu: 100m, memory: 1Gi}
            limits: {memory: 1Gi}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "lawtune-pipeline.volumeMounts" $root | nindent 12 }}
      {{- end }}
      containers:
        - name: {{ $stage }}
          image: {{ $image | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- if $torchrun }}
          {{- if gt $nodes 1 }}
          # Index 0 hosts the c10d store (is_host), whatever its DNS name resolves to from inside.
          command:
            - sh
            - -c
            - 'if [ "$JOB_COMPLETION_INDEX" = 0 ]; then host=1; else host=0; fi; exec torchrun --rdzv-conf="is_host=$host,join_timeout={{ int $dist.joinTimeoutSeconds }}" "$@"'
            - torchrun
          {{- else }}
          command: ["torchrun"]
          {{- end }}
          args:
            - --nnodes={{ $nodes }}
            - --nproc-per-node={{ $nproc }}
            - --max-restarts={{ int $dist.maxRestarts }}
            {{- if gt $nodes 1 }}
            - --rdzv-backend=c10d
            - --rdzv-endpoint={{ $jobName }}-0.{{ include "lawtune-pipeline.rendezvousName" $root }}:{{ $dist.port }}
            - --rdzv-id={{ include "lawtune-pipeline.runId" $root }}
            {{- else }}
            - --standalone
            {{- end }}
            - -m
            - jobs.{{ $stage }}
            {{- toYaml $args | nindent 12 }}
          {{- else }}
          args:
            {{- toYaml $args | nindent 12 }}
          {{- end }}
          env:
            {{- include "lawtune-pipeline.env" $root | nindent 12 }}
          {{- if gt $nodes 1 }}
          ports:
            - name: rendezvous
              containerPort: {{ $dist.port }}
          {{- end }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "lawtune-pipeline.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "lawtune-pipeline.volumes" (dict "root" $root "s" $s "stage" $stage) | nindent 8 }}
{{- end }}
