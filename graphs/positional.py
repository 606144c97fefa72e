"""Token-position graphs: scores and circuits over ``(component, position)`` nodes (docs/positions.md).

A positional edge ``u@t -> r@t`` is sender ``u``'s output at token ``t`` as read by receiver ``r`` at
the same token ``t``. Residual edges only join equal positions; information moves between positions
only inside attention heads (a head's ``<k>``/``<v>`` slot at ``t`` feeds its output at later
positions). The dense layout adds a trailing position axis to the ``[S, R]`` one: scores and
masks are ``[S, R, T]``, and ``[s, r, t]`` is a real edge exactly when ``(s, r)`` is an edge of the
graph. Positional edge order (ties, files) is position-major: every edge of position 0 in the
graph's edge order, then position 1, ...

Every positional object carries ``tokens``: the token strings of the dataset's shared alignment
(one per position; column headers of drawings). They are text for people, never parsed.

``PositionalEdgeScores`` and ``PositionalCircuit`` are immutable, like their non-positional
counterparts; ``summed()`` / ``collapsed()`` give those counterparts back (the sum of the scores
over positions; the union of the edges over positions).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from graphs.circuit import Circuit, _kind, _node_position, _receivers_of, node_attributes
from graphs.graph import ComputationGraph
from graphs.ids import EdgeId, IdError, NodeId, NodeKind, ReceiverId, parse_positional_edge, parse_positional_node
from graphs.scores import EdgeScores, NodeScores

MAX_POSITIONS = 65536  # a sanity cap on T (files, constructors)


def _frozen(meta: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(meta or {}))


def _check_tokens(tokens: Iterable[str], T: int) -> tuple[str, ...]:
    out = tuple(tokens)
    if len(out) != T:
        raise ValueError(f"need one token string per position ({T}), got {len(out)}")
    if not all(isinstance(t, str) for t in out):
        raise ValueError("token strings must be strings")
    return out


def positional_edge_mask(graph: ComputationGraph, T: int) -> Tensor:
    """``[S, R, T]`` bool: True where ``(s, r)`` is an edge (at every position)."""
    return graph.edge_mask[:, :, None].expand(-1, -1, T).contiguous()


def _edge_at(graph: ComputationGraph, edge: EdgeId | str, T: int) -> tuple[int, int, int]:
    """(sender, receiver, position) of a positional edge id of ``graph`` (IdError otherwise)."""
    if isinstance(edge, str):
        base, t = parse_positional_edge(edge)
    else:
        t = edge.position
        if t is None:
            raise IdError(f"{edge} has no position (expected e.g. 'a0.h1@3->a3.h2@3<q>')")
        base = edge.at(None)
    if not 0 <= t < T:
        raise IdError(f"{edge}: position {t} is outside the {T} positions of this graph")
    s, r = graph.edge_index(base)
    return s, r, t


def _order(key: Tensor) -> Tensor:
    """Flat indices of ``key`` [S, R, T] in positional edge order (position-major, receiver, sender)."""
    return key.permute(2, 1, 0).reshape(-1)


def _from_order(flat: Tensor, S: int, R: int, T: int) -> Tensor:
    """Inverse of ``_order`` for a flat [T*R*S] tensor -> [S, R, T]."""
    return flat.view(T, R, S).permute(2, 1, 0).contiguous()


def _unflatten(index: int, S: int, R: int) -> tuple[int, int, int]:
    """(s, r, t) of an index in positional edge order."""
    t, rest = divmod(index, R * S)
    r, s = divmod(rest, S)
    return s, r, t


@dataclass(frozen=True)
class PositionalEdgeScores:
    """A score for every positional edge: ``values[s, r, t]`` for ``u_s@t -> r@t`` (0 off the graph).

    Same sign convention as ``EdgeScores`` (effect on the metric of ablating the edge at that
    position). ``tokens``: the shared alignment's token strings, one per position."""

    graph: ComputationGraph
    values: Tensor  # [S, R, T] float32 (or wider), zero where graph.edge_mask is False
    tokens: tuple[str, ...]
    method: str = "unknown"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        S, R = self.graph.n_senders, self.graph.n_receivers
        if self.values.dim() != 3 or tuple(self.values.shape[:2]) != (S, R) or self.values.shape[2] < 1:
            raise ValueError(f"positional edge scores must be [{S}, {R}, T], got {tuple(self.values.shape)}")
        if self.values.shape[2] > MAX_POSITIONS:
            raise ValueError(f"{self.values.shape[2]} positions is above the cap of {MAX_POSITIONS}")
        if not self.values.is_floating_point():
            raise ValueError("edge scores must be floating point")
        values = self.values.detach().to(torch.promote_types(self.values.dtype, torch.float32)).cpu()
        values = torch.where(self.graph.edge_mask[:, :, None], values, torch.zeros((), dtype=values.dtype))
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "tokens", _check_tokens(self.tokens, self.n_positions))
        object.__setattr__(self, "settings", _frozen(self.settings))

    @property
    def n_positions(self) -> int:
        return int(self.values.shape[2])

    @property
    def n_edges(self) -> int:
        """Number of positional edges: the graph's edges times the positions."""
        return self.graph.n_edges * self.n_positions

    @property
    def edge_mask(self) -> Tensor:
        """[S, R, T] bool of the real positional edges."""
        return positional_edge_mask(self.graph, self.n_positions)

    # ------------------------------------------------------------------ access
    def __getitem__(self, edge: EdgeId | str) -> float:
        return float(self.values[_edge_at(self.graph, edge, self.n_positions)])

    def edge_id(self, s: int, r: int, t: int) -> EdgeId:
        return self.graph.edge_id(s, r).at(t)

    def at(self, position: int) -> EdgeScores:
        """The scores of the edges at one position, as non-positional ``EdgeScores``."""
        if not 0 <= position < self.n_positions:
            raise IndexError(f"position {position} outside 0..{self.n_positions - 1}")
        return EdgeScores(self.graph, self.values[:, :, position], self.method, {**self.settings, "position": position})

    def summed(self) -> EdgeScores:
        """Scores summed over positions: for EAP-family scores, exactly the non-positional scores."""
        return EdgeScores(self.graph, self.values.sum(2), self.method, {**self.settings, "positions": "summed"})

    def by_position(self, absolute: bool = True) -> Tensor:
        """[T] total (|score| by default) per position: where the scored effect sits."""
        return (self.values.abs() if absolute else self.values).sum((0, 1))

    def node_scores(self, position: int | None = None) -> NodeScores:
        """Per-sender sum of outgoing scores, at one position or summed over all of them."""
        vals = self.values.sum(1)  # [S, T]
        vals = vals.sum(1) if position is None else vals[:, position]
        return NodeScores(self.graph, vals, f"{self.method}/edges-sum", self.settings)

    def ranking_key(self, absolute: bool = True) -> Tensor:
        """[S, R, T] key: larger = more important; non-edges are -inf."""
        key = self.values.abs() if absolute else self.values
        return torch.where(self.edge_mask, key, torch.full((), float("-inf"), dtype=key.dtype))

    # ------------------------------------------------------------------ selection
    def top_n_mask(self, n: int, absolute: bool = True) -> Tensor:
        """[S, R, T] bool: the ``n`` highest-ranked positional edges; ties by positional edge order."""
        if n < 0:
            raise ValueError("n must be non-negative")
        n = min(n, self.n_edges)
        S, R, T = self.values.shape
        order = torch.sort(_order(self.ranking_key(absolute)), descending=True, stable=True).indices[:n]
        chosen = torch.zeros(S * R * T, dtype=torch.bool)
        chosen[order] = True
        return _from_order(chosen, S, R, T)

    def threshold_mask(self, threshold: float, absolute: bool = True) -> Tensor:
        """[S, R, T] bool: positional edges whose (absolute) score is at least ``threshold``."""
        return (self.ranking_key(absolute) >= threshold) & self.edge_mask

    def top_edges(self, n: int, absolute: bool = True, position: int | None = None) -> list[tuple[EdgeId, float]]:
        """The ``n`` best positional edges (optionally at one ``position``) with their scores."""
        key = self.ranking_key(absolute)
        if position is not None:
            keep = torch.zeros_like(key, dtype=torch.bool)
            keep[:, :, position] = True
            key = torch.where(keep, key, torch.full((), float("-inf"), dtype=key.dtype))
        S, R, _ = self.values.shape
        flat = _order(key)
        order = torch.sort(flat, descending=True, stable=True).indices[: max(0, n)]
        out = []
        for i in order.tolist():
            if flat[i] == float("-inf"):
                break
            s, r, t = _unflatten(i, S, R)
            out.append((self.edge_id(s, r, t), float(self.values[s, r, t])))
        return out

    def items(self) -> Iterator[tuple[EdgeId, float]]:
        """Every positional edge with its score, in positional edge order."""
        for t in range(self.n_positions):
            for edge in self.graph.edges():
                s, r = self.graph.edge_index(edge)
                yield edge.at(t), float(self.values[s, r, t])

    def with_values(self, values: Tensor, **settings: Any) -> PositionalEdgeScores:
        return PositionalEdgeScores(self.graph, values, self.tokens, self.method, {**self.settings, **settings})


