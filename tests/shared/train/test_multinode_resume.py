"""Resume across nodes: two single-process "nodes" on CPU (gloo), each with its own local folder.

On a cluster every node of a multi-node finetune is a pod with its own emptyDir; only S3 is
shared. A resume must fetch the checkpoint on every node (not only global rank 0's), and the
committed checkpoint must hold every rank's RNG state (not only node 0's), else dropout on the
other nodes draws different masks after a restart and the adapter differs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.store.storage import FileLocation
from shared.train.training import CheckpointStore, export_best
from tests.conftest import REPO
from tests.tiny import tiny_data_dir, tiny_model_dir

TOLERANCE = 1e-6  # fp32 on CPU, same seed, same batches, same dropout masks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(model: Path, data: Path, root: Path, locals_: tuple[Path, Path], max_steps: int) -> list[dict]:
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.shared.train.node_main", str(rank), port, str(model), str(data),
                               str(root), str(locals_[rank]), str(max_steps)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def adapter(root: Path, step: int, target: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    store = CheckpointStore(FileLocation(root), {"data": "d1"}, run_id="t", code_version="test")
    export_best(store, step, target)
    return load_file(target / "adapter_model.safetensors")


def test_two_nodes_resume_from_their_own_folders_with_every_ranks_rng_state(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = tiny_data_dir(tmp_path / "data", 8, 2)

    whole = tmp_path / "whole"
    two_nodes(model, data, whole, (tmp_path / "w0", tmp_path / "w1"), 6)
    expected = adapter(whole, 6, tmp_path / "expected")

    cut = tmp_path / "cut"
    two_nodes(model, data, cut, (tmp_path / "c0", tmp_path / "c1"), 6)
    (cut / "checkpoints" / "step-6" / "MANIFEST.json").unlink()  # it died before committing step-6
    assert sorted(p.name for p in (cut / "checkpoints" / "step-4").glob("rng_state_*.pth")) == \
        ["rng_state_0.pth", "rng_state_1.pth"], "the committed checkpoint holds both nodes' RNG state"

    # The retry lands on fresh pods: both local folders are new and empty.
    resumed = two_nodes(model, data, cut, (tmp_path / "r0", tmp_path / "r1"), 6)
    assert [r["resumed_from"] for r in resumed] == [4, 4] and [r["steps"] for r in resumed] == [6, 6]
    assert (tmp_path / "r1" / "checkpoint-4" / "adapter_model.safetensors").is_file(), "node 1 fetched into its own folder"
    got = adapter(cut, 6, tmp_path / "got")
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= TOLERANCE, f"resumed two-node adapter differs from the uninterrupted one by {worst}"
