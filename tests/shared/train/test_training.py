"""shared/train/training.py on a config-initialised tiny Llama (tests/tiny.py): the mechanics, in seconds.

Checkpoints, resume, SIGTERM, best-checkpoint choice, pruning, early stopping, packing and
tiny datasets do not depend on what the model learns, so random weights are enough here;
tests/jobs/test_finetune.py repeats the important ones on the real bundled model.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from shared.core.config import parse_config
from shared.core.errors import ConfigError
from shared.store.storage import FileLocation
from shared.train.training import CheckpointStore, LawtuneCallback, Preempted, export_best, make_collator, precision, train
from tests.tiny import tiny_data_dir, tiny_model_dir

TOLERANCE = 1e-6  # fp32 on CPU, same seed, same batches: resumed weights match to float rounding


def cfg(**training_args):
    args = {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
            "learning_rate": 0.01, **training_args}
    return parse_config({"max_input_length": 32, "max_output_length": 16, "training_args": args,
                         "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}})


@pytest.fixture(scope="module")
def model_dir(module_tmp) -> Path:
    return tiny_model_dir(module_tmp("tiny") / "model")


def new_store(root: Path, inputs: dict | None = None) -> CheckpointStore:
    return CheckpointStore(FileLocation(root / "out"), inputs or {"data": "d1"}, run_id="t", code_version="test")


def adapter_weights(store: CheckpointStore, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    target = tmp / f"adapter-{step}-{id(store)}"
    export_best(store, step, target)
    return load_file(target / "adapter_model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, f"adapters differ by {worst}"


@pytest.mark.parametrize(
    ("train_rows", "dev_rows", "batch", "max_steps"),
    [
        pytest.param(1, 3, 4, 5, id="train-smaller-than-one-batch-max-steps-beyond-data"),
        pytest.param(5, 3, 2, 7, id="several-epochs-dev-of-3"),
        pytest.param(3, 0, 2, 3, id="no-dev-split"),
    ],
)
def test_tiny_datasets_train_to_max_steps(model_dir, tmp_path, train_rows, dev_rows, batch, max_steps):
    data = tiny_data_dir(tmp_path / "data", train_rows, dev_rows)
    store = new_store(tmp_path)
    result = train(cfg(max_steps=max_steps, per_device_train_batch_size=batch), model_dir, data, tmp_path / "local", store)
    assert result.steps_completed == max_steps
    assert result.tokenization["train"]["kept"] == train_rows
    assert max_steps in store.committed(), "the final step is always checkpointed"
    assert len(result.train_loss_curve) == max_steps
    if dev_rows:
        assert [s for s, _ in result.dev_loss_curve] == sorted({*range(2, max_steps + 1, 2), max_steps})
        assert result.best_dev_loss == min(loss for _, loss in result.dev_loss_curve)
        assert store.committed()[result.best_step].extra["dev_loss"] == result.best_dev_loss
    else:
        assert result.dev_loss_curve == [] and result.best_step == max_steps and result.best_dev_loss is None
    assert result.tokens_seen > 0


def test_logs_carry_loss_grad_norm_lr_epoch_tokens_per_s_and_eta(model_dir, tmp_path):
    result = train(cfg(), model_dir, tiny_data_dir(tmp_path / "data", 4, 2), tmp_path / "local", new_store(tmp_path))
    train_logs = [h for h in result.log_history if "loss" in h]
    assert len(train_logs) == 4
    for record in train_logs:
        assert {"loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s", "eta_s", "step"} <= record.keys()
    assert train_logs[-1]["eta_s"] == 0


def test_resume_from_newest_committed_checkpoint_matches_uninterrupted_run(model_dir, tmp_path):
    data = tiny_data_dir(tmp_path / "data", 6, 2)
    config = cfg(max_steps=6)
    whole = new_store(tmp_path / "a")
    train(config, model_dir, data, tmp_path / "local-a", whole)
    expected = adapter_weights(whole, 6, tmp_path)

    # A run that died after committing step-4: its step-6 never happened (and a half-written
    # step-6 folder without manifest must be ignored).
    partial = new_store(tmp_path / "b")
    train(config, model_dir, data, tmp_path / "local-b", partial)
    step6 = partial.root.child("step-6")
    step6.delete("MANIFEST.json")
    assert sorted(partial.committed()) == [2, 4]
    resumed = train(config, model_dir, data, tmp_path / "local-b", partial)
    assert resumed.resumed_from == 4
    assert resumed.steps_completed == 6
    assert_same(adapter_weights(partial, 6, tmp_path), expected)
    # the curves span the whole run, not just the resumed part
    assert [s for s, _ in resumed.train_loss_curve] == [1, 2, 3, 4, 5, 6]


def test_sigterm_commits_a_checkpoint_and_raises_preempted_then_resume_continues(model_dir, tmp_path, monkeypatch):
    data = tiny_data_dir(tmp_path / "data", 6, 2)
    store = new_store(tmp_path)
    original = LawtuneCallback.on_step_begin
    handler_before = signal.getsignal(signal.SIGTERM)

    def kill_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 2:  # during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(LawtuneCallback, "on_step_begin", kill_at_step_3)
    with pytest.raises(Preempted, match="step-3 committed"):
        train(cfg(max_steps=6, save_steps=4, eval_steps=4), model_dir, data, tmp_path / "local", store)
    assert sorted(store.committed()) == [3]
    assert store.committed()[3].extra["preempted"] is True
    assert signal.getsignal(signal.SIGTERM) == handler_before, "the SIGTERM handler is restored after training"

    monkeypatch.setattr(LawtuneCallback, "on_step_begin", original)
    resumed = train(cfg(max_steps=6, save_steps=4, eval_steps=4), model_dir, data, tmp_path / "local", store)
    assert resumed.resumed_from == 3 and resumed.steps_completed == 6
    assert sorted(store.committed()) == [3, 4, 6]


def test_checkpoints_of_other_inputs_are_discarded_not_resumed(model_dir, tmp_path):
    data = tiny_data_dir(tmp_path / "data", 4, 2)
    old = new_store(tmp_path, {"data": "old"})
    train(cfg(max_steps=2), model_dir, data, tmp_path / "local", old)
    assert sorted(old.committed()) == [2]
    new = new_store(tmp_path, {"data": "new"})
    result = train(cfg(max_steps=2), model_dir, data, tmp_path / "local", new)
    assert result.resumed_from is None
    assert old.committed() == {}, "stale checkpoints are deleted"
    assert sorted(new.committed()) == [2]


def test_save_total_limit_keeps_newest_and_best(model_dir, tmp_path):
    store = new_store(tmp_path)
    result = train(cfg(max_steps=6, save_steps=1, eval_steps=1, save_total_limit=1), model_dir,
                   tiny_data_dir(tmp_path / "data", 4, 2), tmp_path / "local", store)
    kept = sorted(store.committed())
    assert kept == sorted({6, result.best_step})
    # pruned folders are gone entirely, not left as manifest-less debris
    assert {p.split("/")[0] for p in store.root.list_files()} == {f"step-{s}" for s in kept}


@pytest.mark.parametrize(
    ("losses", "patience", "stops"),
    [
        pytest.param([3.0, 2.0, 2.1, 2.2], 2, True, id="two-evals-without-improvement"),
        pytest.param([3.0, 2.0, 2.1], 2, False, id="one-eval-without-improvement"),
        pytest.param([3.0, 2.0, 1.9, 2.5], 2, False, id="improved-recently"),
        pytest.param([3.0, 3.0], 1, True, id="equal-is-not-better"),
    ],
)
def test_early_stopping_patience(losses, patience, stops):
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.log_history = [{"eval_loss": loss, "step": i + 1} for i, loss in enumerate(losses)]
    callback = LawtuneCallback(None, has_dev=True, patience=patience, keep=None)
    control = callback.on_evaluate(None, state, TrainerControl(), metrics={"eval_loss": losses[-1]})
    assert control.should_training_stop is stops
    assert callback.stopped_early is stops


def test_early_stopping_ends_training_and_best_is_exported(model_dir, tmp_path):
    store = new_store(tmp_path)
    # learning rate 0: the dev loss never improves after the first evaluation
    result = train(cfg(max_steps=20, eval_steps=1, save_steps=5, learning_rate=1e-12, early_stopping_patience=2),
                   model_dir, tiny_data_dir(tmp_path / "data", 4, 2), tmp_path / "local", store)
    assert result.stopped_early
    assert result.steps_completed < 20
    assert result.steps_completed in store.committed()


def test_packing_gives_the_same_loss_as_padding(model_dir):
    from transformers import AutoTokenizer

    from shared.train.tokenization import ChatEncoder
    from shared.train.training import prepare_model
    from tests.tiny import words_conversation

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = ChatEncoder(tok, 32, 16).encode_all([words_conversation(i) for i in range(4)])
    prec = precision(cfg())
    # prepare_model must switch the KV cache off: with a cache, transformers ignores packed position_ids
    # and the examples of a packed row would attend to each other.
    model = prepare_model(model_dir, cfg(), prec).eval()
    padded = make_collator(cfg(packing=False), tok, prec)([dict(r) for r in rows])
    packed = make_collator(cfg(packing=True), tok, prec)([dict(r) for r in rows])
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows), "no padding at all"
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    # the examples never attend to each other: the same tokens get the same loss
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5), (loss_padded, loss_packed)


def test_packed_training_runs(model_dir, tmp_path):
    result = train(cfg(packing=True), model_dir, tiny_data_dir(tmp_path / "data", 5, 2), tmp_path / "local", new_store(tmp_path))
    assert result.steps_completed == 4 and result.best_dev_loss is not None


@pytest.mark.parametrize(
    ("peft", "needle"),
    [
        pytest.param({"target_modules": ["no_such_proj"]}, "peft_config.target_modules", id="unknown-module"),
    ],
)
def test_bad_peft_settings_are_config_errors(model_dir, tmp_path, peft, needle):
    config = parse_config({"max_input_length": 32, "max_output_length": 16, "peft_config": peft,
                           "training_args": {"max_steps": 1}})
    with pytest.raises(ConfigError, match=needle):
        train(config, model_dir, tiny_data_dir(tmp_path / "data", 2, 1), tmp_path / "local", new_store(tmp_path))


def test_all_linear_targets_every_linear_layer(model_dir, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="shared.train.training")
    config = parse_config({"max_input_length": 32, "max_output_length": 16, "peft_config": {"target_modules": "all-linear", "r": 2},
                           "training_args": {"max_steps": 1}})
    result = train(config, model_dir, tiny_data_dir(tmp_path / "data", 2, 1), tmp_path / "local", new_store(tmp_path))
    # r * (in + out) for q 32->32, k 32->16, v 32->16, o 32->32, gate/up 32->64, down 64->32; 2 layers; no lm_head
    per_layer = 2 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert result.trainable_params == 2 * per_layer
    assert any("trainable params:" in r.message and "|| all params:" in r.message for r in caplog.records)


def test_no_training_example_fits_is_a_data_error(model_dir, tmp_path):
    from shared.core.errors import DataError

    config = parse_config({"max_input_length": 8, "max_output_length": 8, "training_args": {"max_steps": 1}})
    with pytest.raises(DataError, match="no training example fits max_input_length=8"):
        train(config, model_dir, tiny_data_dir(tmp_path / "data", 2, 1), tmp_path / "local", new_store(tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_lora_training_on_gpu_lowers_the_loss_and_resumes(arch, tmp_path):
    """Run on the device machine: config-initialised model, bf16 chosen automatically, packing on."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run through the device tool (pytest -m gpu)")
    from shared.train.fast.speedups import training_hooks
    from shared.train.training import Precision

    model_dir = tiny_model_dir(tmp_path / "model", arch=arch, hidden=256, layers=4)
    data = tiny_data_dir(tmp_path / "data", 12, 3)
    config = parse_config({"max_input_length": 32, "max_output_length": 16, "peft_config": {"r": 16, "target_modules": "all-linear"},
                           "training_args": {"max_steps": 40, "save_steps": 20, "eval_steps": 10, "logging_steps": 5,
                                             "per_device_train_batch_size": 4, "learning_rate": 5e-3, "packing": True}})
    assert precision(config) == Precision("cuda", True)
    store = new_store(tmp_path)
    hooks = training_hooks(config, "cuda")  # what jobs.finetune passes on a GPU
    result = train(config, model_dir, data, tmp_path / "local", store, hooks)
    losses = [loss for _, loss in result.train_loss_curve]
    assert all(loss == loss for loss in losses), "no NaN in bf16"
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    speed = [h["tokens_per_s"] for h in result.log_history if "tokens_per_s" in h]
    print(f"{arch}: {torch.cuda.get_device_name()} bf16 loss {losses[0]:.3f} -> {losses[-1]:.3f}, tokens/s {max(speed):.0f}")

    step40 = adapter_weights(store, 40, tmp_path)
    store.root.child("step-40").delete("MANIFEST.json")
    resumed = train(config, model_dir, data, tmp_path / "local", store, hooks)
    assert resumed.resumed_from == 20 and resumed.steps_completed == 40
    # bf16 GPU kernels are not bitwise deterministic: same adapter up to bf16 rounding
    again = adapter_weights(store, 40, tmp_path)
    worst = max((step40[k] - again[k]).abs().max().item() for k in step40)
    assert worst < 5e-2, worst


