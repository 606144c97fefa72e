"""Turn ``EdgeScores`` into circuits: top-n, threshold, greedy from the logits, dangling removal,
and the minimal-circuit search (DESIGN.md section 5, "Pruning").

Every function returns a *new* ``Circuit`` that carries the scores it was selected from and
provenance describing the selection (JSON-friendly values only, so circuit files can record it):

- ``selection``: ``{"rule": "top-n" | "threshold" | "greedy", "n" | "threshold": ..., "absolute": ...}``
- ``method`` and ``settings``: the scores' method name and settings;
- ``dangling_removed``: ``{"edges": k, "nodes": j}`` after ``remove_dangling``;
- ``minimal_circuit`` and ``faithfulness`` after ``minimal_circuit``.

Ranking follows ``EdgeScores``: by ``|score|`` (``absolute=True``, the default) or by the signed
score, largest first. Ties are broken by the graph's edge order (receiver-major), so every rule is
deterministic. NaN scores are refused: they have no rank.
"""

from __future__ import annotations

import heapq
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuits.checkpoint import Checkpointer
from graphs.circuit import Circuit
from graphs.graph import SLOTS, ComputationGraph
from graphs.scores import EdgeScores

if TYPE_CHECKING:  # evaluate imports prune (curves); import it lazily at run time
    from circuits.evaluate import Baseline, Faithfulness
    from circuits.experiment import Experiment

SELECTIONS: tuple[str, ...] = ("top-n", "greedy")


class PruneError(ValueError):
    """A selection or search cannot be made (bad n, NaN scores, unreachable target...)."""


# --------------------------------------------------------------------------- helpers


def _check_scores(scores: EdgeScores) -> None:
    if bool(torch.isnan(scores.values[scores.graph.edge_mask]).any()):
        raise PruneError(f"scores of method {scores.method!r} contain NaN; NaN edges cannot be ranked")


def _check_n(n: int, graph: ComputationGraph) -> int:
    """``n`` as an int clamped to the edge count; PruneError unless a non-negative integer."""
    try:
        k = operator.index(n) if not isinstance(n, bool) else -1
    except TypeError:
        k = -1
    if k < 0:
        raise PruneError(f"n must be a non-negative integer number of edges, got {n!r}")
    return min(k, graph.n_edges)


def _circuit(scores: EdgeScores, mask: Tensor, selection: dict[str, Any]) -> Circuit:
    provenance = {"method": scores.method, "settings": dict(scores.settings), "selection": selection}
    return Circuit(scores.graph, mask, scores, provenance)


def receiver_nodes(graph: ComputationGraph) -> Tensor:
    """[R] long: for every receiver, the index of its node in ``graph.nodes`` (senders, then logits).

    The q, k and v slots of a head all map to the head's sender index; ``logits`` maps to ``S``."""
    out = torch.empty(graph.n_receivers, dtype=torch.long)
    for layer in range(graph.n_layers):
        heads = torch.arange(graph.head_sender(layer, 0), graph.head_sender(layer, 0) + graph.n_heads)
        out[graph.qkv_receivers(layer)] = heads.repeat(3)  # [q_0.., k_0.., v_0..]
        out[graph.mlp_receiver(layer)] = graph.mlp_sender(layer)
    out[graph.logits_receiver] = graph.n_senders
    return out


def incoming_receivers(graph: ComputationGraph, sender: int) -> list[int]:
    """Receiver indices that belong to sender node ``sender``: a head's q/k/v slots, an MLP's input.

    ``input`` (sender 0) has none."""
    if sender == 0:
        return []
    layer, offset = divmod(sender - 1, graph.n_heads + 1)
    if offset == graph.n_heads:
        return [graph.mlp_receiver(layer)]
    return [graph.slot_receiver(layer, offset, slot) for slot in SLOTS]


# --------------------------------------------------------------------------- simple rules


