"""Kill at any point: every stage SIGKILLed mid-run on the bundled model and the sample CSV, then re-run.

For each backend (file://, SeaweedFS S3) one uninterrupted pipeline is the reference. Then,
stage by stage (downstream first, so an upstream re-run never changes what a later trial
reads), the stage's output is removed, the stage is started and its whole process group is
SIGKILLed at a point of its own progress: a line of its log (tests/faults/pipeline.py
``MARKERS``: model loaded, a checkpoint committed, a training step, generation started, the
merge checked, the download started) plus a seeded delay (``FAULTS_SEED``). The number of
points per stage is ``FAULTS_KILL_POINTS``; ``FAULTS_BACKENDS`` picks backends: ``make test``
runs 1 point on S3, ``make test-faults`` 3 points on file and S3. With ``FAULTS_COMMIT_KILLS=1``
(``make test-faults``) every stage is also killed inside its commit, at failpoints
(shared/core/failpoints.py): between its uploads and its manifest, and for publish between
``PROMOTED``'s swap and its history record. Every trial arms its stage's commit point, so a
process stops there at the latest and no kill lands after a commit. Then the same command runs
again. Each trial checks:

- the process died by the SIGKILL, after its marker: a marker that never appears, or a stage
  that ends by itself first, fails the trial;
- right after the kill, the output has no manifest and a reader (``fetch_dir``,
  ``fetch_model``'s target) refuses it, or it is committed and verifies file by file;
- the re-run exits 0, and every object it stored is downloaded and hashed: each equals the
  reference run's bytes (files with timings excepted, which must still match their manifest;
  the adapter within the resume tolerance), and nothing the reference stored is missing;
  publish's ``PROMOTED`` and history equal the reference's;
- nothing is left over: the folder holds exactly the manifest's files (plus committed
  checkpoints, each verifying against its own manifest), no temp files, no unfinished
  multipart uploads, no half-fetched model folder, no pending promotion record.

``FAULTS_REPORT=path.jsonl`` appends one line per trial, failing trials included, with
``survived`` and ``lost`` computed from those checks (tests/faults/summarise.py builds
docs/reliability.md's table from it).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from shared.core.errors import IntegrityError
from shared.store.artifacts import MANIFEST, Manifest, damaged_files, fetch_dir, read_manifest, read_verified, sha256_file
from shared.store.storage import S3Location, open_location
from tests.faults.pipeline import (COMMIT_KILLS, MODEL_NAME, STAGES, VOLATILE, VOLATILE_FOLDERS, kill_points, pipeline)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
POINTS = int(os.environ.get("FAULTS_KILL_POINTS", "1"))
SEED = int(os.environ.get("FAULTS_SEED", "15"))
# make test: S3 only (the backend with more to go wrong: multipart uploads, the S3 lease's takeover);
# make test-faults: both.
BACKENDS = os.environ.get("FAULTS_BACKENDS", "s3").split(",")
COMMIT_KILLS_ON = os.environ.get("FAULTS_COMMIT_KILLS", "0") == "1"
# The resume tolerance of tests/jobs/test_finetune.py (the reason is written there).
from tests.lora_fixtures import RESUME_TOLERANCE as TOLERANCE  # noqa: E402

# (stage, i, marker, delay), downstream first: upstream stays as the reference made it.
TRIALS = [(stage, i, marker, delay) for stage in reversed(STAGES)
          for i, (marker, delay) in enumerate(kill_points(stage, POINTS, SEED + STAGES.index(stage))
                                              + (COMMIT_KILLS[stage] if COMMIT_KILLS_ON else []))]


@pytest.fixture(scope="module", params=BACKENDS)
def reference(request, module_tmp, model_cache_dir):
    work = module_tmp(f"kill-{request.param}")
    env = {"LAWTUNE_CACHE_DIR": str(model_cache_dir)}
    if request.param == "file":
        root = f"file://{work / 'artifacts'}"
    else:
        seaweedfs = request.getfixturevalue("seaweedfs")
        bucket = f"kill-{int(time.time())}"
        seaweedfs.client().create_bucket(Bucket=bucket)
        env.update(seaweedfs.env())
        root = f"s3://{bucket}/lawtune"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # boto3 in this process reads them
    try:
        p = pipeline(root, env, work)
        durations, manifests, stored = {}, {}, {}
        for stage in STAGES:
            durations[stage] = p.run(stage, work / f"reference-{stage}.log")
            manifests[stage] = _manifest_of(p, stage)
            stored[stage] = _stored(p, stage)
        adapter = _adapter(p, work / "reference-adapter")
        yield {"backend": request.param, "pipeline": p, "durations": durations, "manifests": manifests, "adapter": adapter,
               "adapter_config": _adapter_config(p.output("finetune")), "work": work, "stored": stored,
               "registry": _registry_state(p)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _manifest_of(p, stage):
    if stage == "fetch_model":
        return read_manifest_local(p.fetch_target)
    return read_manifest(p.output(stage))


def read_manifest_local(target):
    return Manifest.model_validate_json((target / MANIFEST).read_bytes())


def _adapter(p, dest):
    from safetensors.torch import load_file

    shutil.rmtree(dest, ignore_errors=True)
    fetch_dir(p.output("finetune"), dest, only=["adapter/adapter_model.safetensors"])
    return load_file(dest / "adapter" / "adapter_model.safetensors")


def _adapter_config(loc) -> dict:
    """The adapter's peft config, target_modules sorted (peft writes them in set order)."""
    config = json.loads(read_verified(loc, "adapter/adapter_config.json"))
    return {**config, "target_modules": sorted(config["target_modules"])}


