"""Sources of a CD-T pass: sets of sender nodes (optionally at token positions) whose relevant part
is ``a - A`` (activation minus ablation value), and how a group of them becomes one ``PassPlan``.

A source is given as a node id (``"a3.h7"``, ``"m2"``, ``"input"``), a node at a position
(``"a3.h7@12"``, i.e. ``NodeId`` with ``position``), a ``Source`` (several nodes, optionally
restricted to ``positions``), or any iterable of those (one source set).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from circuits.methods.cdt.forward import BatchState, PassPlan, Point
from circuits.methods.cdt.rules import CDTError
from graphs.graph import ComputationGraph
from graphs.ids import NodeId, NodeKind, parse_node


@dataclass(frozen=True)
class Source:
    """A set of sender nodes that are relevant together. ``positions`` restricts every node that
    carries no position of its own (None: all positions)."""

    nodes: tuple[NodeId | str, ...]
    positions: tuple[int, ...] | None = None


SourceLike = Source | NodeId | str | Iterable[NodeId | str]


@dataclass(frozen=True)
class ResolvedSource:
    """Sender indices with their positions (None: every position), and where the source enters."""

    entries: tuple[tuple[int, tuple[int, ...] | None], ...]
    start: Point


def _node(item: NodeId | str) -> NodeId:
    node = parse_node(item) if isinstance(item, str) else item
    if not isinstance(node, NodeId):
        raise CDTError(f"a source must be built from node ids, got {item!r}")
    if node.kind is NodeKind.LOGITS:
        raise CDTError("logits is a receiver, not a source")
    return node


def entry_point(graph: ComputationGraph, sender: int) -> Point:
    """Where a sender's output enters the residual stream: input before layer 0, a head of layer l
    with layer l's attention, an MLP of layer l after layer l's attention."""
    node = graph.senders[sender]
    if node.kind is NodeKind.INPUT:
        return Point(0, "attn")
    assert node.layer is not None
    return Point(node.layer, "mlp" if node.kind is NodeKind.MLP else "attn")


def resolve(graph: ComputationGraph, item: SourceLike) -> ResolvedSource:
    """A source in sender indices (CDTError for unknown nodes or an empty set)."""
    if isinstance(item, Source):
        items, default = item.nodes, item.positions
    elif isinstance(item, NodeId | str):
        items, default = (item,), None
    else:
        items, default = tuple(item), None
    if default is not None and any(p < 0 for p in default):
        raise CDTError(f"source positions must be non-negative, got {default}")
    entries: dict[int, tuple[int, ...] | None] = {}
    for raw in items:
        node = _node(raw)
        index = graph.sender_index(node.at(None))
        positions = (node.position,) if node.position is not None else default
        if index in entries and (entries[index] is None or positions is None):
            entries[index] = None
        elif index in entries:
            entries[index] = tuple(sorted(set(entries[index]) | set(positions)))  # type: ignore[arg-type]
        else:
            entries[index] = None if positions is None else tuple(sorted(set(positions)))
    if not entries:
        raise CDTError("a source needs at least one node")
    start = min(entry_point(graph, s) for s in entries)
    return ResolvedSource(tuple(sorted(entries.items())), start)


def resolve_all(graph: ComputationGraph, items: Sequence[SourceLike]) -> list[ResolvedSource]:
    return [resolve(graph, item) for item in items]


def plan_pass(state: BatchState, sources: Sequence[ResolvedSource], start: Point | None = None) -> PassPlan:
    """One pass for ``sources`` (side by side), starting where the earliest of them enters (or at
    ``start`` if that is earlier: e.g. layer 0, to trace every layer)."""
    g = state.spec.graph
    S, T, H = len(sources), state.length, g.n_heads
    dtype, device = state.resid.dtype, state.resid.device
    first = min((src.start for src in sources), default=Point(g.n_layers))
    start = first if start is None else min(start, first)
    heads: dict[int, torch.Tensor] = {}
    mlps: dict[int, torch.Tensor] = {}
    input_mask = None

    def position_mask(positions: tuple[int, ...] | None) -> torch.Tensor:
        m = torch.zeros(T, dtype=dtype, device=device)
        if positions is None:
            m[:] = 1
        else:
            m[[p for p in positions if p < T]] = 1
        return m

    for s, src in enumerate(sources):
        for sender, positions in src.entries:
            node = g.senders[sender]
            pm = position_mask(positions)
            if node.kind is NodeKind.INPUT:
                input_mask = input_mask if input_mask is not None else torch.zeros(S, T, dtype=dtype, device=device)
                input_mask[s] = pm
            elif node.kind is NodeKind.HEAD:
                assert node.layer is not None and node.head is not None
                heads.setdefault(node.layer, torch.zeros(S, T, H, dtype=dtype, device=device))[s, :, node.head] = pm
            else:
                assert node.layer is not None
                mlps.setdefault(node.layer, torch.zeros(S, T, dtype=dtype, device=device))[s] = pm
    resid = None
    if input_mask is not None:
        resid = input_mask[:, None, :, None] * state.delta(0)[None]  # [S, P, T, d]
    return PassPlan(S, start, resid=resid, heads=heads, mlps=mlps)