def top_n(scores: EdgeScores, n: int, absolute: bool = True) -> Circuit:
    """The ``n`` highest-ranked edges (all of them if ``n`` exceeds the edge count)."""
    _check_scores(scores)
    k = _check_n(n, scores.graph)
    return _circuit(scores, scores.top_n_mask(k, absolute), {"rule": "top-n", "n": k, "absolute": absolute})


def threshold(scores: EdgeScores, x: float, absolute: bool = True) -> Circuit:
    """Every edge whose ranking key (``|score|`` or the score) is at least ``x``."""
    _check_scores(scores)
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(float(x)):
        raise PruneError(f"threshold must be a number, got {x!r}")
    mask = scores.threshold_mask(float(x), absolute)
    return _circuit(scores, mask, {"rule": "threshold", "threshold": float(x), "absolute": absolute})


def greedy_order(scores: EdgeScores, absolute: bool = True, limit: int | None = None) -> list[tuple[int, int]]:
    """Edges ``(sender, receiver)`` in the order the greedy rule takes them (at most ``limit``).

    Grow from the logits: the candidates start as every edge into ``logits``; repeatedly take the
    best-ranked candidate; when its sender enters the circuit for the first time, that sender's own
    incoming edges (all its q/k/v slots, or the MLP's input) become candidates. ``input`` has no
    incoming edges, so taking an edge from ``input`` adds none. Every taken edge therefore has a
    path to the logits through taken edges. Ties: graph edge order (receiver, then sender)."""
    _check_scores(scores)
    g = scores.graph
    limit = g.n_edges if limit is None else min(limit, g.n_edges)
    key = scores.ranking_key(absolute).tolist()  # [S][R], python floats for the heap
    heap: list[tuple[float, int, int]] = []

    def push_receiver(r: int) -> None:
        for s in range(g.n_upstream[r]):
            heap.append((-key[s][r], r, s))

    push_receiver(g.logits_receiver)
    heapq.heapify(heap)
    entered = [False] * g.n_senders
    order: list[tuple[int, int]] = []
    while heap and len(order) < limit:
        _, r, s = heapq.heappop(heap)
        order.append((s, r))
        if not entered[s]:
            entered[s] = True
            for rr in incoming_receivers(g, s):
                for ss in range(g.n_upstream[rr]):
                    heapq.heappush(heap, (-key[ss][rr], rr, ss))
    return order


def _mask_of(graph: ComputationGraph, edges: list[tuple[int, int]]) -> Tensor:
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    if edges:
        idx = torch.tensor(edges, dtype=torch.long)  # [n, 2]
        mask[idx[:, 0], idx[:, 1]] = True
    return mask


def greedy(scores: EdgeScores, n: int, absolute: bool = True) -> Circuit:
    """The first ``n`` edges taken by the greedy rule (see ``greedy_order``): a circuit connected
    to the logits by construction. A high-ranked edge into a node that is not (yet) connected to the
    logits is not taken."""
    k = _check_n(n, scores.graph)
    mask = _mask_of(scores.graph, greedy_order(scores, absolute, limit=k))
    return _circuit(scores, mask, {"rule": "greedy", "n": k, "absolute": absolute})


def select(scores: EdgeScores, n: int, selection: str = "top-n", absolute: bool = True) -> Circuit:
    """Dispatch to ``top_n`` or ``greedy`` by name."""
    return _selector(selection)(scores, n, absolute)


def _selector(selection: str) -> Callable[[EdgeScores, int, bool], Circuit]:
    if selection == "top-n":
        return top_n
    if selection == "greedy":
        return greedy
    raise PruneError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def selection_masks(
    scores: EdgeScores, ns: list[int], selection: str = "top-n", absolute: bool = True
) -> list[Tensor]:
    """[S, R] bool masks of the ``selection`` circuits of every size in ``ns``, from one ranking.

    Both rules are prefixes of one edge order (top-n: the stable sort by key; greedy: the greedy
    order), so the order is computed once for the whole list (used by curves)."""
    _selector(selection)
    _check_scores(scores)
    g = scores.graph
    sizes = [_check_n(n, g) for n in ns]
    if selection == "greedy":
        order = greedy_order(scores, absolute, limit=max(sizes, default=0))
        return [_mask_of(g, order[:k]) for k in sizes]
    key = scores.ranking_key(absolute).T.reshape(-1)  # receiver-major = graph edge order
    ranked = torch.sort(key, descending=True, stable=True).indices  # [S*R]
    masks = []
    for k in sizes:
        flat = torch.zeros_like(key, dtype=torch.bool)
        flat[ranked[:k]] = True
        masks.append(flat.view(g.n_receivers, g.n_senders).T.contiguous())
    return masks


