"""Trials that change one receiver's incoming edges, recomputing only what the kept edges reach,
must give the logits of a full run with each trial's mask (the oracle: ``runtime.run``)."""

from __future__ import annotations

import pytest
import torch

from graphs import downstream
from graphs import runtime as rt
from graphs.adapters import build_spec
from tests.conftest import POST_NORM_MODELS, TINY_MODELS, make_tiny, random_ids


def _receivers(g) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {
        "q of the first layer": g.slot_receiver(0, 1, "q"),
        "k of a middle layer": g.qkv_receivers(1).start + g.n_heads + 0,
        "v of the last layer": g.qkv_receivers(g.n_layers - 1).start + 2 * g.n_heads + 1,
        "first MLP": g.mlp_receiver(0),
        "last MLP": g.mlp_receiver(g.n_layers - 1),
        "logits": g.logits_receiver,
    }


@pytest.mark.parametrize("name", sorted(set(TINY_MODELS) - POST_NORM_MODELS))
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_column_trials_equal_full_runs(name: str, density: float) -> None:
    """For every kind of receiver and mostly kept, half kept and mostly ablated circuits: K trials
    (each ablating and restoring some of the receiver's edges) equal K full runs."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    P, T, K = 3, 7, 4
    ids, corrupted = random_ids(P, T, seed=31), random_ids(P, T, seed=32)
    values = rt.corrupted_values(spec, corrupted)
    read = torch.tensor([6, 2, 4])
    gen = torch.Generator().manual_seed(int(density * 100))
    for where, r in _receivers(g).items():
        mask = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < density) & g.edge_mask
        base = downstream.base_run(spec, ids, mask, values, read)
        n = g.n_upstream[r]
        column = torch.rand(K, n, generator=gen) < 0.5
        column[0] = mask[:n, r]  # a trial equal to the base run
        got = downstream.column_trials(spec, base, r, column, values)  # [K*P, V]
        masks = mask.repeat(K, 1, 1)
        masks[:, :n, r] = column
        with torch.no_grad():
            want = rt.run(spec, ids.repeat(K, 1), mask=masks, ablation=values, read_positions=read.repeat(K)).logits
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (where, float((got - want).abs().max()))


def test_post_norm_models_are_not_supported() -> None:
    assert not downstream.supports(build_spec(make_tiny("gemma2")))
    assert downstream.supports(build_spec(make_tiny("gpt2")))


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "mistral-window"])
def test_updating_the_base_run_column_by_column_equals_a_fresh_run(name: str, reuse: bool) -> None:
    """ACDC moves its base run from receiver to receiver with ``with_column``: after setting the
    columns of the logits, the last MLP and slots of the last two layers one by one, every sender
    output, every receiver input and the logits equal those of a fresh run with the final mask,
    whether each step copies the base run or writes into it (``reuse``, as ACDC does)."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    P, T = 2, 6
    ids, corrupted = random_ids(P, T, seed=41), random_ids(P, T, seed=42)
    values = rt.corrupted_values(spec, corrupted)
    read = torch.tensor([5, 3])
    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    base = downstream.base_run(spec, ids, mask, values, read)
    later = range(g.qkv_receivers(g.n_layers - 2).start, g.n_receivers)
    for r in reversed(later):
        column = torch.rand(g.n_upstream[r], generator=gen) < 0.8
        base = downstream.with_column(spec, base, r, column, values, reuse=reuse)
        mask[: column.shape[0], r] = column
    fresh = downstream.base_run(spec, ids, mask, values, read)
    assert torch.equal(base.mask, fresh.mask)
    assert torch.allclose(base.senders, fresh.senders, atol=2e-5)
    assert torch.allclose(base.inputs, fresh.inputs, atol=2e-5)
    assert torch.allclose(base.patterns, fresh.patterns, atol=2e-5)
    assert not torch.allclose(base.inputs, downstream.base_run(spec, ids, mask & False, values, read).inputs, atol=1e-3)


def test_with_column_leaves_the_base_run_alone_unless_asked_to_reuse_it() -> None:
    """Without ``reuse`` the given base run is unchanged; with it the result is the same, written
    into the given run's tensors."""
    spec = build_spec(make_tiny("llama-gqa"))
    g = spec.graph
    ids, corrupted = random_ids(2, 6, seed=61), random_ids(2, 6, seed=62)
    values = rt.corrupted_values(spec, corrupted)
    read = torch.tensor([5, 4])
    mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    r = g.mlp_receiver(g.n_layers - 2)
    column = torch.ones(g.n_upstream[r], dtype=torch.bool)  # every edge into the MLP ablated
    base = downstream.base_run(spec, ids, mask, values, read)
    senders, inputs = base.senders.clone(), base.inputs.clone()
    copied = downstream.with_column(spec, base, r, column, values)
    assert torch.equal(base.senders, senders) and torch.equal(base.inputs, inputs)
    assert not torch.equal(copied.senders, senders)  # the column changed the run downstream
    reused = downstream.with_column(spec, base, r, column, values, reuse=True)
    assert reused.senders.data_ptr() == base.senders.data_ptr()
    assert reused.inputs.data_ptr() == base.inputs.data_ptr()
    assert reused.patterns.data_ptr() == base.patterns.data_ptr()
    assert torch.equal(reused.senders, copied.senders) and torch.equal(reused.inputs, copied.inputs)
    assert torch.equal(reused.patterns, copied.patterns) and torch.equal(reused.mask, copied.mask)


