"""shared/train/fsdp.py: FSDP2 LoRA training on two CPU processes (gloo), a tiny config-initialised Llama.

The ranks run as torchrun starts them (RANK/LOCAL_RANK/WORLD_SIZE, one shared local folder), each a
subprocess of tests/shared/train/fsdp_main.py, through the job's own ``train()`` and fast-path hooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared.store.storage import FileLocation
from shared.train import fsdp
from shared.train.training import CheckpointStore, export_best
from tests.conftest import REPO
from tests.shared.train.test_multinode_resume import free_port
from tests.tiny import tiny_data_dir, tiny_model_dir

# fp32 on CPU, same seed, same batches, same dropout masks on both ranks: usually equal to 1e-6, but
# a single-process CPU resume has been seen 2.8e-5 off once (tests/faults/test_kill_anywhere.py). A
# real resume error (optimizer state not reloaded, a step repeated) moves a LoRA weight by about a
# whole Adam step, the learning rate (1e-2, fsdp_main.py): 100x this bound. The same bound as every resume test.
from tests.lora_fixtures import RESUME_TOLERANCE as TOLERANCE  # noqa: E402


def start(model: Path, data: Path, root: Path, local: Path, *extra: str, distributed: str = "fsdp", env=None):
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "tests.shared.train.fsdp_main", str(rank), port, str(model), str(data),
                              str(root), str(local), "6", distributed, *extra],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "LAWTUNE_NO_PROGRESS": "1", **(env or {})}) for rank in (0, 1)]


def finish(procs) -> list[tuple[dict, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    return results


def adapter(root: Path, step: int, target: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    store = CheckpointStore(FileLocation(root), {"data": "d1"}, run_id="t", code_version="test")
    export_best(store, step, target)
    return load_file(target / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def tiny(module_tmp):
    base = module_tmp("fsdp")
    return tiny_model_dir(base / "model"), tiny_data_dir(base / "data", 8, 2)


@pytest.mark.parametrize(
    "mode, world, weights, card, expected",
    [
        pytest.param("auto", 1, 10**12, 80 * 2**30, "single", id="one-process-neither"),
        pytest.param("fsdp", 1, 1, 80 * 2**30, "single", id="one-process-ignores-fsdp"),
        pytest.param("auto", 2, 15 * 10**9, 80 * 2**30, "ddp", id="7b-on-80gb-ddp"),
        pytest.param("auto", 2, 65 * 10**9, 80 * 2**30, "fsdp", id="32b-on-80gb-fsdp"),
        pytest.param("auto", 2, 65 * 10**9, 141 * 10**9, "ddp", id="32b-on-h200-ddp"),
        pytest.param("auto", 4, 145 * 10**9, 141 * 10**9, "fsdp", id="72b-on-h200-fsdp"),
        pytest.param("auto", 2, 40 * 2**30, 80 * 2**30, "ddp", id="exactly-half-ddp"),
        pytest.param("auto", 2, 10**12, None, "ddp", id="no-gpu-ddp"),
        pytest.param("ddp", 2, 10**12, 80 * 2**30, "ddp", id="explicit-ddp"),
        pytest.param("fsdp", 2, 1, 80 * 2**30, "fsdp", id="explicit-fsdp"),
    ],
)
def test_auto_picks_fsdp_when_bf16_weights_exceed_half_a_card(mode, world, weights, card, expected):
    assert fsdp.choose(mode, world, weights, card) == expected


def test_auto_counts_the_model_folders_weights_against_the_card(tiny, monkeypatch):
    """The card is faked (no GPU here): ``card_bytes`` is the one thing replaced."""
    from safetensors import safe_open

    from shared.core.config import parse_config

    model, _ = tiny
    with safe_open(model / "model.safetensors", framework="pt") as f:
        stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    weights = fsdp.base_weight_bytes(model)
    assert weights == 2 * stored  # tied head counted once, as stored
    cfg = parse_config({"training_args": {"distributed": "auto"}})
    monkeypatch.setattr(fsdp, "card_bytes", lambda: 2 * weights - 2)
    assert fsdp.strategy(cfg, model, 2, "cuda") == "fsdp"
    monkeypatch.setattr(fsdp, "card_bytes", lambda: 2 * weights)
    assert fsdp.strategy(cfg, model, 2, "cuda") == "ddp"
    assert fsdp.strategy(cfg, model, 2, "cpu") == "ddp"
    assert fsdp.strategy(cfg, model, 1, "cuda") == "single"


def test_sharded_model_computes_what_the_whole_model_does(tiny):
    """Each rank read only its rows of every weight; LoRA B starts at zero, so the loss is the base model's."""
    from transformers import AutoModelForCausalLM

    model, data = tiny
    results = finish(start(model, data, model.parent / "unused", model.parent / "unused-local", "forward"))
    whole = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = torch.arange(3, 35).remainder(whole.get_input_embeddings().weight.shape[0])[None]
    with torch.no_grad():
        expected = float(whole(input_ids=ids, labels=ids).loss)
    assert [r["strategy"] for r, _ in results] == ["fsdp", "fsdp"]
    for r, _ in results:
        assert r["loss"] == pytest.approx(expected, rel=1e-6)


