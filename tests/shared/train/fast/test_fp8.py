"""shared/train/fast/fp8.py: frozen linear layers through FP8 matmuls (rowwise scales).

torch._scaled_mm runs on CPU too, so the layouts, scales, padding and autograd are checked here
at small sizes; the gpu-marked test checks the same maths on FP8 tensor cores at model sizes.
"""

from __future__ import annotations

import pytest
import torch

from shared.core.config import parse_config
from shared.train.fast.fp8 import E4M3, convert_frozen_linears, fp8_forward, quantize_rows
from shared.train.fast.speedups import fp8_wanted


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _reference(linear: torch.nn.Linear):
    w = linear.weight.detach().float().clone()
    b = None if linear.bias is None else linear.bias.detach().float().clone()
    return lambda x: torch.nn.functional.linear(x.float(), w, b)


def test_quantize_rows_pads_rows_and_scales_each_row_to_the_e4m3_range():
    x = torch.randn(5, 32) * torch.tensor([[1e-3], [1.0], [1e3], [0.0], [7.0]])
    q, scale = quantize_rows(x, 16)
    assert q.dtype == E4M3 and q.shape == (16, 32) and scale.shape == (16, 1)
    assert torch.equal(q[5:].float(), torch.zeros(11, 32)), "padding rows are zeros"
    back = q[:5].float() * scale[:5]
    for row in (0, 1, 2, 4):  # every row keeps its own magnitude: relative error of e4m3, not of the largest row
        assert _rel(back[row], x[row]) < 0.05
        assert q[row].float().abs().max().item() == 448.0
    assert torch.equal(back[3], x[3]), "an all-zero row stays zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_the_linear_forward_and_input_gradient(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=bias).to(dtype).requires_grad_(False)
    reference = _reference(linear)
    weight = linear.weight
    forward = fp8_forward(linear)
    assert linear.weight is weight and weight.numel() == 0, "same Parameter, bf16 storage released"

    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)  # 21 rows: not a multiple of 16
    y = forward(x)
    assert y.shape == (3, 7, 48) and y.dtype == dtype
    probe = torch.randn(3, 7, 48)
    (y.float() * probe).sum().backward()
    xr = x.detach().float().requires_grad_(True)
    yr = reference(xr)
    (yr * probe).sum().backward()
    assert _rel(y, yr) < 0.06  # e4m3 keeps 3 mantissa bits: ~3.5 % per matmul
    assert _rel(x.grad, xr.grad) < 0.06
    assert x.grad.shape == x.shape


def test_an_input_shared_by_several_layers_is_quantised_once():
    from shared.train.fast.fp8 import _SharedInput

    x = torch.randn(4, 32)
    first = _SharedInput.quantize(x.reshape(-1, 32), x)
    assert _SharedInput.quantize(x.reshape(-1, 32), x) is first, "q, k and v read the same tensor"
    x.mul_(2)  # changed in place: quantised again
    again = _SharedInput.quantize(x.reshape(-1, 32), x)
    assert again is not first and torch.allclose(again[1][:4], 2 * first[1][:4])
    y = x.clone()
    assert _SharedInput.quantize(y.reshape(-1, 32), y) is not again, "another tensor, even with equal values"


def _tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                                init_lora_weights=False))  # random B: A gets gradients too
    return model


def test_convert_touches_only_frozen_linears_of_the_decoder():
    model = _tiny_lora_model()
    base = model.get_base_model()
    n = convert_frozen_linears(base.model)
    # 2 layers x (q, k, v, o, gate, up, down); LoRA's A/B (trainable) and lm_head (outside the decoder) stay
    assert n == 14
    assert base.lm_head.weight.numel() == 64 * 32
    for name, module in base.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            assert module.weight.numel() > 0 and module.weight.requires_grad
    assert convert_frozen_linears(base.model) == 0, "idempotent"


def test_lora_training_step_through_fp8_matches_the_plain_model():
    plain, fp8 = _tiny_lora_model(), _tiny_lora_model()
    convert_frozen_linears(fp8.get_base_model().model)
    ids = torch.randint(0, 64, (2, 24))
    for model in (plain, fp8):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    reference = plain(input_ids=ids, labels=ids).loss.item()
    assert abs(fp8(input_ids=ids, labels=ids).loss.item() - reference) < 0.01 * reference
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in fp8.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and _rel(p.grad, grads[n]) < 0.1, n


def test_fp8_setting_on_off_auto():
    assert parse_config({}).training_args.fp8 == "auto"
    assert fp8_wanted(parse_config({})) is None
    assert fp8_wanted(parse_config({"training_args": {"fp8": "on"}})) is True
    assert fp8_wanted(parse_config({"training_args": {"fp8": "off"}})) is False


@pytest.mark.parametrize(("hidden", "expected"), [(64, False), (4096, True)])
def test_auto_fp8_wants_fp8_tensor_cores_and_a_large_enough_model(hidden, expected, monkeypatch):
    import shared.train.fast.fp8
    from shared.train.fast.speedups import auto_fp8, enable_fast_path
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    assert enable_fast_path(model, fp8=None).fp8 is False, "on CPU: never automatically"
    assert auto_fp8(model, on_gpu=False) is False
    monkeypatch.setattr(shared.train.fast.fp8, "fp8_supported", lambda device=None: True)
    assert auto_fp8(model, on_gpu=True) is expected
    monkeypatch.setattr(shared.train.fast.fp8, "fp8_supported", lambda device=None: False)
    assert auto_fp8(model, on_gpu=True) is False, "no FP8 tensor cores (e.g. A100)"


@pytest.mark.gpu
def test_fp8_linear_on_tensor_cores_at_model_sizes():
    from shared.train.fast.fp8 import _quantize_rows, _triton_quantizer, fp8_supported

    if not fp8_supported():
        pytest.skip("needs a GPU with FP8 tensor cores (compute capability 8.9+): run through the device tool")
    torch.manual_seed(0)
    for k, n in [(3584, 512), (3584, 18944), (18944, 3584)]:
        linear = torch.nn.Linear(k, n, bias=n == 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        reference = _reference(linear)
        forward = fp8_forward(linear)
        x = torch.randn(1000, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        probe = torch.randn(1000, n, device="cuda")
        y = forward(x)
        (y.float() * probe).sum().backward()
        xr = x.detach().float().requires_grad_(True)
        yr = reference(xr)
        (yr * probe).sum().backward()
        print(f"k={k} n={n}: forward rel err {_rel(y, yr):.4f}, input-grad rel err {_rel(x.grad, xr.grad):.4f}")
        assert _rel(y, yr) < 0.06 and _rel(x.grad, xr.grad) < 0.06
    fused = _triton_quantizer()
    assert fused is not None, "Triton quantisation kernel available"
    x = torch.randn(1001, 18944, device="cuda", dtype=torch.bfloat16) * torch.logspace(-3, 3, 1001, device="cuda")[:, None]
    (q, s), (q_ref, s_ref) = fused(x, 16), _quantize_rows(x, 16)
    assert q.shape == q_ref.shape == (1008, 18944) and torch.allclose(s, s_ref, rtol=1e-6)
    # the same codes up to rounding ties: at most one e4m3 step apart (subnormal steps are 2**-9)
    step = torch.maximum(q_ref.float().abs() * 0.125, torch.full_like(q_ref, 2**-9, dtype=torch.float32))
    assert ((q.float() - q_ref.float()).abs() <= step).all() and (q.float() == q_ref.float()).float().mean() > 0.99
    assert torch.equal(q[1001:].float(), torch.zeros(7, 18944, device="cuda"))
