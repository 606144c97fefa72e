"""``Circuit``: a scored subgraph of a ``ComputationGraph``, its queries and its networkx views.

A circuit is a set of edges (``in_circuit[s, r]``), optionally the ``EdgeScores`` it was selected
from, and provenance (tool version, model, task, method, ablation, metric, seed, date,
faithfulness...). Its nodes are the nodes its edges touch. Circuits are immutable: every selection or
pruning step returns a new one.

Queries (docs/query.md): ``nodes_by``, ``in_edges`` / ``out_edges``, ``paths``, ``ancestors`` /
``descendants``, ``top_edges`` and comparisons with another circuit of the same graph (``overlap``,
``iou``, ``precision``, ``recall`` at edge or node level).

networkx views: ``to_networkx`` gives an ``nx.DiGraph`` over node ids. A sender can feed one head
through its ``<q>``, ``<k>`` and ``<v>`` slots, which are three edges of the computation graph but
one node pair; the DiGraph merges them into one edge with ``slot`` = the slots joined by commas in
q, k, v order (e.g. ``"q,v"``), ``slot_scores`` = {slot: score} and ``score`` = the sum of the slot
scores. ``to_multigraph`` keeps one edge per slot instead (key = ``"q"``, ``"k"``, ``"v"``, or ``""``
for MLP and logits receivers). Node attributes are integers so every export format can hold them:
``kind`` ("input" / "head" / "mlp" / "logits"), ``layer`` (``-1`` for input, ``n_layers`` for logits)
and ``head`` (``-1`` for anything but a head).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Literal

import networkx as nx
import torch
from torch import Tensor

from graphs.graph import SLOTS, ComputationGraph
from graphs.ids import (
    EdgeId,
    IdError,
    NodeId,
    NodeKind,
    ReceiverId,
    parse_edge,
    parse_node,
    parse_receiver,
)
from graphs.scores import EdgeScores

Level = Literal["edge", "node"]
NodeLike = NodeId | str


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

    # ------------------------------------------------------------------ node and edge queries
    def _node(self, node: NodeLike) -> NodeId:
        """``node`` as a NodeId of this graph (IdError naming it otherwise)."""
        n = parse_node(node) if isinstance(node, str) else node
        if not isinstance(n, NodeId):
            raise TypeError(f"expected a NodeId or node id string, got {type(node).__name__}")
        _node_position(self.graph, n)  # raises IdError when the node is not in the graph
        return n

    def nodes_by(self, kind: NodeKind | str | None = None, layer: int | None = None) -> list[NodeId]:
        """Circuit nodes of one ``kind`` ("input", "head", "mlp", "logits") and/or ``layer``.

        Input and logits have no layer, so they never match a ``layer`` filter. Topological order."""
        want = _kind(kind) if kind is not None else None
        return [
            n for n in self.nodes() if (want is None or n.kind is want) and (layer is None or n.layer == layer)
        ]

    def in_edges(self, node: NodeLike | ReceiverId) -> list[tuple[EdgeId, float | None]]:
        """Circuit edges into ``node`` (all its slots, or one slot given as ``a1.h0<q>``), with scores.

        Graph order: receiver-major (all ``<q>`` edges of a head, then ``<k>``, then ``<v>``),
        senders in topological order. The score is ``None`` when the circuit has no scores."""
        g = self.graph
        if isinstance(node, str) and "<" in node:
            node = parse_receiver(node)
        if isinstance(node, ReceiverId):
            receivers = [g.receiver_index(node)]
        else:
            receivers = _receivers_of(g, self._node(node))
        out: list[tuple[EdgeId, float | None]] = []
        for r in sorted(receivers):
            for s in torch.nonzero(self.in_circuit[:, r]).flatten().tolist():
                out.append((g.edge_id(s, r), self._score(s, r)))
        return out

    def out_edges(self, node: NodeLike) -> list[tuple[EdgeId, float | None]]:
        """Circuit edges out of ``node`` (a sender), with scores, in graph (receiver) order."""
        g, n = self.graph, self._node(node)
        if n.kind is NodeKind.LOGITS:
            return []
        s = g.sender_index(n)
        return [(g.edge_id(s, r), self._score(s, r)) for r in torch.nonzero(self.in_circuit[s]).flatten().tolist()]

    def _score(self, s: int, r: int) -> float | None:
        return None if self.scores is None else float(self.scores.values[s, r])

    def paths(self, source: NodeLike = "input", target: NodeLike = "logits", limit: int | None = None) -> list[list[NodeId]]:
        """Simple paths from ``source`` to ``target`` along circuit edges, as lists of nodes.

        A path passes through a head via any of its q/k/v slots (the slots are merged, so a path is
        listed once however many slots carry it). The number of paths can grow exponentially with
        the circuit: pass ``limit`` to take only the first ``limit`` (networkx DFS order, which is
        deterministic for a given circuit)."""
        src, dst = self._node(source), self._node(target)
        if limit is not None and limit < 0:
            raise ValueError("limit must be non-negative")
        view, by_name = self._digraph, _names(self.graph)
        if str(src) not in view or str(dst) not in view or src == dst:
            return []
        found = itertools.islice(nx.all_simple_paths(view, str(src), str(dst)), limit)
        return [[by_name[name] for name in path] for path in found]

    def ancestors(self, node: NodeLike) -> list[NodeId]:
        """Nodes with a circuit path to ``node`` (not ``node`` itself), in topological order."""
        return self._reach(node, nx.ancestors)

    def descendants(self, node: NodeLike) -> list[NodeId]:
        """Nodes reachable from ``node`` along circuit edges (not ``node`` itself), topological order."""
        return self._reach(node, nx.descendants)

    def _reach(self, node: NodeLike, how: Any) -> list[NodeId]:
        n = self._node(node)
        if str(n) not in self._digraph:
            return []
        names = how(self._digraph, str(n))
        return [m for m in self.graph.nodes if str(m) in names]

    def top_edges(self, n: int, absolute: bool = True) -> list[tuple[EdgeId, float]]:
        """The ``n`` highest-scoring circuit edges (by |score|, or signed with ``absolute=False``).

        Ties are broken by graph order. Needs scores (ValueError otherwise)."""
        if self.scores is None:
            raise ValueError("this circuit has no scores; top_edges needs them")
        if n < 0:
            raise ValueError("n must be non-negative")
        key = self.scores.ranking_key(absolute)
        key = torch.where(self.in_circuit, key, torch.full((), float("-inf"), dtype=key.dtype))
        order = torch.sort(key.T.reshape(-1), descending=True, stable=True).indices[: min(n, self.n_edges)]
        S = self.graph.n_senders
        out = []
        for flat in order.tolist():
            r, s = divmod(flat, S)
            out.append((self.graph.edge_id(s, r), float(self.scores.values[s, r])))
        return out

    # ------------------------------------------------------------------ comparison with another circuit
    def _members(self, other: Circuit, level: Level) -> tuple[Tensor, Tensor]:
        if not isinstance(other, Circuit):
            raise TypeError(f"can only compare with a Circuit, got {type(other).__name__}")
        if other.graph != self.graph:
            raise ValueError(
                f"cannot compare circuits on different graphs: {self.graph.describe()} vs {other.graph.describe()}"
            )
        if level == "edge":
            return self.in_circuit, other.in_circuit
        if level == "node":
            return self.node_mask(), other.node_mask()
        raise ValueError(f"level must be 'edge' or 'node', got {level!r}")

    def overlap(self, other: Circuit, level: Level = "edge") -> int:
        """Number of edges (or nodes) in both circuits."""
        a, b = self._members(other, level)
        return int((a & b).sum())

    def iou(self, other: Circuit, level: Level = "edge") -> float:
        """|A & B| / |A | B| (intersection over union); 1.0 when both are empty."""
        a, b = self._members(other, level)
        return _ratio(int((a & b).sum()), int((a | b).sum()), both_empty=not bool(a.any() or b.any()))

    def precision(self, other: Circuit, level: Level = "edge") -> float:
        """Fraction of this circuit (the prediction) that is in ``other`` (the reference).

        0.0 when this circuit is empty and the reference is not; 1.0 when both are empty."""
        a, b = self._members(other, level)
        return _ratio(int((a & b).sum()), int(a.sum()), both_empty=not bool(a.any() or b.any()))

    def recall(self, other: Circuit, level: Level = "edge") -> float:
        """Fraction of ``other`` (the reference) that this circuit (the prediction) contains.

        0.0 when the reference is empty and this circuit is not; 1.0 when both are empty."""
        a, b = self._members(other, level)
        return _ratio(int((a & b).sum()), int(b.sum()), both_empty=not bool(a.any() or b.any()))

    # ------------------------------------------------------------------ networkx views
    def to_networkx(self) -> nx.DiGraph:
        """A fresh ``nx.DiGraph`` of the circuit: node ids as nodes, q/k/v slots merged per node pair.

        Node attributes: ``kind``, ``layer``, ``head`` (ints; see the module docstring). Edge
        attributes: ``slot`` ("q", "q,v", "" for MLP / logits), ``slot_scores`` ({slot: score}),
        ``score`` (sum over slots; ``None`` without scores). Graph attributes: ``n_layers``,
        ``n_heads``, ``parallel_residual``, ``provenance`` (a dict) and, with scores, ``method``."""
        view = nx.DiGraph(**self._graph_attributes())
        self._add_nodes(view)
        for u, v, slot, _, score in self._edge_rows():
            data = view.get_edge_data(u, v)
            if data is None:
                view.add_edge(u, v, slot=slot, slot_scores={slot: score}, score=score)
            else:  # another slot of the same head: slots arrive in q, k, v order
                data["slot"] = f"{data['slot']},{slot}"
                data["slot_scores"][slot] = score
                data["score"] = None if score is None else data["score"] + score
        return view

    def to_multigraph(self) -> nx.MultiDiGraph:
        """A fresh ``nx.MultiDiGraph``: one edge per circuit edge, key = slot ("" for MLP / logits).

        Edge attributes: ``slot``, ``score`` (``None`` without scores), ``edge_id`` (e.g. ``a0.h1->a2.h0<q>``)."""
        view = nx.MultiDiGraph(**self._graph_attributes())
        self._add_nodes(view)
        for u, v, slot, edge_id, score in self._edge_rows():
            view.add_edge(u, v, key=slot, slot=slot, score=score, edge_id=edge_id)
        return view

    @cached_property
    def _digraph(self) -> nx.DiGraph:
        """Private DiGraph used by the path queries (built once per circuit; never handed out)."""
        return self.to_networkx()

    def _graph_attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "n_layers": self.graph.n_layers,
            "n_heads": self.graph.n_heads,
            "parallel_residual": self.graph.parallel_residual,
            "provenance": dict(self.provenance),
        }
        if self.scores is not None:
            attrs["method"] = self.scores.method
        return attrs

    def _add_nodes(self, view: nx.DiGraph) -> None:
        for node in self.nodes():
            view.add_node(str(node), **node_attributes(self.graph, node))

    def _edge_rows(self) -> list[tuple[str, str, str, str, float | None]]:
        """(sender, receiver node, slot, edge id, score) of every circuit edge, in graph order."""
        g = self.graph
        senders = [str(n) for n in g.senders]
        receivers = [(str(r.node), "" if r.slot is None else r.slot.value, str(r)) for r in g.receivers]
        rs, ss = torch.nonzero(self.in_circuit.T, as_tuple=True)  # receiver-major = graph edge order
        values = [None] * len(rs) if self.scores is None else self.scores.values[ss, rs].tolist()
        rows = []
        for s, r, score in zip(ss.tolist(), rs.tolist(), values, strict=True):
            node, slot, rec = receivers[r]
            rows.append((senders[s], node, slot, f"{senders[s]}->{rec}", score))
        return rows


# ---------------------------------------------------------------------- helpers
def node_attributes(graph: ComputationGraph, node: NodeId) -> dict[str, Any]:
    """``kind``, ``layer`` and ``head`` of a node as export-safe values (ints, no None).

    ``layer`` is -1 for input and ``n_layers`` for logits; ``head`` is -1 for anything but a head."""
    if node.kind is NodeKind.INPUT:
        layer = -1
    elif node.kind is NodeKind.LOGITS:
        layer = graph.n_layers
    else:
        assert node.layer is not None
        layer = node.layer
    return {"kind": node.kind.value, "layer": layer, "head": -1 if node.head is None else node.head}


def _kind(kind: NodeKind | str) -> NodeKind:
    try:
        return NodeKind(kind)
    except ValueError:
        valid = ", ".join(k.value for k in NodeKind)
        raise ValueError(f"unknown node kind {kind!r}; expected one of {valid}") from None


def _node_position(graph: ComputationGraph, node: NodeId) -> int:
    """Index of ``node`` in ``graph.nodes`` (senders, then logits); IdError if absent."""
    if node == NodeId.logits():
        return graph.n_senders
    if node.kind is NodeKind.LOGITS:
        raise IdError(f"{node} is not a node of this graph ({graph.describe()})")
    return graph.sender_index(node)


def _receivers_of(graph: ComputationGraph, node: NodeId) -> list[int]:
    """Receiver indices of a node: three slots for a head, one for an MLP or logits, none for input."""
    if node.kind is NodeKind.INPUT:
        return []
    if node.kind is NodeKind.LOGITS:
        return [graph.logits_receiver]
    assert node.layer is not None
    if node.kind is NodeKind.MLP:
        return [graph.mlp_receiver(node.layer)]
    assert node.head is not None
    return [graph.slot_receiver(node.layer, node.head, slot) for slot in SLOTS]


def _names(graph: ComputationGraph) -> dict[str, NodeId]:
    return {str(n): n for n in graph.nodes}


def _ratio(num: int, den: int, both_empty: bool) -> float:
    """num / den; with den == 0: 1.0 when both sets are empty (perfect agreement), else 0.0."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den
