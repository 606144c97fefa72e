"""The pure-python helpers of the peer benchmarks (benchmarks/peers): model options and circuit overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.peers import compare, data


def test_random_gpt2_options_have_their_own_sizes_and_folders() -> None:
    assert set(data.GPT2_RANDOM_CONFIGS) == {"gpt2-random", "gpt2-tiny-random"}
    assert set(data.GPT2_RANDOM_CONFIGS) < set(data.MODELS)
    # the 6-layer model keeps the folder name (and so the cached weights) it had before the tiny one
    assert data.gpt2_random_tag("gpt2-random") == "gpt2-random-l6-h8-d256-s0"
    assert data.gpt2_random_tag("gpt2-tiny-random") == "gpt2-tiny-random-l3-h4-d128-s0"
    for name, sizes in data.GPT2_RANDOM_CONFIGS.items():
        config = data.gpt2_random_config(name, vocab_size=1000, bos_token_id=1, eos_token_id=2)
        assert (config.n_layer, config.n_head, config.n_embd) == (sizes["n_layer"], sizes["n_head"], sizes["n_embd"])
        assert config.n_embd % config.n_head == 0
        assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (1000, 1, 2)
        assert f"{sizes['n_layer']} layers, {sizes['n_head']} heads, d_model {sizes['n_embd']}" in data.MODELS[name]
    tiny, full = data.GPT2_RANDOM_CONFIGS["gpt2-tiny-random"], data.GPT2_RANDOM_CONFIGS["gpt2-random"]
    assert tiny["n_layer"] < full["n_layer"] and tiny["n_head"] < full["n_head"]


def test_unknown_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        data.model_folder("gpt2-huge-random", tmp_path)
    with pytest.raises(KeyError):
        data.gpt2_random_tag("smollm2")


def test_circuit_agreement_counts_overlap_on_common_edges() -> None:
    ours = {e: 0.0 for e in ("a", "b", "c", "d", "only_ours")}
    theirs = {e: 0.0 for e in ("a", "b", "c", "d", "only_theirs")}
    r = compare.circuit_agreement(ours, theirs, {"a", "b", "c", "only_ours"}, {"b", "c", "d", "only_theirs"})
    assert (r["kept_ours"], r["kept_theirs"], r["kept_both"]) == (3, 3, 2)  # edges outside both graphs ignored
    assert (r["kept_only_ours"], r["kept_only_theirs"]) == (1, 1)
    assert r["jaccard"] == pytest.approx(2 / 4)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["kept_only_ours_examples"] == ["a"] and r["kept_only_theirs_examples"] == ["d"]
    lopsided = compare.circuit_agreement(ours, theirs, {"a"}, {"a", "b"})
    assert (lopsided["precision"], lopsided["recall"], lopsided["jaccard"]) == (1.0, 0.5, 0.5)
    empty = compare.circuit_agreement(ours, theirs, set(), set())
    assert (empty["jaccard"], empty["precision"], empty["recall"]) == (1.0, 1.0, 1.0)


def _acdc_experiment():  # -> Experiment
    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from graphs.adapters import build_spec
    from tests.conftest import make_tiny, random_task

    return Experiment(build_spec(make_tiny("gpt2-mini")), random_task(4, 6, seed=5), make_metric("kl"), batch_size=2)


def test_replay_in_our_order_gives_our_acdc_circuit() -> None:
    """Without skipping edges into dead nodes and one evaluation per edge, the replay of our own
    order finds the circuit of ``acdc`` (edges into dead nodes change nothing, so they go)."""
    import torch

    from benchmarks.peers.replay import our_order, replay_acdc
    from circuits.methods.acdc import acdc

    exp = _acdc_experiment()
    g = exp.spec.graph
    order = our_order(exp)
    assert len(order) == g.n_edges == len(set(order))
    ours = acdc(exp, 0.01)
    kept = int(ours.circuit.in_circuit.sum())
    assert 0 < kept < g.n_edges  # a circuit that is neither empty nor everything
    rep = replay_acdc(exp, 0.01, order)
    assert rep.evaluations == g.n_edges
    assert torch.equal(rep.kept, ours.circuit.in_circuit)
    assert rep.metric == pytest.approx(ours.metric, abs=1e-6)


def test_replay_follows_the_given_order_and_rejects_bad_orders() -> None:
    import torch

    from benchmarks.peers.replay import our_order, replay_acdc

    exp = _acdc_experiment()
    g = exp.spec.graph
    order = our_order(exp)
    # removing everything (tau huge) in any order leaves nothing; tau 0 (nothing removable
    # unless it changes nothing) keeps a subset of the graph
    assert not bool(replay_acdc(exp, 1e9, list(reversed(order))).kept.any())
    kept = replay_acdc(exp, 0.0, order[::-1]).kept
    assert not bool((kept & ~g.edge_mask).any())
    with pytest.raises(ValueError, match="each of the"):
        replay_acdc(exp, 0.01, order[:-1])
    with pytest.raises(ValueError, match="each of the"):
        replay_acdc(exp, 0.01, [*order[:-1], order[0]])
    assert torch.is_tensor(kept)


class _FakeNode:
    def __init__(self, layer: int) -> None:
        self.module_name = f"blocks.{layer}.hook_attn_in"


class _FakeEdge:
    def __init__(self, name: str, layer: int) -> None:
        self.name = name
        self.dest = _FakeNode(layer)


class _FakePatchable:
    """Stands in for auto-circuit's PatchableModel: edges and a forward that takes start_at_layer."""

    def __init__(self, edges_per_layer: dict[int, int]) -> None:
        self.edges = {_FakeEdge(f"e{layer}.{i}", layer) for layer, n in edges_per_layer.items() for i in range(n)}
        self.calls: list[int | None] = []

    def forward(self, *args: object, start_at_layer: int | None = None) -> None:
        self.calls.append(start_at_layer)


