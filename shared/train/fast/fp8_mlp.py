"""A frozen SwiGLU MLP in FP8 with its elementwise work fused into the quantisation (issue 16).

``down(silu(gate(x)) * up(x))`` with frozen weights, as :mod:`shared.train.fast.fp8` runs it
layer by layer, moves the widest activations of the model (intermediate size, 5.3x the hidden
size on Qwen2.5-7B) through memory several times a step: SwiGLU writes its bf16 output, the
quantiser reads it (twice) for the down projection; in backward SwiGLU's gradient kernel writes
bf16 gate and up gradients, each is quantised on its own, two matmuls and an add make the input
gradient. A CUDA profile of the 7B benchmark put those passes at ~4 ms of each layer's ~38 ms.

Here the MLP is one autograd function over three FP8 matmuls:

- forward: ``gu = x [Wg; Wu]^T`` (gate and up as one matmul, their weights stacked), then one
  kernel reads ``gu`` and writes ``silu(g) * u`` straight as e4m3 with its row scales (no bf16
  activation is ever stored), then the down matmul;
- backward: the down matmul's input gradient, then one kernel reads it with ``gu`` and writes the
  gate and up gradients side by side as e4m3 (one scale per row over both), and one matmul
  against the stacked weights gives the input gradient (no add).

Saved for backward: ``gu`` only (what SwiGLU's own backward needs anyway). The two fused kernels
are Triton on CUDA and plain torch elsewhere, registered as custom ops so a compiled decoder
layer (``training_args.compile``) calls them as they are.
"""

from __future__ import annotations

import logging
from types import MethodType
from typing import Callable

import torch
import torch.nn.functional as F

from shared.train.fast.fp8 import E4M3, E4M3_MAX, _quantize_rows, _SharedInput, quantize_rows

log = logging.getLogger(__name__)

ROWS_MULTIPLE = 16  # the row padding quantize_rows gives _scaled_mm


# --------------------------------------------------------------------------- reference maths (CPU, tests)