@dataclass(frozen=True, eq=False)
class PositionalCircuit:
    """A set of positional edges (``in_circuit[s, r, t]``), optionally scored, with provenance.

    Its nodes are the ``(component, position)`` pairs its edges touch. Queries take an optional
    ``position`` filter; ``at(t)`` and ``collapsed()`` give ordinary ``Circuit`` objects."""

    graph: ComputationGraph
    in_circuit: Tensor  # [S, R, T] bool, a subset of the positional edge mask
    tokens: tuple[str, ...]
    scores: PositionalEdgeScores | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        S, R = self.graph.n_senders, self.graph.n_receivers
        if self.in_circuit.dim() != 3 or tuple(self.in_circuit.shape[:2]) != (S, R) or self.in_circuit.shape[2] < 1:
            raise ValueError(f"positional circuit mask must be [{S}, {R}, T], got {tuple(self.in_circuit.shape)}")
        mask = self.in_circuit.detach().cpu().to(torch.bool)
        if bool((mask & ~self.graph.edge_mask[:, :, None]).any()):
            raise ValueError("circuit mask marks pairs that are not edges of the graph")
        object.__setattr__(self, "in_circuit", mask)
        object.__setattr__(self, "tokens", _check_tokens(self.tokens, self.n_positions))
        if self.scores is not None:
            if self.scores.graph != self.graph or self.scores.n_positions != self.n_positions:
                raise ValueError("scores belong to a different graph or number of positions")
        object.__setattr__(self, "provenance", MappingProxyType(dict(self.provenance)))

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def from_edges(
        graph: ComputationGraph,
        tokens: Iterable[str],
        edges: Iterable[EdgeId | str],
        scores: PositionalEdgeScores | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> PositionalCircuit:
        toks = tuple(tokens)
        mask = torch.zeros(graph.n_senders, graph.n_receivers, len(toks), dtype=torch.bool)
        for edge in edges:
            mask[_edge_at(graph, edge, len(toks))] = True
        return PositionalCircuit(graph, mask, toks, scores, provenance or {})

    @staticmethod
    def from_circuit(circuit: Circuit, tokens: Iterable[str]) -> PositionalCircuit:
        """Every edge of ``circuit`` at every position (e.g. a non-positional MIB circuit)."""
        toks = tuple(tokens)
        mask = circuit.in_circuit[:, :, None].expand(-1, -1, len(toks))
        return PositionalCircuit(circuit.graph, mask, toks, None, circuit.provenance)

    @staticmethod
    def full(graph: ComputationGraph, tokens: Iterable[str], scores: PositionalEdgeScores | None = None) -> PositionalCircuit:
        toks = tuple(tokens)
        return PositionalCircuit(graph, positional_edge_mask(graph, len(toks)), toks, scores)

    @staticmethod
    def empty(graph: ComputationGraph, tokens: Iterable[str], scores: PositionalEdgeScores | None = None) -> PositionalCircuit:
        toks = tuple(tokens)
        return PositionalCircuit(graph, torch.zeros(graph.n_senders, graph.n_receivers, len(toks), dtype=torch.bool), toks, scores)

    def with_mask(self, mask: Tensor, **provenance: Any) -> PositionalCircuit:
        return PositionalCircuit(self.graph, mask, self.tokens, self.scores, {**self.provenance, **provenance})

    def with_provenance(self, **provenance: Any) -> PositionalCircuit:
        return PositionalCircuit(self.graph, self.in_circuit, self.tokens, self.scores, {**self.provenance, **provenance})

    # ------------------------------------------------------------------ views
    @property
    def n_positions(self) -> int:
        return int(self.in_circuit.shape[2])

    @property
    def n_edges(self) -> int:
        return int(self.in_circuit.sum())

    @property
    def n_graph_edges(self) -> int:
        """Number of positional edges of the graph (edges times positions)."""
        return self.graph.n_edges * self.n_positions

    @property
    def edge_fraction(self) -> float:
        return self.n_edges / self.n_graph_edges

    def ablation_mask(self) -> Tensor:
        """[S, R, T] bool: the positional edges to ablate when evaluating this circuit."""
        return positional_edge_mask(self.graph, self.n_positions) & ~self.in_circuit

    def at(self, position: int) -> Circuit:
        """The circuit's edges at one position as a non-positional ``Circuit``."""
        if not 0 <= position < self.n_positions:
            raise IndexError(f"position {position} outside 0..{self.n_positions - 1}")
        scores = None if self.scores is None else self.scores.at(position)
        return Circuit(self.graph, self.in_circuit[:, :, position], scores, {**self.provenance, "position": position})

    def collapsed(self) -> Circuit:
        """The non-positional circuit: an edge is in it if it is in at any position; scores summed."""
        scores = None if self.scores is None else self.scores.summed()
        return Circuit(self.graph, self.in_circuit.any(2), scores, {**self.provenance, "positions": "collapsed"})

    def positions(self) -> list[int]:
        """Positions that hold at least one circuit edge."""
        return self.in_circuit.any(0).any(0).nonzero().flatten().tolist()

    def edges(self, position: int | None = None) -> list[EdgeId]:
        """Circuit edges (positional ids) in positional edge order, optionally at one ``position``."""
        return [e for e, _ in self._rows(self.in_circuit, position)]

    def score_of(self, edge: EdgeId | str) -> float | None:
        return None if self.scores is None else self.scores[edge]

    def __contains__(self, item: EdgeId | NodeId | str) -> bool:
        if isinstance(item, str):
            if "->" in item:
                try:
                    return bool(self.in_circuit[_edge_at(self.graph, item, self.n_positions)])
                except IdError:
                    return False
            item = _parse_node(item)
        if isinstance(item, EdgeId):
            try:
                return bool(self.in_circuit[_edge_at(self.graph, item, self.n_positions)])
            except IdError:
                return False
        return item in set(self.nodes())

    def node_mask(self) -> Tensor:
        """[S + 1, T] bool over ``graph.nodes`` x positions: nodes touched by a circuit edge."""
        g = self.graph
        sends = self.in_circuit.any(1)  # [S, T]
        col_any = self.in_circuit.any(0)  # [R, T]
        out = torch.zeros(g.n_senders + 1, self.n_positions, dtype=torch.bool)
        out[: g.n_senders] |= sends
        for layer in range(g.n_layers):
            qkv = col_any[g.qkv_receivers(layer)].view(3, g.n_heads, -1).any(0)  # [H, T]
            out[g.attention_senders(layer)] |= qkv
            out[g.mlp_sender(layer)] |= col_any[g.mlp_receiver(layer)]
        out[g.n_senders] |= col_any[g.logits_receiver]
        return out

    def nodes(self, position: int | None = None) -> list[NodeId]:
        """Positional nodes touched by circuit edges: position-major, topological within a position."""
        mask = self.node_mask()
        positions = range(self.n_positions) if position is None else [position]
        return [node.at(t) for t in positions for node, keep in zip(self.graph.nodes, mask[:, t].tolist()) if keep]

    def nodes_by(
        self, kind: NodeKind | str | None = None, layer: int | None = None, position: int | None = None
    ) -> list[NodeId]:
        """Circuit nodes filtered by ``kind``, ``layer`` and/or ``position``."""
        want = _kind(kind) if kind is not None else None
        return [
            n for n in self.nodes(position) if (want is None or n.kind is want) and (layer is None or n.layer == layer)
        ]

    def positions_of(self, node: NodeId | str) -> list[int]:
        """Positions at which a component (given without ``@t``) is in the circuit."""
        parsed = _parse_node(node)
        if parsed.position is not None:
            raise IdError(f"{parsed}: give the component without a position (e.g. a3.h2)")
        index = _node_position(self.graph, parsed)
        return self.node_mask()[index].nonzero().flatten().tolist()

    def in_edges(self, node: NodeId | ReceiverId | str) -> list[tuple[EdgeId, float | None]]:
        """Circuit edges into a positional node (``a2.h0@5``, all slots) or slot (``a2.h0@5<q>``)."""
        g = self.graph
        if isinstance(node, str):
            node = _parse_receiver_or_node(node)
        if isinstance(node, ReceiverId):
            t = node.node.position
            receivers = [g.receiver_index(node.at(None))]
        else:
            t = node.position
            receivers = _receivers_of(g, node.at(None))
        if t is None:
            raise IdError(f"{node}: give a position (e.g. a2.h0@5); use at(t) or collapsed() for whole circuits")
        out = []
        for r in sorted(receivers):
            for s in torch.nonzero(self.in_circuit[:, r, t]).flatten().tolist():
                out.append((g.edge_id(s, r).at(t), self._score(s, r, t)))
        return out

    def out_edges(self, node: NodeId | str) -> list[tuple[EdgeId, float | None]]:
        """Circuit edges out of a positional sender node (``a0.h1@3``)."""
        g = self.graph
        n = _parse_node(node) if isinstance(node, str) else node
        if n.position is None:
            raise IdError(f"{n}: give a position (e.g. a0.h1@3)")
        if n.kind is NodeKind.LOGITS:
            return []
        s, t = g.sender_index(n.at(None)), n.position
        return [(g.edge_id(s, r).at(t), self._score(s, r, t)) for r in torch.nonzero(self.in_circuit[s, :, t]).flatten().tolist()]

    def top_edges(self, n: int, absolute: bool = True, position: int | None = None) -> list[tuple[EdgeId, float]]:
        """The ``n`` highest-scoring circuit edges (optionally at one ``position``). Needs scores."""
        if self.scores is None:
            raise ValueError("this circuit has no scores; top_edges needs them")
        key = self.scores.ranking_key(absolute)
        keep = self.in_circuit.clone()
        if position is not None:
            keep[:, :, :position] = False
            keep[:, :, position + 1 :] = False
        key = torch.where(keep, key, torch.full((), float("-inf"), dtype=key.dtype))
        S, R, _ = key.shape
        order = torch.sort(_order(key), descending=True, stable=True).indices[: min(max(n, 0), int(keep.sum()))]
        out = []
        for i in order.tolist():
            s, r, t = _unflatten(i, S, R)
            out.append((self.graph.edge_id(s, r).at(t), float(self.scores.values[s, r, t])))
        return out

    def head_positions(self) -> dict[str, list[int]]:
        """For every head in the circuit, the positions it appears at (as a node): ``{"a3.h2": [4, 9]}``."""
        mask = self.node_mask()
        out: dict[str, list[int]] = {}
        for i, node in enumerate(self.graph.senders):
            if node.kind is NodeKind.HEAD and bool(mask[i].any()):
                out[str(node)] = mask[i].nonzero().flatten().tolist()
        return out

    # ------------------------------------------------------------------ networkx views and paths
    def to_networkx(self) -> nx.DiGraph:
        """A fresh ``nx.DiGraph`` of the circuit's positional edges: nodes ``a3.h7@12`` with ``kind``,
        ``layer``, ``head`` (export-safe ints as in ``Circuit.to_networkx``), ``position`` and
        ``token``; one edge per (sender@t, receiver node@t) pair with q/k/v slots merged (``slot``,
        ``slot_scores``, ``score`` summed over slots or None). Graph attributes: ``n_layers``,
        ``n_heads``, ``parallel_residual``, ``n_positions``, ``tokens`` (a list), ``provenance`` and,
        with scores, ``method``. Only residual edges: movement between tokens inside heads is not an
        edge of the graph (``paths`` follows it)."""
        g = self.graph
        attrs: dict[str, Any] = {
            "n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_residual": g.parallel_residual,
            "n_positions": self.n_positions, "tokens": list(self.tokens), "provenance": dict(self.provenance),
        }
        if self.scores is not None:
            attrs["method"] = self.scores.method
        view = nx.DiGraph(**attrs)
        for node in self.nodes():
            assert node.position is not None
            view.add_node(str(node), **node_attributes(g, node.at(None)), position=node.position,
                          token=self.tokens[node.position])
        for edge, score in self._rows(self.in_circuit, None):
            u, v = str(edge.sender), str(edge.receiver.node)
            slot = "" if edge.receiver.slot is None else edge.receiver.slot.value
            data = view.get_edge_data(u, v)
            if data is None:
                view.add_edge(u, v, slot=slot, slot_scores={slot: score}, score=score)
            else:  # another slot of the same head at the same token: slots arrive in q, k, v order
                data["slot"] = f"{data['slot']},{slot}"
                data["slot_scores"][slot] = score
                data["score"] = None if score is None else data["score"] + score
        return view

    def _path_graph(self) -> nx.DiGraph:
        """The graph ``paths`` walks: circuit edges, with a head's ``<k>`` / ``<v>`` edges at token t
        entering a hidden node ``a.h@t<kv>`` that continues to the same head at every token ``>= t``
        where it is a circuit node (causal attention); ``<q>`` edges enter the head at t only."""
        view = nx.DiGraph()
        heads_at: dict[str, list[int]] = {}
        for node in self.nodes():
            view.add_node(str(node))
            if node.kind is NodeKind.HEAD:
                heads_at.setdefault(str(node.at(None)), []).append(int(node.position))  # type: ignore[arg-type]
        for edge, _ in self._rows(self.in_circuit, None):
            u, receiver = str(edge.sender), edge.receiver
            slot = receiver.slot
            if slot is None or slot.value == "q":
                view.add_edge(u, str(receiver.node))
                continue
            head, t = receiver.node.at(None), receiver.node.position
            assert t is not None
            hidden = f"{receiver.node}<kv>"
            view.add_edge(u, hidden)
            for later in heads_at.get(str(head), []):
                if later >= t:
                    view.add_edge(hidden, str(head.at(later)))
        return view

    def paths(self, source: NodeId | str = "input", target: NodeId | str = "logits", limit: int | None = None,
              position: int | None = None) -> list[list[NodeId]]:
        """Simple paths from ``source`` to ``target`` through the positional circuit, as lists of
        positional nodes.

        Residual edges join equal tokens; a path moves to a later token only inside a head, through
        the head's ``<k>`` / ``<v>`` input at token t to the same head's output at a token ``t' >= t``
        (shown as ``a.h@t -> a.h@t'``). ``source`` / ``target`` without ``@t`` stand for the component
        at every token where it is a circuit node. ``position``: only paths that stay at that token.
        ``limit``: the first ``limit`` paths (deterministic order: sources, then targets by token,
        then networkx DFS); paths that read the same are listed once."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be non-negative")
        if position is not None and not 0 <= position < self.n_positions:
            raise IndexError(f"position {position} outside 0..{self.n_positions - 1}")
        view = self._path_graph()
        present = set(self.nodes())

        def ends(item: NodeId | str) -> list[NodeId]:
            node = _parse_node(item)
            _node_position(self.graph, node.at(None))  # IdError / ValueError for nodes the graph lacks
            if node.position is not None:
                wanted = [node]
            else:
                wanted = [node.at(t) for t in range(self.n_positions)]
            return [n for n in wanted if n in present and (position is None or n.position == position)]

        if position is not None:
            view = view.subgraph([n for n in view if _parse_node(n.removesuffix("<kv>")).position == position])
        out: list[list[NodeId]] = []
        seen: set[tuple[str, ...]] = set()
        for src in ends(source):
            for dst in ends(target):
                if src == dst:
                    continue
                for raw in nx.all_simple_paths(view, str(src), str(dst)):
                    shown: list[str] = []
                    for name in raw:
                        name = name.removesuffix("<kv>")
                        if not shown or shown[-1] != name:
                            shown.append(name)
                    key = tuple(shown)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append([_parse_node(n) for n in shown])
                    if limit is not None and len(out) >= limit:
                        return out
        return out

    def describe(self) -> str:
        nodes = self.nodes()
        heads = sum(1 for n in nodes if n.kind is NodeKind.HEAD)
        return (
            f"{self.n_edges} positional edges ({100 * self.edge_fraction:.3f}% of {self.n_graph_edges}) over "
            f"{len(self.positions())} of {self.n_positions} positions, {heads} head-position nodes"
        )

    def _score(self, s: int, r: int, t: int) -> float | None:
        return None if self.scores is None else float(self.scores.values[s, r, t])

    def _rows(self, mask: Tensor, position: int | None) -> list[tuple[EdgeId, float | None]]:
        S, R, _ = mask.shape
        keep = mask if position is None else _only(mask, position)
        out = []
        for i in _order(keep).nonzero().flatten().tolist():
            s, r, t = _unflatten(i, S, R)
            out.append((self.graph.edge_id(s, r).at(t), self._score(s, r, t)))
        return out


def _only(mask: Tensor, position: int) -> Tensor:
    out = torch.zeros_like(mask)
    out[:, :, position] = mask[:, :, position]
    return out


def _parse_node(text: NodeId | str) -> NodeId:
    if isinstance(text, NodeId):
        return text
    base, t = parse_positional_node(text)
    return base.at(t)


def _parse_receiver_or_node(text: str) -> ReceiverId | NodeId:
    from graphs.ids import parse_receiver

    return parse_receiver(text) if "<" in text else _parse_node(text)


__all__ = ["MAX_POSITIONS", "PositionalCircuit", "PositionalEdgeScores", "positional_edge_mask"]
