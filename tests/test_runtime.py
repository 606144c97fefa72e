"""Runtime semantics beyond the exactness contract: masks, ablation values, gradients, bad input."""

from __future__ import annotations

import pytest
import torch

from graphs import runtime as rt
from graphs.adapters import build_spec
from graphs.adapters.spec import ModelSpec
from graphs.ids import Slot
from tests.conftest import make_tiny, random_ids


def _spec(name: str = "llama-gqa", dtype: torch.dtype = torch.float32) -> ModelSpec:
    return build_spec(make_tiny(name, dtype=dtype))


def _constants(spec: ModelSpec, T: int) -> torch.Tensor:
    """c_logits: what the logits receiver reads besides senders (positions and output biases)."""
    c = torch.zeros(T, spec.d_model, dtype=spec.dtype)
    if spec.W_pos is not None:
        c = c + spec.W_pos[:T]
    for layer in spec.layers:
        if layer.attn.b_O is not None:
            c = c + layer.attn.b_O
    return c


@pytest.mark.parametrize("name", ["gpt2", "neox-parallel", "qwen2-bias", "gemma2", "gemma3"])
def test_senders_sum_to_final_residual(name: str) -> None:
    """The residual-stream rewrite: logits = unembed(c + sum of every sender's output)."""
    spec = _spec(name)
    ids = random_ids(2, 8)
    with torch.no_grad():
        out = rt.run(spec, ids, keep_senders=True)
        rebuilt = rt.unembed(spec, out.senders.sum(2) + _constants(spec, 8))
        embedded = rt.embed(spec, ids)
    assert torch.allclose(rebuilt, out.logits, atol=1e-4)
    assert torch.equal(out.senders[:, :, 0], embedded)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2", "gemma3"])
def test_per_row_masks_equal_separate_runs(name: str) -> None:
    spec = _spec(name)
    g = spec.graph
    clean, corrupted = random_ids(1, 9, seed=1), random_ids(1, 9, seed=2)
    values = rt.corrupted_values(spec, corrupted)
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, g.n_senders, g.n_receivers, generator=gen) < 0.3).float()
    with torch.no_grad():
        batched = rt.run(spec, clean.expand(3, -1), mask=masks, ablation=values).logits
        for i in range(3):
            single = rt.run(spec, clean, mask=masks[i], ablation=values).logits
            assert torch.allclose(batched[i], single[0], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
def test_fractional_mask_on_logits_interpolates_residuals(name: str) -> None:
    """With only the edges into logits ablated by a fraction f, the final residual is the clean one
    moved a fraction f of the way to the corrupted one (all constants cancel)."""
    spec = _spec(name)
    g = spec.graph
    clean, corrupted = random_ids(2, 8, seed=3), random_ids(2, 8, seed=4)
    values = rt.corrupted_values(spec, corrupted)
    f = 0.3
    mask = torch.zeros(g.n_senders, g.n_receivers)
    mask[:, g.logits_receiver] = f
    c = _constants(spec, 8)
    with torch.no_grad():
        ours = rt.run(spec, clean, mask=mask, ablation=values).logits
        clean_res = rt.sender_outputs(spec, clean).sum(2) + c
        corr_res = values.values.sum(2) + c
        expected = rt.unembed(spec, clean_res + f * (corr_res - clean_res))
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-mqa", "gemma3"])
def test_zero_ablating_everything_leaves_only_constants(name: str) -> None:
    spec = _spec(name)
    ids = random_ids(2, 7)
    with torch.no_grad():
        out = rt.run(spec, ids, mask=spec.graph.edge_mask, ablation=rt.zero_values(spec)).logits
    expected = rt.unembed(spec, _constants(spec, 7)).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-5)


