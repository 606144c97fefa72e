"""Evaluate circuits: faithfulness, faithfulness curves with CPR / CMD, random-circuit baselines
and ROC / AUC against a reference circuit (DESIGN.md section 6; user guide: docs/evaluation.md).

Faithfulness is a ratio of *dataset means* of the experiment's metric ``m``:

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

- ``m(C)``: the clean prompts run once per batch with every edge *not* in ``C`` ablated
  (``circuit.ablation_mask()``) with the experiment's ablation values;
- ``m(full)``: no edge ablated (the model itself), so ``f(full) = 1``;
- ``m(empty)``: every edge ablated, so ``f(empty) = 0``.

``m(full)`` and ``m(empty)`` depend only on the experiment: ``reference_metrics`` computes them once
(a ``Baseline``) and every function here takes one to reuse. Everything runs under
``torch.no_grad`` and streams the task through ``experiment.batches()``; many circuits are
evaluated per forward pass with ``experiment.masked_metrics`` (one mask per batch row), in chunks
that bound memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata  # type: ignore[import-untyped]
from torch import Tensor

from circuits.experiment import Experiment
from circuits.positional import check_alignment
from circuits.prune import selection_masks
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.positional import PositionalCircuit, PositionalEdgeScores
from graphs.scores import EdgeScores

EDGE_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SPAN_TOLERANCE = 1e-5  # |m(full) - m(empty)| at or below this times max(1, |m(full)|, |m(empty)|): no separation
MAX_FLOATS = 2**27  # default memory budget (floats) for one batched pass of several masks (~512 MB)


class EvaluationError(ValueError):
    """A circuit cannot be evaluated: degenerate task, mismatched graphs, bad fractions..."""


# --------------------------------------------------------------------------- baseline


@dataclass(frozen=True)
class Baseline:
    """The dataset means ``m(full)`` and ``m(empty)`` of one experiment (its metric and ablation).

    Construction fails if they (almost) coincide: then the task does not separate clean and
    ablated behaviour and no faithfulness ratio is meaningful."""

    m_full: float
    m_empty: float
    metric: str
    ablation: str
    n_prompts: int

    def __post_init__(self) -> None:
        scale = max(1.0, abs(self.m_full), abs(self.m_empty))
        if not (math.isfinite(self.m_full) and math.isfinite(self.m_empty)):
            raise EvaluationError(f"m(full) = {self.m_full}, m(empty) = {self.m_empty}: not finite")
        if abs(self.m_full - self.m_empty) <= SPAN_TOLERANCE * scale:
            raise EvaluationError(
                f"the task does not separate clean and ablated behaviour: metric {self.metric!r} has "
                f"dataset mean {self.m_full:.6g} with no edge ablated and {self.m_empty:.6g} with every "
                f"edge ablated ({self.ablation} ablation), so faithfulness (m(C) - m(empty)) / "
                "(m(full) - m(empty)) is undefined. Check that the corrupted prompts really change the "
                "answer, or pick another metric or ablation."
            )

    @property
    def span(self) -> float:
        """``m(full) - m(empty)``: the denominator of faithfulness."""
        return self.m_full - self.m_empty

    def normalise(self, m_circuit: float) -> float:
        """Faithfulness of a circuit whose dataset-mean metric is ``m_circuit``."""
        return (m_circuit - self.m_empty) / self.span

    def check(self, experiment: Experiment) -> None:
        """Refuse a baseline computed for a different metric, ablation or dataset size."""
        mine = (self.metric, self.ablation, self.n_prompts)
        theirs = (experiment.metric.name, experiment.ablation, experiment.n_prompts)
        if mine != theirs:
            raise EvaluationError(f"baseline was computed for (metric, ablation, prompts) {mine}, not {theirs}")


@torch.no_grad()
def reference_metrics(experiment: Experiment) -> Baseline:
    """``m(full)`` (no ablation) and ``m(empty)`` (every edge ablated): two passes per batch."""
    every_edge = experiment.spec.graph.edge_mask  # [S, R]
    full = empty = 0.0
    for batch in experiment.batches():
        full += float(experiment.masked_metric(batch, None).double().sum())
        empty += float(experiment.masked_metric(batch, every_edge).double().sum())
    N = experiment.n_prompts
    return Baseline(full / N, empty / N, experiment.metric.name, experiment.ablation, N)


def _baseline(experiment: Experiment, baseline: Baseline | None) -> Baseline:
    if baseline is None:
        return reference_metrics(experiment)
    baseline.check(experiment)
    return baseline


def _check_graph(experiment: Experiment, graph: ComputationGraph, what: str) -> None:
    if graph != experiment.spec.graph:
        raise EvaluationError(
            f"{what} belongs to a graph of {graph.describe()}, the experiment's model has {experiment.spec.graph.describe()}"
        )


# --------------------------------------------------------------------------- single circuits


@dataclass(frozen=True)
class Faithfulness:
    """``value = (m_circuit - m_empty) / (m_full - m_empty)`` (dataset means) for a circuit of ``n_edges``."""

    value: float
    m_circuit: float
    m_full: float
    m_empty: float
    n_edges: int


@torch.no_grad()
def circuit_metric(experiment: Experiment, circuit: Circuit) -> float:
    """``m(C)``: the dataset mean with every edge not in ``circuit`` ablated (one pass per batch)."""
    _check_graph(experiment, circuit.graph, "the circuit")
    ablate = circuit.ablation_mask()  # [S, R]
    total = 0.0
    for batch in experiment.batches():
        total += float(experiment.masked_metric(batch, ablate if bool(ablate.any()) else None).double().sum())
    return total / experiment.n_prompts


def faithfulness(experiment: Experiment, circuit: Circuit, baseline: Baseline | None = None) -> Faithfulness:
    """Faithfulness of ``circuit`` (see the module docstring). Pass ``baseline`` (from
    ``reference_metrics``) to reuse ``m(full)`` and ``m(empty)`` across circuits."""
    base = _baseline(experiment, baseline)
    m = circuit_metric(experiment, circuit)
    return Faithfulness(base.normalise(m), m, base.m_full, base.m_empty, circuit.n_edges)


@torch.no_grad()
def positional_circuit_metric(experiment: Experiment, circuit: PositionalCircuit) -> float:
    """``m(C)`` of a positional circuit: every positional edge not in it ablated at its own token,
    one pass per batch with the ``[S, R, T]`` mask. The task must share the circuit's alignment."""
    _check_graph(experiment, circuit.graph, "the circuit")
    alignment = check_alignment(experiment.task)
    if alignment.length != circuit.n_positions:
        raise EvaluationError(
            f"the circuit has {circuit.n_positions} token positions, the task's prompts have {alignment.length} tokens"
        )
    ablate = circuit.ablation_mask()  # [S, R, T]
    total = 0.0
    for batch in experiment.batches():
        total += float(experiment.masked_metric(batch, ablate if bool(ablate.any()) else None).double().sum())
    return total / experiment.n_prompts


