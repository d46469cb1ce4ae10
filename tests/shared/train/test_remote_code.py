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
    assert "--trust-remote-code" in server_args(merged, gpu=False)
    assert "--trust-remote-code" not in server_args(tiny_model_dir(tmp_path / "plain"), gpu=True)


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