def test_mean_values_are_masked_means_over_real_tokens() -> None:
    spec = _spec()
    ids = random_ids(5, 8, seed=9)
    lengths = torch.tensor([8, 3, 5, 8, 1])
    cache = rt.sender_outputs(spec, ids)  # [5, 8, S, d]
    keep = torch.arange(8)[None, :] < lengths[:, None]
    flat = torch.cat([cache[b, : int(lengths[b])] for b in range(5)], dim=0)  # [tokens, S, d]
    mean = rt.mean_values(spec, ids, lengths, chunk_size=2)
    assert mean.values.shape == (1, 1, spec.graph.n_senders, spec.d_model)
    assert torch.allclose(mean.values[0, 0], flat.mean(0), atol=1e-5)
    pos = rt.mean_values(spec, ids, lengths, positional=True, chunk_size=3)
    assert pos.values.shape == (1, 8, spec.graph.n_senders, spec.d_model)
    for t in (0, 2, 6):
        rows = keep[:, t]
        assert torch.allclose(pos.values[0, t], cache[rows, t].mean(0), atol=1e-5)


def test_read_positions_pick_the_same_logits() -> None:
    spec = _spec("neox-sequential")
    ids = random_ids(3, 9)
    where = torch.tensor([8, 2, 5])
    with torch.no_grad():
        full = rt.run(spec, ids).logits
        picked = rt.run(spec, ids, read_positions=where).logits
    assert torch.allclose(picked, full[torch.arange(3), where], atol=1e-6)


def test_input_embedding_override() -> None:
    spec = _spec("gpt2")
    ids = random_ids(2, 6)
    with torch.no_grad():
        a = rt.run(spec, ids).logits
        b = rt.run(spec, ids, input_embeddings=rt.embed(spec, ids)).logits
        c = rt.run(spec, ids, input_embeddings=torch.zeros(2, 6, spec.d_model)).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "gemma2", "gemma3"])
def test_receiver_gradients_match_mask_gradients(name: str) -> None:
    """d m / d M[u, r] = sum_{b,t} (A_u - a_u) . d m / d in_r : the runtime's receiver gradients
    agree with autograd through the mask itself (this is the EAP identity)."""
    spec = _spec(name, torch.float64)
    g = spec.graph
    clean, corrupted = random_ids(2, 7, seed=5), random_ids(2, 7, seed=6)
    values = rt.corrupted_values(spec, corrupted)
    metric = lambda lo: lo[:, -1, 3].sum() - lo[:, -1, 5].sum()  # noqa: E731
    _, grads = rt.receiver_gradients(spec, clean, metric)  # [B, T, R, d]
    deltas = values.values - rt.sender_outputs(spec, clean)  # [B, T, S, d]
    predicted = torch.einsum("btsd,btrd->sr", deltas, grads) * g.edge_mask

    mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, requires_grad=True)
    value = metric(rt.run(spec, clean, mask=mask, ablation=values).logits)
    (through_mask,) = torch.autograd.grad(value, mask)
    assert torch.allclose(predicted, through_mask * g.edge_mask, atol=1e-9, rtol=1e-7)
    assert predicted.abs().max() > 1e-3


@pytest.mark.parametrize("name", ["qwen2-bias", "gemma2", "gemma3"])
def test_receiver_gradients_match_finite_differences(name: str) -> None:
    spec = _spec(name, torch.float64)
    g = spec.graph
    clean, corrupted = random_ids(2, 6, seed=7), random_ids(2, 6, seed=8)
    values = rt.corrupted_values(spec, corrupted)
    metric = lambda lo: lo[:, -1].log_softmax(-1)[:, 7].sum()  # noqa: E731
    _, grads = rt.receiver_gradients(spec, clean, metric)
    deltas = values.values - rt.sender_outputs(spec, clean)
    eps = 1e-5
    gen = torch.Generator().manual_seed(1)
    edges = list(g.edges())
    for k in torch.randint(0, len(edges), (12,), generator=gen).tolist():
        s, r = g.edge_index(edges[k])
        mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
        mask[s, r] = eps
        with torch.no_grad():
            up = metric(rt.run(spec, clean, mask=mask, ablation=values).logits)
            down = metric(rt.run(spec, clean, mask=-mask, ablation=values).logits)
        fd = (up - down) / (2 * eps)
        analytic = (deltas[:, :, s] * grads[:, :, r]).sum()
        assert torch.isclose(fd, analytic, atol=1e-6, rtol=1e-5), str(edges[k])


