"""Circuit search by path patching (the procedure of Wang et al. 2022 for IOI, automated).

Start at the logits. For the node being expanded, path-patch every upstream sender to each of its
input slots (the logits; an MLP's input; a head's query, key and value separately); the effect of
sender u on slot r is the score of edge u -> r. The k senders with the largest |effect| on each
slot join the frontier (the input node is never expanded). Nodes are expanded latest layer first,
until the frontier is empty or ``max_nodes`` nodes were expanded. Edges never scored keep 0.

``checkpoint=``: the search state (scores so far, the frontier, the expanded nodes and how many
slots of the node being expanded are done) is saved after every slot; a resumed search continues
with the next slot and ends as the uninterrupted one. On a distributed shard every path-patching
effect is all-reduced, so all ranks expand the same nodes; rank 0 alone writes progress.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from circuits.checkpoint import Checkpointer, restore
from circuits.distributed import reducer
from circuits.experiment import Experiment
from circuits.methods.patching import path_patching
from circuits.progress import progress_bar
from graphs.graph import SLOTS, ComputationGraph
from graphs.ids import NodeId, NodeKind, parse_node
from graphs.scores import EdgeScores


@dataclass(frozen=True)
class PathSearchResult:
    scores: EdgeScores
    expanded: tuple[NodeId, ...]  # in expansion order


def _slots(g: ComputationGraph, node: NodeId) -> list[int]:
    if node.kind is NodeKind.LOGITS:
        return [g.logits_receiver]
    if node.kind is NodeKind.MLP:
        return [g.mlp_receiver(int(node.layer))]  # type: ignore[arg-type]
    return [g.slot_receiver(int(node.layer), int(node.head), s) for s in SLOTS]  # type: ignore[arg-type]


def _order(g: ComputationGraph, node: NodeId) -> float:
    """Heap key: latest node first (logits, then MLP l before the heads of layer l)."""
    return -g.node_layer(node)


def path_patching_search(
    experiment: Experiment,
    k: int = 5,
    max_nodes: int = 30,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> PathSearchResult:
    if k < 1 or max_nodes < 1:
        raise ValueError("k and max_nodes must be at least 1")
    g = experiment.spec.graph
    red = reducer(experiment)
    values = torch.zeros(g.n_senders, g.n_receivers)
    queue: list[tuple[float, int, NodeId]] = [(_order(g, NodeId.logits()), 0, NodeId.logits())]
    queued = {NodeId.logits()}
    expanded: list[NodeId] = []
    counter = 1
    pending: tuple[NodeId, int] | None = None  # (node being expanded, its slots done)
    saved = red.broadcast_state(checkpoint.load() if checkpoint is not None and red.is_root else None)
    if saved is not None:
        tensors, meta = saved
        restore(tensors, {"values": values}, checkpoint.path if checkpoint is not None else "progress")
        queue = [(float(o), int(c), parse_node(n)) for o, c, n in meta["queue"]]
        heapq.heapify(queue)
        queued = {parse_node(n) for n in meta["queued"]}
        expanded = [parse_node(n) for n in meta["expanded"]]
        counter = int(meta["counter"])
        pending = None if meta["pending"] is None else (parse_node(meta["pending"][0]), int(meta["pending"][1]))

    def save() -> None:
        if checkpoint is not None and red.is_root:
            meta = {
                "queue": [[o, c, str(n)] for o, c, n in sorted(queue)],
                "queued": sorted(str(n) for n in queued),
                "expanded": [str(n) for n in expanded],
                "counter": counter,
                "pending": None if pending is None else [str(pending[0]), pending[1]],
            }
            checkpoint.save({"values": values}, meta)

    bar = progress_bar(max_nodes, "path-patching search", progress, "node")
    bar.update(len(expanded) - (pending is not None))
    while pending is not None or (queue and len(expanded) < max_nodes):
        if pending is not None:
            node, first_slot = pending
        else:
            _, _, node = heapq.heappop(queue)
            expanded.append(node)
            first_slot = 0
        slots = _slots(g, node)
        for j in range(first_slot, len(slots)):
            r = slots[j]
            upstream = list(range(g.n_upstream[r]))
            effect = path_patching(experiment, receivers=[g.receivers[r]], senders=[g.senders[s] for s in upstream])
            values[upstream, r] = effect.values[upstream]
            ranked = sorted(upstream[1:], key=lambda s: -abs(float(effect.values[s])))[:k]  # input is never expanded
            for s in ranked:
                sender = g.senders[s]
                if sender not in queued:
                    queued.add(sender)
                    heapq.heappush(queue, (_order(g, sender), counter, sender))
                    counter += 1
            pending = (node, j + 1) if j + 1 < len(slots) else None
            save()
        pending = None
        bar.update(1)
    bar.close()
    settings = {
        "metric": experiment.metric.name,
        "ablation": experiment.ablation,
        "n_prompts": red.count(experiment.n_prompts),
        "k": k,
        "max_nodes": max_nodes,
    }
    return PathSearchResult(EdgeScores(g, values, "path-patching", settings), tuple(expanded))