def test_sampled_acdc_estimate_visits_a_few_edges_per_layer_and_extrapolates_by_layer() -> None:
    from benchmarks.peers.run_autocircuit import sample_edges

    model = _FakePatchable({0: 7, 1: 30, 2: 3})
    search = sample_edges(model, 4)
    by_layer = {layer: sum(1 for e in model.edges if e.dest.module_name == f"blocks.{layer}.hook_attn_in")
                for layer in (0, 1, 2)}
    assert by_layer == {0: 4, 1: 4, 2: 3}  # at most 4 per layer, all of a layer with fewer
    assert search.edges_per_layer == {0: 7, 1: 30, 2: 3}
    model.forward("clean")  # the clean run: not a trial, not timed
    for layer in (2, 1, 0):
        model.forward("resid", start_at_layer=layer)
    assert model.calls == [None, 2, 1, 0]
    assert all(len(search.forward_seconds[layer]) == 1 for layer in (0, 1, 2))
    search.forward_seconds = {0: [3.0, 1.0], 1: [1.0], 2: [5.0]}  # known times replace the measured ones
    search.forward_cpu_seconds = {0: [1.0], 1: [0.5], 2: [2.0]}
    est = search.estimate(call_seconds=10.0, call_cpu_seconds=4.0)
    assert est["sampled_edges"] == 11 and est["total_edges"] == 40
    assert est["estimated_seconds"] == pytest.approx(10.0 + 2.0 * 3 + 1.0 * 26 + 5.0 * 0)
    assert est["estimated_cpu_seconds"] == pytest.approx(4.0 + 1.0 * 3 + 0.5 * 26)


def test_sampled_acdc_estimate_needs_a_timed_trial_in_every_layer() -> None:
    from benchmarks.peers.run_autocircuit import sample_edges

    model = _FakePatchable({0: 2, 1: 2})
    search = sample_edges(model, 1)
    model.forward("resid", start_at_layer=1)
    with pytest.raises(SystemExit, match=r"start layers \[0\]"):
        search.estimate(1.0, 1.0)