def test_slot_gradients_are_separate() -> None:
    """q, k and v slots of one head read the same value but get different gradients."""
    spec = _spec("gpt2")
    g = spec.graph
    _, grads = rt.receiver_gradients(spec, random_ids(2, 6), lambda lo: lo[:, -1, 1].sum())
    q = grads[:, :, g.slot_receiver(1, 2, Slot.Q)]
    k = grads[:, :, g.slot_receiver(1, 2, Slot.K)]
    v = grads[:, :, g.slot_receiver(1, 2, Slot.V)]
    assert not torch.allclose(q, k) and not torch.allclose(k, v)


def test_bad_inputs_have_clear_errors() -> None:
    spec = _spec("gpt2")
    g = spec.graph
    ids = random_ids(2, 6)
    values = rt.corrupted_values(spec, random_ids(2, 6, seed=3))
    with pytest.raises(rt.RuntimeInputError, match="senders x receivers"):
        rt.run(spec, ids, mask=torch.zeros(3, 3), ablation=values)
    with pytest.raises(rt.RuntimeInputError, match="ablation values"):
        rt.run(spec, ids, mask=g.edge_mask)
    with pytest.raises(rt.RuntimeInputError, match="token length"):
        rt.run(spec, ids, mask=g.edge_mask, ablation=rt.corrupted_values(spec, random_ids(2, 7)))
    with pytest.raises(rt.RuntimeInputError, match="token ids"):
        rt.run(spec, torch.full((1, 3), 10_000))
    with pytest.raises(rt.RuntimeInputError, match="exceeds"):
        rt.run(spec, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(rt.RuntimeInputError, match="non-empty"):
        rt.mean_values(spec, torch.zeros(0, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- intervention forms


def _paths_agree(spec: ModelSpec, ids: torch.Tensor, mask: torch.Tensor, values: rt.AblationValues) -> None:
    """The fast mixer (active senders, complement sums) equals the plain differentiable einsum."""
    with torch.no_grad():
        fast = rt.run(spec, ids, mask=mask, ablation=values).logits
    plain = rt.run(spec, ids, mask=mask.clone().requires_grad_(True), ablation=values).logits.detach()
    assert torch.allclose(fast, plain, atol=1e-5), (fast - plain).abs().max()


@pytest.mark.parametrize("density", [0.02, 0.5, 0.97])
@pytest.mark.parametrize("name", ["gpt2", "neox-parallel", "gemma2"])
def test_fast_mixer_equals_plain_einsum(name: str, density: float) -> None:
    spec = _spec(name)
    g = spec.graph
    ids, corrupted = random_ids(4, 7, seed=11), random_ids(4, 7, seed=12)
    values = rt.corrupted_values(spec, corrupted)
    gen = torch.Generator().manual_seed(int(density * 100))
    frac = torch.rand(g.n_senders, g.n_receivers, generator=gen)
    mask = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < density) * frac
    _paths_agree(spec, ids, mask, values)
    grid = (torch.rand(2, g.n_senders, g.n_receivers, generator=gen) < density).float()
    _paths_agree(spec, ids, grid, values)


def test_grid_masks_equal_separate_runs() -> None:
    """[K, S, R] masks over K groups of P prompts (values per prompt) = K separate shared-mask runs."""
    spec = _spec("qwen2-bias")
    g = spec.graph
    P, K = 3, 2
    ids, corrupted = random_ids(P, 8, seed=13), random_ids(P, 8, seed=14)
    values = rt.corrupted_values(spec, corrupted)  # [P, T, S, d]: shared by the K groups
    gen = torch.Generator().manual_seed(2)
    masks = (torch.rand(K, g.n_senders, g.n_receivers, generator=gen) < 0.6).float()
    with torch.no_grad():
        grid = rt.run(spec, ids.repeat(K, 1), mask=masks, ablation=values).logits.view(K, P, 8, -1)
        for k in range(K):
            alone = rt.run(spec, ids, mask=masks[k], ablation=values).logits
            assert torch.allclose(grid[k], alone, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "gemma2", "gemma3"])
@pytest.mark.parametrize("differ", ["q", "k+v", "mlp", "logits", "none"])
def test_groups_that_agree_until_one_receiver_equal_separate_runs(name: str, differ: str) -> None:
    """ACDC's grids: K masks equal everywhere but in some receivers' columns, resumed at a layer.
    The grid is computed once for its prompts until the first receiver whose mask differs between
    groups (then only the heads with a differing slot, or the MLP, per group), and the mixer mixes
    the shared prefix's deltas once for all groups. Each group must equal its own run, wherever the
    groups part: a query slot, the key and value slots of two heads, the MLP, the logits, or nowhere."""
    spec = _spec(name)
    g = spec.graph
    H = g.n_heads
    P, K, layer = 2, 3, 1
    ids, corrupted = random_ids(P, 7, seed=21), random_ids(P, 7, seed=22)
    values = rt.corrupted_values(spec, corrupted)
    clean = rt.clean_run(spec, ids)
    gen = torch.Generator().manual_seed(5)
    qkv = g.qkv_receivers(layer)
    columns = {
        "q": [qkv.start + 1],
        "k+v": [qkv.start + H + 0, qkv.start + 2 * H + 2],
        "mlp": [g.mlp_receiver(layer)],
        "logits": [g.logits_receiver],
        "none": [],
    }[differ]
    for density in (0.1, 0.9):  # direct sums and complement sums
        base = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < density).float() * g.edge_mask
        base[:, : qkv.start] = 0
        masks = base.repeat(K, 1, 1)
        for r in columns:
            for k in range(1, K):
                masks[k, : g.n_upstream[r], r] = (torch.rand(g.n_upstream[r], generator=gen) < 0.5).float()
        with torch.no_grad():
            grid = rt.run(spec, ids.repeat(K, 1), mask=masks, ablation=values, start=clean.at(spec, layer)).logits
            for k in range(K):
                alone = rt.run(spec, ids, mask=masks[k], ablation=values).logits
                assert torch.allclose(grid[k * P : (k + 1) * P], alone, atol=1e-5), (density, k)


