"""Drawings of token-position circuits: one column per token position, one row per layer.

Columns are graphviz clusters headed by the position's token string (XML-escaped through
``label_text``, so a token like ``<script>`` is shown as text and can never inject markup) and its
index ``@t``; rows are ``rank=same`` groups per layer position (``newrank`` lets a rank cross
clusters), pinned in order by an invisible spine of axis labels on the left like the
non-positional drawing. Invisible flat edges between neighbouring nodes of a row keep the columns
in token order. Only positions that hold a drawn node get a column.

Edges join equal positions (a residual edge ``u@t -> r@t`` stays inside its column); information
moving between positions happens inside heads and is not an edge of the graph.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from graphs.ids import EdgeId, NodeId, NodeKind
from graphs.positional import PositionalCircuit
from graphs.render import (
    MAX_EDGES,
    PNG_DPI,
    RenderResult,
    _check_size,
    _keep_top,
    _output,
    _write,
    output_format,
)
from graphs.render_dot import (
    DrawnEdge,
    emit_scored_edges,
    legend_node,
    new_digraph,
    score_legend_rows,
    score_scale,
    slot_rows,
    title_from_provenance,
    title_rows,
)
from graphs.render_style import DEFAULT_STYLE, Style, font, html_label, label_text

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class _Edge:
    edge: EdgeId  # positional
    score: float | None


def filter_positional(circuit: PositionalCircuit, top: int | None = None, min_score: float | None = None) -> PositionalCircuit:
    """The sub-circuit to draw: ``|score| >= min_score``, then the ``top`` highest |score| (needs scores)."""
    if top is None and min_score is None:
        return circuit
    if circuit.scores is None:
        raise ValueError("this circuit has no scores: top / min_score filters need them")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
        raise ValueError(f"top must be a non-negative integer, got {top!r}")
    if min_score is not None and (isinstance(min_score, bool) or not math.isfinite(float(min_score)) or min_score < 0):
        raise ValueError(f"min_score must be a finite number >= 0, got {min_score!r}")
    key = circuit.scores.values.abs()
    key = torch.where(torch.isfinite(key), key, torch.full((), -1.0, dtype=key.dtype))  # NaN / inf rank last
    mask = circuit.in_circuit.clone()
    if min_score is not None:
        mask &= key >= float(min_score)
    if top is not None:
        mask = _keep_top(mask.permute(2, 1, 0), key.permute(2, 1, 0), top).permute(2, 1, 0).contiguous()
    return circuit.with_mask(mask)


def _name(node: NodeId) -> str:
    return str(node)  # positional ids are unique DOT node names (quoted by graphviz)


def render_positional_dot(
    circuit: PositionalCircuit,
    *,
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
    dpi: float | None = None,
) -> str:
    """DOT source of a positional circuit: positions as columns (token headers), layers as rows."""
    shown = filter_positional(circuit, top, min_score)
    _check_size(shown.n_edges, max_edges)
    g = shown.graph
    rows_of = [(e, s) for e, s in _edges(shown)]
    drawn = [DrawnEdge(e, s, f"cc_e{i}") for i, (e, s) in enumerate(rows_of)]
    nodes = shown.nodes()
    scale = score_scale(drawn)
    scored = circuit.scores is not None
    heading = title_from_provenance(shown.collapsed()) if title is None else title
    positions = sorted({n.position for n in nodes if n.position is not None})
    heads = sum(n.kind is NodeKind.HEAD for n in nodes)
    stats = [
        f"{len(drawn)} positional edges \u00b7 {heads} head nodes over {len(positions)} of "
        f"{shown.n_positions} positions \u00b7 graph: {g.describe()}"
    ]
    if shown is not circuit:
        stats.append(f"showing {shown.n_edges} of {circuit.n_edges} circuit edges")
    if not drawn:
        stats.append("no edges to draw")
    dot = new_digraph(len(drawn), style, title_rows(heading, stats), dpi)
    dot.attr(compound="true")

    by_rank: dict[float, list[NodeId]] = {}
    for node in nodes:
        by_rank.setdefault(g.node_layer(node.at(None)), []).append(node)
    keys = sorted(by_rank)
    for t in positions:
        with dot.subgraph(name=f"cluster_p{t}") as col:
            header = [font(label_text(shown.tokens[t], limit=40), bold=True, size=11), font(f"@{t}", size=9, color="#555555")]
            col.attr(label=html_label(header), labelloc="b", style="rounded", color="#cccccc", id=f"cc_col{t}")
            for node in nodes:
                if node.position == t:
                    col.node(_name(node), **_node_attrs(shown, node, style))
    for i, key in enumerate(keys):
        with dot.subgraph(name=f"row{i}") as row:
            row.attr(rank="same")
            row.node(f"axis{i}", label=_rank_label(g.n_layers, key), shape="plaintext", style="", fontsize="9",
                     fontcolor="#888888", width="0.1", height="0.1")
            members = sorted(by_rank[key], key=lambda n: (n.position, n))
            for n in members:
                row.node(_name(n))
            chain = [f"axis{i}"] + [_name(n) for n in members]
            for a, b in zip(chain, chain[1:]):
                row.edge(a, b, style="invis")
            if i == len(keys) - 1:
                row.node("legend", **legend_node(score_legend_rows(style, scale, scored, False)
                                                 + slot_rows(style, "#333333" if scored else style.neutral)))
    for i in range(len(keys) - 1):
        dot.edge(f"axis{i}", f"axis{i + 1}", style="invis", weight="10")
    emit_scored_edges(dot, drawn, style, scale)
    return dot.source


def render_positional(
    circuit: PositionalCircuit,
    path: PathLike,
    fmt: str | None = None,
    *,
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
) -> RenderResult:
    """Draw a positional circuit to ``path`` as svg, png, pdf or dot (atomic write)."""
    kind = output_format(path, fmt)
    if kind == "html":
        raise ValueError("the HTML viewer does not draw positional circuits yet; write .svg, .png, .pdf or .dot")
    source = render_positional_dot(circuit, title=title, top=top, min_score=min_score, style=style,
                                   max_edges=max_edges, dpi=PNG_DPI if kind == "png" else None)
    written = _write(path, _output(source, kind, None))
    shown = filter_positional(circuit, top, min_score)
    return RenderResult(written, kind, shown.n_edges, len(shown.nodes()), circuit.n_edges)


def _edges(circuit: PositionalCircuit) -> list[tuple[EdgeId, float | None]]:
    ts, rs, ss = circuit.in_circuit.permute(2, 1, 0).nonzero(as_tuple=True)
    g = circuit.graph
    values = [None] * len(ss) if circuit.scores is None else circuit.scores.values[ss, rs, ts].tolist()
    return [(g.edge_id(s, r).at(t), v) for s, r, t, v in zip(ss.tolist(), rs.tolist(), ts.tolist(), values, strict=True)]


def _node_attrs(circuit: PositionalCircuit, node: NodeId, style: Style) -> dict[str, str]:
    look = style.nodes[node.kind]
    base = node.at(None)
    index = circuit.graph.n_senders if node.kind is NodeKind.LOGITS else circuit.graph.sender_index(base)
    attrs = {
        "label": str(base),
        "shape": look.shape,
        "fillcolor": look.fill,
        "fontcolor": look.font_color,
        "id": f"cc_n{index}_p{node.position}",
        "tooltip": f"{node}: {look.description} at position {node.position}",
    }
    if node.kind in (NodeKind.INPUT, NodeKind.LOGITS):
        attrs["penwidth"] = "1.5"
    return attrs


def _rank_label(n_layers: int, key: float) -> str:
    if key < 0 or key >= n_layers:
        return ""
    layer = int(key)
    return f"L{layer} mlp" if key != layer else f"L{layer} attn"


__all__ = ["filter_positional", "render_positional", "render_positional_dot"]