def positional_faithfulness(
    experiment: Experiment, circuit: PositionalCircuit, baseline: Baseline | None = None
) -> Faithfulness:
    """Faithfulness of a positional circuit. ``m(full)`` and ``m(empty)`` are those of the
    non-positional graph (nothing ablated; every edge ablated at every position), so a baseline from
    ``reference_metrics`` is shared with non-positional circuits."""
    base = _baseline(experiment, baseline)
    m = positional_circuit_metric(experiment, circuit)
    return Faithfulness(base.normalise(m), m, base.m_full, base.m_empty, circuit.n_edges)


@torch.no_grad()
def masks_metric(experiment: Experiment, ablation_masks: Tensor, max_floats: int = MAX_FLOATS) -> Tensor:
    """Dataset means ``[K]`` (float64) of the metric under K ablation masks ``[K, S, R]``.

    Several masks share one forward pass (``experiment.masked_metrics``). A pass over k masks and
    a batch of B prompts of length T holds about ``k * B * (S*R + 3*T*S*d)`` floats (the per-row
    masks; the repeated ablation values, sender deltas and activations of the runtime); k is chosen
    so that stays below ``max_floats`` (at least one mask per pass)."""
    g = experiment.spec.graph
    K = ablation_masks.shape[0]
    if ablation_masks.dim() != 3 or tuple(ablation_masks.shape[1:]) != (g.n_senders, g.n_receivers):
        raise EvaluationError(f"masks must be [K, {g.n_senders}, {g.n_receivers}], got {tuple(ablation_masks.shape)}")
    totals = torch.zeros(K, dtype=torch.float64)
    if K == 0:
        return totals
    for batch in experiment.batches():
        T = batch.clean_ids.shape[1]
        per_mask = batch.size * (g.n_senders * g.n_receivers + 3 * T * g.n_senders * experiment.spec.d_model)
        chunk = max(1, max_floats // per_mask)
        for lo in range(0, K, chunk):
            values = experiment.masked_metrics(batch, ablation_masks[lo : lo + chunk])  # [k, B]
            totals[lo : lo + chunk] += values.double().sum(1)
    return totals / experiment.n_prompts


def faithfulness_of_masks(
    experiment: Experiment, ablation_masks: Tensor, baseline: Baseline, max_floats: int = MAX_FLOATS
) -> list[float]:
    """Faithfulness for each of K ablation masks ``[K, S, R]`` (True = ablated edge).

    The full circuit (nothing ablated) and the empty one (every edge ablated) are not run: their
    values are exactly 1 and 0 by definition."""
    baseline.check(experiment)
    every_edge = experiment.spec.graph.edge_mask
    ablate = ablation_masks.to(torch.bool) & every_edge  # [K, S, R]
    none = ~ablate.flatten(1).any(1)  # [K]
    all_ = (ablate == every_edge).flatten(1).all(1)  # [K]
    todo = (~none & ~all_).nonzero().flatten()
    out = [1.0 if bool(n) else 0.0 for n in none]
    if todo.numel():
        means = masks_metric(experiment, ablate[todo], max_floats)
        for i, m in zip(todo.tolist(), means.tolist(), strict=True):
            out[i] = baseline.normalise(m)
    return out


# --------------------------------------------------------------------------- curves


def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) < 2:
        raise EvaluationError("a curve needs at least two edge fractions (use faithfulness() for one circuit)")
    if any(not (0.0 < f <= 1.0) for f in fr) or any(b <= a for a, b in itertools.pairwise(fr)):
        raise EvaluationError(f"edge fractions must increase strictly within (0, 1], got {fr}")
    return fr


