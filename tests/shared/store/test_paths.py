"""shared/store/paths.py: names read from the store that become local paths."""

from __future__ import annotations

import pytest

from shared.core.errors import ConfigError, IntegrityError
from shared.store.paths import check_relative_path, check_version, inside

UNSAFE = [
    pytest.param("../x", "climbs out", id="dotdot"),
    pytest.param("a/../../x", "climbs out", id="dotdot-inside"),
    pytest.param("..", "climbs out", id="only-dotdot"),
    pytest.param("/etc/passwd", "is absolute", id="absolute"),
    pytest.param("", "is empty", id="empty"),
    pytest.param("a//b", "empty or '.' part", id="empty-part"),
    pytest.param("./a", "empty or '.' part", id="dot-part"),
    pytest.param("a/", "empty or '.' part", id="trailing-slash"),
    pytest.param("..\\x", "backslash", id="backslash"),
    pytest.param("a\x00b", "NUL", id="nul"),
]


@pytest.mark.parametrize(("path", "reason"), UNSAFE)
def test_unsafe_manifest_paths_are_refused(path, reason):
    with pytest.raises(ValueError, match=reason):
        check_relative_path(path)


@pytest.mark.parametrize("path", ["config.json", "adapter/adapter_model.safetensors", "a/b/c..d", "..hidden", "x.."])
def test_ordinary_paths_pass(path):
    assert check_relative_path(path) == path


def test_a_symlink_under_the_root_that_points_out_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(IntegrityError, match=r"manifest: file path 'link/x' resolves outside"):
        inside(root, "link/x", "manifest")
    assert inside(root, "sub/x", "manifest") == root / "sub" / "x"


@pytest.mark.parametrize("version", ["..", ".", "../v1", "v1/../..", "/abs", "", " v1", "-v1", "v1\n", "a" * 129])
def test_version_names_that_are_not_one_safe_part_are_refused(version):
    with pytest.raises(ConfigError, match="PROMOTED holds .*expected a version name"):
        check_version(version, "s3://b/models/m/PROMOTED")


@pytest.mark.parametrize("version", ["v1", "sample-0123abcd45", "20261128", "1.2.3_rc1"])
def test_version_names_pass(version):
    assert check_version(version, "PROMOTED") == version
