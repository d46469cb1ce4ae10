"""shared/core/settings.py: environment → typed settings; URIs derived from them; no credentials."""

from pathlib import Path

import pytest

from shared.core.errors import ConfigError
from shared.core.settings import Settings, load_settings


def test_defaults_are_a_local_artifact_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.artifact_root == f"file://{tmp_path / 'artifacts'}"
    assert settings.run_uri("data") == f"file://{tmp_path / 'artifacts'}/runs/dev/data"
    assert settings.run_uri() == f"file://{tmp_path / 'artifacts'}/runs/dev"
    assert settings.models_uri("legal") == f"file://{tmp_path / 'artifacts'}/models/legal"


@pytest.mark.parametrize(
    "env, field, value",
    [
        pytest.param({"LAWTUNE_ARTIFACT_ROOT": "s3://bucket/some/prefix/"}, "artifact_root", "s3://bucket/some/prefix", id="s3-trailing-slash"),
        pytest.param({"LAWTUNE_ARTIFACT_ROOT": "file:///srv/art"}, "artifact_root", "file:///srv/art", id="file-abs"),
        pytest.param({"LAWTUNE_RUN_ID": "run-2026.11_a"}, "run_id", "run-2026.11_a", id="run-id"),
        pytest.param({"LAWTUNE_RUN_ID": "a"}, "run_id", "a", id="run-id-one-character"),
        pytest.param({"LAWTUNE_S3_ENDPOINT_URL": "http://127.0.0.1:8333"}, "s3_endpoint_url", "http://127.0.0.1:8333", id="endpoint"),
        pytest.param({"LAWTUNE_S3_MAX_CONCURRENCY": "16"}, "s3_max_concurrency", 16, id="concurrency-typed"),
        pytest.param({"LAWTUNE_CACHE_DIR": "/tmp/lt-cache"}, "cache_dir", Path("/tmp/lt-cache"), id="cache-dir"),
    ],
)
def test_environment_is_read_and_typed(monkeypatch, env, field, value):
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    assert getattr(load_settings(), field) == value


@pytest.mark.parametrize(
    "env, message",
    [
        pytest.param({"LAWTUNE_RUN_ID": "has space"}, "LAWTUNE_RUN_ID", id="run-id-path-segment"),
        pytest.param({"LAWTUNE_RUN_ID": "x" * 64}, "LAWTUNE_RUN_ID", id="run-id-too-long"),
        # The charts put the run id in a label, whose value must end with a letter or digit.
        pytest.param({"LAWTUNE_RUN_ID": "run-"}, "starting and ending with a letter or digit", id="run-id-ends-with-dash"),
        pytest.param({"LAWTUNE_RUN_ID": "run."}, "LAWTUNE_RUN_ID", id="run-id-ends-with-dot"),
        pytest.param({"LAWTUNE_RUN_ID": "run_"}, "LAWTUNE_RUN_ID", id="run-id-ends-with-underscore"),
        pytest.param({"LAWTUNE_S3_MAX_CONCURRENCY": "0"}, "LAWTUNE_S3_MAX_CONCURRENCY", id="concurrency-range"),
        # a sentence, not pydantic's "Input should be a valid integer"
        pytest.param({"LAWTUNE_S3_MAX_ATTEMPTS": "abc"}, r"LAWTUNE_S3_MAX_ATTEMPTS='abc': expected a whole number$", id="not-a-number"),
        pytest.param({"LAWTUNE_ARTIFACT_ROOT": "gs://bucket"}, "unsupported scheme 'gs'", id="scheme"),
        pytest.param({"LAWTUNE_ARTIFACT_ROOT": "s3:///nobucket"}, "has no bucket", id="s3-no-bucket"),
    ],
)
def test_bad_environment_is_a_config_error_naming_the_variable(monkeypatch, env, message):
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_overrides_win_over_environment(monkeypatch):
    monkeypatch.setenv("LAWTUNE_RUN_ID", "from-env")
    assert load_settings(run_id="explicit").run_id == "explicit"


def test_credentials_are_not_settings(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("LAWTUNE_AWS_SECRET_ACCESS_KEY", "very-secret-value")
    settings = load_settings()
    assert not any("secret" in name or "access_key" in name for name in Settings.model_fields)
    assert "very-secret-value" not in repr(settings) + settings.model_dump_json()


def test_code_version_is_recorded():
    assert load_settings(code_version="abc123").resolved_code_version == "abc123"
    assert load_settings().resolved_code_version.startswith("lawtune-")
