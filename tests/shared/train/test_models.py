"""shared/train/models.py: every kind of base_model ref, the bundled conversion and its cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.store.artifacts import commit_dir, now_iso, sha256_file
from shared.core.errors import ConfigError
from shared.train.models import BUNDLED_DEFAULT, resolve_base_model
from shared.core.settings import Settings
from shared.store.storage import open_location


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        pytest.param("bundled:nope", "unknown bundled model", id="unknown-bundled"),
        pytest.param("", "base_model is empty", id="empty"),
        pytest.param("not a model id!", "is not a Hugging Face id", id="garbage"),
        pytest.param("./does/not/exist", "no such directory", id="missing-local-dir"),
        pytest.param("no-such-org/no-such-model-xyz", "Hugging Face hub", id="hf-id-offline"),
        pytest.param("ftp://host/model", "is not a Hugging Face id", id="unknown-scheme"),
    ],
)
def test_bad_refs_fail_with_one_line(ref, needle, tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_base_model(ref, Settings(cache_dir=tmp_path / "cache"))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        pytest.param({}, "has no config.json", id="empty-dir"),
        pytest.param({"config.json": "{not json"}, "config.json is unreadable", id="broken-config"),
        pytest.param({"config.json": json.dumps({"model_type": "llama"})}, "no tokenizer files", id="no-tokenizer"),
    ],
)
def test_unusable_local_dirs_are_rejected(files, needle, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    with pytest.raises(ConfigError, match=needle):
        resolve_base_model(str(model), Settings(cache_dir=tmp_path / "cache"))


def test_store_uri_without_manifest_is_rejected(tmp_path):
    folder = tmp_path / "half-uploaded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no MANIFEST.json"):
        resolve_base_model(f"file://{folder}", Settings(cache_dir=tmp_path / "cache"))


@pytest.mark.integration
def test_bundled_model_converts_to_a_plain_chat_model(bundled_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(bundled_model_dir)
    assert not hasattr(config, "quantization_config"), "the GGUF origin must not leak into the saved config"
    assert (bundled_model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.integration
def test_bundled_cache_is_reused_and_partial_builds_are_ignored(bundled_model_dir, model_cache_dir):
    settings = Settings(cache_dir=model_cache_dir)
    weights = bundled_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    # A crashed conversion leaves a staging sibling; it must neither be used nor block reuse.
    stale = bundled_model_dir.parent / f".{bundled_model_dir.name}.partial-crashed"
    stale.mkdir(exist_ok=True)
    assert resolve_base_model(BUNDLED_DEFAULT, settings) == bundled_model_dir
    assert weights.stat().st_mtime_ns == before, "a valid cache must not be rebuilt"
    shutil.rmtree(stale)


@pytest.mark.integration
def test_bundled_cache_with_a_wrong_marker_is_rebuilt(bundled_model_dir, tmp_path):
    cache = tmp_path / "cache"
    target = cache / "models" / "smollm2-135m-instruct"
    shutil.copytree(bundled_model_dir, target)
    (target / "lawtune-source.json").write_text(json.dumps({"version": "0.0.0"}))
    (target / "model.safetensors").write_bytes(b"truncated")
    path = resolve_base_model(BUNDLED_DEFAULT, Settings(cache_dir=cache))
    assert path == target
    assert sha256_file(path / "model.safetensors") == sha256_file(bundled_model_dir / "model.safetensors")


@pytest.mark.integration
def test_store_ref_downloads_verified_and_follows_promoted(bundled_model_dir, artifact_root, tmp_path):
    settings = Settings(cache_dir=tmp_path / "cache")
    version_uri = f"{settings.models_uri('legal')}/v1"
    commit_dir(bundled_model_dir, open_location(version_uri, settings), stage="publish", inputs={}, started_at=now_iso())
    open_location(settings.models_uri("legal"), settings).write_text("PROMOTED", "v1\n")

    for ref in (version_uri, settings.models_uri("legal")):
        path = resolve_base_model(ref, settings)
        assert sha256_file(path / "model.safetensors") == sha256_file(bundled_model_dir / "model.safetensors")
        assert (path / "chat_template.jinja").is_file()


@pytest.mark.integration
def test_store_ref_with_corrupted_file_fails_and_caches_nothing(bundled_model_dir, artifact_root, tmp_path):
    from shared.core.errors import IntegrityError

    settings = Settings(cache_dir=tmp_path / "cache")
    src = tmp_path / "small"
    src.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(bundled_model_dir / name, src / name)
    uri = f"{settings.models_uri('tiny')}/v1"
    loc = open_location(uri, settings)
    commit_dir(src, loc, stage="publish", inputs={}, started_at=now_iso())
    loc.write_text("config.json", "{}")  # corrupted after commit
    with pytest.raises(IntegrityError, match="config.json"):
        resolve_base_model(uri, settings)
    assert not [p for p in (settings.cache_dir / "models").iterdir() if p.name.startswith("store-")]


def test_local_directory_is_used_in_place(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "tokenizer.json").write_text("{}")
    assert resolve_base_model(str(model), Settings(cache_dir=tmp_path / "c")) == model.resolve()
    assert isinstance(resolve_base_model(str(model), Settings(cache_dir=tmp_path / "c")), Path)


@pytest.mark.parametrize("promoted", ["..", "../legal", "."])
def test_store_ref_whose_promoted_names_a_path_is_refused(tmp_path, promoted):
    """issue 24 item 1: PROMOTED's content becomes models/<name>/<version>: `..` would read another folder."""
    from shared.core.errors import ConfigError

    settings = Settings(artifact_root=f"file://{tmp_path / 'artifacts'}", cache_dir=tmp_path / "cache")
    open_location(settings.models_uri("legal"), settings).write_text("PROMOTED", promoted + "\n")
    with pytest.raises(ConfigError, match="PROMOTED holds .*expected a version name"):
        resolve_base_model(settings.models_uri("legal"), settings)