def _reader_invariant(p, stage) -> str:
    """Right after the kill: committed-and-valid, or refused. Returns which."""
    if stage == "fetch_model":
        target = p.fetch_target
        if not target.exists():
            return "refused"  # no folder: the server's loader finds nothing, never a partial model
        manifest = read_manifest_local(target)
        for entry in manifest.files:
            assert (target / entry.path).stat().st_size == entry.size, f"{target} is partial: {entry.path}"
        return "committed"
    loc = p.output(stage)
    if stage == "publish" and loc is None:
        return "refused"  # PROMOTED not moved: fetch_model follows the previous (here: no) version
    check = p.settings.cache_dir / "work" / "reader-check"
    shutil.rmtree(check, ignore_errors=True)
    try:
        fetch_dir(loc, check)
        return "committed"
    except IntegrityError as exc:
        assert "has no MANIFEST.json" in str(exc), exc
        return "refused"
    finally:
        shutil.rmtree(check, ignore_errors=True)


def _no_orphans(p, stage) -> None:
    if stage == "fetch_model":
        strays = [x.name for x in p.fetch_target.parent.iterdir() if ".partial-" in x.name]
        assert not strays, f"half-fetched folders left beside the target: {strays}"
        return
    loc = p.output(stage)
    manifest = read_manifest(loc)
    listed = {f.path for f in manifest.files} | {MANIFEST}
    present = {rel for rel in loc.list_files() if not rel.startswith("checkpoints/")}
    assert present == listed, f"files beside the manifest's: {sorted(present ^ listed)}"
    if isinstance(loc, S3Location):
        uploads = loc._client.list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.prefix).get("Uploads", [])
        assert not uploads, f"unfinished multipart uploads left: {[u['Key'] for u in uploads]}"
    else:
        temps = [q.name for q in loc.path.rglob(".lawtune-tmp-*")]
        assert not temps, f"temporary files left: {temps}"


def _stored(p, stage) -> dict[str, str]:
    """Every object the stage's output holds, downloaded and hashed: {path: sha256}."""
    if stage == "fetch_model":
        target = p.fetch_target
        return {q.relative_to(target).as_posix(): sha256_file(q) for q in sorted(target.rglob("*")) if q.is_file()}
    loc = p.output(stage)
    return {rel: loc.sha256(rel) for rel in loc.list_files()}


