"""DOT source for circuit diagrams: layered layout, edge encodings, title, legend, diffs.

Layout (``rankdir=BT``): ``input`` at the bottom, ``logits`` at the top, one rank per layer of heads
with that layer's MLP on its own rank just above it (MLP l reads heads of layer l in sequential
blocks, so its edges go *up*, never sideways). An invisible "spine" of axis labels (``L3 attn``,
``L3 mlp``) pins every drawn node to its layer's rank, so layers stay in order even where no circuit
path connects them; ranks that hold no drawn node are left out to keep the drawing compact.

Only nodes touched by the drawn edges appear. Edges are emitted weakest first so the strongest
edges are painted on top, and every choice depends only on the circuit (no randomness, no dict
ordering from hashing), so the same circuit always gives byte-identical DOT - and therefore SVG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import graphviz
import torch

from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import EdgeId, NodeId, NodeKind, Slot
from graphs.render_style import (
    Style,
    font,
    format_score,
    format_value,
    html_label,
    label_text,
)

GRAPH_NAME = "circuit"  # also the SVG <title>: never user text
TITLE_KEYS = ("model", "task", "method", "faithfulness")


@dataclass(frozen=True)
class DrawnEdge:
    """One circuit edge as drawn: its id, score (None when unscored) and SVG element id."""

    edge: EdgeId
    score: float | None
    element_id: str


def node_element_id(graph: ComputationGraph, node: NodeId) -> str:
    """Stable SVG id of a node's group: ``cc_n<position in graph.nodes>``."""
    position = graph.n_senders if node.kind is NodeKind.LOGITS else graph.sender_index(node)
    return f"cc_n{position}"


def drawn_edges(circuit: Circuit) -> list[DrawnEdge]:
    """The circuit's edges with scores, in graph order; element ids ``cc_e0``, ``cc_e1``, ..."""
    g = circuit.graph
    rs, ss = torch.nonzero(circuit.in_circuit.T, as_tuple=True)  # receiver-major = graph edge order
    values: list[float | None]
    values = [None] * len(rs) if circuit.scores is None else circuit.scores.values[ss, rs].tolist()
    return [
        DrawnEdge(EdgeId(g.senders[s], g.receivers[r]), v, f"cc_e{i}")
        for i, (s, r, v) in enumerate(zip(ss.tolist(), rs.tolist(), values, strict=True))
    ]


def score_scale(edges: Sequence[DrawnEdge]) -> float:
    """Largest finite |score| of the drawn edges (0 when unscored or all zero)."""
    finite = [abs(e.score) for e in edges if e.score is not None and math.isfinite(e.score)]
    return max(finite, default=0.0)


# ---------------------------------------------------------------------- the layered skeleton
def new_digraph(n_edges: int, style: Style, title_rows: Sequence[str], dpi: float | None) -> graphviz.Digraph:
    """An empty digraph with the graph-wide attributes, tuned for the drawing's size."""
    big = n_edges > style.edge_label_limit
    attrs = {
        "rankdir": "BT",
        "newrank": "true",
        "splines": "true",
        "outputorder": "edgesfirst",
        "nodesep": "0.18" if big else "0.3",
        "ranksep": "0.9" if big else "0.5",
        "fontname": style.fontname,
        "bgcolor": "white",
        "pad": "0.2",
        "labelloc": "t",
        "labeljust": "c",
        "label": html_label(title_rows),
    }
    attrs.update(effort_limits(n_edges))
    if dpi is not None:
        attrs["dpi"] = f"{dpi:g}"
    node_attrs = {
        "fontname": style.fontname, "fontsize": "10", "style": "filled", "height": "0.3", "margin": "0.06,0.03"
    }
    edge_attrs = {"fontname": style.fontname, "fontsize": "8", "arrowsize": "0.6"}
    return graphviz.Digraph(GRAPH_NAME, graph_attr=attrs, node_attr=node_attrs, edge_attr=edge_attrs)


