"""Pruning rules on hand-made scores, dangling removal, and the minimal-circuit search."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits import prune
from circuits.evaluate import Baseline, faithfulness, reference_metrics
from circuits.prune import (
    PruneError,
    greedy,
    greedy_order,
    minimal_circuit,
    remove_dangling,
    threshold,
    top_n,
)
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import parse_edge
from graphs.scores import EdgeScores
from tests.tiny_tasks import experiment, random_scores, tiny_spec

G = ComputationGraph(3, 2)


def scores_of(graph: ComputationGraph, values: dict[str, float]) -> EdgeScores:
    v = torch.zeros(graph.n_senders, graph.n_receivers)
    for edge, x in values.items():
        v[graph.edge_index(parse_edge(edge))] = x
    return EdgeScores(graph, v, method="hand")


def edge_set(circuit: Circuit) -> set[str]:
    return {str(e) for e in circuit.edges()}


# --------------------------------------------------------------------------- top-n, threshold

HAND = {"m2->logits": 5.0, "a1.h0->a2.h1<k>": -4.0, "input->m0": 3.0, "a0.h1->logits": 0.5}


def test_top_n_ranks_by_absolute_then_signed_score() -> None:
    s = scores_of(G, HAND)
    assert edge_set(top_n(s, 2)) == {"m2->logits", "a1.h0->a2.h1<k>"}
    assert edge_set(top_n(s, 2, absolute=False)) == {"m2->logits", "input->m0"}
    assert edge_set(top_n(s, 0)) == set()
    # ties (all other edges score 0) are broken by the graph's edge order: input->a0.h0<q> first
    assert edge_set(top_n(s, 5)) == set(HAND) | {"input->a0.h0<q>"}
    assert top_n(s, 10**6).n_edges == G.n_edges


def test_selection_carries_scores_and_provenance() -> None:
    s = scores_of(G, HAND)
    c = top_n(s, 3, absolute=False)
    assert c.scores is s
    assert c.provenance["selection"] == {"rule": "top-n", "n": 3, "absolute": False}
    assert c.provenance["method"] == "hand"
    assert threshold(s, 1.0).provenance["selection"] == {"rule": "threshold", "threshold": 1.0, "absolute": True}
    assert greedy(s, 2).provenance["selection"]["rule"] == "greedy"


def test_threshold() -> None:
    s = scores_of(G, HAND)
    assert edge_set(threshold(s, 3.0)) == {"m2->logits", "a1.h0->a2.h1<k>", "input->m0"}
    assert edge_set(threshold(s, 3.0, absolute=False)) == {"m2->logits", "input->m0"}
    assert edge_set(threshold(s, 0.5)) == set(HAND)
    assert threshold(s, 0.0).n_edges == G.n_edges


def test_bad_inputs_are_refused() -> None:
    s = scores_of(G, HAND)
    with pytest.raises(PruneError, match="non-negative"):
        top_n(s, -1)
    with pytest.raises(PruneError, match="non-negative"):
        greedy(s, 2.5)  # type: ignore[arg-type]
    with pytest.raises(PruneError, match="number"):
        threshold(s, math.nan)
    nan = s.with_values(torch.where(G.edge_mask, torch.nan, 0.0))
    with pytest.raises(PruneError, match="NaN"):
        top_n(nan, 3)
    with pytest.raises(PruneError, match="unknown selection"):
        prune.select(s, 3, "bottom-n")


# --------------------------------------------------------------------------- greedy

GREEDY = {
    "a0.h0->a1.h1<q>": 10.0,  # ranks first, but a1.h1 is not connected to the logits at first
    "m1->logits": 5.0,
    "input->m1": 4.0,
    "a0.h0->m1": 3.0,
    "a1.h1->logits": 1.0,
}


def test_greedy_grows_from_the_logits() -> None:
    s = scores_of(G, GREEDY)
    assert edge_set(greedy(s, 1)) == {"m1->logits"}
    assert edge_set(greedy(s, 3)) == {"m1->logits", "input->m1", "a0.h0->m1"}
    # next: the best candidate is a1.h1->logits (1.0); the 10.0 edge waits until a1.h1 enters
    assert edge_set(greedy(s, 4)) == {"m1->logits", "input->m1", "a0.h0->m1", "a1.h1->logits"}
    assert edge_set(greedy(s, 5)) == edge_set(greedy(s, 4)) | {"a0.h0->a1.h1<q>"}
    # top-n would take the unconnected edge at once
    assert "a0.h0->a1.h1<q>" in edge_set(top_n(s, 1))


def test_greedy_ties_follow_edge_order_and_input_adds_no_candidates() -> None:
    s = scores_of(G, {"input->logits": 2.0, "m0->logits": 1.0})
    # after input->logits (no new candidates) comes m0->logits, then m0's inputs and the other
    # edges into logits tie at 0: the lowest receiver index wins (m0's input, receiver 6)
    assert [str(G.edge_id(*e)) for e in greedy_order(s, limit=3)] == ["input->logits", "m0->logits", "input->m0"]


def test_greedy_of_every_edge_is_the_full_graph() -> None:
    s = random_scores(G)
    assert torch.equal(greedy(s, G.n_edges).in_circuit, G.edge_mask)
    assert len(set(greedy_order(s))) == G.n_edges


def _owner_sends(circuit: Circuit) -> bool:
    """Every circuit edge into a head or MLP enters a node that itself sends a circuit edge."""
    owner = prune.receiver_nodes(circuit.graph)
    sends = circuit.in_circuit.any(1)
    for s, r in torch.nonzero(circuit.in_circuit).tolist():
        node = int(owner[r])
        if node < circuit.graph.n_senders and not bool(sends[node]):
            return False
    return True


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), seed=st.integers(0, 10**6), frac=st.floats(0, 1))
def test_greedy_circuits_are_nested_and_connected_to_logits(layers: int, heads: int, seed: int, frac: float) -> None:
    g = ComputationGraph(layers, heads)
    s = random_scores(g, seed)
    n = round(frac * g.n_edges)
    small, large = greedy(s, n), greedy(s, min(n + 3, g.n_edges))
    assert small.n_edges == n
    assert bool((small.in_circuit <= large.in_circuit).all())
    assert _owner_sends(small)
    # the batched selection (one greedy order for many sizes) agrees
    assert torch.equal(prune.selection_masks(s, [n], "greedy")[0], small.in_circuit)


def test_selection_masks_equal_single_selections() -> None:
    s = random_scores(G, 3)
    for rule, fn in (("top-n", top_n), ("greedy", greedy)):
        masks = prune.selection_masks(s, [0, 1, 7, 30, G.n_edges], rule, absolute=False)
        for n, m in zip([0, 1, 7, 30, G.n_edges], masks, strict=True):
            assert torch.equal(m, fn(s, n, absolute=False).in_circuit)


# --------------------------------------------------------------------------- dangling removal


def circuit_of(*edges: str) -> Circuit:
    return Circuit.from_edges(G, edges)


def test_remove_dangling_drops_nodes_without_input_or_output() -> None:
    c = circuit_of(
        "input->a0.h0<q>",
        "a0.h0->m1",
        "m1->logits",
        "a1.h1->logits",  # a1.h1 has no incoming edge: dropped
        "input->a2.h0<v>",  # a2.h0 sends nothing: dropped
        "a0.h1->a2.h0<v>",  # into a dropped node (and a0.h1 has no input)
    )
    out = remove_dangling(c)
    assert edge_set(out) == {"input->a0.h0<q>", "a0.h0->m1", "m1->logits"}
    assert out.provenance["dangling_removed"] == {"edges": 3, "nodes": 3}


def test_remove_dangling_cascades() -> None:
    # m2 does not reach the logits, so a1.h0, then a0.h0, lose their only outputs
    chain = circuit_of("input->a0.h0<k>", "a0.h0->a1.h0<q>", "a1.h0->m2")
    assert remove_dangling(chain).n_edges == 0
    # a0.h0 has no input, so a1.h0 loses its only input
    chain = circuit_of("a0.h0->a1.h0<q>", "a1.h0->logits", "input->logits")
    assert edge_set(remove_dangling(chain)) == {"input->logits"}


def test_a_head_fed_through_any_slot_has_input() -> None:
    for slot in "qkv":
        c = circuit_of(f"input->a1.h1<{slot}>", "a1.h1->logits")
        assert remove_dangling(c).n_edges == 2


def test_full_and_empty_are_fixed_points() -> None:
    assert torch.equal(remove_dangling(Circuit.full(G)).in_circuit, G.edge_mask)
    assert remove_dangling(Circuit.empty(G)).n_edges == 0


def _path_oracle(circuit: Circuit) -> torch.Tensor:
    """Keep an edge iff its sender and its receiver's node both lie on an input -> logits path."""
    g = circuit.graph
    owner = prune.receiver_nodes(g).tolist()
    edges = [(s, owner[r]) for s, r in torch.nonzero(circuit.in_circuit).tolist()]
    logits = g.n_senders

    def reach(start: int, forward: bool) -> set[int]:
        seen, todo = {start}, deque([start])
        while todo:
            x = todo.popleft()
            for a, b in edges:
                nxt = b if forward and a == x else a if not forward and b == x else None
                if nxt is not None and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    alive = reach(0, True) & reach(logits, False)
    keep = torch.zeros_like(circuit.in_circuit)
    for s, r in torch.nonzero(circuit.in_circuit).tolist():
        keep[s, r] = s in alive and owner[r] in alive
    return keep


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 3),
    heads=st.integers(1, 3),
    parallel=st.booleans(),
    seed=st.integers(0, 10**6),
    density=st.floats(0.0, 0.5),
)
def test_remove_dangling_properties(layers: int, heads: int, parallel: bool, seed: int, density: float) -> None:
    g = ComputationGraph(layers, heads, parallel)
    gen = torch.Generator().manual_seed(seed)
    c = Circuit(g, (torch.rand(g.n_senders, g.n_receivers, generator=gen) < density) & g.edge_mask)
    once = remove_dangling(c)
    assert bool((once.in_circuit <= c.in_circuit).all())  # never adds edges
    assert torch.equal(remove_dangling(once).in_circuit, once.in_circuit)  # idempotent
    assert torch.equal(once.in_circuit, _path_oracle(c))  # = the path definition
    assert once.provenance["dangling_removed"] == {
        "edges": c.n_edges - once.n_edges,
        "nodes": len(c.nodes()) - len(once.nodes()),
    }


