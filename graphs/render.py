"""Circuit diagrams: DOT source, SVG / PNG / PDF via graphviz ``dot``, a self-contained HTML viewer,
and diff drawings of two circuits on the same graph (docs/rendering.md).

Public API:

* ``render_dot(circuit, *, title=None, top=None, min_score=None) -> str`` - DOT source;
* ``render(circuit, path, fmt=None, ...) -> RenderResult`` - write ``.svg .png .pdf .dot/.gv
  .html/.htm`` (format from the suffix unless ``fmt`` is given);
* ``render_html(circuit, ...) -> str`` - the SVG inlined in a page with hover details;
* ``render_diff_dot(a, b, ...) -> str`` / ``render_diff(a, b, path, ...)`` - edges in both, only in
  A, only in B;
* ``filter_circuit(circuit, top=None, min_score=None) -> Circuit`` - the sub-circuit a drawing shows.

The ``circuits render CIRCUIT.json -o out.svg [--top N] [--min-score X]`` command is
``render(load_circuit(path), out, top=N, min_score=X)`` plus printing the returned ``RenderResult``.

Filters never change the circuit: they select a sub-circuit (a new object) to draw. Outputs are
deterministic (the same circuit gives byte-identical DOT, SVG and HTML) and written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import graphviz
import torch

from graphs.circuit import Circuit
from graphs.ids import NodeId, NodeKind
from graphs.io import atomic_write
from graphs.render_dot import (
    DrawnEdge,
    add_nodes,
    drawn_edges,
    edge_attributes,
    emit_edges,
    emit_scored_edges,
    legend_node,
    new_digraph,
    node_attributes,
    node_element_id,
    score_legend_rows,
    score_scale,
    slot_rows,
    title_from_provenance,
    title_rows,
)
from graphs.render_html import Page, html_page
from graphs.render_style import (
    DEFAULT_STYLE,
    Style,
    font,
    format_score,
    label_text,
    tooltip_text,
)

FORMATS = ("svg", "png", "pdf", "dot", "html")
_SUFFIXES = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot", ".html": "html", ".htm": "html"}
MAX_EDGES = 3000  # dot needs minutes beyond this; pass top= or min_score=
PNG_DPI = 144.0
TABLE_ROWS = 25
INSTALL_HINT = "install Graphviz (Debian/Ubuntu: `sudo apt-get install graphviz`; macOS: `brew install graphviz`)"

PathLike = str | os.PathLike[str]


class RenderError(RuntimeError):
    """Graphviz failed to lay out or write a drawing."""


class GraphvizNotFoundError(RenderError):
    """The Graphviz ``dot`` executable is not on PATH."""


@dataclass(frozen=True)
class RenderResult:
    """What ``render`` / ``render_diff`` wrote: for the CLI to report."""

    path: Path
    format: str
    n_edges: int  # edges drawn
    n_nodes: int  # nodes drawn
    n_circuit_edges: int  # edges of the circuit before filters (for a diff: of A plus B)


# ====================================================================== filters
def filter_circuit(circuit: Circuit, top: int | None = None, min_score: float | None = None) -> Circuit:
    """The sub-circuit to draw: edges with ``|score| >= min_score``, then the ``top`` highest |score|.

    Ties are broken by graph order (deterministic). Non-finite scores rank lowest. Returns
    ``circuit`` itself when no filter is given and a new ``Circuit`` otherwise; filters need scores."""
    if top is None and min_score is None:
        return circuit
    if circuit.scores is None:
        raise ValueError("this circuit has no scores: top / min_score filters need them")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
        raise ValueError(f"top must be a non-negative integer, got {top!r}")
    if min_score is not None and (isinstance(min_score, bool) or not math.isfinite(float(min_score)) or min_score < 0):
        raise ValueError(f"min_score must be a finite number >= 0, got {min_score!r}")
    key = circuit.scores.values.abs()
    key = torch.where(torch.isfinite(key), key, torch.full((), -1.0, dtype=key.dtype))
    mask = circuit.in_circuit.clone()
    if min_score is not None:
        mask &= key >= float(min_score)
    if top is not None:
        mask = _keep_top(mask.T, key.T, top).T.contiguous()
    return circuit.with_mask(mask)


def _keep_top(mask: torch.Tensor, key: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` entries of ``mask`` with the highest ``key``; ties go to the first in row-major order.

    Callers permute ``mask`` and ``key`` so that row-major order is graph order, and permute back."""
    ranked = torch.where(mask, key, torch.full((), -math.inf, dtype=key.dtype)).reshape(-1)
    chosen = torch.sort(ranked, descending=True, stable=True).indices[: min(top, int(mask.sum()))]
    flat = torch.zeros_like(ranked, dtype=torch.bool)
    flat[chosen] = True
    return flat.view(mask.shape)