def test_tokens_per_batch_auto_is_refused_under_fsdp(tiny):
    """Its trial steps would be collectives: one rank out of memory would leave the other waiting."""
    model, data = tiny
    results = finish(start(model, data, model.parent / "unused", model.parent / "unused-local", "budget-auto"))
    for r, _ in results:
        assert r["error"].startswith("training_args.tokens_per_batch: auto is not measured under distributed: fsdp")


def test_killed_fsdp_run_resumes_to_the_uninterrupted_adapter_from_adapter_and_optimizer_shards(tiny, tmp_path):
    model, data = tiny
    whole = finish(start(model, data, tmp_path / "whole", tmp_path / "whole-local"))
    assert [r["steps"] for r, _ in whole] == [6, 6]
    losses = [loss for _, loss in whole[0][0]["losses"]]
    assert losses[-1] < losses[0]
    # FP8 was asked for; under FSDP it is off, and the log says why.
    assert all("fp8 off: FP8 frozen weights are not combined with distributed: fsdp" in err for _, err in whole)
    assert "distributed: fsdp (FSDP2" in whole[0][1]
    expected = adapter(tmp_path / "whole", 6, tmp_path / "expected")

    # Only what resuming needs: the adapter, the optimizer sharded by rank, scheduler/RNG/trainer state.
    step4 = tmp_path / "whole" / "checkpoints" / "step-4"
    names = sorted(str(p.relative_to(step4)) for p in step4.rglob("*") if p.is_file())
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer/.metadata", "optimizer/__0_0.distcp",
            "optimizer/__1_0.distcp", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= set(names)
    assert not [n for n in names if n.startswith("model") or n.endswith(".bin") or "pytorch_model" in n], names
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader

    with safe_open(step4 / "adapter_model.safetensors", framework="pt") as f:
        assert f.keys() and all(".lora_" in k for k in f.keys())
    optimizer_keys = list(FileSystemReader(str(step4 / "optimizer")).read_metadata().state_dict_metadata)
    assert any(".lora_A." in k and k.endswith("exp_avg") for k in optimizer_keys), optimizer_keys[:5]
    assert all(".lora_" in k for k in optimizer_keys if k.endswith(("exp_avg", "exp_avg_sq"))), "no frozen weight's state"

    # A run killed (SIGKILL, both ranks) after step-4 was committed, before step-6.
    cut = tmp_path / "cut"
    procs = start(model, data, cut, tmp_path / "cut-local", env={"LAWTUNE_TEST_STEP_SLEEP": "1.5"})
    deadline = time.monotonic() + 240
    while not (cut / "checkpoints" / "step-4" / "MANIFEST.json").is_file():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("step-4 was never committed: " + "".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    logs = [p.communicate()[1] for p in procs]
    assert not (cut / "checkpoints" / "step-6" / "MANIFEST.json").is_file(), "the kill came too late: " + logs[0][-2000:]

    # The retry starts on a fresh pod: empty local folder, everything fetched from the store.
    resumed = finish(start(model, data, cut, tmp_path / "retry-local"))
    assert [(r["resumed_from"], r["steps"]) for r, _ in resumed] == [(4, 6), (4, 6)]
    got = adapter(cut, 6, tmp_path / "got")
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= TOLERANCE, f"resumed FSDP adapter differs from the uninterrupted one by {worst}"


def test_a_bad_distributed_value_exits_2_naming_key_and_file(tmp_path, capsys):
    from jobs.finetune import main

    path = tmp_path / "bad.yaml"
    path.write_text("training_args:\n  distributed: zero3\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training_args.distributed" in err and str(path) in err and "'fsdp'" in err
