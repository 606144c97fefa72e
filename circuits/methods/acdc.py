"""ACDC (Conmy et al. 2023): greedy edge removal in reverse topological order.

Receivers are visited from the logits back (descending receiver index: logits, m_{L-1}, the value,
key and query slots of layer L-1, m_{L-2}, ...); for each receiver its incoming edges are tried
latest sender first. An edge stays removed when the metric drops by less than ``tau``:

    m(current circuit) - m(current circuit without the edge) < tau

With the default KL metric (``m = -KL(full || circuit)``, see circuits/metrics.py) this is ACDC's
rule "KL increases by less than tau". Edges into a node that no longer has any outgoing edge cannot
change the output; they are removed without a forward pass (score 0), as in the original.

ACDC is sequential by nature. Here candidates are evaluated *speculatively*: for the next k
candidates of a receiver one batched pass evaluates the k cumulative removals (most are accepted),
the decisions are replayed in order, and evaluation restarts after the first rejection. The masks
evaluated - and therefore the circuit - are exactly those of the plain sequential algorithm.
Every pass resumes from a clean checkpoint at the receiver's layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.experiment import Experiment, PreparedBatch
from circuits.progress import progress_bar
from graphs import runtime as rt
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import NodeKind
from graphs.scores import EdgeScores


@dataclass(frozen=True)
class ACDCResult:
    circuit: Circuit  # the edges ACDC kept
    scores: EdgeScores  # per edge: m(without it) - m(with it), at the time it was tried
    metric: float  # the kept circuit's metric (dataset mean)
    full_metric: float  # the full model's metric
    evaluations: int  # masks evaluated (each over the whole dataset)
    passes: int  # batched evaluation rounds


class _Evaluator:
    """Dataset-mean metric of K masks at once, resumed at a layer; batches are prepared once."""

    def __init__(self, experiment: Experiment, max_rows: int) -> None:
        self.experiment = experiment
        self.max_rows = max_rows
        self.prepared: list[tuple[PreparedBatch, rt.CleanRun]] = [
            (b, rt.clean_run(experiment.spec, b.clean_ids, b.read_positions)) for b in experiment.batches()
        ]
        self.evaluations = 0
        self.passes = 0

    def full(self) -> float:
        total = sum(float(b.score(c.logits).sum()) for b, c in self.prepared)
        return total / self.experiment.n_prompts

    @torch.no_grad()
    def __call__(self, masks: Tensor, layer: int) -> Tensor:
        """Dataset means [K] of the metric with masks [K, S, R] (all entries at layers >= layer)."""
        spec = self.experiment.spec
        K = masks.shape[0]
        sums = torch.zeros(K, dtype=torch.float64)
        for batch, clean in self.prepared:
            P = batch.size
            step = max(1, self.max_rows // P)
            checkpoint = clean.at(spec, layer)
            for lo in range(0, K, step):
                part = masks[lo : lo + step].float()
                k = part.shape[0]
                logits = rt.run(
                    spec,
                    batch.clean_ids.repeat(k, 1),
                    mask=part,
                    ablation=batch.ablation,
                    read_positions=batch.read_positions.repeat(k),
                    start=checkpoint,
                ).logits
                sums[lo : lo + k] += batch.score(logits.view(k, P, -1)).sum(1).double()
        self.evaluations += K
        self.passes += 1
        return (sums / self.experiment.n_prompts).float()


def _layer_of(graph: ComputationGraph, receiver: int) -> int:
    node = graph.receivers[receiver].node
    return graph.n_layers if node.kind is NodeKind.LOGITS else int(node.layer)  # type: ignore[arg-type]


def _sender_of_receiver(graph: ComputationGraph, receiver: int) -> int | None:
    """The sender index of the node that owns ``receiver`` (None for logits)."""
    node = graph.receivers[receiver].node
    if node.kind is NodeKind.LOGITS:
        return None
    return graph.sender_index(node)


def acdc(
    experiment: Experiment,
    tau: float,
    speculation: int = 8,
    max_speculation: int = 64,
    max_rows: int = 256,
    progress: bool = False,
) -> ACDCResult:
    """Run ACDC with threshold ``tau`` on ``experiment`` (its metric; KL is the usual choice)."""
    if tau < 0:
        raise ValueError("tau must be non-negative")
    if speculation < 1 or max_speculation < speculation:
        raise ValueError("need 1 <= speculation <= max_speculation")
    g = experiment.spec.graph
    evaluate = _Evaluator(experiment, max_rows)
    removed = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    scores = torch.zeros(g.n_senders, g.n_receivers)
    edge_mask = g.edge_mask
    full = evaluate.full()
    current = full
    width = speculation
    bar = progress_bar(g.n_edges, f"ACDC (tau={tau:g})", progress, "edge")
    for r in reversed(range(g.n_receivers)):
        candidates = list(reversed(range(g.n_upstream[r])))
        owner = _sender_of_receiver(g, r)
        if owner is not None and not bool((edge_mask[owner] & ~removed[owner]).any()):
            removed[candidates, r] = True  # nothing downstream reads this node: its inputs cannot matter
            bar.update(len(candidates))
            continue
        layer = _layer_of(g, r)
        i = 0
        while i < len(candidates):
            k = min(width, len(candidates) - i)
            trial = removed.unsqueeze(0).repeat(k, 1, 1)
            for j in range(k):
                trial[j:, candidates[i + j], r] = True  # trial j removes candidates i .. i+j
            values = evaluate(trial, layer)
            previous = current
            accepted = k
            for j in range(k):
                value = float(values[j])
                scores[candidates[i + j], r] = value - previous
                if previous - value < tau:
                    previous = value
                else:
                    accepted = j  # candidates i .. i+j-1 removed, i+j kept
                    break
            removed[candidates[i : i + accepted], r] = True
            current = previous
            tried = accepted + (0 if accepted == k else 1)
            i += tried
            bar.update(tried)
            width = min(max_speculation, width * 2) if accepted == k else max(1, accepted + 1)
    bar.close()
    kept = edge_mask & ~removed
    settings = {
        "tau": tau,
        "metric": experiment.metric.name,
        "ablation": experiment.ablation,
        "n_prompts": experiment.n_prompts,
    }
    edge_scores = EdgeScores(g, scores, "acdc", settings)
    circuit = Circuit(g, kept, edge_scores, {"method": "acdc", "method_settings": settings})
    return ACDCResult(circuit, edge_scores, current, full, evaluate.evaluations, evaluate.passes)