def test_trials_equal_to_the_base_run_change_nothing() -> None:
    """Columns equal to the base run's (nothing to recompute) give the base run's logits and leave
    it as it is."""
    spec = build_spec(make_tiny("gpt2"))
    g = spec.graph
    ids, corrupted = random_ids(2, 5, seed=51), random_ids(2, 5, seed=52)
    values = rt.corrupted_values(spec, corrupted)
    read = torch.tensor([4, 2])
    mask = (torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(4)) < 0.5) & g.edge_mask
    base = downstream.base_run(spec, ids, mask, values, read)
    r = g.mlp_receiver(0)
    column = mask[: g.n_upstream[r], r]
    got = downstream.column_trials(spec, base, r, column.repeat(3, 1), values)
    with torch.no_grad():
        want = rt.run(spec, ids, mask=mask, ablation=values, read_positions=read).logits
    assert torch.allclose(got, want.repeat(3, 1), atol=2e-5)
    same = downstream.with_column(spec, base, r, column, values)
    assert torch.equal(same.senders, base.senders) and torch.equal(same.inputs, base.inputs)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "mistral-window"])
@pytest.mark.parametrize("read_by", ["mlps", "a query", "a value", "a key"])
def test_senders_read_only_at_the_read_positions_are_computed_there(name: str, read_by: str) -> None:
    """A sender whose kept edges reach the logits only through MLPs and queries matters at the read
    positions alone, so trials compute it there; one whose output a key or value reads is needed
    everywhere. Either way the trials equal full runs."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    L = g.n_layers
    P, T, K = 3, 7, 5
    ids, corrupted = random_ids(P, T, seed=41), random_ids(P, T, seed=42)
    values = rt.corrupted_values(spec, corrupted)
    read = torch.tensor([6, 3, 5])
    m0, m1, last, head = g.mlp_sender(0), g.mlp_sender(1), g.mlp_sender(L - 1), g.head_sender(1, 0)
    mask = g.edge_mask.clone()  # everything ablated but for the edges below
    mask[0] = False  # the embedding feeds every node
    for s, r in ((m0, g.mlp_receiver(1)), (m1, g.logits_receiver), (m0, g.logits_receiver),
                 (last, g.logits_receiver), (head, g.logits_receiver)):
        mask[s, r] = False
    slot = {"a query": "q", "a value": "v", "a key": "k"}.get(read_by)
    if slot is not None:
        mask[m0, g.slot_receiver(1, 0, slot)] = False
    base = downstream.base_run(spec, ids, mask, values, read)
    narrow = base.narrow(g)
    assert {m1, last, head} <= narrow
    assert (m0 in narrow) == (read_by in ("mlps", "a query"))
    r = g.mlp_receiver(0)
    n = g.n_upstream[r]
    column = torch.rand(K, n, generator=torch.Generator().manual_seed(5)) < 0.5
    got = downstream.column_trials(spec, base, r, column, values)  # [K*P, V]
    masks = mask.repeat(K, 1, 1)
    masks[:, :n, r] = column
    with torch.no_grad():
        want = rt.run(spec, ids.repeat(K, 1), mask=masks, ablation=values, read_positions=read.repeat(K)).logits
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(got[:P], got[P : 2 * P])  # the trials differ


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_trials_at_the_read_positions_equal_trials_at_every_position(name: str) -> None:
    """Trials at the read positions equal trials at every position, on sparse circuits where most
    senders are narrow."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    P, T, K = 2, 6, 6
    ids, corrupted = random_ids(P, T, seed=51), random_ids(P, T, seed=52)
    values = rt.corrupted_values(spec, corrupted)
    read = torch.tensor([5, 4])
    gen = torch.Generator().manual_seed(3)
    for r in (g.mlp_receiver(0), g.slot_receiver(0, 1, "v"), g.slot_receiver(1, 0, "q")):
        mask = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < 0.9) & g.edge_mask
        base = downstream.base_run(spec, ids, mask, values, read)
        assert base.narrow(g)  # some senders are narrow, so the two paths differ
        column = torch.rand(K, g.n_upstream[r], generator=gen) < 0.5
        narrow = downstream.column_finals(spec, base, r, column, values)
        wide = downstream.column_finals(spec, base, r, column, values, at_read_positions=False)
        assert torch.allclose(narrow, wide, atol=1e-5, rtol=1e-5)
