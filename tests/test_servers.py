"""The test servers themselves: what a long session needs from them."""

import pytest

from tests.servers import fresh_bucket, start_seaweedfs

pytestmark = pytest.mark.integration


def test_buckets_of_finished_tests_give_their_volumes_back(tmp_path):
    """Room for one test bucket beside the probe's (7 volumes each): without the removal the
    second bucket's first write fails with InternalError, as a whole `make test` did once it
    outgrew the session server's cap."""
    server = start_seaweedfs(tmp_path / "weed", volume_max=14)
    try:
        client = server.client()
        for _ in range(3):
            with fresh_bucket(server) as name:
                client.put_object(Bucket=name, Key="runs/r/x", Body=b"x" * 1024)
                assert server.volumes().get(name, 0) > 0
            assert name not in server.volumes()
            assert name not in {b["Name"] for b in client.list_buckets()["Buckets"]}
    finally:
        server.stop()
