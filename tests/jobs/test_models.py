"""jobs/models.py (lawtune models list/promote/rollback) and two real publish processes racing, on file:// and SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import models
from shared.core.settings import load_settings
from shared.publish import registry
from shared.store.releases import record_release
from shared.store.storage import open_location
from tests.shared.publish.test_registry import publish_fake_version

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def three_versions(artifact_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ACTOR", "alice")
    settings = load_settings()
    for v, passed in (("r1-aaaa", True), ("r2-bbbb", True), ("r3-cccc", False)):
        publish_fake_version(settings, "legal", v, tmp_path, passed=passed)
    return settings


def _promoted(settings):
    return registry.read_pointer(open_location(settings.models_uri("legal"), settings)).version


def test_promote_list_and_rollback(three_versions, capsys):
    settings = three_versions
    assert models.main(["promote", "legal", "r1-aaaa"]) == 0
    assert models.main(["promote", "legal", "r2-bbbb"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"PROMOTED: r1-aaaa -> r2-bbbb: {settings.models_uri('legal')}/PROMOTED"
    assert models.main(["promote", "legal", "r3-cccc"]) == 2, "a failed gate needs --force"
    assert "failed its quality gate" in capsys.readouterr().err
    assert models.main(["promote", "legal", "r3-cccc", "--force"]) == 0
    assert _promoted(settings) == "r3-cccc"

    assert models.main(["rollback", "legal"]) == 0
    assert _promoted(settings) == "r2-bbbb"
    assert models.main(["rollback", "legal"]) == 0
    assert _promoted(settings) == "r1-aaaa"
    capsys.readouterr()
    assert models.main(["rollback", "legal"]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err

    assert models.main(["list", "legal"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out[1:4]}
    assert rows["r1-aaaa"].startswith("* ") and not rows["r2-bbbb"].startswith("*")
    assert "passed" in rows["r1-aaaa"] and "FAILED" in rows["r3-cccc"] and "12.50" in rows["r1-aaaa"] and "abababababab" in rows["r1-aaaa"]
    assert "PROMOTED: r1-aaaa" in out
    assert not any(line.startswith("serving:") for line in out)  # nothing deployed through `lawtune deploy`
    kinds = [line.split()[1] for line in out[out.index("history:") + 1:]]
    assert kinds == ["promote", "promote", "forced", "rollback", "rollback"]
    assert all("by alice" in line for line in out[out.index("history:") + 1:])

    # A release deployed with `lawtune deploy` shows which version it runs, which may not be PROMOTED.
    record_release(open_location(settings.models_uri("legal"), settings), release="assistant", namespace="serving",
                   version="r2-bbbb", deployed_at="2026-11-29T01:00:00Z", helm_revision=4)
    assert models.main(["list", "legal"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("serving:")] == [
        "serving: serving/assistant runs r2-bbbb (helm revision 4, deployed 2026-11-29T01:00:00Z by alice)"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["promote", "legal", "r9-nope"], "has no version 'r9-nope'; known: r1-aaaa, r2-bbbb, r3-cccc", id="version"),
        pytest.param(["list", "other"], "no published model named 'other'", id="name"),
        pytest.param(["rollback", "other"], "known: legal", id="name-lists-known"),
        pytest.param(["list", "Bad Name"], "model name 'Bad Name'", id="bad-name"),
    ],
)
def test_unknown_model_or_version_exits_2_listing_known_ones(three_versions, capsys, args, needle):
    assert models.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune models: error: ") and needle in err[-1]


def test_cli_dispatches_models(three_versions):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "models", "promote", "legal", "r9-nope"], cwd=REPO,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "known: r1-aaaa" in proc.stderr
