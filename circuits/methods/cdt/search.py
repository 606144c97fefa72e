"""CD-T circuit discovery: grow the circuit from the logits back, k sources per round, then prune.

Round 0 scores every sender against the ``logits`` receiver; round i against the receivers (q / k / v
slots, MLP input) of the nodes chosen in round i-1. A candidate's round score is the sum of
``|kappa(u -> r)|`` over the current targets' receivers (CD-T edge contributions, signed, see
``edges``); the ``k`` best candidates are kept (a node already in the circuit may be chosen again
for new targets), with their non-zero edges into the current targets. Newly chosen nodes (not
``input``, which has no inputs) become the next targets; every node is expanded once, so the
rounds end when no new node is chosen (at the latest below layer 0) or after ``max_rounds``.

Pruning (DESIGN.md section 5): the greedy order from the logits over the found edges (keeping only
edges connected to the logits through found edges), then dangling-node removal; with
``target_faithfulness``, the shortest greedy prefix that reaches it (bisection, as
``circuits.prune.minimal_circuit``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuits.evaluate import Baseline, faithfulness, reference_metrics
from circuits.experiment import Experiment
from circuits.methods.cdt.edges import (
    Mode,
    cdt_edge_contributions,
    to_edge_scores,
    to_node_scores,
)
from circuits.methods.cdt.rules import CDTConfig, CDTError
from circuits.prune import greedy_order, incoming_receivers, remove_dangling
from graphs.circuit import Circuit
from graphs.ids import NodeId
from graphs.scores import EdgeScores, NodeScores


@dataclass(frozen=True)
class Round:
    """One round: the targets scored against, the chosen sources with their round scores, and how
    many edges the round added."""

    targets: tuple[NodeId, ...]
    chosen: tuple[tuple[NodeId, float], ...]
    edges_added: int


@dataclass(frozen=True, eq=False)
class CDTResult:
    circuit: Circuit  # the pruned circuit (its ``scores`` are ``scores``)
    scores: EdgeScores  # CD-T scores of every edge (values = -kappa)
    node_scores: NodeScores  # every sender's CD-T contribution to the metric (values = -kappa)
    rounds: tuple[Round, ...]
    found: Circuit  # the rounds' edges before pruning
    faithfulness: float | None = None  # of ``circuit``, when a target faithfulness was asked for


def _rounds(scores: EdgeScores, k: int, max_rounds: int | None) -> tuple[torch.Tensor, list[Round]]:
    """The rounds of the search on edge scores (values = -kappa): the found-edge mask and the rounds."""
    g = scores.graph
    key = scores.values.abs() * g.edge_mask  # [S, R]
    found = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    expanded: set[int] = set()
    targets_r = [g.logits_receiver]
    target_nodes: tuple[NodeId, ...] = (NodeId.logits(),)
    rounds: list[Round] = []
    while targets_r and (max_rounds is None or len(rounds) < max_rounds):
        block = key[:, targets_r]  # [S, n]
        score = block.sum(1)  # [S]
        order = torch.sort(score, descending=True, stable=True).indices
        chosen = [int(u) for u in order[:k] if float(score[u]) > 0]
        added = 0
        for u in chosen:
            for j, r in enumerate(targets_r):
                if float(block[u, j]) > 0 and not bool(found[u, r]):
                    found[u, r] = True
                    added += 1
        rounds.append(Round(target_nodes, tuple((g.senders[u], float(score[u])) for u in chosen), added))
        new = [u for u in chosen if u not in expanded and u != 0]
        expanded.update(new)
        targets_r = [r for u in new for r in incoming_receivers(g, u)]
        target_nodes = tuple(g.senders[u] for u in new)
    return found, rounds


def _connected_order(scores: EdgeScores, found: torch.Tensor) -> list[tuple[int, int]]:
    """Found edges in the greedy order from the logits, stopping where no found edge is reachable."""
    ranked = EdgeScores(scores.graph, torch.where(found, scores.values.abs(), torch.full((), -1.0)), scores.method)
    order = []
    for s, r in greedy_order(ranked, absolute=False, limit=int(found.sum()) + 1):
        if not bool(found[s, r]):
            break
        order.append((s, r))
    return order


def _mask(graph, edges: list[tuple[int, int]]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    for s, r in edges:
        mask[s, r] = True
    return mask


def cdt_circuit(
    experiment: Experiment,
    k: int = 5,
    *,
    scores: EdgeScores | None = None,
    mode: Mode = "projected",
    max_rounds: int | None = None,
    target_faithfulness: float | None = None,
    baseline: Baseline | None = None,
    config: CDTConfig | None = None,
    progress: bool = False,
) -> CDTResult:
    """Discover a circuit with CD-T (see the module docstring).

    ``scores``: CD-T edge scores computed earlier (``cdt_edge_scores``), reused instead of recomputed
    (node scores are then derived from them: the ``logits`` column is not a node score, so
    ``node_scores`` are recomputed only when ``scores`` is None)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CDTError(f"k must be a positive integer, got {k!r}")
    if target_faithfulness is not None and not (0.0 < float(target_faithfulness) <= 1.0):
        raise CDTError(f"target faithfulness must lie in (0, 1], got {target_faithfulness!r}")
    config = config or CDTConfig()
    g = experiment.spec.graph
    if scores is None:
        result = cdt_edge_contributions(experiment, mode, config=config, progress=progress)
        scores = to_edge_scores(experiment, result, config)
        node_scores = to_node_scores(experiment, result, config)
    else:
        if scores.graph != g:
            raise CDTError("the scores belong to a different graph than the experiment's model")
        node_scores = scores.node_scores("sum")
    found, rounds = _rounds(scores, k, max_rounds)
    found_circuit = Circuit(g, found, scores, {"method": scores.method, "settings": dict(scores.settings)})
    order = _connected_order(scores, found)
    f_value = None
    if target_faithfulness is not None and order:
        base = baseline if baseline is not None else reference_metrics(experiment)
        order, f_value = _shortest_prefix(experiment, scores, order, float(target_faithfulness), base)
    provenance = {
        "method": scores.method,
        "settings": dict(scores.settings),
        "selection": {"rule": "cdt-rounds", "k": k, "rounds": len(rounds), "max_rounds": max_rounds,
                      "target_faithfulness": target_faithfulness},
    }
    circuit = remove_dangling(Circuit(g, _mask(g, order), scores, provenance))
    if f_value is not None:
        circuit = circuit.with_provenance(faithfulness=f_value)
    return CDTResult(circuit, scores, node_scores, tuple(rounds), found_circuit, f_value)


def _shortest_prefix(
    experiment: Experiment, scores: EdgeScores, order: list[tuple[int, int]], target: float, base: Baseline
) -> tuple[list[tuple[int, int]], float]:
    """The shortest greedy prefix (bisection over its length) whose circuit reaches ``target``; the
    whole order if none does. Returns the prefix and its faithfulness."""
    g = scores.graph
    cache: dict[int, float] = {}

    def f(n: int) -> float:
        if n not in cache:
            circuit = remove_dangling(Circuit(g, _mask(g, order[:n]), scores))
            cache[n] = faithfulness(experiment, circuit, base).value
        return cache[n]

    lo, hi = 0, len(order)
    if f(hi) < target:
        return order, f(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    return order[:hi], f(hi)
