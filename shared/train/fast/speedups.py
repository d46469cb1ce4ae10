"""The fast GPU training path: packed varlen attention, a fused head+loss, Liger kernels.

``enable_fast_path(model, ...)`` changes a loaded causal LM (before peft wraps it) so that a
Trainer step over :class:`shared.train.packing.PackedCollator` batches

- attends with per-example causal masking over one padding-free sequence: PyTorch's
  ``varlen_attn`` (FlashAttention with cumulative sequence lengths) on CUDA; on CPU, or where
  that kernel is missing, plain SDPA over each example in turn (same function, slower);
- computes the loss with a chunked linear+cross-entropy that never holds full-vocabulary
  logits (Liger's Triton kernel on CUDA when installed, ``shared.train.fast.chunked_loss`` otherwise),
  only at positions that carry a label;
- uses Liger's fused RMSNorm, SwiGLU and RoPE kernels where Liger is installed and a GPU
  runs the model;
- runs peft's LoRA layers without their fp32 input copy, scale and add passes;
- in the memory profile, recomputes each decoder layer in backward (gradient checkpointing).

The model's own forward still answers calls without labels (generation, logits), and
padded batches with a 2D ``attention_mask`` (an eval loader) keep exact padding semantics.
Nothing here imports a package the GPU image lacks (no datasets); Liger is optional.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, Callable

import torch
import torch.nn.functional as F

from shared.train.fast.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from shared.train.packing import segments_from_position_ids

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "lawtune_varlen"


# --------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=None)
def _torch_varlen() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _varlen_signature(fn: Callable) -> tuple[tuple[str, Any], bool]:
    """(the causal argument, whether GQA is native) of this torch's varlen_attn."""
    params = inspect.signature(fn).parameters
    gqa = "enable_gqa" in params
    if "window_size" in params:
        return ("window_size", (-1, 0)), gqa
    if "is_causal" in params:
        return ("is_causal", True), gqa
    raise RuntimeError("torch varlen_attn takes neither window_size nor is_causal; cannot ask for causal attention")


def _segments_sdpa(q, k, v, cu: list[int], scaling: float | None) -> torch.Tensor:
    """Reference varlen: causal SDPA over each example separately. q/k/v are (T, H, D)."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu, cu[1:]):
        if b <= a:
            continue
        qs = q[a:b].transpose(0, 1)
        ks = k[a:b].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[a:b].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def _padded_sdpa(q, k, v, attention_mask, scaling):
    """Exact padded attention from a 2D key-padding mask (B, kv_len); q/k/v are (B, H, L, D)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    causal = q_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
    mask = causal[None, None] & attention_mask[:, None, None, -kv_len:].bool()
    # A query row with no visible key (left padding) would give NaN; let it see itself.
    mask = mask | (q_pos[:, None] == torch.arange(kv_len, device=q.device)[None, :])[None, None]
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function; returns (B, L, H, D) like the built-in ones."""
    bsz, n_heads, q_len, head_dim = query.shape
    if attention_mask is not None:
        return _padded_sdpa(query, key, value, attention_mask, scaling).transpose(1, 2), None
    if cu_seq_lens_q is None and bsz == 1 and position_ids is not None and key.shape[2] == q_len:
        cu_seq_lens_q, max_length_q = segments_from_position_ids(position_ids)
    if cu_seq_lens_q is None or bsz != 1 or key.shape[2] != q_len:
        # Unpacked causal batch (or a KV cache): ordinary causal attention is exact.
        groups = n_heads // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, is_causal=key.shape[2] == q_len, scale=scaling)
        return out.transpose(1, 2), None
    # (1, H, T, D) -> (T, H, D), the layout varlen kernels take.
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    varlen = _VARLEN["cuda"] if query.is_cuda else None
    if varlen is not None:
        fn, (causal_key, causal_value), native_gqa = varlen
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        kw: dict[str, Any] = {causal_key: causal_value}
        if k.shape[1] != q.shape[1]:
            if native_gqa:
                kw["enable_gqa"] = True
            else:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        # int() only where it is not one already: in a compiled layer it is a symbolic int, and
        # int() would pin the graph to one value (a recompile for every new longest example).
        max_len = max_length_q if isinstance(max_length_q, (int, torch.SymInt)) else int(max_length_q)
        out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, scale=scaling, **kw)
    else:
        out = _segments_sdpa_eager(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


@torch.compiler.disable
def _segments_sdpa_eager(q, k, v, cu_seq_lens: torch.Tensor, scaling: float | None) -> torch.Tensor:
    # Reads the boundaries on the host: outside any compiled graph (a graph break in a compiled layer).
    return _segments_sdpa(q, k, v, [int(x) for x in cu_seq_lens.tolist()], scaling)


def _resolve_varlen() -> tuple[Callable, tuple[str, Any], bool] | None:
    fn = _torch_varlen()
    return None if fn is None else (fn, *_varlen_signature(fn))


# Resolved once at import, read as a plain global inside the (possibly compiled) attention function.
_VARLEN: dict[str, tuple[Callable, tuple[str, Any], bool] | None] = {"cuda": _resolve_varlen()}


def register_attention() -> str:
    """Make ``attn_implementation="lawtune_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    # Like FlashAttention: no 4D mask is built; None for causal/packed, the 2D mask for padding.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION


