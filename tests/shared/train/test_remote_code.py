"""trust_remote_code: a base model that needs its repository's code (THUDM/chatglm3-6b does) is
refused with exit 2 naming the key while the key is off; with it on, training, the merge (which
keeps the code files) and serving's vLLM flags follow it.

No model hub here: tests/tiny.py dresses a config-initialised tiny Llama as such a model (its
own configuration_*.py / modeling_*.py and an ``auto_map``), which exercises the same
transformers code path (dynamic modules) as ChatGLM3's repository.
"""

from __future__ import annotations

import json

import pytest
import yaml

from shared.core.config import parse_config
from shared.core.errors import ConfigError
from shared.store.artifacts import commit_dir, now_iso
from shared.store.storage import open_location
from shared.train.models import needs_remote_code, resolve_base_model
from tests.tiny import remote_code_model_dir, tiny_data_dir, tiny_model_dir


def test_model_needing_remote_code_is_refused_while_the_key_is_off(tmp_path):
    from shared.core.settings import Settings

    model = remote_code_model_dir(tmp_path / "remote")
    assert needs_remote_code(model) == "modeling_tiny_remote.TinyRemoteForCausalLM"
    assert needs_remote_code(tiny_model_dir(tmp_path / "plain")) is None
    with pytest.raises(ConfigError, match="needs its repository's own code .* trust_remote_code is false; set trust_remote_code: true"):
        resolve_base_model(str(model), Settings(cache_dir=tmp_path / "cache"))
    assert resolve_base_model(str(model), Settings(cache_dir=tmp_path / "cache"), trust_remote_code=True) == model


def test_finetune_job_exits_2_with_one_line_naming_the_key(tmp_path, monkeypatch, capsys):
    from jobs.finetune import main
    from shared.core.settings import Settings

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'art'}")
    settings = Settings()
    data = tiny_data_dir(tmp_path / "data", 4, 2)
    commit_dir(data, open_location(settings.run_uri("data"), settings), stage="data", inputs={}, started_at=now_iso())
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(remote_code_model_dir(tmp_path / "remote"))}))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune finetune: error: base_model") and "trust_remote_code: true" in err[-1]