def edge_counts(fractions: Sequence[float], n_edges: int) -> list[int]:
    """Circuit sizes of a curve: ``n = max(1, round(fraction * n_edges))`` per fraction."""
    return [max(1, round(f * n_edges)) for f in fractions]


@dataclass(frozen=True)
class Curve:
    """Faithfulness at increasing edge fractions.

    The x-axis is the *linear* edge fraction ``n / graph_edges``, taken at the requested fractions
    (not the realised ``n_edges[i] / graph_edges``, which rounding moves slightly), from the first
    fraction to the last. ``cpr`` / ``cmd`` are trapezoid areas over that axis; with the default
    fractions the x-range is ``[0.001, 1.0]``, so the raw areas lie close to the normalised ones."""

    fractions: tuple[float, ...]
    n_edges: tuple[int, ...]  # edges in each circuit
    values: tuple[float, ...]  # faithfulness of each circuit
    graph_edges: int
    selection: str = "top-n"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", _check_fractions(self.fractions))
        object.__setattr__(self, "n_edges", tuple(int(n) for n in self.n_edges))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if not len(self.fractions) == len(self.n_edges) == len(self.values):
            raise EvaluationError("a curve needs one edge count and one value per fraction")

    @property
    def x_range(self) -> float:
        return self.fractions[-1] - self.fractions[0]

    @property
    def cpr(self) -> float:
        """Circuit performance ratio: area under ``f`` (higher is better)."""
        return _trapezoid(self.fractions, self.values)

    @property
    def cmd(self) -> float:
        """Circuit-model difference: area under ``|1 - f|`` (lower is better)."""
        return _trapezoid(self.fractions, [abs(1.0 - v) for v in self.values])

    @property
    def cpr_normalised(self) -> float:
        """``cpr / x_range``: the mean faithfulness over the x-range."""
        return self.cpr / self.x_range

    @property
    def cmd_normalised(self) -> float:
        return self.cmd / self.x_range

    def points(self) -> list[tuple[float, int, float]]:
        """``(fraction, n_edges, faithfulness)`` rows, for tables."""
        return list(zip(self.fractions, self.n_edges, self.values, strict=True))