@pytest.mark.parametrize("name", ["gpt2", "neox-parallel", "gemma2"])
def test_logits_at_read_positions_equal_the_full_logits_there(name: str) -> None:
    """With ``read_positions`` the last MLP runs at those positions only; the logits there must be
    those of the full run, fresh or resumed, for a shared mask, a grid of masks and a grid whose
    groups agree up to one receiver."""
    spec = _spec(name)
    g = spec.graph
    P, K = 3, 2
    ids, corrupted = random_ids(P, 8, seed=23), random_ids(P, 8, seed=24)
    values = rt.corrupted_values(spec, corrupted)
    where = torch.tensor([7, 3, 5])
    clean = rt.clean_run(spec, ids)
    gen = torch.Generator().manual_seed(6)
    layer = g.n_layers - 1
    first = g.qkv_receivers(layer).start
    mask = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < 0.5).float() * g.edge_mask
    grid = (torch.rand(K, g.n_senders, g.n_receivers, generator=gen) < 0.5).float() * g.edge_mask
    with torch.no_grad():
        full = rt.run(spec, ids, mask=mask, ablation=values).logits  # [P, T, V]
        read = rt.run(spec, ids, mask=mask, ablation=values, read_positions=where).logits  # [P, V]
        assert torch.allclose(read, full[torch.arange(P), where], atol=1e-5)
        full = rt.run(spec, ids.repeat(K, 1), mask=grid, ablation=values).logits
        read = rt.run(spec, ids.repeat(K, 1), mask=grid, ablation=values, read_positions=where.repeat(K)).logits
        assert torch.allclose(read, full[torch.arange(K * P), where.repeat(K)], atol=1e-5)
        start = clean.at(spec, layer)
        for r in (first + 1, g.logits_receiver):  # the groups part at a query slot, at the logits
            late = mask.repeat(K, 1, 1)
            late[:, :, :first] = 0
            late[1, :, r] = (1.0 - late[1, :, r]) * g.edge_mask[:, r]
            full = rt.run(spec, ids.repeat(K, 1), mask=late, ablation=values, start=start).logits
            read = rt.run(
                spec, ids.repeat(K, 1), mask=late, ablation=values, start=start, read_positions=where.repeat(K)
            ).logits
            assert torch.allclose(read, full[torch.arange(K * P), where.repeat(K)], atol=1e-5), r