def effort_limits(n_edges: int) -> dict[str, str]:
    """Caps on dot's crossing minimisation (``mclimit``) and x-placement (``nslimit``) for big drawings.

    Measured on random circuits over a 12 x 12 graph: 500 edges take 5.8 s uncapped and 0.9 s with
    these caps, 1000 edges 28 s and 2 s. Small drawings keep dot's full effort (best layout)."""
    if n_edges <= 80:
        return {}
    if n_edges <= 300:
        return {"mclimit": "0.5"}
    if n_edges <= 800:
        return {"mclimit": "0.3", "nslimit": "2"}
    return {"mclimit": "0.1", "nslimit": "1"}


def _rank_label(graph: ComputationGraph, key: float) -> str:
    if key < 0 or key >= graph.n_layers:
        return ""
    layer = int(key)
    return f"L{layer} mlp" if key != layer else f"L{layer} attn"


def add_nodes(
    dot: graphviz.Digraph,
    graph: ComputationGraph,
    nodes: Sequence[NodeId],
    attrs_of: Callable[[NodeId], Mapping[str, str]],
    extra_top: Sequence[tuple[str, Mapping[str, str]]] = (),
) -> None:
    """Add ``nodes`` grouped one rank per layer position, with the invisible axis spine.

    ``extra_top`` nodes (the legend) share the top rank."""
    ranks: dict[float, list[NodeId]] = {}
    for node in nodes:  # topological order in, so each rank lists heads by index
        ranks.setdefault(graph.node_layer(node), []).append(node)
    keys = sorted(ranks)
    for i, key in enumerate(keys):
        with dot.subgraph(name=f"rank{i}") as sub:
            sub.attr(rank="same")
            sub.node(
                f"axis{i}", label=_rank_label(graph, key), shape="plaintext", style="", fontsize="9",
                fontcolor="#888888", group="axis", width="0.1", height="0.1",
            )
            for node in ranks[key]:
                sub.node(str(node), **attrs_of(node))
            if i == len(keys) - 1:
                for name, attrs in extra_top:
                    sub.node(name, **attrs)
    for i in range(len(keys) - 1):
        dot.edge(f"axis{i}", f"axis{i + 1}", style="invis", weight="10")
    if not keys:
        for name, attrs in extra_top:
            dot.node(name, **attrs)


def node_attributes(
    graph: ComputationGraph, node: NodeId, style: Style, fill: str | None = None, **extra: str
) -> dict[str, str]:
    """Shape, fill, label, tooltip and SVG id of a node (labels are our own ids: nothing to escape)."""
    look = style.nodes[node.kind]
    attrs = {
        "label": str(node),
        "shape": look.shape,
        "fillcolor": fill or look.fill,
        "fontcolor": look.font_color,
        "id": node_element_id(graph, node),
        "tooltip": f"{node}: {look.description}",
    }
    if node.kind in (NodeKind.INPUT, NodeKind.LOGITS):
        attrs["penwidth"] = "1.5"
    attrs.update(extra)
    return attrs


def edge_attributes(
    edge: DrawnEdge, color: str, penwidth: float, style: Style, labels: bool, tooltip: str
) -> dict[str, str]:
    """Colour, width, slot line style and arrowhead (and a slot head label in small drawings)."""
    slot = edge.edge.receiver.slot
    attrs = {
        "color": color,
        "penwidth": f"{penwidth:.3f}",
        "style": style.slot_styles[slot],
        "arrowhead": style.slot_arrowheads[slot],
        "arrowsize": f"{style.arrowsize(penwidth):.3f}",
        "id": edge.element_id,
        "tooltip": tooltip,
    }
    if slot is not None and labels:
        attrs["headlabel"] = slot.value
        attrs["labelfontcolor"] = "#555555"
        attrs["labeldistance"] = "1.2"
    return attrs


def emit_edges(dot: graphviz.Digraph, rows: Sequence[tuple[float, int, DrawnEdge, dict[str, str]]]) -> None:
    """Add edges weakest first (ties in graph order) so strong edges are painted last, on top."""
    for _, _, e, attrs in sorted(rows, key=lambda row: (row[0], row[1])):
        dot.edge(str(e.edge.sender), str(e.edge.receiver.node), **attrs)