def _curve_from_masks(
    experiment: Experiment,
    circuits_in: list[Tensor],
    fractions: tuple[float, ...],
    baseline: Baseline,
    selection: str,
    max_floats: int,
) -> list[Curve]:
    """Evaluate equally long lists of [S, R] circuit masks (one list per curve), all in one stream."""
    every_edge = experiment.spec.graph.edge_mask
    stacked = torch.stack(circuits_in)  # [K, S, R] in-circuit masks
    values = faithfulness_of_masks(experiment, every_edge & ~stacked, baseline, max_floats)
    sizes = stacked.flatten(1).sum(1).tolist()
    P = len(fractions)
    return [
        Curve(fractions, tuple(int(s) for s in sizes[i : i + P]), tuple(values[i : i + P]), experiment.spec.graph.n_edges, selection)
        for i in range(0, len(values), P)
    ]


def faithfulness_curve(
    experiment: Experiment,
    scores: EdgeScores,
    fractions: Sequence[float] = EDGE_FRACTIONS,
    selection: str = "top-n",
    absolute: bool = True,
    baseline: Baseline | None = None,
    max_floats: int = MAX_FLOATS,
) -> Curve:
    """Faithfulness of the ``selection`` circuit (``"top-n"`` or ``"greedy"``) of
    ``n = max(1, round(fraction * n_edges))`` edges at every fraction. Several circuits share each
    forward pass; fractions that round to the same ``n`` are evaluated once."""
    _check_graph(experiment, scores.graph, "the scores")
    fr = _check_fractions(fractions)
    base = _baseline(experiment, baseline)
    ns = edge_counts(fr, scores.graph.n_edges)
    unique = sorted(set(ns))
    masks = dict(zip(unique, selection_masks(scores, unique, selection, absolute), strict=True))
    return _curve_from_masks(experiment, [masks[n] for n in ns], fr, base, selection, max_floats)[0]


# --------------------------------------------------------------------------- random baselines


def _random_orders(graph: ComputationGraph, samples: int, seed: int) -> list[Tensor]:
    """``samples`` uniformly random orderings of the real edges, each ``[E, 2]`` (sender, receiver)."""
    pairs = torch.nonzero(graph.edge_mask.T)[:, [1, 0]]  # [E, 2] in graph edge order
    gen = torch.Generator().manual_seed(seed)
    return [pairs[torch.randperm(pairs.shape[0], generator=gen)] for _ in range(samples)]


def _prefix_mask(graph: ComputationGraph, order: Tensor, n: int) -> Tensor:
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    mask[order[:n, 0], order[:n, 1]] = True
    return mask


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); 0 for a single sample."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class RandomBaseline:
    """Faithfulness of ``samples`` random circuits of ``n_edges`` edges: ``values``, their ``mean``
    and sample ``std`` (ddof 1)."""

    n_edges: int
    values: tuple[float, ...]
    seed: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return _std(self.values)


def _check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise EvaluationError(f"samples must be a positive integer, got {samples!r}")


def random_baseline(
    experiment: Experiment,
    n_edges: int,
    samples: int = 5,
    seed: int = 0,
    baseline: Baseline | None = None,
    max_floats: int = MAX_FLOATS,
) -> RandomBaseline:
    """Faithfulness of random circuits of ``n_edges`` edges, drawn uniformly (without replacement)
    from the real edges with a ``torch.Generator`` seeded with ``seed``."""
    _check_samples(samples)
    g = experiment.spec.graph
    if isinstance(n_edges, bool) or not isinstance(n_edges, int) or not (0 <= n_edges <= g.n_edges):
        raise EvaluationError(f"n_edges must be an integer in [0, {g.n_edges}], got {n_edges!r}")
    base = _baseline(experiment, baseline)
    masks = torch.stack([_prefix_mask(g, order, n_edges) for order in _random_orders(g, samples, seed)])
    values = faithfulness_of_masks(experiment, g.edge_mask & ~masks, base, max_floats)
    return RandomBaseline(n_edges, tuple(values), seed)


