"""jobs/models.py canary: start, move, promote, abort; what `models list` and the serving state then say.

On file:// and real SeaweedFS S3 (the CANARY record moves by compare-and-swap like PROMOTED).
"""

from __future__ import annotations

import pytest

from jobs import models
from shared.core.settings import load_settings
from shared.publish import registry
from shared.store.releases import record_release
from shared.store.serving import CanaryConflict, read_canary, serving_state, write_canary
from shared.store.storage import open_location
from tests.shared.publish.test_registry import publish_fake_version


@pytest.fixture
def champion_and_challengers(artifact_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ACTOR", "bob")
    settings = load_settings()
    for v, passed in (("r1-aaaa", True), ("r2-bbbb", True), ("r3-cccc", False)):
        publish_fake_version(settings, "legal", v, tmp_path, passed=passed)
    assert models.main(["promote", "legal", "r1-aaaa"]) == 0
    return settings, open_location(settings.models_uri("legal"), settings)


def _state(root):
    return serving_state("legal", root, with_history=True)


def test_canary_moves_promote_and_list(champion_and_challengers, capsys):
    settings, root = champion_and_challengers
    assert models.main(["canary", "legal", "r2-bbbb", "--weight", "10"]) == 0
    assert capsys.readouterr().out.startswith("canary: r1-aaaa 90%, r2-bbbb 10%")
    assert _state(root).weights() == {"r1-aaaa": 90, "r2-bbbb": 10}
    assert _state(root).routes() == {"model": "legal", "champion": "r1-aaaa", "challenger": "r2-bbbb", "weight": 10,
                                     "sticky": "apiKey", "previous": None, "salt": "r2-bbbb"}

    assert models.main(["canary", "legal", "r2-bbbb", "--weight", "100"]) == 0  # the 0/100 shift
    assert _state(root).weights() == {"r1-aaaa": 0, "r2-bbbb": 100}
    assert models.main(["canary", "legal", "r2-bbbb", "--sticky", "conversation"]) == 0  # the weight stays
    canary, _ = read_canary(root)
    assert (canary.weight, canary.sticky, canary.actor) == (100, "conversation", "bob")

    record_release(root, release="assistant", namespace="serving", version="r1-aaaa", deployed_at="2026-12-01T00:00:00Z",
                   helm_revision=3, mode="adapters", base_model_digest="b" * 64)
    capsys.readouterr()
    assert models.main(["list", "legal"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out[1:4]}
    assert rows["r1-aaaa"].endswith("merged   0%") and rows["r2-bbbb"].endswith("merged   100%") and rows["r3-cccc"].endswith("merged")
    assert any(line.startswith("CANARY: r2-bbbb answers 100% (sticky per conversation; since ") for line in out)
    assert "serving: serving/assistant serves adapters on base bbbbbbbbbbbb…: r1-aaaa 0%, r2-bbbb 100% (helm revision 3, " \
           "deployed 2026-12-01T00:00:00Z by bob)" in out

    assert models.main(["canary", "legal", "promote"]) == 0
    assert registry.read_pointer(root).version == "r2-bbbb" and read_canary(root)[0] is None
    state = _state(root)
    assert state.weights() == {"r2-bbbb": 100} and state.previous == "r1-aaaa", "the old champion stays loaded while it settles"
    kinds = [e.get("kind") for e in registry.history(root)]
    assert kinds == ["promote", "canary", "canary", "canary", "canary-promote"]
    # Canary events do not confuse rollback: back to the champion before the promoted challenger.
    assert models.main(["rollback", "legal"]) == 0
    assert registry.read_pointer(root).version == "r1-aaaa"


def test_abort_gives_the_champion_all_traffic(champion_and_challengers, capsys):
    _, root = champion_and_challengers
    assert models.main(["canary", "legal", "r2-bbbb"]) == 0  # the default weight
    assert _state(root).weights() == {"r1-aaaa": 90, "r2-bbbb": 10}
    assert models.main(["canary", "legal", "abort"]) == 0
    assert read_canary(root)[0] is None and _state(root).weights() == {"r1-aaaa": 100}
    assert registry.read_pointer(root).version == "r1-aaaa"
    assert registry.history(root)[-1]["kind"] == "canary-abort" and registry.history(root)[-1]["challenger"] == "r2-bbbb"


@pytest.mark.parametrize(("args", "needle"), [
    pytest.param(["canary", "legal", "promote"], "no canary to promote", id="promote-without-canary"),
    pytest.param(["canary", "legal", "abort"], "no canary to abort", id="abort-without-canary"),
    pytest.param(["canary", "legal", "r1-aaaa"], "is PROMOTED already", id="the-champion"),
    pytest.param(["canary", "legal", "r3-cccc"], "failed its quality gate; canary it anyway with --force", id="failed-gate"),
    pytest.param(["canary", "legal", "r2-bbbb", "--weight", "150"], "--weight 150: expected a percent", id="weight"),
    pytest.param(["canary", "legal", "r9-nope"], "has no version 'r9-nope'", id="unknown-version"),
])
def test_bad_canary_commands_exit_2_naming_why(champion_and_challengers, capsys, args, needle):
    _, root = champion_and_challengers
    assert models.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune models: error: ") and needle in err[-1], err[-1]
    assert read_canary(root)[0] is None


def test_a_failed_gate_canaries_with_force(champion_and_challengers):
    _, root = champion_and_challengers
    assert models.main(["canary", "legal", "r3-cccc", "--weight", "5", "--force"]) == 0
    assert models.main(["canary", "legal", "promote"]) == 2, "promoting it needs --force again"
    assert models.main(["canary", "legal", "promote", "--force"]) == 0
    assert registry.read_pointer(root).version == "r3-cccc"


def test_two_operators_cannot_overwrite_each_others_canary(champion_and_challengers):
    _, root = champion_and_challengers
    assert models.main(["canary", "legal", "r2-bbbb", "--weight", "10"]) == 0
    seen, token = read_canary(root)
    assert models.main(["canary", "legal", "r2-bbbb", "--weight", "50"]) == 0  # the other operator
    with pytest.raises(CanaryConflict):
        write_canary(root, seen, token)
    assert read_canary(root)[0].weight == 50


def test_lineage_ends_at_the_releases_serving_the_version_and_its_share(champion_and_challengers):
    from shared.publish.lineage import trace

    settings, root = champion_and_challengers
    record_release(root, release="assistant", namespace="serving", version="r1-aaaa", deployed_at="2026-12-01T00:00:00Z",
                   helm_revision=3, mode="adapters", base_model_digest="b" * 64)
    record_release(root, release="merged", namespace="serving", version="r1-aaaa", deployed_at="2026-12-01T00:00:00Z",
                   helm_revision=1, mode="merged")
    assert models.main(["canary", "legal", "r2-bbbb", "--weight", "10"]) == 0

    def serving(version):
        return trace(settings, f"{settings.models_uri('legal')}/{version}")[-1]

    challenger = serving("r2-bbbb")
    assert challenger.status == "ok"
    assert [(r["release"], r["mode"], r["traffic_percent"]) for r in challenger.facts["releases"]] == [("assistant", "adapters", 10)]
    assert challenger.facts["other_releases"] == {"serving/merged": "r1-aaaa"}, "a plain merged release runs only its version"
    champion = serving("r1-aaaa")
    assert sorted((r["release"], r["traffic_percent"]) for r in champion.facts["releases"]) == [("assistant", 90), ("merged", 100)]
    assert serving("r3-cccc").status == "not deployed"
