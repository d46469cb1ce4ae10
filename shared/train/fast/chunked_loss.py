"""Cross-entropy over the vocabulary without materialising full-vocabulary logits.

A causal LM's head turns every position into ``vocab_size`` logits: for Qwen2.5 (152k
vocabulary) a 4 × 1,024-token batch makes 2.5 GB of fp32 logits, plus as much again for
their gradient, which is most of the tutorial's out-of-memory trouble on 24 GB cards.
Here the head runs a chunk of positions at a time, computes the loss AND the gradient with
respect to the hidden states in the same pass (so backward never recomputes the logits),
and keeps only the (positions × hidden) gradient. Positions whose target is -100 (prompt
tokens) are dropped before the head runs: they cost nothing.

Plain torch, so it runs (and is tested) on CPU; on a GPU with Liger installed,
``shared.train.fast.speedups`` uses Liger's Triton kernel for the same job.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _FusedLinearCE(torch.autograd.Function):
    """Sum of CE(hidden @ weight.T, targets); gradients are produced during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = h @ weight.T
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                # d(lse - logit_t)/d logits = softmax - onehot(t); reuse the logits buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = probs.to(hidden.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = g @ weight
                if need_w:
                    grad_w += (g.T @ h).float()
                if need_b:
                    grad_b += probs.sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        out = []
        for has, dtype in zip(ctx.has, (None, *ctx.dtypes)):
            if not has:
                out.append(None)
                continue
            g = saved.pop(0) * grad_out
            out.append(g if dtype is None else g.to(dtype))
        return out[0], out[1], out[2], None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Summed (not averaged) CE of ``hidden @ weight.T (+ bias)`` against ``targets``.

    ``hidden`` is (..., H) and ``targets`` (...) already aligned (shifted); -100 is ignored.
    Returns a float32 scalar; divide by the number of counted tokens for a mean.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    h = hidden[keep]
    t = targets[keep]
    if t.numel() == 0:
        # Keep the graph connected so backward still runs (DDP needs every rank to reduce).
        return (hidden.sum() * 0.0).float()
    if not torch.is_grad_enabled():
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk_size):
                logits = (h[s : s + chunk_size] @ weight.T).float()
                if bias is not None:
                    logits = logits + bias.float()
                total += torch.nn.functional.cross_entropy(logits, t[s : s + chunk_size], reduction="sum")
            return total
    return _FusedLinearCE.apply(h, weight, bias, t, chunk_size)
