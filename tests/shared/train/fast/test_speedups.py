"""shared/train/fast/speedups.py: the fast path computes the same loss and gradients as the tutorial's way.

Tiny config-initialised models in fp32 on CPU: the per-example SDPA fallback stands in for
the GPU's varlen kernel (same function), the chunked head for Liger's. The GPU kernels
themselves are checked by the ``gpu`` test at the end (run through the device tool) and by
tests/benchmarks/train_speed.py, which compares 20 training steps' losses on the real sizes.
"""

from __future__ import annotations

import pytest
import torch

from shared.train.packing import IGNORE_INDEX, PackedCollator
from shared.train.fast.speedups import (
    _segments_sdpa,
    enable_fast_path,
    fuse_lora_layers,
    varlen_attention_forward,
)

ARCHS = {
    "llama": dict(cls="LlamaConfig", tie_word_embeddings=True),
    "qwen2": dict(cls="Qwen2Config", tie_word_embeddings=False),
    # GLM-4 in transformers' own classes: GlmForCausalLM (THUDM/glm-4-9b-chat-hf: partial rotary,
    # q/k/v bias, fused gate_up_proj) and Glm4ForCausalLM (THUDM/GLM-4-9B-0414: plus post-norms).
    "glm": dict(cls="GlmConfig", tie_word_embeddings=False, head_dim=8, pad_token_id=0, eos_token_id=1),
    "glm4": dict(cls="Glm4Config", tie_word_embeddings=False, head_dim=8, pad_token_id=0, eos_token_id=1),
}


def tiny_model(arch: str, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    config = getattr(transformers, spec.pop("cls"))(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **spec,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def examples(lengths=(17, 40, 9, 33), vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    return out


def padded(exs):
    width = max(len(e["input_ids"]) for e in exs)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(e["input_ids"], 0) for e in exs]),
        "labels": torch.tensor([pad(e["labels"], IGNORE_INDEX) for e in exs]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in exs]),
    }


def with_lora(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so LoRA gradients and outputs are not trivially equal
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def loss_and_grads(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("arch", "targets", "memory_profile"),
    [
        pytest.param("llama", ["q_proj", "k_proj", "v_proj"], False, id="llama-qkv"),
        pytest.param("qwen2", "all-linear", False, id="qwen2-all-linear"),
        pytest.param("qwen2", ["q_proj", "k_proj", "v_proj"], True, id="qwen2-memory-profile"),
        pytest.param("glm", "all-linear", False, id="glm-all-linear"),
        pytest.param("glm", ["q_proj", "k_proj", "v_proj"], True, id="glm-memory-profile"),
        pytest.param("glm4", "all-linear", False, id="glm4-all-linear"),
    ],
)
def test_packed_fast_path_equals_padded_baseline(arch, targets, memory_profile):
    exs = examples()
    base = with_lora(tiny_model(arch), targets)
    base.train()
    want_loss, want_grads = loss_and_grads(base, padded(exs))

    model = tiny_model(arch)
    enable_fast_path(model, memory_profile=memory_profile)
    fast = with_lora(model, targets)
    fast.train()
    got_loss, got_grads = loss_and_grads(fast, PackedCollator()([exs]))

    assert torch.allclose(got_loss, want_loss, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        assert torch.allclose(g, want_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("arch", ["qwen2", "glm", "glm4"])
def test_no_attention_leaks_across_packed_examples(arch):
    """Each example's hidden states in a packed row equal those of the example run alone;
    the same row without per-example boundaries does differ (so the check can fail)."""
    model = tiny_model(arch)
    enable_fast_path(model)
    model.eval()
    exs = examples((11, 23, 7))
    batch = PackedCollator()([exs])
    with torch.no_grad():
        packed = model.model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"],
            cu_seq_lens_q=batch["cu_seq_lens_q"], max_length_q=batch["max_length_q"],
        ).last_hidden_state[0]
        leaky = model.model(input_ids=batch["input_ids"]).last_hidden_state[0]
        cu = batch["cu_seq_lens_q"].tolist()
        for k, ex in enumerate(exs):
            alone = model.model(input_ids=torch.tensor([ex["input_ids"]])).last_hidden_state[0]
            assert torch.allclose(packed[cu[k] : cu[k + 1]], alone, atol=1e-5), f"example {k} saw another example"
        later = slice(cu[1], cu[-1])
        assert not torch.allclose(leaky[later], packed[later], atol=1e-3)


def test_position_ids_alone_are_enough_to_separate_examples():
    """A caller that sends only position_ids (e.g. DataCollatorWithFlattening) is still exact."""
    model = tiny_model("llama")
    enable_fast_path(model)
    exs = examples((9, 14))
    batch = PackedCollator()([exs])
    with torch.no_grad():
        full = model(**batch).loss
        lean = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], shift_labels=batch["shift_labels"]).loss
    assert torch.allclose(full, lean, rtol=1e-6)