def _filter_note(circuit: Circuit, shown: Circuit, top: int | None, min_score: float | None) -> list[str]:
    if shown is circuit:
        return []
    parts = ([f"top {top} by |score|"] if top is not None else []) + (
        [f"|score| \u2265 {min_score:g}"] if min_score is not None else []
    )
    return [f"showing {shown.n_edges} of {circuit.n_edges} circuit edges ({', '.join(parts)})"]


def _check_size(n_edges: int, max_edges: int) -> None:
    if n_edges > max_edges:
        raise ValueError(
            f"refusing to draw {n_edges} edges (limit {max_edges}: dot would take minutes and the picture "
            "would be unreadable); pass top=N or min_score=X (CLI: --top / --min-score)"
        )


def _counts(nodes: Sequence[NodeId]) -> str:
    heads = sum(n.kind is NodeKind.HEAD for n in nodes)
    mlps = sum(n.kind is NodeKind.MLP for n in nodes)
    return f"{_plural(heads, 'head')} \u00b7 {_plural(mlps, 'MLP')}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ====================================================================== one circuit
@dataclass(frozen=True)
class _Drawing:
    dot: graphviz.Digraph
    shown: Circuit
    edges: list[DrawnEdge]
    title: str
    subtitle: list[str]


def _draw(
    circuit: Circuit,
    title: str | None,
    top: int | None,
    min_score: float | None,
    style: Style,
    max_edges: int,
    dpi: float | None = None,
) -> _Drawing:
    shown = filter_circuit(circuit, top, min_score)
    _check_size(shown.n_edges, max_edges)
    edges = drawn_edges(shown)
    nodes = shown.nodes()
    scale = score_scale(edges)
    scored = circuit.scores is not None
    heading = title_from_provenance(circuit) if title is None else title
    stats = [
        f"{_plural(len(edges), 'edge')} \u00b7 {_counts(nodes)} \u00b7 graph: {circuit.graph.describe()}",
        *_filter_note(circuit, shown, top, min_score),
    ]
    if not edges:
        stats.append("no edges to draw")
    dot = new_digraph(len(edges), style, title_rows(heading, stats), dpi)
    slot_colour = "#333333" if scored else style.neutral
    legend = legend_node(score_legend_rows(style, scale, scored, _any_neutral(edges)) + slot_rows(style, slot_colour))
    add_nodes(dot, shown.graph, nodes, lambda n: node_attributes(shown.graph, n, style), [("legend", legend)])
    emit_scored_edges(dot, edges, style, scale)
    return _Drawing(dot, shown, edges, heading, stats)


def render_dot(
    circuit: Circuit,
    *,
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
) -> str:
    """DOT source of a layered drawing of ``circuit`` (after the optional ``top`` / ``min_score`` filters).

    ``title`` replaces the provenance title (model, task, method, faithfulness); ``""`` drops it."""
    return _draw(circuit, title, top, min_score, style, max_edges).dot.source


# ====================================================================== running dot, writing files
def run_dot(source: str, fmt: str) -> bytes:
    """Lay out DOT ``source`` with graphviz ``dot`` and return the ``fmt`` output (svg, png, pdf, json...)."""
    try:
        return graphviz.pipe("dot", fmt, source.encode("utf-8"), quiet=True)
    except graphviz.ExecutableNotFound:
        raise GraphvizNotFoundError(
            f"cannot render {fmt.upper()}: the Graphviz 'dot' executable was not found on PATH; {INSTALL_HINT}, "
            "or write the DOT source instead (.dot)"
        ) from None
    except graphviz.CalledProcessError as err:
        stderr = err.stderr.decode("utf-8", "replace") if isinstance(err.stderr, bytes) else str(err.stderr)
        raise RenderError(f"dot -T{fmt} failed with exit code {err.returncode}: {stderr.strip()}") from None


