"""Fixtures shared by every test tier. Real servers start once per session, on demand."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_report_header(config):
    """Free disk up front: when a run dies of ENOSPC, the log says so before the first failure."""
    import tempfile

    where = tempfile.gettempdir()
    return f"disk: {shutil.disk_usage(where).free / 2**30:.1f} GiB free under {where} (a full make test peaks at ~4 GiB there)"


_FAULT_CASE = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test marked ``fault("<class>")`` appends its outcome to ``FAULTS_REPORT`` (JSON lines), failing
    ones included: tests/faults/summarise.py counts tried / survived / lost per class from them. A test
    that measured what was lost says so with ``record_property("lost_files", n)``; else a pass means
    its assertions found nothing lost and a failure leaves "lost" unknown.

    One row per case, written once its teardown ran: a fixture that fails after a passing test makes
    the case one failure (two rows would count one case twice, as survived and as not)."""
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    path = os.environ.get("FAULTS_REPORT")
    if marker is None or not path:
        return
    case = item.stash.setdefault(_FAULT_CASE, {"ran": False, "failed": False, "skipped": False, "seconds": 0.0})
    case["failed"] |= report.failed
    case["skipped"] |= report.skipped
    case["ran"] |= report.when == "call" or report.failed
    case["seconds"] += report.duration
    if report.when != "teardown" or not case["ran"] or (case["skipped"] and not case["failed"]):
        return  # a skipped case was not tried here (e.g. a tool this machine lacks): as a row it read as a fault not survived
    props = dict(item.user_properties)
    survived = not case["failed"]
    row = {"fault": marker.args[0], "case": item.nodeid.split("::", 1)[1], "survived": survived,
           "lost_files": props.get("lost_files", 0 if survived else None), "seconds": round(case["seconds"], 1)}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the developer's LAWTUNE_* environment, writes into their cache or logs to their MLflow."""
    for key in list(os.environ):
        if key.startswith(("LAWTUNE_", "MLFLOW_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LAWTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LAWTUNE_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``mktemp`` for module fixtures: their folders go when the module's tests are done.

    A module fixture that publishes the bundled model holds ~0.5-1 GiB; kept to the session's end,
    they added up to 13 GiB and a CI machine ran out of disk. Kept when a test of the module
    failed, to look at (as pytest keeps a failed test's tmp_path)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """Where the bundled model is converted once per session (conversion takes seconds)."""
    env = os.environ.get("LAWTUNE_TEST_MODEL_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    from tests.servers import start_seaweedfs

    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweedfs):
    """A fresh bucket, removed afterwards: the session's SeaweedFS has room for about 140 (tests/servers.py)."""
    from tests.servers import fresh_bucket

    with fresh_bucket(seaweedfs) as name:
        yield name


@pytest.fixture
def s3_env(seaweedfs, s3_bucket, monkeypatch) -> dict[str, str]:
    """Environment pointing the artifact store at a fresh bucket of the session's SeaweedFS."""
    env = {**seaweedfs.env(), "LAWTUNE_ARTIFACT_ROOT": f"s3://{s3_bucket}/lawtune"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def artifact_root(request, tmp_path, monkeypatch) -> str:
    """Both backends, so every store test runs against each (s3 = real SeaweedFS)."""
    if request.param == "file":
        root = f"file://{tmp_path / 'artifacts'}"
        monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", root)
        return root
    env = request.getfixturevalue("s3_env")
    return env["LAWTUNE_ARTIFACT_ROOT"]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (a user's clone has no ../shared); the project's own fixtures cover the core cases")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bundled_model_dir(model_cache_dir) -> Path:
    """The bundled model (GGUF → safetensors), converted once per session under ``model_cache_dir``."""
    from shared.train.models import BUNDLED_DEFAULT, resolve_base_model
    from shared.core.settings import Settings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return resolve_base_model(BUNDLED_DEFAULT, Settings(cache_dir=model_cache_dir))
