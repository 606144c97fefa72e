"""Visual encodings and safe text for circuit diagrams (used by ``graphs.render``).

Everything a reader decodes from a drawing is fixed here, in one immutable ``Style``: node shapes
per kind, edge colour per score sign, line style per q/k/v slot, pen-width range for |score|, and
the diff colours. Keeping it in one frozen object means two drawings made with the same style are
byte-identical and the legend can never disagree with the edges it explains.

Text that reaches a drawing may come from users (provenance values, circuit labels): it only ever
enters DOT inside HTML-like labels built by ``html_label`` / ``label_text``, which XML-escape it,
double backslashes (graphviz expands ``\\G``-style escapes even there) and drop characters XML
cannot hold, so neither the DOT source nor the SVG that ``dot`` writes can be
broken or injected into.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import graphviz

from graphs.ids import NodeKind, Slot

# Characters XML 1.0 cannot hold (C0 controls except tab/newline/CR, lone surrogates, U+FFFE/FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
MAX_TEXT = 120  # longest user string shown in a label (longer ones are cut with an ellipsis)


@dataclass(frozen=True)
class NodeLook:
    """How one node kind is drawn."""

    shape: str
    fill: str
    font_color: str = "#000000"
    description: str = ""


@dataclass(frozen=True)
class Style:
    """All encodings of a circuit drawing (see docs/rendering.md)."""

    nodes: Mapping[NodeKind, NodeLook] = field(
        default_factory=lambda: MappingProxyType(
            {
                NodeKind.INPUT: NodeLook("house", "#d9d9d9", description="input (embedding)"),
                NodeKind.HEAD: NodeLook("ellipse", "#fff2cc", description="attention head"),
                NodeKind.MLP: NodeLook("box", "#d9ead3", description="MLP"),
                NodeKind.LOGITS: NodeLook("invhouse", "#cfe2f3", description="logits"),
            }
        )
    )
    positive: str = "#2166ac"  # blue: ablating the edge raises the metric
    negative: str = "#b2182b"  # red: ablating the edge lowers the metric (the behaviour uses it)
    neutral: str = "#808080"  # grey: unscored, zero or non-finite
    slot_styles: Mapping[Slot | None, str] = field(
        default_factory=lambda: MappingProxyType({Slot.Q: "solid", Slot.K: "dashed", Slot.V: "dotted", None: "solid"})
    )
    slot_arrowheads: Mapping[Slot | None, str] = field(
        default_factory=lambda: MappingProxyType({Slot.Q: "normal", Slot.K: "diamond", Slot.V: "dot", None: "normal"})
    )
    min_penwidth: float = 0.7
    max_penwidth: float = 6.0
    uniform_penwidth: float = 1.4  # unscored circuits; diff drawings (x1.6 for edges in one circuit only)
    min_alpha: int = 0x66  # opacity of the weakest edge (strong edges are opaque)
    diff_both: str = "#4d4d4d"
    diff_only_a: str = "#e66101"  # orange
    diff_only_b: str = "#5e3c99"  # purple (orange / purple stays distinct for colour-blind readers)
    diff_fill_a: str = "#fde0c5"
    diff_fill_b: str = "#ddd3ee"
    fontname: str = "Helvetica"
    edge_label_limit: int = 80  # above this many drawn edges, no per-edge slot labels

    def sign_color(self, score: float | None) -> str:
        """Colour of an edge from the sign of its score (grey for None, 0 and non-finite)."""
        if score is None or not math.isfinite(score) or score == 0:
            return self.neutral
        return self.positive if score > 0 else self.negative

    def weight(self, score: float | None, scale: float) -> float:
        """|score| / scale in [0, 1]; 0 when unscored, non-finite or scale is 0."""
        if score is None or not math.isfinite(score) or scale <= 0:
            return 0.0
        return min(abs(score) / scale, 1.0)

    def penwidth(self, score: float | None, scale: float) -> float:
        """Pen width linear in |score|: ``min_penwidth`` at 0, ``max_penwidth`` at ``scale``."""
        if score is None or scale <= 0 or not math.isfinite(score):
            return self.uniform_penwidth
        return self.min_penwidth + (self.max_penwidth - self.min_penwidth) * self.weight(score, scale)

    def arrowsize(self, penwidth: float) -> float:
        """Arrowheads grow with the line so a thick edge's head stays recognisable."""
        return 0.5 + 0.08 * penwidth

    def edge_color(self, score: float | None, scale: float) -> str:
        """Sign colour with opacity growing with |score| (weak edges recede in dense drawings)."""
        base = self.sign_color(score)
        if score is None or scale <= 0 or not math.isfinite(score):
            return base
        alpha = round(self.min_alpha + (0xFF - self.min_alpha) * self.weight(score, scale))
        return f"{base}{alpha:02x}"


DEFAULT_STYLE = Style()


# ---------------------------------------------------------------------- safe text
def xml_text(value: Any, limit: int | None = MAX_TEXT) -> str:
    """``value`` as one line of XML-escaped text for an HTML-like label (or an HTML page).

    Newlines and tabs become spaces, characters XML cannot hold become U+FFFD, and text longer than
    ``limit`` characters is cut with an ellipsis (before escaping, so an entity is never split)."""
    text = value if isinstance(value, str) else format_value(value)
    text = _NOT_XML.sub("\ufffd", text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " "))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return html.escape(text, quote=True)


def label_text(value: Any, limit: int | None = MAX_TEXT) -> str:
    """``xml_text`` for a DOT HTML-like label: backslashes doubled as well.

    Graphviz expands escapes such as ``\\G`` (graph name) and ``\\N`` (node name) inside HTML-like
    labels too, after decoding entities; a doubled backslash is the only way to show one."""
    return xml_text(value, limit).replace("\\", "\\\\")


def tooltip_text(value: Any, limit: int = 4 * MAX_TEXT) -> str:
    """User text for a DOT escString attribute (tooltips): one line, XML-safe characters only,
    backslashes doubled and marked not-HTML (``graphviz.escape``); ``dot`` XML-escapes the rest."""
    text = " ".join(_NOT_XML.sub("\ufffd", value if isinstance(value, str) else format_value(value)).split())
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return graphviz.escape(text)


def format_value(value: Any) -> str:
    """A provenance value as short text: numbers with 4 significant digits, containers as JSON."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def format_score(score: float | None) -> str:
    """A score for labels and tooltips: 4 significant digits, ``unscored`` for None."""
    return "unscored" if score is None else f"{score:.4g}"


def html_label(rows: Sequence[str], *, align: str = "CENTER") -> str:
    """An HTML-like DOT label (``<...>``) of a borderless table, one already-escaped row each."""
    body = "".join(f'<TR><TD ALIGN="{align}">{row}</TD></TR>' for row in rows)
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{body}</TABLE>>'


def font(text: str, *, color: str | None = None, size: float | None = None, bold: bool = False) -> str:
    """Wrap already-escaped ``text`` in FONT / B tags of an HTML-like label."""
    attrs = ""
    if color is not None:
        attrs += f' COLOR="{color}"'
    if size is not None:
        attrs += f' POINT-SIZE="{size:g}"'
    out = f"<FONT{attrs}>{text}</FONT>" if attrs else text
    return f"<B>{out}</B>" if bold else out