# --------------------------------------------------------------------------- loss


def _liger_flce() -> Callable | None:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - Liger is optional; any import failure means "not here"
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def head_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, shift_labels: torch.Tensor, use_liger: bool) -> torch.Tensor:
    """Summed CE of ``head(hidden)`` against already-shifted labels, without full logits."""
    if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        # A wrapped head (e.g. LoRA on lm_head): fall back to the plain, memory-hungry way.
        logits = head(hidden).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device), reduction="sum")
    if use_liger and hidden.is_cuda and torch.is_grad_enabled():
        flce = _liger_flce()
        if flce is not None:
            h = hidden.reshape(-1, hidden.shape[-1])
            t = shift_labels.reshape(-1).to(h.device)
            keep = t != IGNORE_INDEX
            if bool(keep.any()):
                return flce(head.weight, h[keep], t[keep], head.bias).float()
    return linear_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias)


# --------------------------------------------------------------------------- model patching


@dataclass
class FastPath:
    """What ``enable_fast_path`` did, and how to undo its process-wide patches."""

    attention: str
    liger: bool
    gradient_checkpointing: bool
    compiled_lora: bool = False
    fp8: bool = False
    compiled_layers: int = 0
    fp8_mlp: bool = False
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def undo_global_patches(self) -> None:
        while self._undo:
            self._undo.pop()()

    def describe(self) -> str:
        return (
            f"attention={self.attention} liger={('loss-only' if self.compiled_layers else 'on') if self.liger else 'off'} "
            f"gradient_checkpointing={'on' if self.gradient_checkpointing else 'off'} loss=chunked"
            + (" lora=compiled" if self.compiled_lora else "")
            + ((" fp8=frozen-linears+fused-mlp" if self.fp8_mlp else " fp8=frozen-linears") if self.fp8 else "")
            + (f" compile=layers({self.compiled_layers})" if self.compiled_layers else "")
        )


def liger_import_error() -> str | None:
    """Why Liger cannot be used here (the import's exception), or None when it imports."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"; the reason is what matters
        return f"{type(exc).__name__}: {exc}"
    return None


def liger_available() -> bool:
    return liger_import_error() is None


def _apply_liger(model: torch.nn.Module) -> Callable[[], None] | None:
    """Liger's fused RMSNorm/SwiGLU/RoPE on this model instance; returns an undo for module globals."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception:  # noqa: BLE001
        return None
    modeling = sys.modules[type(model).__module__]
    saved = dict(vars(modeling))
    try:
        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    except Exception as exc:  # noqa: BLE001 - an unsupported architecture just runs without Liger
        log.warning("Liger kernels not applied to %s: %s", type(model).__name__, exc)
        vars(modeling).update(saved)
        return None

    def undo() -> None:
        for name, value in saved.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)

    return undo