def test_sparse_edits_equal_one_hot_masks() -> None:
    spec = _spec("llama-gqa")
    g = spec.graph
    P = 2
    ids, corrupted = random_ids(P, 7, seed=15), random_ids(P, 7, seed=16)
    values = rt.corrupted_values(spec, corrupted)
    edges = [e for i, e in enumerate(g.edges()) if i % 37 == 0]
    senders = torch.tensor([g.edge_index(e)[0] for e in edges])
    receivers = torch.tensor([g.edge_index(e)[1] for e in edges])
    edits = rt.SparseEdits.one_edge_per_row(senders, receivers, P)
    masks = torch.zeros(len(edges), g.n_senders, g.n_receivers)
    masks[torch.arange(len(edges)), senders, receivers] = 1.0
    with torch.no_grad():
        sparse = rt.run(spec, ids.repeat(len(edges), 1), edits=edits, ablation=values).logits
        dense = rt.run(spec, ids.repeat(len(edges), 1), mask=masks, ablation=values).logits
    assert torch.allclose(sparse, dense, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "neox-parallel", "llama-mqa", "gemma3"])
def test_checkpoint_resume_equals_full_run(name: str) -> None:
    spec = _spec(name)
    g = spec.graph
    P = 3
    ids, corrupted = random_ids(P, 8, seed=17), random_ids(P, 8, seed=18)
    values = rt.corrupted_values(spec, corrupted)
    where = torch.tensor([7, 3, 5])
    clean = rt.clean_run(spec, ids)
    gen = torch.Generator().manual_seed(3)
    for layer in range(g.n_layers + 1):
        first = g.qkv_receivers(layer).start if layer < g.n_layers else g.logits_receiver
        masks = (torch.rand(2, g.n_senders, g.n_receivers, generator=gen) < 0.4).float()
        masks[:, :, :first] = 0
        with torch.no_grad():
            full = rt.run(spec, ids.repeat(2, 1), mask=masks, ablation=values, read_positions=where.repeat(2)).logits
            resumed = rt.run(
                spec, ids.repeat(2, 1), mask=masks, ablation=values, read_positions=where.repeat(2),
                start=clean.at(spec, layer),
            ).logits
        assert torch.allclose(full, resumed, atol=1e-5), layer
        # sparse edits resume too
        s, r = torch.nonzero(masks[0] * g.edge_mask, as_tuple=True)
        if s.numel():
            edits = rt.SparseEdits(torch.zeros_like(s), s, r, torch.ones(s.numel()))
            one = rt.run(spec, ids[:1], edits=edits, ablation=rt.AblationValues("c", values.values[:1]),
                         start=rt.Checkpoint(layer, clean.resid[layer][:1], clean.senders[:1, :, : g.attention_upstream(layer) if layer < g.n_layers else g.n_senders]))
            ref = rt.run(spec, ids[:1], mask=masks[0], ablation=rt.AblationValues("c", values.values[:1]))
            assert torch.allclose(one.logits, ref.logits, atol=1e-5)


def test_checkpoint_refuses_earlier_interventions() -> None:
    spec = _spec("gpt2")
    g = spec.graph
    ids = random_ids(2, 6)
    clean = rt.clean_run(spec, ids)
    values = rt.corrupted_values(spec, random_ids(2, 6, seed=5))
    mask = torch.zeros(g.n_senders, g.n_receivers)
    mask[0, g.mlp_receiver(0)] = 1
    with pytest.raises(rt.RuntimeInputError, match="before the checkpoint"):
        rt.run(spec, ids, mask=mask, ablation=values, start=clean.at(spec, 1))


def test_sparse_edits_must_be_edges() -> None:
    spec = _spec("gpt2")
    g = spec.graph
    ids = random_ids(1, 5)
    values = rt.corrupted_values(spec, random_ids(1, 5, seed=2))
    bad = rt.SparseEdits(torch.tensor([0]), torch.tensor([g.mlp_sender(2)]), torch.tensor([g.mlp_receiver(0)]), torch.ones(1))
    with pytest.raises(ValueError, match="not an edge"):
        rt.run(spec, ids, edits=bad, ablation=values)
