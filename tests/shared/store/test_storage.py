"""shared/store/storage.py: one vocabulary over file:// and s3:// (real SeaweedFS), multipart, no credentials."""

import logging
import os

import pytest

from shared.core.errors import StorageError
from shared.core.settings import load_settings
from shared.store.storage import FileLocation, open_location


@pytest.fixture
def loc(artifact_root):
    settings = load_settings()
    return open_location(f"{settings.artifact_root}/store-test", settings)


def test_write_read_list_exists_delete(loc):
    loc.write_text("a.txt", "甲")
    loc.write_bytes("nested/deep/b.bin", b"\x00\x01")
    assert loc.read_text("a.txt") == "甲"
    assert loc.read_bytes("nested/deep/b.bin") == b"\x00\x01"
    assert loc.list_files() == ["a.txt", "nested/deep/b.bin"]
    assert loc.exists("a.txt") and not loc.exists("missing.txt")
    assert loc.child("nested").list_files() == ["deep/b.bin"]
    loc.delete("a.txt")
    loc.delete("never-existed.txt")  # missing is fine
    assert loc.list_files() == ["nested/deep/b.bin"]
    loc.delete_all()
    assert loc.list_files() == []


def test_upload_download_round_trip(loc, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    loc.upload_file(src, "dir/file.bin")
    dest = tmp_path / "x" / "y" / "dest.bin"
    loc.download_file("dir/file.bin", dest)
    assert dest.read_bytes() == src.read_bytes()


def test_missing_object_is_a_storage_error_naming_it(loc, tmp_path):
    with pytest.raises(StorageError, match="store-test/nope.txt"):
        loc.read_bytes("nope.txt")
    with pytest.raises(StorageError, match="nope.txt"):
        loc.download_file("nope.txt", tmp_path / "d")


def test_file_writes_are_atomic_and_leave_no_temporaries(tmp_path):
    loc = FileLocation(tmp_path / "f")
    loc.write_text("x.json", "1")
    loc.write_text("x.json", "2")
    assert loc.read_text("x.json") == "2"
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["x.json"]


@pytest.mark.integration
def test_s3_multipart_upload_over_20mb(s3_env, seaweedfs, s3_bucket, tmp_path):
    settings = load_settings()
    loc = open_location(f"s3://{s3_bucket}/big", settings)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(21 * 1024 * 1024))
    loc.upload_file(big, "weights.bin")
    head = seaweedfs.client().head_object(Bucket=s3_bucket, Key="big/weights.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of 8 MiB: the transfer manager went multipart
    back = tmp_path / "back.bin"
    loc.download_file("weights.bin", back)
    assert back.read_bytes() == big.read_bytes()


@pytest.mark.integration
def test_s3_errors_and_logs_never_show_credentials(s3_env, seaweedfs, monkeypatch, caplog, tmp_path):
    from shared.core.log import configure_logging

    configure_logging("DEBUG")
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + seaweedfs.secret_key)
    settings = load_settings(s3_max_concurrency=3)  # a fresh client, built with the wrong secret
    loc = open_location("s3://no-such-bucket-here/p", settings)
    with pytest.raises(StorageError) as info:
        loc.write_text("x", "y")
    shown = str(info.value) + caplog.text
    assert "no-such-bucket-here/p/x" in str(info.value)
    for secret in (seaweedfs.secret_key, seaweedfs.access_key):
        assert secret not in shown
