"""The shared-residual attention path gives every q / k / v slot the same input gradient as
separate per-slot copies of the residual would (``graphs.slot_gradients``)."""

from __future__ import annotations

import pytest
import torch

from graphs import runtime as rt
from graphs.adapters.spec import NormSpec
from graphs.slot_gradients import slot_input_gradients, slot_probe
from tests.conftest import random_ids
from tests.test_runtime import _spec


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "qwen2-bias", "neox-parallel", "gemma2", "gemma3"])
def test_shared_path_equals_separate_slot_copies(name: str) -> None:
    spec = _spec(name, torch.float64)
    g = spec.graph
    clean = random_ids(2, 7, seed=3)
    metric = lambda lo: lo[:, -1, 3].sum() - lo[:, -1].logsumexp(-1).sum()
    value, shared = rt.receiver_gradients(spec, clean, metric)  # the fused path (no intervention)
    # a zero mask that requires grad makes the runtime give every slot its own copy of the residual
    zero = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, requires_grad=True)
    values = rt.zero_values(spec)
    value2, copies = rt.receiver_gradients(spec, clean, metric, mask=zero, ablation=values)
    torch.testing.assert_close(value, value2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared, copies, rtol=1e-9, atol=1e-12)
    assert shared.abs().max() > 1e-3


def test_probe_value_is_the_residual() -> None:
    resid = torch.randn(2, 3, 4)
    probe = slot_probe(resid, 5)
    assert probe.shape == (2, 3, 5, 4) and probe.requires_grad
    assert torch.equal(probe[:, :, 4], resid)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "rmsnorm-offset", "rmsnorm-plain"])
def test_slot_input_gradients_match_autograd(kind: str) -> None:
    """J_norm^T W_r^T g_r per slot, against autograd through the norm and each slot's projection."""
    from graphs.ops import apply_norm

    gen = torch.Generator().manual_seed(0)
    d, dh, R = 6, 3, 4
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    if kind == "layernorm":
        norm = NormSpec("layernorm", w, torch.randn(d, generator=gen, dtype=torch.float64), 1e-5)
    elif kind == "rmsnorm-offset":
        norm = NormSpec("rmsnorm", w, None, 1e-6, weight_offset=1.0)
    elif kind == "rmsnorm-plain":
        norm = NormSpec("rmsnorm", None, None, 1e-6)
    else:
        norm = NormSpec("rmsnorm", w, None, 1e-6)
    x = torch.randn(2, 3, d, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(R, dh, d, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, R, dh, generator=gen, dtype=torch.float64)
    got = slot_input_gradients(norm, x.detach(), g, W)  # [R, B, T, d]
    proj = torch.einsum("btd,red->btre", apply_norm(norm, x.detach()), W)  # W_r norm(x)
    with_proj = slot_input_gradients(norm, x.detach(), g, W, proj)
    torch.testing.assert_close(with_proj, got)
    for r in range(R):
        out = apply_norm(norm, x) @ W[r].T  # [B, T, dh]
        (want,) = torch.autograd.grad(out, x, g[:, :, r])
        torch.testing.assert_close(got[r], want)