def _fused_lora_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft LoRA Linear forward, same maths, fewer passes over the activations.

    peft upcasts the layer input to the adapter's fp32 dtype before dropout (a full fp32 copy
    of every LoRA'd activation), then adds ``B(A(dropout(x))) * scaling`` in two more
    elementwise passes. Here dropout runs in the activation dtype (the bf16 values that reach
    the matmul are identical: autocast rounds the fp32 result to bf16 anyway) and the scale and
    the add ride in the B matmul's epilogue (``addmm`` with ``alpha``). Anything unusual
    (merged, disabled, several adapters, DoRA and other variants, a LoRA bias) goes to peft.
    Bound to each layer as its ``forward`` method (one function, not a closure per layer), so a
    compiled decoder layer traces the same code for every layer.
    """
    active = self.active_adapters
    if (
        self.disable_adapters
        or self.merged
        or args
        or kwargs
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in getattr(self, "lora_variant", {})
        or self.lora_B[active[0]].bias is not None
    ):
        return self._lawtune_peft_forward(x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    a = self.lora_A[name].weight
    b = self.lora_B[name].weight
    dtype = result.dtype if not torch.is_autocast_enabled() else torch.get_autocast_dtype(x.device.type)
    xa = F.linear(self.lora_dropout[name](x.to(dtype)), a.to(dtype))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]).to(dtype),
        xa.reshape(-1, xa.shape[-1]),
        b.to(dtype).t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape).to(result.dtype)


_COMPILED: dict[str, Callable] = {}


def _lora_math(x, w, bias, a, b, scaling: float, p: float, training: bool):
    result = F.linear(x, w, bias)
    xa = F.linear(F.dropout(x, p, training), a.to(x.dtype))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.to(x.dtype).t(), alpha=scaling)
    return out.view(result.shape)


def _compiled_lora_forward(layer: torch.nn.Module, original: Callable) -> Callable:
    """Experimental: the same LoRA maths through torch.compile (dropout mask regenerated, not stored)."""
    if "fn" not in _COMPILED:
        import torch._dynamo.config as dcfg

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 64))
        _COMPILED["fn"] = torch.compile(_lora_math, dynamic=True)
    fused = _fused_lora_forward.__get__(layer)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = layer.active_adapters
        if args or kwargs or layer.merged or layer.disable_adapters or len(active) != 1 or not x.is_cuda:
            return fused(x, *args, **kwargs)
        name = active[0]
        drop = layer.lora_dropout[name]
        p = float(getattr(drop, "p", 0.0))
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else x.dtype
        with torch.autocast("cuda", enabled=False):
            return _COMPILED["fn"](
                x.to(dtype), layer.base_layer.weight.to(dtype),
                None if layer.base_layer.bias is None else layer.base_layer.bias.to(dtype),
                layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]), p, drop.training,
            )

    return forward


def fuse_lora_layers(model: torch.nn.Module, compiled: bool = False) -> int:
    """Swap in :func:`_fused_lora_forward` on every peft LoRA Linear; returns how many."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and not getattr(module, "_lawtune_fused", False):
            module._lawtune_peft_forward = module.forward
            if compiled:
                module.forward = _compiled_lora_forward(module, module._lawtune_peft_forward)
            else:
                module.forward = MethodType(_fused_lora_forward, module)
            module._lawtune_fused = True
            count += 1
    return count


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a transformers causal LM (``model.model.layers``), or []."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Regional torch.compile: each decoder layer compiled on its own (transformers' advice for
    training: compile the repeated block, not the whole model).

    All layers run the same code over their own parameters, so one graph (forward and backward)
    serves every layer: the compile cost is one layer's, not the model's. ``dynamic=True``: the
    token count of a packed batch, its number of examples and its longest example change every
    step, and are symbolic from the first trace instead of costing a recompile. Inductor fuses
    what sits between the matmuls and the attention kernel (RMSNorm, RoPE, SwiGLU, the residual
    adds, LoRA's dropout and adds, the FP8 activation quantisation). Returns how many layers.
    """
    import torch._dynamo.config as dcfg

    layers = decoder_layers(model)
    # Training, evaluation (no grad) and a second model size in one process are separate
    # entries of the one cache all layers share; keep room for them.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, knob):
            setattr(dcfg, knob, max(getattr(dcfg, knob), 16))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def auto_compile(on_gpu: bool, memory_profile: bool) -> bool:
    """``compile: auto``: where it was measured (a GPU, layers kept in memory); the memory profile's
    per-layer recompute stays eager."""
    return on_gpu and not memory_profile and COMPILE_AUTO


# Whether ``compile: auto`` turns regional compilation on. Measured on an H200 (docs/benchmarks.md,
# "Scale (issue 16)"): +1.4-2.2 % tokens/s on 7B q/k/v, +4 % on 1.5B, for 22-86 s of compilation at
# the first step and another graph for evaluation's no-grad forward: it repays itself only after
# ~1,400 (1.5B) to ~4,000 (7B) steps, so auto leaves it off and long runs ask for it (compile: on).
COMPILE_AUTO = False

FP8_AUTO_MIN_HIDDEN = 3072
# With FP8 on, frozen SwiGLU MLPs run as one fused function (shared/train/fast/fp8_mlp.py):
# measured on an H200 (7B q/k/v, 28,672 tokens) 2.92x the steady baseline against 2.77x for the
# per-layer FP8 path, loss parity 0.44 % (docs/benchmarks.md, "Scale (issue 16)").
FP8_MLP_DEFAULT = True


def auto_fp8(model: torch.nn.Module, on_gpu: bool) -> bool:
    """``fp8: auto``: FP8 tensor cores, and matmuls large enough to repay the quantisation passes."""
    from shared.train.fast import fp8

    return on_gpu and fp8.fp8_supported() and getattr(model.config, "hidden_size", 0) >= FP8_AUTO_MIN_HIDDEN


def _fast_forward(original: Callable, use_liger: bool, fuse_lora: bool, compile_lora: bool = False, fp8: bool = False,
                  fp8_mlp: bool = False) -> Callable:
    state = {"fused": False, "fp8": False}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        shift_labels=None,
        use_cache=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None and shift_labels is None:
            return original(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        kwargs.pop("logits_to_keep", None)
        if fuse_lora and not state["fused"]:
            # peft injects its layers after enable_fast_path, so they are found at first use.
            state["fused"] = True
            log.info("fused %d LoRA layers", fuse_lora_layers(self, compiled=compile_lora))
        decoder = getattr(self, self.base_model_prefix)
        if fp8 and not state["fp8"]:
            # At first use: the weights are on the GPU by now, and peft's layers exist.
            from shared.train.fast.fp8 import convert_frozen_linears

            state["fp8"] = True
            if fp8_mlp:
                from shared.train.fast.fp8_mlp import convert_frozen_mlps

                log.info("FP8 fused SwiGLU on %d frozen MLPs", convert_frozen_mlps(decoder))
            log.info("FP8 forward/backward on %d frozen linear layers", convert_frozen_linears(decoder))
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        loss = head_loss_sum(out.last_hidden_state, self.lm_head, shift_labels, use_liger)
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return CausalLMOutputWithPast(loss=loss / num_items_in_batch)

    return forward


def enable_fast_path(
    model: torch.nn.Module,
    *,
    memory_profile: bool = False,
    liger: bool | None = None,
    fuse_lora: bool = True,
    compile_lora: bool = False,
    fp8: bool | None = False,
    on_gpu: bool | None = None,
    compile: bool | None = False,
    fp8_mlp: bool | None = None,
) -> FastPath:
    """Patch a transformers causal LM in place (before or after peft wraps it: pass the
    transformers model itself, e.g. ``peft_model.get_base_model()``).

    ``liger=None`` uses Liger when it is installed and the model sits on a GPU. ``fp8=None``
    (auto) runs the frozen linear layers in FP8 where that was measured to pay: a GPU with FP8
    tensor cores and a hidden size of at least ``FP8_AUTO_MIN_HIDDEN`` (Qwen2.5-7B: +17 % tokens/s
    on an H100; Qwen2.5-1.5B: -7 %, its matmuls too small to repay the quantisation passes).
    ``on_gpu`` says where the model will train; by default, where its weights are now. The
    finetune job prepares the model on the CPU and Trainer moves it later, so it passes this.
    ``compile=True`` compiles each decoder layer (:func:`compile_decoder_layers`); Liger's layer
    kernels are then left out (inductor fuses those ops with their neighbours) and only its
    head+loss kernel is used. ``compile=None`` (auto): :func:`auto_compile`. ``fp8_mlp`` (with
    FP8 on): frozen SwiGLU MLPs as one fused FP8 function (:mod:`shared.train.fast.fp8_mlp`);
    None = ``FP8_MLP_DEFAULT``.
    """
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    if on_gpu is None:
        on_gpu = next(model.parameters()).is_cuda
    use_liger = (liger_available() and on_gpu) if liger is None else liger
    if compile is None:
        compile = auto_compile(on_gpu, memory_profile)
    fast = FastPath(attention="varlen" if (on_gpu and _torch_varlen()) else "per-example sdpa", liger=False, gradient_checkpointing=False)
    if use_liger and compile:
        fast.liger = liger_available()  # the head+loss kernel only
    elif use_liger:
        undo = _apply_liger(model)
        if undo is not None:
            fast.liger = True
            fast._undo.append(undo)
    if compile:
        fast.compiled_layers = compile_decoder_layers(model)
    if fp8 is None:
        fp8 = auto_fp8(model, on_gpu)
    if fp8_mlp is None:
        fp8_mlp = FP8_MLP_DEFAULT
    fp8_mlp = bool(fp8 and fp8_mlp)
    model.forward = MethodType(_fast_forward(model.forward, fast.liger, fuse_lora, compile_lora, fp8, fp8_mlp), model)
    if memory_profile:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fast.gradient_checkpointing = True
    fast.compiled_lora = compile_lora
    fast.fp8 = fp8
    fast.fp8_mlp = fp8_mlp
    log.info("fast training path: %s", fast.describe())
    return fast


def cuda_available() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def fast_path(model: torch.nn.Module, **kwargs: Any):
    """``enable_fast_path`` for a block, restoring module-level patches after (benchmarks)."""
    fast = enable_fast_path(model, **kwargs)
    try:
        yield fast
    finally:
        fast.undo_global_patches()


# --------------------------------------------------------------------------- finetune job wiring


def compile_wanted(config: Any) -> bool | None:
    """``training_args.compile``: "on" (True), "off" (False) or "auto" (None: enable_fast_path decides)."""
    return {"on": True, "off": False}.get(getattr(config.training_args, "compile", "auto"))


def fp8_wanted(config: Any) -> bool | None:
    """``training_args.fp8``: "on" (True), "off" (False) or "auto" (None: enable_fast_path decides)."""
    return {"on": True, "off": False}.get(getattr(config.training_args, "fp8", "auto"))


def training_hooks(config: Any, device: str, cache_dir: Any = None):
    """``shared.train.training.Hooks`` for the finetune job: the fast path where wanted, else the defaults.

    - ``prepare_model``: the job's own model + LoRA, then :func:`enable_fast_path` on the base
      model (attention implementation, Liger, head+loss, memory profile);
    - ``make_collator``: :class:`~shared.train.packing.PackedCollator` (train and eval batches become
      one padding-free sequence each);
    - ``prepare_train_dataset`` (where ``Hooks`` has it): rows of at most
      ``training_args.tokens_per_batch`` tokens, so micro-batches grow once padding is gone
      while peak memory stays bounded.
    """
    from shared.train.packing import PackedCollator, PackedRows
    from shared.train.training import Hooks, fast_path_wanted, prepare_model

    if not fast_path_wanted(config, device):
        return Hooks()
    args = config.training_args

    budget: dict[str, int | None] = {}

    def prepare(model_dir, cfg, prec):
        from shared.train.fsdp import is_sharded

        model = prepare_model(model_dir, cfg, prec)
        sharded = is_sharded(model)
        fp8 = fp8_wanted(cfg)
        if sharded:
            # FP8 replaces each frozen weight by two e4m3 copies held outside the module; FSDP2
            # all-gathers the sharded bf16 weight per layer, so the two cannot share the weight.
            if fp8 or (fp8 is None and auto_fp8(model.get_base_model(), prec.device == "cuda")):
                log.info("fp8 off: FP8 frozen weights are not combined with distributed: fsdp (the weights are "
                         "sharded and all-gathered per layer in bf16); training_args.fp8 ignored")
            fp8 = False
        compile_layers = compile_wanted(cfg)
        if sharded and compile_layers is not False:
            # Regional compile is applied after fully_shard here, so the graphs would trace FSDP2's
            # per-layer hooks; not measured together: off, and said so when it was asked for.
            if compile_layers:
                log.info("compile off: not combined with distributed: fsdp here; training_args.compile ignored")
            compile_layers = False
        enable_fast_path(model.get_base_model(), memory_profile=cfg.training_args.memory_profile, fp8=fp8,
                         on_gpu=prec.device == "cuda", compile=compile_layers)
        if sharded and cfg.training_args.tokens_per_batch is not None:
            # A trial step on a sharded model is a collective: one rank running out of memory would
            # leave the others waiting in it, so under FSDP the budget is taken as written.
            if cfg.training_args.tokens_per_batch == "auto":
                from shared.core.errors import ConfigError

                raise ConfigError("training_args.tokens_per_batch: auto is not measured under distributed: fsdp; "
                                  "set a number of tokens per micro-batch")
            budget["tokens"] = cfg.training_args.tokens_per_batch
        elif cfg.training_args.tokens_per_batch is not None:
            from shared.train.fast.budget import resolve_token_budget

            if prec.device == "cuda":
                model.to("cuda")  # the trial step runs where training will
            budget["tokens"] = resolve_token_budget(model, cfg, cache_dir)
        return model

    def collator(cfg, tokenizer, prec):
        return PackedCollator()

    hooks = Hooks(prepare_model=prepare, make_collator=collator)
    if args.tokens_per_batch and hasattr(hooks, "prepare_train_dataset"):
        # Trainer still draws per_device_train_batch_size items per micro-batch; each item is a
        # row of up to tokens_per_batch / batch_size tokens, so a micro-batch stays within budget.
        # The budget is known once the model is prepared (tokens_per_batch: auto measures it).
        seed = config.training_seed

        def packed(rows, cfg):
            tokens = budget.get("tokens", args.tokens_per_batch)
            if not isinstance(tokens, int):
                raise RuntimeError("tokens_per_batch: auto is measured on the prepared model: prepare it first")
            per_row = max(1, tokens // args.per_device_train_batch_size)
            return PackedRows.build(rows, per_row, seed=seed)

        hooks.prepare_train_dataset = packed
    return hooks