def emit_scored_edges(dot: graphviz.Digraph, edges: Sequence[DrawnEdge], style: Style, scale: float) -> None:
    """Add ``edges`` coloured and sized by score (slot labels in small drawings), weakest first."""
    labels = len(edges) <= style.edge_label_limit
    rows = []
    for i, e in enumerate(edges):
        tooltip = f"{e.edge}  score {format_score(e.score)}"
        colour, width = style.edge_color(e.score, scale), style.penwidth(e.score, scale)
        attrs = edge_attributes(e, colour, width, style, labels, tooltip)
        rows.append((style.weight(e.score, scale), i, e, attrs))
    emit_edges(dot, rows)


# ---------------------------------------------------------------------- titles and legends
def title_from_provenance(circuit: Circuit) -> str:
    """``model · task · method · faithfulness`` from provenance (method falls back to the scores')."""
    prov = dict(circuit.provenance)
    if "method" not in prov and circuit.scores is not None and circuit.scores.method != "unknown":
        prov["method"] = circuit.scores.method
    parts = [f"{key}: {format_value(prov[key])}" for key in TITLE_KEYS if key in prov and prov[key] is not None]
    return " \u00b7 ".join(parts) if parts else "circuit"


def title_rows(title: str, stats: Sequence[str]) -> list[str]:
    """Escaped title rows: the title in bold (omitted when empty), then small grey stats lines."""
    rows = [font(label_text(title, limit=240), size=14, bold=True)] if title else []
    rows.extend(font(label_text(line, limit=240), size=10, color="#555555") for line in stats)
    return rows


def _sample(glyph: str, color: str) -> str:
    return font(glyph, color=color, size=11)


def slot_rows(style: Style, color: str) -> list[str]:
    """Legend rows for the q/k/v line styles (glyphs approximate solid / dashed / dotted)."""
    glyphs = {"solid": "\u2501" * 4, "dashed": " ".join("\u2501" * 3), "dotted": " ".join("\u00b7" * 5)}
    heads = {"normal": "\u25b6", "diamond": "\u25c6", "dot": "\u25cf"}
    rows = []
    for slot, what in ((Slot.Q, "query"), (Slot.K, "key"), (Slot.V, "value")):
        line = style.slot_styles[slot]
        arrow = heads.get(style.slot_arrowheads[slot], "")
        rows.append(f"{_sample(glyphs[line] + arrow, color)} {slot.value}: {what} input of a head ({line})")
    rows.append(f"{_sample(glyphs['solid'] + heads['normal'], color)} into an MLP or the logits")
    return rows


def legend_node(rows: Sequence[str]) -> dict[str, str]:
    """A boxed HTML-table node holding the legend rows (left-aligned)."""
    header = font("legend", bold=True, size=10)
    body = "".join(f'<TR><TD ALIGN="LEFT">{row}</TD></TR>' for row in [header, *rows])
    label = f'<<TABLE BORDER="1" COLOR="#bbbbbb" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2">{body}</TABLE>>'
    return {"label": label, "shape": "plaintext", "style": "", "fontsize": "9", "id": "cc_legend", "tooltip": "legend"}


def score_legend_rows(style: Style, scale: float, scored: bool, neutral: bool) -> list[str]:
    """Legend rows for sign colours (the grey row only when ``neutral`` edges are drawn) and widths."""
    if not scored:
        return [f"{_sample(chr(0x2501) * 4, style.neutral)} unscored circuit: colour and width carry no score"]
    bar = "\u2501" * 4
    rows = [
        f"{_sample(bar, style.negative)} score &lt; 0: ablating the edge lowers the metric",
        f"{_sample(bar, style.positive)} score &gt; 0: ablating the edge raises the metric",
    ]
    if neutral:
        rows.append(f"{_sample(bar, style.neutral)} score 0 or not finite")
    rows.append(f"width and opacity \u221d |score|; thickest: |score| = {label_text(format_score(scale))}")
    return rows