def _volatile(stage: str, rel: str) -> bool:
    """Bytes that legitimately differ between two runs (timings, time stamps, a resumed run's float noise)."""
    return (rel in VOLATILE.get(stage, ()) or rel.startswith(VOLATILE_FOLDERS) or rel.endswith(MANIFEST)
            or rel.startswith("checkpoints/"))


def _normalised(paths) -> set[str]:
    return {next((folder + "*" for folder in VOLATILE_FOLDERS if rel.startswith(folder)), rel) for rel in paths}


def _registry_state(p) -> tuple:
    from shared.publish import registry

    root = open_location(p.settings.models_uri(MODEL_NAME), p.settings)
    return (registry.read_pointer(root).version, [(e["from"], e["to"], e["kind"]) for e in registry.history(root)],
            root.child(registry.HISTORY).child(registry.PENDING).list_files())


def _lost(p, stage, reference) -> list[str]:
    """What the re-run did not give back, object by object, from the bytes stored now."""
    got, expected = _stored(p, stage), reference["stored"][stage]
    lost = [f"{rel}: missing" for rel in sorted(expected) if rel not in got and not rel.startswith(VOLATILE_FOLDERS)]
    lost += [f"{rel}: bytes differ from the uninterrupted run's" for rel in sorted(expected)
             if rel in got and not _volatile(stage, rel) and got[rel] != expected[rel]]
    manifest = _manifest_of(p, stage)
    lost += [f"{e.path}: stored bytes do not match the manifest" for e in manifest.files if got.get(e.path) != e.sha256]
    lost += [f"{rel}: not in the uninterrupted run's output" for rel in sorted(_normalised(got) - _normalised(expected))]
    if stage == "finetune":
        loc = p.output(stage)
        for rel in sorted(r for r in got if r.startswith("checkpoints/") and r.endswith("/" + MANIFEST)):
            folder = loc.child(rel.rsplit("/", 1)[0])
            lost += [f"{rel.rsplit('/', 1)[0]}/{d}" for d in damaged_files(folder, read_manifest(folder))]
    if stage == "publish" and _registry_state(p) != reference["registry"]:
        lost.append(f"PROMOTED/history {_registry_state(p)} differ from the uninterrupted run's {reference['registry']}")
    return lost


def _record(entry: dict) -> None:
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize("stage, i, marker, delay", [pytest.param(*t, id=f"{t[0]}-{t[1]}") for t in TRIALS])
def test_sigkill_then_rerun_gives_the_uninterrupted_output(reference, stage, i, marker, delay):
    p, work = reference["pipeline"], reference["work"]
    row = {"fault": "SIGKILL inside a commit" if marker.startswith("failpoint ") else "SIGKILL mid-stage",
           "backend": reference["backend"], "stage": stage, "seed": SEED + STAGES.index(stage), "marker": marker,
           "delay_s": delay, "reference_s": round(reference["durations"][stage], 1), "survived": False, "lost_files": None}
    try:
        p.reset(stage)
        row["killed_at"] = p.kill_at(stage, marker, delay, work / f"kill-{stage}-{i}.log")
        row["after_kill"] = _reader_invariant(p, stage)
        t0 = time.monotonic()
        p.run(stage, work / f"rerun-{stage}-{i}.log")
        row["rerun_s"] = round(time.monotonic() - t0, 1)
        lost = _lost(p, stage, reference)
        row["lost_files"] = len(lost)
        assert not lost, f"{stage} killed at {row['killed_at']}: lost {lost}"
        if stage == "finetune":
            a, b = reference["adapter"], _adapter(p, work / f"adapter-{i}")
            row["adapter_max_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
            assert a.keys() == b.keys() and row["adapter_max_diff"] <= TOLERANCE, f"adapter differs by {row['adapter_max_diff']}"
            assert _adapter_config(p.output("finetune")) == reference["adapter_config"]
        _no_orphans(p, stage)
        row["survived"] = True
    except BaseException as exc:
        row["error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise
    finally:
        _record(row)
