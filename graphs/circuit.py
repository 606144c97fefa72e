"""``Circuit``: a scored subgraph of a ``ComputationGraph``.

A circuit is a set of edges (``in_circuit[s, r]``), optionally the ``EdgeScores`` it was selected
from, and provenance (tool version, model, task, method, ablation, metric, seed, date,
faithfulness...). Its nodes are the nodes its edges touch. Circuits are immutable: every selection or
pruning step returns a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from graphs.graph import ComputationGraph
from graphs.ids import EdgeId, NodeId, NodeKind, parse_edge, parse_node
from graphs.scores import EdgeScores


@dataclass(frozen=True, eq=False)
class Circuit:
    graph: ComputationGraph
    in_circuit: Tensor  # [S, R] bool, a subset of graph.edge_mask
    scores: EdgeScores | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        S, R = self.graph.n_senders, self.graph.n_receivers
        if tuple(self.in_circuit.shape) != (S, R):
            raise ValueError(f"circuit mask must be [{S}, {R}], got {tuple(self.in_circuit.shape)}")
        mask = self.in_circuit.detach().cpu().to(torch.bool)
        if bool((mask & ~self.graph.edge_mask).any()):
            raise ValueError("circuit mask marks pairs that are not edges of the graph")
        object.__setattr__(self, "in_circuit", mask)
        if self.scores is not None and self.scores.graph != self.graph:
            raise ValueError("scores belong to a different graph")
        object.__setattr__(self, "provenance", MappingProxyType(dict(self.provenance)))

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def from_edges(
        graph: ComputationGraph,
        edges: Iterable[EdgeId | str],
        scores: EdgeScores | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Circuit:
        mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        for edge in edges:
            e = parse_edge(edge) if isinstance(edge, str) else edge
            mask[graph.edge_index(e)] = True
        return Circuit(graph, mask, scores, provenance or {})

    @staticmethod
    def full(graph: ComputationGraph, scores: EdgeScores | None = None) -> Circuit:
        return Circuit(graph, graph.edge_mask, scores)

    @staticmethod
    def empty(graph: ComputationGraph, scores: EdgeScores | None = None) -> Circuit:
        return Circuit(graph, torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool), scores)

    def with_mask(self, mask: Tensor, **provenance: Any) -> Circuit:
        return Circuit(self.graph, mask, self.scores, {**self.provenance, **provenance})

    def with_provenance(self, **provenance: Any) -> Circuit:
        return Circuit(self.graph, self.in_circuit, self.scores, {**self.provenance, **provenance})

    # ------------------------------------------------------------------ basic views
    @property
    def n_edges(self) -> int:
        return int(self.in_circuit.sum())

    @property
    def edge_fraction(self) -> float:
        return self.n_edges / self.graph.n_edges

    def ablation_mask(self) -> Tensor:
        """[S, R] bool: the edges to ablate when evaluating this circuit (real edges not in it)."""
        return self.graph.edge_mask & ~self.in_circuit

    def edges(self) -> list[EdgeId]:
        """Circuit edges in the graph's edge order (receiver-major)."""
        rs, ss = torch.nonzero(self.in_circuit.T, as_tuple=True)
        return [self.graph.edge_id(int(s), int(r)) for s, r in zip(ss, rs, strict=True)]

    def __contains__(self, item: EdgeId | NodeId | str) -> bool:
        if isinstance(item, str):
            item = parse_edge(item) if "->" in item else parse_node(item)
        if isinstance(item, EdgeId):
            try:
                return bool(self.in_circuit[self.graph.edge_index(item)])
            except ValueError:
                return False
        return item in self.nodes()

    def node_mask(self) -> Tensor:
        """[S + 1] bool over ``graph.nodes`` (senders then logits): nodes touched by a circuit edge."""
        g = self.graph
        sends = self.in_circuit.any(1)  # [S]
        receives = torch.zeros(g.n_senders + 1, dtype=torch.bool)
        col_any = self.in_circuit.any(0)  # [R]
        for layer in range(g.n_layers):
            qkv = col_any[g.qkv_receivers(layer)].view(3, g.n_heads).any(0)
            receives[g.attention_senders(layer)] |= qkv
            receives[g.mlp_sender(layer)] |= col_any[g.mlp_receiver(layer)]
        receives[g.n_senders] = col_any[g.logits_receiver]
        out = receives.clone()
        out[: g.n_senders] |= sends
        return out

    def nodes(self) -> list[NodeId]:
        """Nodes touched by circuit edges, in topological order."""
        mask = self.node_mask()
        return [node for node, keep in zip(self.graph.nodes, mask.tolist(), strict=True) if keep]

    def score_of(self, edge: EdgeId | str) -> float | None:
        return None if self.scores is None else self.scores[edge]

    def describe(self) -> str:
        heads = sum(1 for n in self.nodes() if n.kind is NodeKind.HEAD)
        mlps = sum(1 for n in self.nodes() if n.kind is NodeKind.MLP)
        return f"{self.n_edges} edges ({100 * self.edge_fraction:.2f}% of {self.graph.n_edges}), {heads} heads, {mlps} MLPs"