def test_with_the_key_on_training_merge_and_serving_follow_it(tmp_path):
    from shared.publish.merge import merge_adapter
    from shared.serve.serve_local import server_args
    from shared.train.fast.speedups import training_hooks
    from shared.train.training import train

    model = remote_code_model_dir(tmp_path / "remote")
    config = parse_config({
        "trust_remote_code": True, "max_input_length": 32, "max_output_length": 16,
        "training_args": {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "use_cpu": True,
                          "per_device_train_batch_size": 2},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    })
    result = train(config, model, tiny_data_dir(tmp_path / "data", 6, 2), tmp_path / "local", None, training_hooks(config, "cpu"))
    assert result.steps_completed == 2
    adapter = tmp_path / "local" / "checkpoint-2"
    assert (adapter / "adapter_config.json").is_file()

    merged = tmp_path / "merged"
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers itself refuses without the key
        merge_adapter(model, adapter, tmp_path / "refused")
    merge_adapter(model, adapter, merged, trust_remote_code=True)
    assert {"configuration_tiny_remote.py", "modeling_tiny_remote.py"} <= {p.name for p in merged.iterdir()}
    assert json.loads((merged / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith("TinyRemoteForCausalLM")
    assert "--trust-remote-code" in server_args(merged, gpu=False, trust_remote_code=True)


@pytest.mark.parametrize(
    ("peft", "model_type", "leaf", "want"),
    [
        pytest.param({}, "chatglm", "query_key_value", ["query_key_value"], id="chatglm3-default-targets"),
        pytest.param({}, "llama", "q_proj", ["q_proj", "k_proj", "v_proj"], id="default-kept-where-it-exists"),
        pytest.param({"target_modules": ["dense"]}, "chatglm", "query_key_value", ["dense"], id="explicit-wins"),
    ],
)
def test_lora_targets_follow_the_architecture_when_the_config_names_none(peft, model_type, leaf, want):
    """ChatGLM3's attention is one fused ``query_key_value`` linear (its modeling code, not
    loadable here): the demo's lora.yaml names no targets, so peft's own ones for chatglm apply."""
    import torch

    from shared.core.config import PeftConfig
    from shared.train.models import lora_targets

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, leaf, torch.nn.Linear(4, 4))
            self.dense = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(Attention())
    model.config = type("Config", (), {"model_type": model_type})()
    assert lora_targets(model, PeftConfig(**peft)) == want


# ---------------------------------------------------------------------------------------------
# issue 24 item 2: remote code is the operator's decision, and only the code finetune ran may run


def _config_file(tmp_path, trust: bool, model) -> str:
    path = tmp_path / f"config-{trust}.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(model), "trust_remote_code": trust, "max_input_length": 32, "max_output_length": 16,
        "training_args": {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "use_cpu": True,
                          "per_device_train_batch_size": 2},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "evaluation": {"generation": {"max_new_tokens": 2}, "batch_size": 2, "backend": "transformers"},
    }))
    return str(path)


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.integration
def test_remote_code_follows_the_operator_and_the_recorded_digests_through_the_pipeline(tmp_path, monkeypatch, capsys):
    """finetune records the code it ran; evaluate, publish and fetch-model run it only when their own
    switch is on and only while the files match that record (before: evaluate and publish took the
    switch from the finetune manifest, and nothing compared the code)."""
    from jobs import evaluate, fetch_model, finetune, publish
    from shared.core.settings import Settings
    from shared.store.artifacts import read_manifest
    from shared.store.model_code import code_files
    from tests.tiny import words_conversation, write_split

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'art'}")
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    settings = Settings()
    model = remote_code_model_dir(tmp_path / "remote")
    data = tiny_data_dir(tmp_path / "data", 6, 2)
    write_split(data, "test.jsonl", [words_conversation(200 + i) for i in range(2)])
    commit_dir(data, open_location(settings.run_uri("data"), settings), stage="data", inputs={}, started_at=now_iso())
    trusted, untrusted = _config_file(tmp_path, True, model), _config_file(tmp_path, False, model)

    assert finetune.main(["--config", trusted]) == 0
    record = read_manifest(open_location(settings.run_uri("finetune"), settings)).extra["remote_code"]
    assert record == code_files(model) and set(record) == {"configuration_tiny_remote.py", "modeling_tiny_remote.py"}

    # evaluate: the finetune manifest's trust_remote_code: true no longer switches it on.
    assert evaluate.main(["--config", untrusted]) == 2
    assert "needs its repository's own code" in (line := _last_error(capsys)) and "trust_remote_code: true" in line
    # Other code under the same name than the code finetune ran: refused before it is imported.
    modeling = model / "modeling_tiny_remote.py"
    original = modeling.read_text()
    modeling.write_text(original + "\nraise SystemExit('attacker code ran')\n")
    assert evaluate.main(["--config", trusted]) == 2
    assert "modeling_tiny_remote.py: sha256" in (line := _last_error(capsys)) and "recorded; refused" in line
    (model / "extra_helper.py").write_text("")
    modeling.write_text(original)
    assert evaluate.main(["--config", trusted]) == 2
    assert "extra_helper.py: a code file" in _last_error(capsys)
    (model / "extra_helper.py").unlink()
    assert evaluate.main(["--config", trusted]) == 0

    # publish reads no config: its own flag decides.
    assert publish.main(["--model-name", "remote"]) == 2
    assert "--trust-remote-code" in _last_error(capsys)
    assert publish.main(["--model-name", "remote", "--trust-remote-code"]) == 0
    version_uri = capsys.readouterr().out.split("model: ", 1)[1].split()[0]
    version = read_manifest(open_location(version_uri, settings))
    assert version.extra["remote_code"] == record
    assert {f.path for f in version.files} >= set(record)

    # fetch-model (the serving chart's init container) with the chart's vllm.trustRemoteCode on.
    assert fetch_model.main([version_uri, str(tmp_path / "served"), "--trust-remote-code"]) == 0
    assert code_files(tmp_path / "served") == record
    # Someone rewrites the code in the store, manifest entry included: the record still refuses it.
    store = open_location(version_uri, settings)
    import json as _json

    store.write_text("modeling_tiny_remote.py", original + "\n# changed\n")
    raw = _json.loads(store.read_text("MANIFEST.json"))
    for entry in raw["files"]:
        if entry["path"] == "modeling_tiny_remote.py":
            changed = (original + "\n# changed\n").encode()
            entry.update(size=len(changed), sha256=__import__("hashlib").sha256(changed).hexdigest())
    store.write_text("MANIFEST.json", _json.dumps(raw))
    assert fetch_model.main([version_uri, str(tmp_path / "served2"), "--trust-remote-code"]) == 2
    assert "modeling_tiny_remote.py: sha256" in _last_error(capsys)
    assert not (tmp_path / "served2").exists()


def test_serving_a_model_that_needs_code_without_the_switch_names_it(tmp_path):
    """make serve: the model folder's own config never adds --trust-remote-code (before, it did)."""
    from shared.serve.serve_local import server_args

    model = remote_code_model_dir(tmp_path / "remote")
    with pytest.raises(ConfigError, match=r"remote code is off: run with --trust-remote-code \(make serve TRUST_REMOTE_CODE=1\)"):
        server_args(model, gpu=False)
    assert server_args(model, gpu=False, trust_remote_code=True)[-1] == "--trust-remote-code"
    assert "--trust-remote-code" not in server_args(tiny_model_dir(tmp_path / "plain"), gpu=True)
