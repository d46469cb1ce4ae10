"""shared/train/safe_dcp.py: the FSDP resume's optimizer state (torch.distributed.checkpoint) read from
a checkpoint fetched from the store, verified and without running pickled code.

Real DCP files, written by shared.train.fsdp.save_optimizer in one process (DCP's no-process-group
mode) and committed/fetched through the real artifact store (file://), as a resume fetches them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from shared.core.errors import IntegrityError
from shared.core.settings import Settings
from shared.store.artifacts import commit_dir, fetch_dir, now_iso
from shared.store.storage import open_location
from shared.train import fsdp

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen base, trainable "adapter"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def _step(model, optimizer):
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()


class RunsCode:
    """What an attacker pickles: unpickling it creates ``marker`` (os.system would do anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _committed_checkpoint(tmp_path: Path, before_commit=None) -> Path:
    """save_optimizer -> commit to the store -> fetch_dir into a local folder (what _resume_point does)."""
    model, optimizer = _model_and_optimizer(0)
    _step(model, optimizer)
    local = tmp_path / "saved"
    fsdp.save_optimizer(model, optimizer, local)
    if before_commit:
        before_commit(local)
    loc = open_location(f"file://{tmp_path}/store/checkpoints/step-1", Settings(artifact_root=f"file://{tmp_path}/store"))
    commit_dir(local, loc, stage="finetune-checkpoint", inputs={}, started_at=now_iso())
    fetched = tmp_path / "fetched"
    fetch_dir(loc, fetched)
    return fetched


def test_a_verified_checkpoint_resumes_the_optimizer_state(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    _step(model, optimizer)
    expected = {k: v.clone() for k, v in optimizer.state[optimizer.param_groups[0]["params"][0]].items()}
    checkpoint = _committed_checkpoint(tmp_path)
    fresh_model, fresh_optimizer = _model_and_optimizer(0)
    fsdp.load_optimizer(fresh_model, fresh_optimizer, checkpoint)
    got = fresh_optimizer.state[fresh_optimizer.param_groups[0]["params"][0]]
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-3 and fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_metadata_that_would_run_code_is_refused_even_with_a_matching_manifest(tmp_path):
    """Whoever writes the store writes the manifest too: digests alone cannot stop this one."""
    marker = tmp_path / "code-ran"

    def hostile_metadata(local: Path):
        (local / "optimizer" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))

    checkpoint = _committed_checkpoint(tmp_path, hostile_metadata)
    model, optimizer = _model_and_optimizer(0)
    with pytest.raises(IntegrityError, match=r"checkpoint metadata names pathlib.Path.touch.*refused"):
        fsdp.load_optimizer(model, optimizer, checkpoint)
    assert not marker.exists()


def test_a_non_tensor_item_that_would_run_code_is_refused(tmp_path):
    """DCP stores an optimizer's hyperparameters as pickled bytes and reads them with weights_only=False."""
    marker = tmp_path / "code-ran"

    def hostile_item(local: Path):
        model, optimizer = _model_and_optimizer(0)
        _step(model, optimizer)
        optimizer.param_groups[0]["foreach"] = RunsCode(marker)
        for stale in (local / "optimizer").iterdir():
            stale.unlink()
        fsdp.save_optimizer(model, optimizer, local)

    checkpoint = _committed_checkpoint(tmp_path, hostile_item)
    model, optimizer = _model_and_optimizer(0)
    with pytest.raises(IntegrityError, match=r"checkpoint item optimizer\.param_groups\.\S*foreach is not plain data .*refused") as refused:
        fsdp.load_optimizer(model, optimizer, checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("change", ["tampered", "unlisted", "missing", "no-manifest"])
def test_files_that_do_not_match_the_manifest_are_refused_before_anything_is_read(tmp_path, change, monkeypatch):
    checkpoint = _committed_checkpoint(tmp_path)
    optimizer_dir = checkpoint / "optimizer"
    shard = next(optimizer_dir.glob("*.distcp"))
    if change == "tampered":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
        needle = rf"{shard.name}: sha256 .* does not match"
    elif change == "unlisted":
        (optimizer_dir / "__1_0.distcp").write_bytes(b"x")
        needle = r"optimizer/__1_0.distcp is not in its MANIFEST.json"
    elif change == "missing":
        shard.unlink()
        needle = rf"optimizer/{shard.name} is listed in its MANIFEST.json but missing"
    else:
        (checkpoint / "MANIFEST.json").unlink()
        needle = "has no readable MANIFEST.json"
    import torch.distributed.checkpoint as dcp

    from shared.train import safe_dcp

    read = []
    monkeypatch.setattr(safe_dcp, "read_metadata", lambda path: read.append(path))
    monkeypatch.setattr(dcp, "load", lambda *a, **k: read.append("dcp.load"))
    model, optimizer = _model_and_optimizer(0)
    with pytest.raises(IntegrityError, match=needle):
        fsdp.load_optimizer(model, optimizer, checkpoint)
    assert read == [], "nothing was read before the check"