# --------------------------------------------------------------------------- minimal circuit


def test_remove_dangling_keeps_the_metric_under_corrupted_ablation(setup: tuple) -> None:
    """A node without circuit inputs reproduces its corrupted output, which is what its ablated
    out-edges carry anyway; a node without circuit outputs reaches nothing."""
    spec, ex, base = setup
    c = top_n(random_scores(spec.graph, 2), 60)
    pruned = remove_dangling(c)
    assert pruned.n_edges < c.n_edges
    assert faithfulness(ex, pruned, base).value == pytest.approx(faithfulness(ex, c, base).value, abs=1e-4)


@pytest.fixture(scope="module")
def setup() -> tuple:
    spec = tiny_spec("gpt2")
    ex = experiment(spec, n=6, batch_size=6)
    return spec, ex, reference_metrics(ex)


@pytest.mark.parametrize("selection", ["top-n", "greedy"])
def test_minimal_circuit_bisection(setup: tuple, selection: str) -> None:
    spec, ex, base = setup
    scores = random_scores(spec.graph, 5)
    result = minimal_circuit(ex, scores, target=0.9, selection=selection, baseline=base)
    by_n = {p.n: p.faithfulness for p in result.points}
    assert len(by_n) == len(result.points)  # no size evaluated twice
    assert result.faithfulness.value >= 0.9 and by_n[result.n] == result.faithfulness.value
    assert result.points[0].n == spec.graph.n_edges and result.points[0].faithfulness == 1.0
    assert all(f < 0.9 for n, f in by_n.items() if n < result.n)
    if result.n > 1:
        assert by_n[result.n - 1] < 0.9
    assert len(result.points) <= math.ceil(math.log2(spec.graph.n_edges)) + 1
    # the circuit is the pruned selection of size n, evaluated independently
    expected = remove_dangling(prune.select(scores, result.n, selection))
    assert torch.equal(result.circuit.in_circuit, expected.in_circuit)
    assert result.circuit.n_edges <= result.n
    assert faithfulness(ex, expected, base).value == pytest.approx(result.faithfulness.value, abs=1e-9)
    assert result.circuit.provenance["faithfulness"] == result.faithfulness.value
    assert result.circuit.provenance["minimal_circuit"]["n"] == result.n
    assert result.curve == sorted(by_n.items())


def test_minimal_circuit_without_dangling_removal(setup: tuple) -> None:
    spec, ex, base = setup
    result = minimal_circuit(ex, random_scores(spec.graph, 1), target=0.5, prune_dangling=False, baseline=base)
    assert result.circuit.n_edges == result.n
    assert all(p.n == p.n_edges for p in result.points)


def test_minimal_circuit_errors(setup: tuple) -> None:
    spec, ex, base = setup
    scores = random_scores(spec.graph)
    for bad in (0.0, -0.1, 1.01, math.nan, math.inf):
        with pytest.raises(PruneError, match=r"target faithfulness must be a number in \(0, 1\]"):
            minimal_circuit(ex, scores, target=bad, baseline=base)
    # a baseline whose m(full) is far above the model's: even the full graph misses the target
    fake = Baseline(base.m_full + 100.0, base.m_empty, base.metric, base.ablation, base.n_prompts)
    with pytest.raises(PruneError, match="even the full graph"):
        minimal_circuit(ex, scores, target=0.9, baseline=fake)
    with pytest.raises(PruneError, match="different graph"):
        minimal_circuit(ex, random_scores(G), baseline=base)
