"""Infrastructure settings from the environment (pydantic-settings).

Every variable is prefixed ``LAWTUNE_``. Credentials are *not* settings: boto3 reads the
standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` variables or a
mounted web-identity token itself, so they never pass through our code, logs or configs.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A Kubernetes label value: the charts label every Job and pod with it.
_RUN_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lawtune"


class Settings(BaseSettings):
    """Where artifacts live and how to reach them; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="LAWTUNE_", extra="ignore", frozen=True)

    artifact_root: str = Field(
        default="file://./artifacts",
        description="s3://bucket/prefix or file:///path; relative file:// paths resolve against the CWD.",
    )
    s3_endpoint_url: str | None = Field(default=None, description="MinIO/SeaweedFS/Ceph endpoint; None = AWS.")
    s3_region: str = "us-east-1"
    s3_addressing_style: str = Field(default="path", description="'path' suits MinIO/SeaweedFS; 'virtual' suits AWS.")
    s3_max_concurrency: int = Field(default=8, ge=1, le=64)
    s3_conditional_writes: bool = Field(
        default=True,
        description="Move PROMOTED with If-Match/If-None-Match (AWS S3, MinIO, SeaweedFS); false where the store lacks them.",
    )
    s3_promotion_lock: bool = Field(
        default=True,
        description="Serialise PROMOTED writers under an expiring lock object (SeaweedFS's conditional writes race).",
    )
    # How S3 calls ride out faults; shared/store/storage.py turns these into boto3's Config.
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    s3_max_attempts: int = Field(default=10, ge=1, le=50, description="Attempts per S3 call, the first included.")
    s3_connect_timeout: float = Field(default=10.0, gt=0)
    s3_read_timeout: float = Field(default=60.0, gt=0, description="Seconds without a byte before a call is retried.")
    lease_ttl_s: float = Field(
        default=60.0, ge=1.0,
        description="An S3 writer lease's lifetime: renewed every third of it; a writer that could not renew it for "
                    "5/6 of it does not commit; a contender takes over one left unchanged for a whole TTL.",
    )
    run_id: str = "dev"
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    log_level: str = "INFO"
    code_version: str | None = Field(default=None, description="Image tag or git sha; recorded in manifests.")

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_path_segment(cls, value: str) -> str:
        if not _RUN_ID.match(value):
            raise ValueError(
                f"run_id {value!r} must be 1-63 characters of letters, digits, '.', '_' or '-', starting and ending "
                "with a letter or digit (it becomes a path segment and a Kubernetes label)"
            )
        return value

    @field_validator("artifact_root")
    @classmethod
    def _root_scheme(cls, value: str) -> str:
        from shared.core.uri import normalize_root

        return normalize_root(value)

    def run_uri(self, stage: str | None = None) -> str:
        """``<artifact_root>/runs/<run_id>[/<stage>]``."""
        base = f"{self.artifact_root}/runs/{self.run_id}"
        return f"{base}/{stage}" if stage else base

    def models_uri(self, name: str) -> str:
        return f"{self.artifact_root}/models/{name}"

    @cached_property
    def resolved_code_version(self) -> str:
        if self.code_version:
            return self.code_version
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"lawtune-{version('lawtune')}"
        except PackageNotFoundError:
            return "lawtune-unknown"


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (tests, CLI flags) on top.

    A bad value is a ConfigError (exit 2) naming the variable, the value and what was expected.
    """
    from pydantic import ValidationError

    from shared.core.config import expectation
    from shared.core.errors import ConfigError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "LAWTUNE_" + "_".join(str(p) for p in error["loc"]).upper()
            if error["type"] == "value_error":  # our validators' messages are sentences already
                problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
            else:
                problems.append(f"{name}={error.get('input')!r}: expected {expectation(error)}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
