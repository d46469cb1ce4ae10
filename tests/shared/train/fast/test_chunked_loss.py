"""shared/train/fast/chunked_loss.py: the chunked head+loss equals the full-logits loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.train.fast.chunked_loss import IGNORE_INDEX, linear_cross_entropy


def full_ce(hidden, weight, bias, targets):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return F.cross_entropy(logits.float().reshape(-1, weight.shape[0]), targets.reshape(-1), reduction="sum")


@pytest.mark.parametrize(
    ("chunk", "with_bias", "ignored"),
    [
        pytest.param(1, False, 0.3, id="chunk-1"),
        pytest.param(7, True, 0.5, id="uneven-chunks-bias"),
        pytest.param(4096, False, 0.0, id="one-chunk-no-ignored"),
    ],
)
def test_matches_full_cross_entropy_and_its_gradients(chunk, with_bias, ignored):
    g = torch.Generator().manual_seed(chunk)
    n, h, v = 37, 16, 50
    hidden = torch.randn(2, n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (2, n), generator=g)
    targets[torch.rand(2, n, generator=g) < ignored] = IGNORE_INDEX

    got = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk)
    want = full_ce(hidden, weight, bias, targets)
    params = [hidden, weight] + ([bias] if with_bias else [])
    got_grads = torch.autograd.grad(got * 0.5, params)
    want_grads = torch.autograd.grad(want.double() * 0.5, params)
    assert torch.allclose(got.double(), want.double(), rtol=1e-6)
    for a, b in zip(got_grads, want_grads):
        # the head runs in fp32 whatever the input dtype (bf16 on GPU), hence fp32 tolerances
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_agrees():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g)  # frozen, like a LoRA model's lm_head
    targets = torch.randint(0, 20, (9,), generator=g)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets, chunk_size=4), loss.detach())


def test_all_positions_ignored_gives_zero_with_a_graph():
    hidden = torch.randn(5, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(6, 4), torch.full((5,), IGNORE_INDEX))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(hidden.grad) == 0
