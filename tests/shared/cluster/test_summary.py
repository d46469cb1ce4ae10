"""shared/cluster/summary.py: what `make train` prints at the end, on a real committed evaluate output."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import urllib.request

import pytest

from shared.cluster.summary import next_steps, summarize
from shared.core.settings import Settings
from shared.store.artifacts import commit_dir, now_iso
from shared.store.storage import open_location
from tests.servers import free_port


def _evaluated(tmp_path, *, passed: bool, promote: bool) -> Settings:
    settings = Settings(artifact_root=f"file://{tmp_path / 'art'}", cache_dir=tmp_path / "cache", run_id="r1")
    local = tmp_path / "evaluate"
    local.mkdir()
    (local / "report.html").write_text("<h1>微调前/微调后</h1>", encoding="utf-8")
    (local / "report.md").write_text("# report\n", encoding="utf-8")
    commit_dir(local, open_location(settings.run_uri("evaluate"), settings), stage="evaluate", inputs={},
               started_at=now_iso(), extra={"gate": {"passed": passed, "reasons": [] if passed else ["rouge-l fell"]}})
    if promote:
        open_location(settings.models_uri("legal-assistant"), settings).write_text("PROMOTED", "v1\n")
    return settings


def test_a_finished_run_names_the_report_and_the_next_step(tmp_path, capsys):
    settings = _evaluated(tmp_path, passed=True, promote=True)
    summarize(settings, "legal-assistant")
    out = capsys.readouterr().out
    assert f"{settings.run_uri('evaluate')}/report.html" in out and "Quality gate: PASSED" in out
    assert "\nNext:\n  make serve " in out
    assert "python3 -m http.server 8000 --bind 127.0.0.1 --directory " in out and "ssh -N -L 8000:127.0.0.1:8000" in out


def test_the_printed_report_server_command_serves_the_report(tmp_path):
    """The http.server line, run through bash as printed, answers with the report."""
    settings = _evaluated(tmp_path, passed=True, promote=True)
    (line,) = [s.strip() for s in next_steps(settings, "legal-assistant", promoted=True) if "http.server" in s]
    port = free_port()
    command = line.replace("python3 ", f"{shlex.quote(sys.executable)} ", 1).replace(" 8000 ", f" {port} ")
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/report.html", timeout=2) as resp:
                    assert "微调前/微调后" in resp.read().decode("utf-8")
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize(("passed", "promote", "target", "expected"), [
    pytest.param(False, False, "local", "the gate kept the model from serving", id="gate-failed"),
    pytest.param(True, True, "k8s", "helm install legal-assistant charts/lawtune-serving", id="k8s"),
])
def test_the_next_step_follows_the_verdict_and_target(tmp_path, passed, promote, target, expected):
    settings = _evaluated(tmp_path, passed=passed, promote=promote)
    steps = "\n".join(next_steps(settings, "legal-assistant", promoted=promote, target=target))
    assert expected in steps and ("make serve" in steps) == (promote and target == "local")