# --------------------------------------------------------------------------- dangling nodes


def remove_dangling(circuit: Circuit) -> Circuit:
    """Drop nodes with no path from ``input`` or no path to ``logits``, and their edges.

    Repeated until nothing changes:

    - a head or MLP *has input* if some circuit edge enters it. A head counts as having input if
      **any** of its q, k or v slots has an incoming edge (a head whose query alone is fed still
      moves information: the other slots read ablated values, but the head's output depends
      on the fed one; requiring all three slots would discard heads that methods legitimately
      keep, e.g. a head whose circuit role runs only through its keys). ``input`` always has input;
    - a node *has output* if some circuit edge leaves it; ``logits`` is always kept;
    - a node lacking either is dropped, with every edge it sends or any of its slots receives.

    At the fixed point every remaining node lies on a path ``input -> ... -> logits`` of circuit
    edges (the graph is a DAG). Edges are only ever removed. Under resample (corrupted) ablation
    this does not change the circuit's metric up to float error: a node without circuit inputs
    reproduces its corrupted output, which is what its ablated out-edges carry anyway, and a node
    without outputs cannot reach the logits. Under mean or zero ablation it can (a node fed only
    ablated inputs outputs f(mean), not mean(f)).
    """
    g = circuit.graph
    owner = receiver_nodes(g)  # [R] node index of each receiver
    mask = circuit.in_circuit  # [S, R]
    while True:
        fed = _fed(mask, owner)  # [S + 1]: any slot of the node receives a circuit edge
        fed[0] = True  # input
        sends = torch.ones(g.n_senders + 1, dtype=torch.bool)
        sends[: g.n_senders] = mask.any(1)  # logits (index S) is always kept
        alive = fed & sends  # [S + 1]
        pruned = mask & alive[: g.n_senders, None] & alive[owner][None, :]
        if torch.equal(pruned, mask):
            break
        mask = pruned
    removed = {
        "edges": circuit.n_edges - int(mask.sum()),
        "nodes": _n_touched(circuit.in_circuit, owner) - _n_touched(mask, owner),
    }
    return Circuit(g, mask, circuit.scores, {**circuit.provenance, "dangling_removed": removed})


def _fed(mask: Tensor, owner: Tensor) -> Tensor:
    """[S + 1] bool over ``graph.nodes``: the node receives a circuit edge into any of its slots."""
    n_nodes = mask.shape[0] + 1
    return torch.zeros(n_nodes, dtype=torch.long).index_add_(0, owner, mask.any(0).long()) > 0


def _n_touched(mask: Tensor, owner: Tensor) -> int:
    """Number of nodes a circuit edge touches (as ``Circuit.nodes()``)."""
    touched = _fed(mask, owner)
    touched[: mask.shape[0]] |= mask.any(1)
    return int(touched.sum())


# --------------------------------------------------------------------------- minimal circuit


@dataclass(frozen=True)
class SearchPoint:
    """One evaluated size of the minimal-circuit search, in evaluation order."""

    n: int  # edges selected
    n_edges: int  # edges left after dangling removal (== n without it)
    faithfulness: float


@dataclass(frozen=True, eq=False)
class MinimalCircuit:
    """Result of ``minimal_circuit``: the circuit, its selection size ``n`` and faithfulness, and
    every evaluated point (``points``, in evaluation order)."""

    circuit: Circuit
    n: int
    faithfulness: Faithfulness
    target: float
    selection: str
    points: tuple[SearchPoint, ...]

    @property
    def curve(self) -> list[tuple[int, float]]:
        """The evaluated ``(n, faithfulness)`` pairs sorted by ``n``."""
        return sorted((p.n, p.faithfulness) for p in self.points)


