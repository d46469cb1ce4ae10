"""Artifact URIs: ``s3://bucket/key`` and ``file:///abs/path`` (a bare path means file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.core.errors import ConfigError

SCHEMES = ("s3", "file")


@dataclass(frozen=True)
class ParsedURI:
    scheme: str
    bucket: str  # empty for file://
    path: str  # key for s3 (no leading slash), absolute path for file

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}".rstrip("/")
        return f"file://{self.path}"


def parse_uri(uri: str) -> ParsedURI:
    if "://" not in uri:
        return ParsedURI("file", "", str(Path(uri).expanduser().resolve()))
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"artifact URI {uri!r} has no bucket; expected s3://bucket/prefix")
        return ParsedURI("s3", parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        # file://./rel and file://rel are relative to the CWD; file:///abs is absolute.
        raw = unquote(parsed.netloc + parsed.path)
        return ParsedURI("file", "", str(Path(raw).expanduser().resolve()))
    raise ConfigError(
        f"artifact URI {uri!r} has unsupported scheme {parsed.scheme!r}; expected one of "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )


def normalize_root(uri: str) -> str:
    return str(parse_uri(uri.rstrip("/")))


def join(uri: str, *parts: str) -> str:
    tail = "/".join(p.strip("/") for p in parts if p)
    return f"{uri.rstrip('/')}/{tail}" if tail else uri.rstrip("/")
