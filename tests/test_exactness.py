"""The exactness contract (DESIGN.md section 3), for every family, on tiny random models.

1. No edge ablated reproduces the HF logits.
2. Every edge ablated with corrupted values reproduces the HF logits on the corrupted prompts.
3. One edge ablated equals a hand-written forward-hook intervention on the HF model.
4. No hook or state remains on the HF model; the model object is not modified.
"""

from __future__ import annotations

import pytest
import torch

from graphs import runtime as rt
from graphs.adapters import build_spec
from graphs.ids import parse_edge
from tests.conftest import make_tiny, random_ids
from tests.hook_oracle import single_edge_logits, ungroup_kv

TOL = 1e-4

EDGES_SEQUENTIAL = [
    "input->a0.h1<q>",
    "input->a1.h0<k>",
    "input->a1.h4<v>",
    "a0.h1->a2.h3<v>",
    "a0.h2->a1.h0<q>",
    "a1.h3->a2.h1<k>",
    "m0->a1.h2<q>",
    "m0->a2.h4<k>",
    "a1.h2->m1",
    "input->m0",
    "a0.h0->m0",
    "m0->m1",
    "m1->logits",
    "a1.h4->logits",
    "input->logits",
]


def _edges_for(model_name: str, n_layers: int) -> list[str]:
    edges = [e for e in EDGES_SEQUENTIAL if all(int(c) < n_layers for c in _layers_in(e))]
    if model_name == "neox-parallel":  # an MLP does not read its own layer's heads
        edges = [e for e in edges if e not in ("a1.h2->m1", "a0.h0->m0")] + ["a0.h2->m1"]
    return edges


def _layers_in(edge: str) -> list[str]:
    import re

    return re.findall(r"(?:a|m)(\d+)", edge)


def test_no_ablation_matches_hf(tiny_name: str) -> None:
    model = make_tiny(tiny_name)
    spec = build_spec(model)
    ids = random_ids(3, 11)
    with torch.no_grad():
        ours = rt.run(spec, ids).logits
        theirs = model(ids).logits
    assert (ours - theirs).abs().max().item() <= TOL


def test_all_edges_ablated_matches_corrupted_run(tiny_name: str) -> None:
    model = make_tiny(tiny_name)
    spec = build_spec(model)
    clean, corrupted = random_ids(3, 11, seed=1), random_ids(3, 11, seed=2)
    every_edge = spec.graph.edge_mask
    with torch.no_grad():
        ours = rt.run(spec, clean, mask=every_edge, ablation=rt.corrupted_values(spec, corrupted)).logits
        theirs = model(corrupted).logits
        clean_logits = model(clean).logits
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - clean_logits).abs().max().item() > 100 * TOL  # the test can tell the two apart


def test_one_edge_matches_forward_hooks(tiny_name: str) -> None:
    model = make_tiny(tiny_name)
    spec = build_spec(model)
    g = spec.graph
    clean, corrupted = random_ids(2, 9, seed=3), random_ids(2, 9, seed=4)
    values = rt.corrupted_values(spec, corrupted)
    with torch.no_grad():
        base = model(clean).logits
    for text in _edges_for(tiny_name, g.n_layers):
        edge = parse_edge(text)
        s, r = g.edge_index(edge)
        mask = torch.zeros(g.n_senders, g.n_receivers)
        mask[s, r] = 1.0
        with torch.no_grad():
            ours = rt.run(spec, clean, mask=mask, ablation=values).logits
        theirs = single_edge_logits(model, clean, corrupted, edge)
        assert (ours - theirs).abs().max().item() <= TOL, text
        assert (theirs - base).abs().max().item() > 10 * TOL, f"{text} has no effect: the check is vacuous"


def test_ungrouped_oracle_model_is_equivalent() -> None:
    model = make_tiny("llama-gqa")
    wide = ungroup_kv(model)
    ids = random_ids(2, 7)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, wide(ids).logits, atol=1e-5)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_runtime_leaves_model_untouched(tiny_name: str) -> None:
    model = make_tiny(tiny_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = _hook_count(model)
    spec = build_spec(model)
    clean, corrupted = random_ids(2, 8, seed=5), random_ids(2, 8, seed=6)
    values = rt.corrupted_values(spec, corrupted)
    mask = torch.rand(spec.graph.n_senders, spec.graph.n_receivers)
    rt.run(spec, clean, mask=mask, ablation=values)
    rt.receiver_gradients(spec, clean, lambda lo: lo[:, -1].logsumexp(-1).sum(), mask=mask, ablation=values)
    assert _hook_count(model) == hooks
    assert not model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_real_padding_is_inert() -> None:
    """Right padding never changes logits at real positions (so prompts of different length batch)."""
    model = make_tiny("llama-gqa")
    spec = build_spec(model)
    short = random_ids(1, 6, seed=7)
    padded = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = rt.run(spec, short).logits[:, :6]
        b = rt.run(spec, padded).logits[:, :6]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64])
def test_exact_in_float64(dtype: torch.dtype) -> None:
    model = make_tiny("gpt2", dtype=dtype)
    spec = build_spec(model)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert (rt.run(spec, ids).logits - model(ids).logits).abs().max().item() < 1e-10