def minimal_circuit(
    experiment: Experiment,
    scores: EdgeScores,
    target: float = 0.9,
    selection: str = "top-n",
    prune_dangling: bool = True,
    absolute: bool = True,
    baseline: Baseline | None = None,
    checkpoint: Checkpointer | None = None,
) -> MinimalCircuit:
    """The smallest selection size ``n`` in ``[1, n_edges]`` whose circuit reaches ``target``
    faithfulness, by bisection over ``n``.

    ``f(n)`` is the faithfulness of ``selection(scores, n)`` (then ``remove_dangling`` if
    ``prune_dangling``). Faithfulness need not be monotone in ``n``, so bisection does not promise
    the globally smallest ``n``: it keeps ``lo`` (``f(lo) < target``, or ``lo = 0``, never evaluated)
    and ``hi`` (``f(hi) >= target``, starting from the full graph where ``f = 1``), and returns an
    ``n`` with ``f(n) >= target`` such that every evaluated ``n' < n`` had ``f(n') < target``; in
    particular ``n - 1`` was evaluated and missed the target (unless ``n = 1``). Every evaluated
    point is reported. One dataset pass per point; about ``log2(n_edges) + 1`` points.

    ``checkpoint``: every evaluated point is saved (atomically) as it is measured; a resumed search
    replays the bisection and takes saved points from the file instead of the dataset, so it
    evaluates the same sizes and returns the same circuit.
    """
    from circuits.evaluate import Faithfulness, faithfulness, reference_metrics

    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not (0.0 < float(target) <= 1.0):
        raise PruneError(f"target faithfulness must be a number in (0, 1], got {target!r}")
    _selector(selection)
    _check_scores(scores)
    if scores.graph != experiment.spec.graph:
        raise PruneError("scores belong to a different graph than the experiment's model")
    base = baseline if baseline is not None else reference_metrics(experiment)
    g = scores.graph
    points: list[SearchPoint] = []
    results: dict[int, tuple[Circuit, Faithfulness]] = {}
    known: dict[int, tuple[int, float, float]] = {}  # n -> (n_edges, faithfulness, m(C)) from a progress file
    saved = None if checkpoint is None else checkpoint.load()
    if saved is not None:
        for n, n_edges, f_value, m_value in saved[1]["points"]:
            known[int(n)] = (int(n_edges), float(f_value), float(m_value))
    measured: list[list[float | int]] = [] if saved is None else list(saved[1]["points"])

    def evaluate(n: int) -> float:
        circuit = select(scores, n, selection, absolute)
        if prune_dangling:
            circuit = remove_dangling(circuit)
        if n in known and known[n][0] == circuit.n_edges:
            _, value, m = known[n]
            f = Faithfulness(value, m, base.m_full, base.m_empty, circuit.n_edges)
        else:
            f = faithfulness(experiment, circuit, base)
            if checkpoint is not None:
                measured.append([n, circuit.n_edges, f.value, f.m_circuit])
                checkpoint.save({}, {"points": measured})
        results[n] = (circuit, f)
        points.append(SearchPoint(n, circuit.n_edges, f.value))
        return f.value

    lo, hi = 0, g.n_edges
    if evaluate(hi) < target:
        raise PruneError(
            f"even the full graph reaches faithfulness {points[-1].faithfulness:.6g} < target {target}"
            " (only float error can cause this; lower the target slightly)"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid) >= target:
            hi = mid
        else:
            lo = mid
    circuit, f = results[hi]
    circuit = circuit.with_provenance(
        faithfulness=f.value,
        minimal_circuit={
            "target": float(target),
            "n": hi,
            "selection": selection,
            "prune_dangling": prune_dangling,
            "evaluated": [[p.n, p.faithfulness] for p in points],
        },
    )
    return MinimalCircuit(circuit, hi, f, float(target), selection, tuple(points))
