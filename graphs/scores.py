"""Scores on the graph: ``EdgeScores`` ([senders, receivers]) and ``NodeScores`` ([senders]).

One sign convention everywhere (DESIGN.md section 5): a score is the effect on the metric ``m``
(higher ``m`` = more task behaviour) of ablating the edge or node, ``m(ablated) - m(clean)``; an
edge the behaviour relies on has a *negative* score. Selection ranks by ``|score|`` by default;
``absolute=False`` ranks by the signed value, largest first (pass negated scores to rank the most
negative first).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from graphs.graph import ComputationGraph
from graphs.ids import EdgeId, NodeId, parse_edge, parse_node


def _frozen(meta: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(meta or {}))


@dataclass(frozen=True)
class EdgeScores:
    """A score for every edge of ``graph``: ``values[s, r]``; entries that are not edges are 0.

    ``method`` and ``settings`` describe how the scores were made (they go into provenance)."""

    graph: ComputationGraph
    values: Tensor  # [S, R] float32 (or wider), zero where graph.edge_mask is False
    method: str = "unknown"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        S, R = self.graph.n_senders, self.graph.n_receivers
        if tuple(self.values.shape) != (S, R):
            raise ValueError(f"edge scores must be [{S}, {R}], got {tuple(self.values.shape)}")
        if not self.values.is_floating_point():
            raise ValueError("edge scores must be floating point")
        values = self.values.detach().to(torch.promote_types(self.values.dtype, torch.float32)).cpu()
        values = torch.where(self.graph.edge_mask, values, torch.zeros((), dtype=values.dtype))
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "settings", _frozen(self.settings))

    # ------------------------------------------------------------------ access
    def __getitem__(self, edge: EdgeId | str) -> float:
        e = parse_edge(edge) if isinstance(edge, str) else edge
        return float(self.values[self.graph.edge_index(e)])

    def items(self) -> Iterator[tuple[EdgeId, float]]:
        """Every edge with its score, in the graph's edge order."""
        for edge in self.graph.edges():
            yield edge, float(self.values[self.graph.edge_index(edge)])

    def flat(self) -> Tensor:
        """Scores of the real edges as a vector, in ``ComputationGraph.edges()`` order."""
        return self.values.T[self.graph.edge_mask.T]

    def ranking_key(self, absolute: bool = True) -> Tensor:
        """[S, R] key: larger = more important; non-edges are -inf."""
        key = self.values.abs() if absolute else self.values
        return torch.where(self.graph.edge_mask, key, torch.full((), float("-inf"), dtype=key.dtype))

    # ------------------------------------------------------------------ selection (new objects)
    def top_n_mask(self, n: int, absolute: bool = True) -> Tensor:
        """[S, R] bool: the ``n`` highest-ranked edges; ties broken by edge order (deterministic)."""
        if n < 0:
            raise ValueError("n must be non-negative")
        n = min(n, self.graph.n_edges)
        key = self.ranking_key(absolute).T.reshape(-1)  # receiver-major = graph edge order
        order = torch.sort(key, descending=True, stable=True).indices[:n]
        chosen = torch.zeros_like(key, dtype=torch.bool)
        chosen[order] = True
        return chosen.view(self.graph.n_receivers, self.graph.n_senders).T.contiguous()

    def threshold_mask(self, threshold: float, absolute: bool = True) -> Tensor:
        """[S, R] bool: edges whose (absolute) score is at least ``threshold``."""
        return (self.ranking_key(absolute) >= threshold) & self.graph.edge_mask

    def with_values(self, values: Tensor, **settings: Any) -> EdgeScores:
        return EdgeScores(self.graph, values, self.method, {**self.settings, **settings})

    def node_scores(self, reduce: str = "sum") -> NodeScores:
        """Per-sender scores from its outgoing edges: ``sum`` of scores or ``max`` of |scores|."""
        if reduce == "sum":
            vals = self.values.sum(1)
        elif reduce == "max":
            vals = self.values.abs().amax(1)
        else:
            raise ValueError("reduce must be 'sum' or 'max'")
        return NodeScores(self.graph, vals, f"{self.method}/edges-{reduce}", self.settings)


@dataclass(frozen=True)
class NodeScores:
    """A score for every sender node (input, heads, MLPs): ``values[s]``."""

    graph: ComputationGraph
    values: Tensor  # [S]
    method: str = "unknown"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.values.shape) != (self.graph.n_senders,):
            raise ValueError(f"node scores must be [{self.graph.n_senders}], got {tuple(self.values.shape)}")
        values = self.values.detach().to(torch.promote_types(self.values.dtype, torch.float32)).cpu()
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "settings", _frozen(self.settings))

    def __getitem__(self, node: NodeId | str) -> float:
        n = parse_node(node) if isinstance(node, str) else node
        return float(self.values[self.graph.sender_index(n)])

    def items(self) -> Iterator[tuple[NodeId, float]]:
        for i, node in enumerate(self.graph.senders):
            yield node, float(self.values[i])

    def top(self, n: int, absolute: bool = True) -> list[tuple[NodeId, float]]:
        key = self.values.abs() if absolute else self.values
        order = torch.sort(key, descending=True, stable=True).indices[:n]
        return [(self.graph.senders[int(i)], float(self.values[int(i)])) for i in order]