def output_format(path: PathLike, fmt: str | None = None) -> str:
    """The render format for ``path``: ``fmt`` if given, else from the suffix; ValueError if unknown."""
    if fmt is not None:
        name = fmt.lower().lstrip(".")
        name = _SUFFIXES.get("." + name, name)
        if name not in FORMATS:
            raise ValueError(f"unknown render format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return name
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        known = ", ".join(sorted(_SUFFIXES))
        shown = f"suffix {suffix!r}" if suffix else "no suffix"
        raise ValueError(
            f"cannot tell the render format of {os.fspath(path)!r} ({shown}); use one of {known} or pass fmt"
        )
    return _SUFFIXES[suffix]


def svg_of(source: str) -> str:
    """SVG text of DOT ``source``."""
    return run_dot(source, "svg").decode("utf-8")


def _write(path: PathLike, data: bytes) -> Path:
    with atomic_write(path) as handle:
        handle.write(data)
    return Path(path)


def _output(drawing_source: str, fmt: str, html: str | None) -> bytes:
    if fmt == "dot":
        return drawing_source.encode("utf-8")
    if fmt == "html":
        assert html is not None
        return html.encode("utf-8")
    return run_dot(drawing_source, fmt)


def render(
    circuit: Circuit,
    path: PathLike,
    fmt: str | None = None,
    *,
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
) -> RenderResult:
    """Draw ``circuit`` to ``path`` as svg, png, pdf, dot or html (format from the suffix by default).

    Raises ValueError for an unknown format (before any work) and ``GraphvizNotFoundError`` naming
    the install command when an image format needs ``dot`` and it is missing. Atomic write."""
    kind = output_format(path, fmt)
    drawing = _draw(circuit, title, top, min_score, style, max_edges, PNG_DPI if kind == "png" else None)
    html = _circuit_page(drawing, circuit) if kind == "html" else None
    written = _write(path, _output(drawing.dot.source, kind, html))
    return RenderResult(written, kind, len(drawing.edges), len(drawing.shown.nodes()), circuit.n_edges)


# ====================================================================== HTML viewer
def render_html(
    circuit: Circuit,
    *,
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
    table_rows: int = TABLE_ROWS,
) -> str:
    """A self-contained HTML page: the SVG inlined, hover details for nodes and edges, top-edge table."""
    drawing = _draw(circuit, title, top, min_score, style, max_edges)
    return _circuit_page(drawing, circuit, table_rows)


def _circuit_page(drawing: _Drawing, circuit: Circuit, table_rows: int = TABLE_ROWS) -> str:
    shown, edges, graph = drawing.shown, drawing.edges, drawing.shown.graph
    order = sorted(range(len(edges)), key=lambda i: (-_magnitude(edges[i].score), i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    items: dict[str, list[tuple[str, str]]] = {}
    stats: dict[NodeId, dict[str, float]] = {}
    for e in edges:
        receiver = e.edge.receiver.node
        for node, key in ((e.edge.sender, "out"), (receiver, "in")):
            entry = stats.setdefault(node, dict.fromkeys(("in", "out", "in_score", "out_score", "q", "k", "v"), 0.0))
            entry[key] += 1
            entry[f"{key}_score"] += e.score if e.score is not None and math.isfinite(e.score) else 0.0
        if e.edge.receiver.slot is not None:
            stats[receiver][e.edge.receiver.slot.value] += 1
    scored = circuit.scores is not None
    for node in shown.nodes():
        s = stats[node]
        rows = [("node", str(node)), ("kind", node.kind.value)]
        if node.layer is not None:
            rows.append(("layer", str(node.layer)))
        if node.head is not None:
            rows.append(("head", str(node.head)))
        rows += [("in-degree", str(int(s["in"]))), ("out-degree", str(int(s["out"])))]
        if node.kind is NodeKind.HEAD:
            rows.append(("in by slot", f"q {int(s['q'])} \u00b7 k {int(s['k'])} \u00b7 v {int(s['v'])}"))
        if scored:
            rows += [("sum of in scores", f"{s['in_score']:.4g}"), ("sum of out scores", f"{s['out_score']:.4g}")]
        items[node_element_id(graph, node)] = rows
    for i, e in enumerate(edges):
        slot = e.edge.receiver.slot
        items[e.element_id] = [
            ("edge", str(e.edge)),
            ("from", str(e.edge.sender)),
            ("to", str(e.edge.receiver.node)),
            ("slot", slot.value if slot is not None else "(single input)"),
            ("score", format_score(e.score)),
            ("rank by |score|", f"{rank[i]} of {len(edges)}" if scored else "unscored"),
        ]
    table = [
        (edges[i].element_id, [str(rank[i]), str(edges[i].edge), _slot_text(edges[i]), format_score(edges[i].score)])
        for i in order[:table_rows]
    ]
    caption = f"{len(table)} of {len(edges)} drawn edges"
    caption = f"top {caption} by |score|" if scored else f"first {caption} (unscored)"
    page = Page(drawing.title or "circuit", drawing.subtitle, items, caption, ["#", "edge", "slot", "score"], table)
    return html_page(svg_of(drawing.dot.source), page)


def _any_neutral(edges: Sequence[DrawnEdge]) -> bool:
    return any(e.score is not None and (e.score == 0 or not math.isfinite(e.score)) for e in edges)


def _magnitude(score: float | None) -> float:
    return abs(score) if score is not None and math.isfinite(score) else -1.0


def _slot_text(edge: DrawnEdge) -> str:
    slot = edge.edge.receiver.slot
    return "-" if slot is None else slot.value


# ====================================================================== diffs
@dataclass(frozen=True)
class _Diff:
    dot: graphviz.Digraph
    edges: list[DrawnEdge]
    categories: list[str]  # "both", "a", "b" per edge
    n_nodes: int
    title: str
    subtitle: list[str]


def _draw_diff(
    a: Circuit,
    b: Circuit,
    labels: tuple[str, str],
    title: str | None,
    top: int | None,
    min_score: float | None,
    style: Style,
    max_edges: int,
    dpi: float | None = None,
) -> _Diff:
    if not isinstance(a, Circuit) or not isinstance(b, Circuit):
        raise TypeError("render_diff needs two Circuit objects")
    if a.graph != b.graph:
        raise ValueError(f"cannot diff circuits on different graphs: {a.graph.describe()} vs {b.graph.describe()}")
    if len(labels) != 2:
        raise ValueError("labels must be two strings (names of A and B)")
    fa, fb = filter_circuit(a, top, min_score), filter_circuit(b, top, min_score)
    union = fa.in_circuit | fb.in_circuit
    _check_size(int(union.sum()), max_edges)
    merged = Circuit(a.graph, union)
    edges = drawn_edges(merged)
    graph = a.graph
    categories = []
    for e in edges:
        s, r = graph.edge_index(e.edge)
        in_a, in_b = bool(fa.in_circuit[s, r]), bool(fb.in_circuit[s, r])
        categories.append("both" if in_a and in_b else ("a" if in_a else "b"))
    name_a, name_b = (str(x) for x in labels)
    heading = f"{name_a} vs {name_b}" if title is None else title
    counts = {c: categories.count(c) for c in ("both", "a", "b")}
    iou = fa.iou(fb)
    overlap = f"both {counts['both']} \u00b7 only {name_a} {counts['a']} \u00b7 only {name_b} {counts['b']}"
    stats = [
        f"{name_a}: {title_from_provenance(a)} ({fa.n_edges} edges)",
        f"{name_b}: {title_from_provenance(b)} ({fb.n_edges} edges)",
        f"{overlap} \u00b7 edge IoU {iou:.3f}",
        *[f"{name_a}: {line}" for line in _filter_note(a, fa, top, min_score)],
        *[f"{name_b}: {line}" for line in _filter_note(b, fb, top, min_score)],
    ]
    nodes = merged.nodes()
    node_a, node_b = fa.node_mask(), fb.node_mask()

    def attrs_of(node: NodeId) -> dict[str, str]:
        pos = graph.n_senders if node.kind is NodeKind.LOGITS else graph.sender_index(node)
        in_a, in_b = bool(node_a[pos]), bool(node_b[pos])
        fill = None if in_a == in_b else (style.diff_fill_a if in_a else style.diff_fill_b)
        where = "both" if in_a and in_b else (f"only {name_a}" if in_a else f"only {name_b}")
        return node_attributes(graph, node, style, fill, tooltip=tooltip_text(f"{node} (in {where})"))

    colors = {"both": style.diff_both, "a": style.diff_only_a, "b": style.diff_only_b}
    bar = "\u2501" * 4
    legend_rows = [
        f"{font(bar, color=style.diff_both, size=11)} in both ({counts['both']})",
        f"{font(bar, color=style.diff_only_a, size=11)} only in {label_text(name_a, limit=60)} ({counts['a']})",
        f"{font(bar, color=style.diff_only_b, size=11)} only in {label_text(name_b, limit=60)} ({counts['b']})",
        (
            f"node fill: {font('only ' + label_text(name_a, limit=60), color=style.diff_only_a)} / "
            f"{font('only ' + label_text(name_b, limit=60), color=style.diff_only_b)}"
        ),
        *slot_rows(style, "#333333"),
    ]
    dot = new_digraph(len(edges), style, title_rows(heading, stats), dpi)
    add_nodes(dot, graph, nodes, attrs_of, [("legend", legend_node(legend_rows))])
    labels_on = len(edges) <= style.edge_label_limit
    order = {"b": 0, "a": 1, "both": 2}  # shared edges painted last
    rows = []
    for i, (e, cat) in enumerate(zip(edges, categories, strict=True)):
        s, r = graph.edge_index(e.edge)
        tip = f"{e.edge}  {('in both' if cat == 'both' else 'only ' + (name_a if cat == 'a' else name_b))}"
        tip += f"  {name_a}: {_score_at(a, s, r)}  {name_b}: {_score_at(b, s, r)}"
        width = style.uniform_penwidth * (1.0 if cat == "both" else 1.6)  # differences stand out
        attrs = edge_attributes(e, colors[cat], width, style, labels_on, tooltip_text(tip))
        rows.append((order[cat], i, e, attrs))
    emit_edges(dot, rows)
    return _Diff(dot, edges, categories, len(nodes), heading, stats)


def _score_at(circuit: Circuit, s: int, r: int) -> str:
    return "unscored" if circuit.scores is None else format_score(float(circuit.scores.values[s, r]))


def render_diff_dot(
    a: Circuit,
    b: Circuit,
    *,
    labels: tuple[str, str] = ("A", "B"),
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
) -> str:
    """DOT source of the union of two circuits on the same graph, edges coloured by membership.

    ``top`` / ``min_score`` filter each circuit separately before comparing (e.g. the top 50 of each)."""
    return _draw_diff(a, b, labels, title, top, min_score, style, max_edges).dot.source


def render_diff(
    a: Circuit,
    b: Circuit,
    path: PathLike,
    fmt: str | None = None,
    *,
    labels: tuple[str, str] = ("A", "B"),
    title: str | None = None,
    top: int | None = None,
    min_score: float | None = None,
    style: Style = DEFAULT_STYLE,
    max_edges: int = MAX_EDGES,
) -> RenderResult:
    """Write the diff drawing of ``a`` and ``b`` as svg, png, pdf, dot or html (see ``render``)."""
    kind = output_format(path, fmt)
    diff = _draw_diff(a, b, labels, title, top, min_score, style, max_edges, PNG_DPI if kind == "png" else None)
    html = _diff_page(diff, a, b, labels) if kind == "html" else None
    written = _write(path, _output(diff.dot.source, kind, html))
    return RenderResult(written, kind, len(diff.edges), diff.n_nodes, a.n_edges + b.n_edges)


def _diff_page(diff: _Diff, a: Circuit, b: Circuit, labels: tuple[str, str]) -> str:
    name = {"both": "both", "a": f"only {labels[0]}", "b": f"only {labels[1]}"}
    graph = a.graph
    items: dict[str, list[tuple[str, str]]] = {}
    table = []
    for e, cat in zip(diff.edges, diff.categories, strict=True):
        s, r = graph.edge_index(e.edge)
        score_a, score_b = _score_at(a, s, r), _score_at(b, s, r)
        items[e.element_id] = [
            ("edge", str(e.edge)), ("in", name[cat]), (str(labels[0]), score_a), (str(labels[1]), score_b)
        ]
        if cat != "both":
            table.append((e.element_id, [name[cat], str(e.edge), score_a, score_b]))
    page = Page(
        diff.title or "circuit diff", diff.subtitle, items,
        f"edges in one circuit only ({len(table)})", ["in", "edge", str(labels[0]), str(labels[1])], table[:200],
    )
    return html_page(svg_of(diff.dot.source), page)