def positional_faithfulness_curve(
    experiment: Experiment,
    scores: PositionalEdgeScores,
    fractions: Sequence[float] = EDGE_FRACTIONS,
    absolute: bool = True,
    baseline: Baseline | None = None,
) -> Curve:
    """Faithfulness of the top-n positional circuits of ``scores`` at edge fractions of the
    positional edges (``n = max(1, round(fraction * E * T))``). One forward pass per batch and
    distinct ``n`` with the ``[S, R, T]`` mask (positional masks are not stacked)."""
    _check_graph(experiment, scores.graph, "the scores")
    fr = _check_fractions(fractions)
    base = _baseline(experiment, baseline)
    ns = edge_counts(fr, scores.n_edges)
    value = {}
    for n in sorted(set(ns)):
        circuit = PositionalCircuit(scores.graph, scores.top_n_mask(n, absolute), scores.tokens, scores)
        value[n] = base.normalise(positional_circuit_metric(experiment, circuit))
    return Curve(fr, tuple(ns), tuple(value[n] for n in ns), scores.n_edges, "top-n")


def positional_random_baseline(
    experiment: Experiment,
    n_edges: int,
    tokens: Sequence[str],
    samples: int = 5,
    seed: int = 0,
    baseline: Baseline | None = None,
) -> RandomBaseline:
    """Faithfulness of random positional circuits of ``n_edges`` positional edges, drawn uniformly
    (without replacement) from the ``E * T`` positional edges with a generator seeded with ``seed``;
    ``tokens``: the alignment's token strings (one per position)."""
    _check_samples(samples)
    g, T = experiment.spec.graph, len(tokens)
    total = g.n_edges * T
    if isinstance(n_edges, bool) or not isinstance(n_edges, int) or not (0 <= n_edges <= total):
        raise EvaluationError(f"n_edges must be an integer in [0, {total}], got {n_edges!r}")
    base = _baseline(experiment, baseline)
    every = g.edge_mask[:, :, None].expand(-1, -1, T).nonzero()  # [E*T, 3] (sender, receiver, position)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        pick = every[torch.randperm(every.shape[0], generator=gen)[:n_edges]]
        mask = torch.zeros(g.n_senders, g.n_receivers, T, dtype=torch.bool)
        mask[pick[:, 0], pick[:, 1], pick[:, 2]] = True
        circuit = PositionalCircuit(g, mask, tuple(tokens))
        values.append(base.normalise(positional_circuit_metric(experiment, circuit)))
    return RandomBaseline(n_edges, tuple(values), seed)


@dataclass(frozen=True)
class RandomCurve:
    """Curves of ``samples`` random edge orderings (each curve's circuits are nested prefixes of one
    uniformly random permutation of the edges: the curve of random scores)."""

    curves: tuple[Curve, ...]
    seed: int

    @property
    def fractions(self) -> tuple[float, ...]:
        return self.curves[0].fractions

    @property
    def mean(self) -> tuple[float, ...]:
        """Mean faithfulness at each fraction."""
        return tuple(float(v) for v in np.mean([c.values for c in self.curves], axis=0))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(_std([c.values[i] for c in self.curves]) for i in range(len(self.fractions)))

    @property
    def cpr(self) -> tuple[float, float]:
        """(mean, std) of the samples' CPR."""
        vals = [c.cpr for c in self.curves]
        return float(np.mean(vals)), _std(vals)

    @property
    def cmd(self) -> tuple[float, float]:
        """(mean, std) of the samples' CMD."""
        vals = [c.cmd for c in self.curves]
        return float(np.mean(vals)), _std(vals)