def test_padded_batches_and_generation_are_unchanged():
    """Eval loaders may still pad, and inference calls (no labels) must give the model's logits."""
    exs = examples((6, 15, 10))
    batch = padded(exs)
    ref = tiny_model("qwen2")
    fast = tiny_model("qwen2")
    enable_fast_path(fast)
    with torch.no_grad():
        assert torch.allclose(fast(**batch).loss, ref(**batch).loss, rtol=1e-5)
        ids = torch.tensor([exs[1]["input_ids"]])
        assert torch.allclose(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("dropout", [pytest.param(0.0, id="no-dropout"), pytest.param(0.3, id="dropout-eval-mode")])
def test_fused_lora_layers_match_peft(dropout):
    from peft import LoraConfig, get_peft_model

    x = torch.randn(2, 5, 32)

    def build():
        torch.manual_seed(3)
        m = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return m

    ref, fused = build(), build()
    assert fuse_lora_layers(fused) == 14  # 7 linear layers x 2 decoder layers
    if dropout:
        ref.eval(), fused.eval()
    layer = lambda m: m.base_model.model.model.layers[0].mlp.up_proj  # noqa: E731
    a, b = layer(ref)(x), layer(fused)(x)
    assert torch.allclose(a, b, atol=1e-6)
    a.sum().backward(), b.sum().backward()
    ga = layer(ref).lora_A["default"].weight.grad
    gb = layer(fused).lora_A["default"].weight.grad
    assert torch.allclose(ga, gb, atol=1e-6)


def test_per_example_attention_reference_matches_masked_sdpa():
    """The CPU fallback (per-example SDPA) equals one SDPA call with a block-diagonal causal mask."""
    g = torch.Generator().manual_seed(0)
    cu = [0, 5, 12, 20]
    q = torch.randn(20, 4, 8, generator=g)
    k = torch.randn(20, 2, 8, generator=g)
    v = torch.randn(20, 2, 8, generator=g)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 7, 8]))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0), v.transpose(0, 1).repeat_interleave(2, 0), attn_mask=mask
    ).transpose(0, 1)
    assert torch.allclose(_segments_sdpa(q, k, v, cu, None), want, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_gpu_varlen_kernel_matches_per_example_reference_in_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [130, 1, 517, 64, 999]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    t = int(cu[-1])
    q = torch.randn(1, 28, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 4, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 4, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    got, _ = varlen_attention_forward(None, q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths))
    ref = _segments_sdpa(*(x[0].transpose(0, 1).double() for x in (q, k, v)), cu.tolist(), 128**-0.5)
    err = (got[0].double() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("mode", "device", "fast"),
    [
        pytest.param("auto", "cuda", True, id="auto-gpu"),
        pytest.param("auto", "cpu", False, id="auto-cpu"),
        pytest.param("on", "cpu", True, id="forced-on"),
        pytest.param("off", "cuda", False, id="off"),
    ],
)
def test_finetune_hooks_pick_the_fast_path_where_configured(mode, device, fast):
    from shared.core.config import TrainConfig
    from shared.train.fast.speedups import training_hooks
    from shared.train.training import Hooks

    hooks = training_hooks(TrainConfig.model_validate({"training_args": {"fast_path": mode}}), device)
    plain = Hooks()
    assert (hooks.make_collator is plain.make_collator) is not fast
    assert (hooks.prepare_model is plain.prepare_model) is not fast
    if fast:
        assert isinstance(hooks.make_collator(None, None, None), PackedCollator)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")


@pytest.mark.gpu
@GPU
def test_gpu_the_finetune_jobs_hooks_turn_on_liger_and_fp8_and_train(tmp_path, caplog):
    """On a GPU with FP8 tensor cores and Liger installed: the job's hooks (the model prepared on
    the CPU, as jobs.finetune does) give Liger and FP8 frozen linears at a 7B-like hidden size,
    and train() with them lowers the loss."""
    import logging

    from shared.core.config import parse_config
    from shared.train.fast import fp8, speedups
    from shared.train.training import train
    from tests.tiny import tiny_data_dir, tiny_model_dir

    if not (speedups.liger_available() and fp8.fp8_supported()):
        pytest.skip(f"needs Liger ({speedups.liger_import_error()}) and FP8 tensor cores")
    config = parse_config({"max_input_length": 32, "max_output_length": 16,
                           "peft_config": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
                           "training_args": {"max_steps": 6, "save_steps": 6, "eval_steps": 6, "logging_steps": 1,
                                             "per_device_train_batch_size": 2, "learning_rate": 1e-3}})
    model_dir = tiny_model_dir(tmp_path / "model", arch="qwen2", hidden=speedups.FP8_AUTO_MIN_HIDDEN, layers=1,
                               heads=speedups.FP8_AUTO_MIN_HIDDEN // 128)  # head_dim 128, as in Qwen2.5-7B
    hooks = speedups.training_hooks(config, "cuda")
    with caplog.at_level(logging.INFO, logger=speedups.log.name):
        result = train(config, model_dir, tiny_data_dir(tmp_path / "data", 16, 2), tmp_path / "local", None, hooks)
    described = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast training path")]
    assert described and "liger=on" in described[-1] and "fp8=frozen-linears" in described[-1], described
    losses = [loss for _, loss in result.train_loss_curve]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0], losses


def test_the_job_decides_liger_and_fp8_for_the_gpu_it_will_train_on_not_where_the_model_is_loaded(tmp_path, monkeypatch, caplog):
    """jobs.finetune prepares the model on the CPU (Trainer moves it to the GPU later), so the
    fast path must not judge "on a GPU?" from the weights' device: it did, and Liger and
    `fp8: auto` never turned on in the job. No GPU here: Liger's patching and the FP8 support
    check are replaced by stand-ins that report a capable card, which is all this test needs."""
    import logging

    from shared.core.config import TrainConfig
    from shared.train.fast import fp8, speedups
    from shared.train.training import Precision
    from tests.tiny import tiny_model_dir

    monkeypatch.setattr(speedups, "liger_available", lambda: True)
    monkeypatch.setattr(speedups, "_apply_liger", lambda model: (lambda: None))
    monkeypatch.setattr(fp8, "fp8_supported", lambda: True)
    monkeypatch.setattr(speedups, "FP8_AUTO_MIN_HIDDEN", 16)
    config = TrainConfig.model_validate({"training_args": {"fast_path": "auto", "fp8": "auto"},
                                         "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    hooks = speedups.training_hooks(config, "cuda")
    with caplog.at_level(logging.INFO, logger=speedups.log.name):
        model = hooks.prepare_model(tiny_model_dir(tmp_path / "model"), config, Precision("cuda", False))
    assert not next(model.parameters()).is_cuda  # still where the job loaded it
    described = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast training path")]
    assert described and "liger=on" in described[-1] and "fp8=frozen-linears" in described[-1], described


@pytest.mark.parametrize(
    ("device", "rel", "fp8", "arch"),
    [
        pytest.param("cpu", 1e-4, "off", "llama", id="cpu-fp32"),
        pytest.param("cpu", 1e-4, "off", "glm4", id="cpu-fp32-glm4"),
        pytest.param("cpu", 2e-2, "on", "llama", id="cpu-fp8-frozen-linears"),
        pytest.param("cuda", 2e-2, "on", "llama", id="gpu-bf16-varlen-liger-fp8", marks=[pytest.mark.gpu, GPU]),
        pytest.param("cuda", 2e-2, "auto", "llama", id="gpu-bf16-varlen-liger", marks=[pytest.mark.gpu, GPU]),
        pytest.param("cuda", 2e-2, "on", "glm", id="gpu-bf16-varlen-fp8-glm", marks=[pytest.mark.gpu, GPU]),
        pytest.param("cuda", 2e-2, "on", "glm4", id="gpu-bf16-varlen-fp8-glm4", marks=[pytest.mark.gpu, GPU]),
    ],
)
def test_finetune_training_on_the_fast_path_matches_the_plain_recipe(tmp_path, device, rel, fp8, arch):
    """The job's own train() with the fast hooks logs the same train and dev losses as with
    the plain padded recipe: same data, seed and steps (dropout off, since padded and packed
    layouts draw different dropout masks). On CPU the fast path is forced on; on a GPU it is
    the default ("auto") and runs the varlen kernel, Liger (if installed) and bf16, with the
    frozen layers in FP8 ("on"; "auto" keeps this tiny model in bf16)."""
    from shared.core.config import parse_config
    from shared.train.fast.speedups import training_hooks
    from shared.train.training import train
    from tests.tiny import tiny_data_dir, tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model", arch=arch)
    data = tiny_data_dir(tmp_path / "data", 6, 3)

    def run(fast: str):
        config = parse_config({
            "max_input_length": 32, "max_output_length": 16,
            "training_args": {"max_steps": 3, "save_steps": 3, "eval_steps": 3, "logging_steps": 1,
                              "per_device_train_batch_size": 3, "learning_rate": 0.01, "fast_path": fast, "fp8": fp8},
            "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        })
        if device == "cpu":
            config.training_args.use_cpu = True
        return train(config, model_dir, data, tmp_path / f"local-{fast}", None, training_hooks(config, device))

    plain, fast = run("off"), run("auto" if device == "cuda" else "on")
    assert [s for s, _ in fast.train_loss_curve] == [1, 2, 3]
    for (_, a), (_, b) in zip(plain.train_loss_curve, fast.train_loss_curve):
        assert a == pytest.approx(b, rel=rel)
    assert [loss for _, loss in fast.dev_loss_curve] == pytest.approx([loss for _, loss in plain.dev_loss_curve], rel=rel)


def test_token_budget_rows_feed_the_finetune_job(tmp_path):
    """tokens_per_batch: Trainer's per-device batch of rows stays within the budget, every
    example is trained once per epoch, and tokens_seen counts every packed token."""
    from shared.core.config import parse_config
    from shared.train.fast.speedups import training_hooks
    from shared.train.training import train
    from tests.tiny import tiny_data_dir, tiny_model_dir

    config = parse_config({
        "max_input_length": 32, "max_output_length": 16,
        "training_args": {"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "use_cpu": True,
                          "per_device_train_batch_size": 2, "fast_path": "on", "tokens_per_batch": 256},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    })
    hooks = training_hooks(config, "cpu")
    lengths = [5, 30, 12, 31, 7, 20, 3]
    rows = hooks.prepare_train_dataset([{"input_ids": [1] * n, "labels": [1] * n} for n in lengths], config)
    assert sorted(len(ex["input_ids"]) for i in range(len(rows)) for ex in rows[i]) == sorted(lengths)
    assert all(sum(len(ex["input_ids"]) for ex in rows[i]) <= 128 for i in range(len(rows)))  # 256 / batch 2
    assert len(rows) < len(lengths)

    # the hooks jobs.finetune passes to train() (fast_path: on)
    result = train(config, tiny_model_dir(tmp_path / "model"), tiny_data_dir(tmp_path / "data", 40, 2), tmp_path / "local", None, hooks)
    assert result.steps_completed == 2
    # 2 steps x 2 rows: more tokens than 4 examples can hold (each at most 32 + 16 tokens)
    assert result.tokens_seen > 2 * 2 * (32 + 16)


def test_compiled_decoder_layers_train_like_eager_with_one_graph_for_all_layers_and_batch_shapes():
    """training_args.compile: each decoder layer through torch.compile (inductor on CPU here) gives
    the eager fast path's losses and gradients (FP8 frozen weights, the fused FP8 MLP, fused LoRA),
    and later batches of other token counts, example counts and longest examples reuse the graphs
    (no recompile). On CPU the per-example attention reads its boundaries on the host, a graph
    break; on a GPU the varlen kernel stays in the graph (measured in docs/benchmarks.md)."""
    import torch._dynamo

    from shared.train.fast.speedups import decoder_layers

    batches = [examples(lens, seed=i) for i, lens in enumerate([(17, 40, 9, 33), (5, 60, 21), (30, 31, 12, 8, 3, 2)])]

    def run(compile: bool):
        model = tiny_model("qwen2")
        fast = enable_fast_path(model, compile=compile, fp8=True, fp8_mlp=True, on_gpu=False)
        peft_model = with_lora(model, ["q_proj", "k_proj", "v_proj"])
        peft_model.train()
        out = [loss_and_grads(peft_model, PackedCollator()([batches[0]]))]
        with torch._dynamo.config.patch(error_on_recompile=compile):
            out += [loss_and_grads(peft_model, PackedCollator()([b])) for b in batches[1:]]
        return fast, model, out

    torch._dynamo.reset()
    _, _, eager = run(False)
    fast, model, compiled = run(True)
    assert fast.compiled_layers == 2 and fast.liger is False and "compile=layers(2)" in fast.describe()
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model))
    for (want_loss, want_grads), (got_loss, got_grads) in zip(eager, compiled):
        assert torch.allclose(got_loss, want_loss, rtol=1e-5)
        for name, g in got_grads.items():
            assert torch.allclose(g, want_grads[name], rtol=1e-4, atol=1e-6), name
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("setting", "on_gpu", "memory_profile", "want"),
    [
        pytest.param("on", False, False, True, id="on"),
        pytest.param("off", True, False, False, id="off"),
        pytest.param("auto", True, True, False, id="auto-memory-profile-stays-eager"),
        pytest.param("auto", False, False, False, id="auto-cpu"),
    ],
)
def test_compile_setting(setting, on_gpu, memory_profile, want):
    from shared.core.config import parse_config
    from shared.train.fast.speedups import auto_compile, compile_wanted

    config = parse_config({"training_args": {"compile": setting}})
    wanted = compile_wanted(config)
    assert (wanted if wanted is not None else auto_compile(on_gpu, memory_profile)) is want
    assert parse_config({}).training_args.compile == "auto"