def test_run_that_died_after_its_final_checkpoint_finishes_without_training_again(model_dir, tmp_path):
    data = tiny_data_dir(tmp_path / "data", 4, 2)
    store = new_store(tmp_path)
    first = train(cfg(), model_dir, data, tmp_path / "local", store)
    final = adapter_weights(store, 4, tmp_path)
    again = train(cfg(), model_dir, data, tmp_path / "local", store)
    assert again.resumed_from == 4 and again.steps_completed == 4
    assert again.best_step == first.best_step and again.dev_loss_curve == first.dev_loss_curve
    assert_same(adapter_weights(store, 4, tmp_path), final)


def test_gradient_checkpointing_trains_the_same_adapter(model_dir, tmp_path):
    data = tiny_data_dir(tmp_path / "data", 4, 2)
    plain, ckpt = new_store(tmp_path / "plain"), new_store(tmp_path / "ckpt")
    a = train(cfg(), model_dir, data, tmp_path / "l1", plain)
    b = train(cfg(gradient_checkpointing=True), model_dir, data, tmp_path / "l2", ckpt)
    # recomputation replays dropout's RNG state, so the losses and weights match
    assert [x for _, x in b.train_loss_curve] == pytest.approx([x for _, x in a.train_loss_curve], abs=1e-5)
    assert_same(adapter_weights(plain, 4, tmp_path), adapter_weights(ckpt, 4, tmp_path))


def test_one_process_on_a_multi_gpu_node_trains_on_one_gpu_not_dataparallel(caplog):
    """Without torchrun, Trainer would wrap the model in DataParallel over every visible GPU."""
    from types import SimpleNamespace

    from shared.train.training import _one_gpu_without_torchrun

    class Args(SimpleNamespace):
        @property
        def n_gpu(self):
            return self._n_gpu

    single = Args(world_size=1, _n_gpu=4)
    _one_gpu_without_torchrun(single)
    assert single.n_gpu == 1
    assert "4 GPUs visible but not started by torchrun" in caplog.text
    ddp = Args(world_size=2, _n_gpu=1)
    _one_gpu_without_torchrun(ddp)
    assert ddp.n_gpu == 1
    cpu = Args(world_size=1, _n_gpu=0)
    _one_gpu_without_torchrun(cpu)
    assert cpu.n_gpu == 0
