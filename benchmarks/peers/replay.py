"""Plain sequential ACDC in a given edge order, with our forward passes (project interpreter).

auto-circuit's ACDC sorts the edges by the receiver's layer only; within a layer they come in the
order of a Python ``set`` of frozen dataclasses. Those hold ``None`` fields, and before Python 3.12
``hash(None)`` is an address, so the order - and with it the greedy circuit - changes from one
process to the next even with a fixed ``PYTHONHASHSEED``. Its child records the order it used
(``visit_order`` in the score file); replaying that order here tells whether the two circuits differ
only because of the order.

Same rule as ``circuits.methods.acdc``: an edge stays removed when the metric drops by less than
``tau``. As in auto-circuit every edge costs one evaluation (no skipping of edges into nodes that
nothing reads any more, and no speculation): this is an analysis tool, not a fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.experiment import Experiment

# the evaluator of our ACDC (batches and clean runs prepared once, resumed at a layer)
from circuits.methods.acdc import _Evaluator, _layer_of


@dataclass(frozen=True)
class Replay:
    kept: Tensor  # [S, R] bool: the edges of the circuit
    scores: Tensor  # [S, R]: metric with the edge removed minus before, when it was tried (0 if never)
    metric: float  # the circuit's metric (dataset mean)
    evaluations: int


def our_order(experiment: Experiment) -> list[str]:
    """The order ``acdc`` visits the edges in: receivers from the logits back, latest sender first."""
    g = experiment.spec.graph
    return [str(g.edge_id(s, r)) for r in reversed(range(g.n_receivers)) for s in reversed(range(g.n_upstream[r]))]


def replay_acdc(experiment: Experiment, tau: float, order: list[str], max_rows: int = 256) -> Replay:
    """ACDC at threshold ``tau`` visiting the edges (our ids) in ``order``, one evaluation each.

    ``order`` must name every edge of the graph exactly once."""
    g = experiment.spec.graph
    index = {str(g.edge_id(int(s), int(r))): (int(s), int(r)) for s, r in torch.nonzero(g.edge_mask).tolist()}
    if len(order) != len(set(order)) or set(order) != set(index):
        unknown = sorted(set(order) - set(index))[:5]
        missing = sorted(set(index) - set(order))[:5]
        raise ValueError(f"the order must name each of the {len(index)} edges once ({len(order)} given;"
                         f" unknown e.g. {unknown}, missing e.g. {missing})")
    evaluate = _Evaluator(experiment, max_rows)
    removed = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    scores = torch.zeros(g.n_senders, g.n_receivers)
    current = evaluate.full()
    start = g.n_layers  # the lowest layer with a removed edge: evaluations resume there
    for edge in order:
        s, r = index[edge]
        start = min(start, _layer_of(g, r))
        trial = removed.clone()
        trial[s, r] = True
        value = float(evaluate(trial[None], start)[0])
        scores[s, r] = value - current
        if current - value < tau:
            removed[s, r] = True
            current = value
    return Replay(g.edge_mask & ~removed, scores, current, evaluate.evaluations)