def _silu_mul_quant_reference(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g, u = gu.float().chunk(2, dim=-1)
    return _quantize_rows(F.silu(g) * u, 1)


def _swiglu_grad_quant_reference(d_act: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g, u = gu.float().chunk(2, dim=-1)
    d = d_act.float()
    sig = torch.sigmoid(g)
    dg = d * u * sig * (1 + g * (1 - sig))
    du = d * g * sig
    return _quantize_rows(torch.cat([dg, du], dim=-1), 1)


# --------------------------------------------------------------------------- Triton kernels (CUDA)

_TRITON: dict[str, tuple[Callable, Callable] | None] = {}


def _triton_kernels() -> tuple[Callable, Callable] | None:
    """One program per row, two passes over it (amax, then scale and cast; the second pass reads
    from L2), like fp8's quantiser, with SwiGLU or its gradient computed on the way in."""
    if "fns" in _TRITON:
        return _TRITON["fns"]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON["fns"] = None
        return None

    @triton.jit
    def _silu_mul_quant_kernel(gu_ptr, q_ptr, s_ptr, n_cols, gu_stride, q_stride, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = gu_ptr + row * gu_stride
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            g = tl.load(base + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(base + n_cols + cols, mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(g * tl.sigmoid(g) * u))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            g = tl.load(base + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(base + n_cols + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(q_ptr + row * q_stride + cols, (g * tl.sigmoid(g) * u / scale).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _swiglu_grad_quant_kernel(d_ptr, gu_ptr, q_ptr, s_ptr, n_cols, d_stride, gu_stride, q_stride,
                                  FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        gbase = gu_ptr + row * gu_stride
        dbase = d_ptr + row * d_stride
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            g = tl.load(gbase + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(gbase + n_cols + cols, mask=m, other=0.0).to(tl.float32)
            d = tl.load(dbase + cols, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            dg = d * u * sig * (1.0 + g * (1.0 - sig))
            du = d * g * sig
            amax = tl.maximum(amax, tl.maximum(tl.abs(dg), tl.abs(du)))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
        qbase = q_ptr + row * q_stride
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            g = tl.load(gbase + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(gbase + n_cols + cols, mask=m, other=0.0).to(tl.float32)
            d = tl.load(dbase + cols, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            dg = d * u * sig * (1.0 + g * (1.0 - sig))
            du = d * g * sig
            tl.store(qbase + cols, (dg / scale).to(q_ptr.dtype.element_ty), mask=m)
            tl.store(qbase + n_cols + cols, (du / scale).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + row, scale)

    def silu_mul_quant(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = gu.shape[0], gu.shape[1] // 2
        q = torch.empty(rows, cols, device=gu.device, dtype=E4M3)
        s = torch.empty(rows, 1, device=gu.device, dtype=torch.float32)
        _silu_mul_quant_kernel[(rows,)](gu, q, s, cols, gu.stride(0), q.stride(0), FP8_MAX=E4M3_MAX, BLOCK=1024, num_warps=4)
        return q, s

    def swiglu_grad_quant(d_act: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = gu.shape[0], gu.shape[1] // 2
        q = torch.empty(rows, 2 * cols, device=gu.device, dtype=E4M3)
        s = torch.empty(rows, 1, device=gu.device, dtype=torch.float32)
        _swiglu_grad_quant_kernel[(rows,)](d_act, gu, q, s, cols, d_act.stride(0), gu.stride(0), q.stride(0),
                                           FP8_MAX=E4M3_MAX, BLOCK=1024, num_warps=4)
        return q, s

    _TRITON["fns"] = (silu_mul_quant, swiglu_grad_quant)
    return _TRITON["fns"]


# --------------------------------------------------------------------------- custom ops (opaque to torch.compile)


@torch.library.custom_op("lawtune::silu_mul_quant", mutates_args=())
def silu_mul_quant(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gu`` = [gate | up] (rows, 2I) -> rowwise e4m3 of ``silu(gate) * up`` (rows, I) and its (rows, 1) scales."""
    fns = _triton_kernels() if gu.is_cuda else None
    if fns is None:
        return _silu_mul_quant_reference(gu)
    return fns[0](gu if gu.stride(-1) == 1 else gu.contiguous())


@silu_mul_quant.register_fake
def _(gu):
    rows, cols = gu.shape[0], gu.shape[1] // 2
    return gu.new_empty(rows, cols, dtype=E4M3), gu.new_empty(rows, 1, dtype=torch.float32)


@torch.library.custom_op("lawtune::swiglu_grad_quant", mutates_args=())
def swiglu_grad_quant(d_act: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up gradients of ``silu(gate) * up`` side by side, rowwise e4m3 (rows, 2I), and the scales."""
    fns = _triton_kernels() if gu.is_cuda else None
    if fns is None:
        return _swiglu_grad_quant_reference(d_act, gu)
    return fns[1](d_act if d_act.stride(-1) == 1 else d_act.contiguous(), gu if gu.stride(-1) == 1 else gu.contiguous())


@swiglu_grad_quant.register_fake
def _(d_act, gu):
    return gu.new_empty(gu.shape, dtype=E4M3), gu.new_empty(gu.shape[0], 1, dtype=torch.float32)


# --------------------------------------------------------------------------- the MLP


class _FP8SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qx, sx, w_gu, s_gu, w_gu_bwd, s_gu_bwd, w_d, s_d, w_d_bwd, s_d_bwd):  # type: ignore[override]
        shape = x.shape
        gu = torch._scaled_mm(qx, w_gu.t(), scale_a=sx, scale_b=s_gu, out_dtype=x.dtype)  # rows padded like qx
        qa, sa = silu_mul_quant(gu)
        y = torch._scaled_mm(qa, w_d.t(), scale_a=sa, scale_b=s_d, out_dtype=x.dtype)
        ctx.save_for_backward(gu, w_gu_bwd, s_gu_bwd, w_d_bwd, s_d_bwd)
        ctx.shape = shape
        rows = x.numel() // shape[-1]
        return y[:rows].view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        gu, w_gu_bwd, s_gu_bwd, w_d_bwd, s_d_bwd = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        q, sd = quantize_rows(dy2, ROWS_MULTIPLE)  # the same padded row count as gu
        d_act = torch._scaled_mm(q, w_d_bwd.t(), scale_a=sd, scale_b=s_d_bwd, out_dtype=dy.dtype)
        qg, sg = swiglu_grad_quant(d_act, gu)
        dx = torch._scaled_mm(qg, w_gu_bwd.t(), scale_a=sg, scale_b=s_gu_bwd, out_dtype=dy.dtype)
        return (dx[: dy2.shape[0]].view(ctx.shape),) + (None,) * 10


def _fp8_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused FP8 MLP, bound to each converted MLP as its ``forward`` (one function for all layers)."""
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(dt)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        q, sx = quantize_rows(x2, ROWS_MULTIPLE)
    else:
        q, sx = _SharedInput.quantize(x2, x)
    w = self._fp8_mlp
    with torch.autocast(x.device.type, enabled=False):
        return _FP8SwiGLU.apply(x, q, sx, *w)


def _is_frozen_plain_linear(m: object) -> bool:
    return (
        type(m) is torch.nn.Linear
        and not m.weight.requires_grad
        and m.weight.numel() > 0
        and m.bias is None
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    )


def _is_silu(act: object) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in {"SiLU", "SiLUActivation"}


def _release(linear: torch.nn.Linear) -> None:
    # As fp8.fp8_forward does: same Parameter object, storage given back.
    storage = linear.weight.untyped_storage()
    dtype, device = linear.weight.dtype, linear.weight.device
    if storage.nbytes() == linear.weight.numel() * linear.weight.element_size():
        try:
            storage.resize_(0)
        except RuntimeError:
            pass
    linear.weight.data = torch.empty(0, dtype=dtype, device=device)


def convert_frozen_mlp(mlp: torch.nn.Module) -> bool:
    """Run a frozen SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, SiLU) as one fused FP8
    function; False (nothing changed) for anything else, e.g. LoRA on an MLP projection."""
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not all(_is_frozen_plain_linear(m) for m in (gate, up, down)) or not _is_silu(getattr(mlp, "act_fn", None)):
        return False
    w_gu = torch.cat([gate.weight.detach(), up.weight.detach()], dim=0)  # (2I, H)
    wg_fwd, sg_fwd = _quantize_rows(w_gu, 1)  # rows per output feature of [gate; up]
    wg_bwd, sg_bwd = _quantize_rows(w_gu.t().contiguous(), 1)  # (H, 2I): dx = [dg du] [Wg; Wu]
    del w_gu
    wd = down.weight.detach()
    wd_fwd, sd_fwd = _quantize_rows(wd, 1)
    wd_bwd, sd_bwd = _quantize_rows(wd.t().contiguous(), 1)
    del wd
    for linear in (gate, up, down):
        _release(linear)
    mlp._fp8_mlp = (wg_fwd, sg_fwd.reshape(1, -1), wg_bwd, sg_bwd.reshape(1, -1),
                    wd_fwd, sd_fwd.reshape(1, -1), wd_bwd, sd_bwd.reshape(1, -1))
    mlp.forward = MethodType(_fp8_mlp_forward, mlp)
    return True


def convert_frozen_mlps(decoder: torch.nn.Module) -> int:
    """:func:`convert_frozen_mlp` on every MLP under ``decoder``; returns how many were converted."""
    return sum(convert_frozen_mlp(m) for m in list(decoder.modules()) if hasattr(m, "gate_proj") and hasattr(m, "down_proj"))
