"""shared/train/fast/fp8_mlp.py: a frozen SwiGLU MLP as one fused FP8 function.

torch._scaled_mm runs on CPU, and the two fused steps (SwiGLU + quantise, SwiGLU's gradient +
quantise) have a plain-torch form that the CPU runs; the Triton kernels that replace them on
CUDA are checked against that form by the gpu-marked test (through the device tool) and, at 7B
size, by tests/benchmarks/train_speed.py's loss parity.
"""

from __future__ import annotations

import pytest
import torch

from shared.train.fast import fp8_mlp
from shared.train.fast.fp8 import E4M3, convert_frozen_linears


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _mlp(hidden=64, inter=160, seed=0):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(seed)
    return Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter)).requires_grad_(False)


def _forward_backward(mlp, x, probe):
    x = x.detach().clone().requires_grad_(True)
    y = mlp(x)
    (y.float() * probe).sum().backward()
    return y.detach(), x.grad


def test_swiglu_gradient_formula_is_autograds():
    """The gradient the fused kernel computes (in closed form) is the derivative of silu(g) * u."""
    g = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, 12, dtype=torch.float64)
    (torch.nn.functional.silu(g) * u * d).sum().backward()
    sig = torch.sigmoid(g.detach())
    dg = d * u.detach() * sig * (1 + g.detach() * (1 - sig))
    du = d * g.detach() * sig
    assert torch.allclose(dg, g.grad) and torch.allclose(du, u.grad)
    q, scale = fp8_mlp._swiglu_grad_quant_reference(d, torch.cat([g, u], -1).detach())
    assert q.dtype == E4M3 and q.shape == (5, 24) and scale.shape == (5, 1)
    assert _rel(q.double() * scale, torch.cat([g.grad, u.grad], -1)) < 0.05, "one row scale over gate and up gradients"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_matches_the_bf16_mlp_and_the_per_layer_fp8_one(dtype):
    ref, fused, per_layer = _mlp(), _mlp().to(dtype), _mlp().to(dtype)  # the reference in fp32
    gate_weight = fused.gate_proj.weight
    assert fp8_mlp.convert_frozen_mlp(fused)
    assert fused.gate_proj.weight is gate_weight and gate_weight.numel() == 0, "same Parameter, storage released"
    assert all(getattr(fused, n).weight.numel() == 0 for n in ("up_proj", "down_proj"))
    assert convert_frozen_linears(fused) == 0, "nothing left for the per-layer conversion"
    assert convert_frozen_linears(per_layer) == 3

    x = torch.randn(3, 7, 64, dtype=dtype)  # 21 rows: not a multiple of 16
    probe = torch.randn(3, 7, 64)
    want_y, want_dx = _forward_backward(ref, x.float(), probe)
    got_y, got_dx = _forward_backward(fused, x, probe)
    base_y, base_dx = _forward_backward(per_layer, x, probe)
    assert got_y.shape == want_y.shape and got_y.dtype == dtype and got_dx.shape == x.shape
    # e4m3 keeps 3 mantissa bits: a few % per matmul, as the per-layer FP8 path has
    assert _rel(got_y, want_y) < 0.1 and _rel(got_dx, want_dx) < 0.1
    assert _rel(got_y, want_y) < 1.5 * _rel(base_y, want_y) + 0.01
    assert _rel(got_dx, want_dx) < 1.5 * _rel(base_dx, want_dx) + 0.01


def test_only_frozen_silu_mlps_without_adapters_are_converted():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    qkv = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert fp8_mlp.convert_frozen_mlps(qkv.get_base_model().model) == 2
    every = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    assert fp8_mlp.convert_frozen_mlps(every.get_base_model().model) == 0, "LoRA on the MLP: left alone"
    gelu = _mlp()
    gelu.act_fn = torch.nn.GELU()
    assert not fp8_mlp.convert_frozen_mlp(gelu)


def test_fused_ops_have_consistent_fake_kernels_for_torch_compile():
    gu = torch.randn(16, 2 * 48, dtype=torch.bfloat16)
    d = torch.randn(16, 48, dtype=torch.bfloat16)
    torch.library.opcheck(fp8_mlp.silu_mul_quant, (gu,), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(fp8_mlp.swiglu_grad_quant, (d, gu), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_gpu_triton_kernels_match_the_torch_form():
    torch.manual_seed(0)
    gu = (torch.randn(4096 + 16, 2 * 18944, device="cuda") * 2).to(torch.bfloat16)
    d = torch.randn(4096 + 16, 18944, device="cuda").to(torch.bfloat16)
    for got, want in (
        (fp8_mlp.silu_mul_quant(gu), fp8_mlp._silu_mul_quant_reference(gu)),
        (fp8_mlp.swiglu_grad_quant(d, gu), fp8_mlp._swiglu_grad_quant_reference(d, gu)),
    ):
        (q, s), (qr, sr) = got, want
        assert q.shape == qr.shape and torch.allclose(s, sr, rtol=1e-5)
        assert _rel(q.float() * s, qr.float() * sr) < 0.02, "same codes up to one rounding step"


@pytest.mark.parametrize(("fp8", "mlp", "fused"), [(True, None, True), (True, False, False), (False, None, False)])
def test_the_fast_path_fuses_the_mlps_when_fp8_is_on_by_default(fp8, mlp, fused):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from shared.train.fast.speedups import enable_fast_path
    from shared.train.packing import PackedCollator

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    fast = enable_fast_path(model, fp8=fp8, fp8_mlp=mlp, on_gpu=False)
    assert fast.fp8_mlp is fused and ("fused-mlp" in fast.describe()) is fused
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (30,)).tolist()
    peft_model(**PackedCollator()([[{"input_ids": ids, "labels": ids}]])).loss.backward()
    kinds = {getattr(layer.mlp.forward, "__func__", None) is fp8_mlp._fp8_mlp_forward for layer in model.model.layers}
    assert kinds == {fused}