def random_curve(
    experiment: Experiment,
    fractions: Sequence[float] = EDGE_FRACTIONS,
    samples: int = 5,
    seed: int = 0,
    baseline: Baseline | None = None,
    max_floats: int = MAX_FLOATS,
) -> RandomCurve:
    """Faithfulness curves of random circuits at the same sizes as ``faithfulness_curve``."""
    _check_samples(samples)
    fr = _check_fractions(fractions)
    base = _baseline(experiment, baseline)
    g = experiment.spec.graph
    ns = edge_counts(fr, g.n_edges)
    masks = [_prefix_mask(g, order, n) for order in _random_orders(g, samples, seed) for n in ns]
    return RandomCurve(tuple(_curve_from_masks(experiment, masks, fr, base, "random", max_floats)), seed)


# --------------------------------------------------------------------------- ROC / AUC


@dataclass(frozen=True)
class RocCurve:
    """ROC of scores as a classifier of reference membership. Points run from (0, 0) to (1, 1);
    ``thresholds[i]`` is the key at which point ``i`` is reached (``inf`` for the first). Tied keys
    form one diagonal step, so the trapezoid area under the points equals ``auc``."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    thresholds: tuple[float, ...]
    auc: float
    level: str
    n_positive: int
    n_negative: int


def _roc_items(scores: EdgeScores, reference: Circuit, level: str, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys, labels) of the items ranked: real edges, or sender nodes (input, heads, MLPs)."""
    g = scores.graph
    if reference.graph != g:
        raise EvaluationError("the reference circuit belongs to a different graph than the scores")
    real = g.edge_mask
    if bool(torch.isnan(scores.values[real]).any()):
        raise EvaluationError("scores contain NaN; they cannot be ranked")
    key = scores.values.abs() if absolute else scores.values  # [S, R]
    if level == "edge":
        keys = key.T[real.T]  # [E] in graph edge order
        labels = reference.in_circuit.T[real.T]
    elif level == "node":
        # a sender's score is the max over its outgoing edges (every sender feeds logits, so >= 1)
        keys = torch.where(real, key, torch.full((), float("-inf"), dtype=key.dtype)).amax(1)  # [S]
        labels = reference.node_mask()[: g.n_senders]
    else:
        raise EvaluationError(f"level must be 'edge' or 'node', got {level!r}")
    k, lab = keys.double().numpy(), labels.numpy().astype(bool)
    P = int(lab.sum())
    if P == 0 or P == lab.size:
        which = "positives" if P == 0 else "negatives"
        raise EvaluationError(
            f"ROC needs both classes: the reference circuit has no {which} at {level} level "
            f"({P} of {lab.size} {level}s are in it)"
        )
    return k, lab


def roc_auc(scores: EdgeScores, reference: Circuit, level: str = "edge", absolute: bool = True) -> float:
    """AUC of the scores' ranking key (``|score|`` or the score) as a classifier of membership in
    ``reference``: the Mann-Whitney U statistic over (positive, negative) pairs, ties counting 1/2
    (average ranks, ``scipy.stats.rankdata``). ``level="node"`` ranks sender nodes by the max key of
    their outgoing edges against the reference's nodes; ``logits`` is left out (it is in every
    non-empty circuit and sends nothing)."""
    keys, labels = _roc_items(scores, reference, level, absolute)
    P, N = int(labels.sum()), int((~labels).sum())
    ranks = rankdata(keys)  # average ranks for ties
    U = float(ranks[labels].sum()) - P * (P + 1) / 2
    return U / (P * N)


def roc_curve(scores: EdgeScores, reference: Circuit, level: str = "edge", absolute: bool = True) -> RocCurve:
    """ROC points of ``roc_auc``'s classifier, one per distinct key (descending)."""
    keys, labels = _roc_items(scores, reference, level, absolute)
    P, N = int(labels.sum()), int((~labels).sum())
    order = np.argsort(-keys, kind="stable")
    k, lab = keys[order], labels[order]
    tp, fp = np.cumsum(lab), np.cumsum(~lab)
    last = np.r_[np.nonzero(np.diff(k))[0], k.size - 1]  # last index of each tie group
    fpr = (0.0, *(fp[last] / N).tolist())
    tpr = (0.0, *(tp[last] / P).tolist())
    thresholds = (math.inf, *k[last].tolist())
    return RocCurve(fpr, tpr, thresholds, roc_auc(scores, reference, level, absolute), level, P, N)
