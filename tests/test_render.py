"""Circuit diagrams (graphs.render): DOT validity, layout, encodings, escaping, HTML viewer, diffs."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import NodeKind, parse_edge
from graphs.render import (
    FORMATS,
    GraphvizNotFoundError,
    RenderError,
    filter_circuit,
    output_format,
    render,
    render_diff,
    render_diff_dot,
    render_dot,
    render_html,
    run_dot,
)
from graphs.render_html import script_json
from graphs.render_style import DEFAULT_STYLE
from graphs.scores import EdgeScores

pytestmark = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot is not installed")

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = [
    "</text><script>alert(1)</script>",
    'a"b\\c{d}|e',
    "&amp;",
    "line1\nline2\r\n{x}",
    "\\N \\G \\L \\E trail\\",
    "<!-- c --> ]]> <![CDATA[x]]>",
    "ctl\x01\x7f\ud800 \u2028 'q'",
    "<<B>bold</B>>",
    "\u00e9 \u6f22\u5b57 \U0001f642",
]

# A small hand-made circuit on 4 layers x 3 heads: every slot, MLPs, logits, both signs, a zero.
EDGES = {
    "input->a0.h0<q>": -1.0,
    "input->a0.h1<k>": 0.5,
    "input->a0.h2<v>": 0.25,
    "a0.h0->m0": -2.0,
    "a0.h1->m0": 0.125,
    "m0->a1.h0<q>": 3.0,
    "m0->a1.h0<v>": -0.5,
    "a0.h2->a1.h1<k>": 0.75,
    "a1.h0->m1": -1.5,
    "a1.h1->a2.h2<v>": 0.0,
    "m1->a3.h1<q>": 2.5,
    "a2.h2->a3.h1<k>": -0.3,
    "a3.h1->logits": -4.0,
    "m1->logits": 1.0,
    "input->logits": -0.0625,
}
PROVENANCE = {"model": "tiny-gpt2", "task": "ioi", "method": "eap-ig", "faithfulness": 0.8765, "seed": 3}


def scored(graph: ComputationGraph, table: dict[str, float], *, noise: float = 0.0, seed: int = 0) -> EdgeScores:
    rng = random.Random(seed)
    values = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    if noise:
        for edge in graph.edges():
            values[graph.edge_index(edge)] = rng.gauss(0.0, noise)
    for edge, score in table.items():
        values[graph.edge_index(parse_edge(edge))] = score
    return EdgeScores(graph, values, method="hand")


def make_circuit(
    table: dict[str, float] = EDGES, provenance: dict[str, Any] | None = None, n_layers: int = 4, n_heads: int = 3
) -> Circuit:
    graph = ComputationGraph(n_layers, n_heads)
    prov = PROVENANCE if provenance is None else provenance
    return Circuit.from_edges(graph, table, scored(graph, table, noise=0.01), prov)


def random_circuit(n_edges: int, n_layers: int = 12, n_heads: int = 12, seed: int = 0) -> Circuit:
    graph = ComputationGraph(n_layers, n_heads)
    rng = random.Random(seed)
    chosen = rng.sample(list(graph.edges()), n_edges)
    table = {str(e): rng.gauss(0.0, 1.0) for e in chosen}
    return Circuit.from_edges(graph, table, scored(graph, table), PROVENANCE)


@pytest.fixture(scope="module")
def circuit() -> Circuit:
    return make_circuit()


@pytest.fixture(scope="module")
def layout(circuit: Circuit) -> dict[str, Any]:
    return dot_json(render_dot(circuit))


def dot_json(source: str) -> dict[str, Any]:
    """Nodes by name and edges by id from ``dot -Tjson`` (layout positions and attributes)."""
    data = json.loads(run_dot(source, "json"))
    objects = data["objects"]
    nodes = {o["name"]: o for o in objects if "nodes" not in o}
    edges = {e["id"]: e for e in data.get("edges", []) if "id" in e}
    return {"nodes": nodes, "edges": edges, "by_gvid": {o["_gvid"]: o["name"] for o in objects}}


def svg_of_cli(source: str) -> ET.Element:
    """Run the real ``dot -Tsvg`` and parse its output (it must be well-formed XML)."""
    done = subprocess.run(["dot", "-Tsvg"], input=source.encode(), capture_output=True, check=True, timeout=60)
    return ET.fromstring(done.stdout)


def svg_text(root: ET.Element) -> str:
    return " ".join("".join(t.itertext()) for t in root.iter(f"{SVG}text"))


def y_of(edge_or_node: dict[str, Any]) -> float:
    return float(edge_or_node["pos"].split(",")[1])


# ====================================================================== DOT and layout
def test_dot_parses_and_svg_is_well_formed(circuit: Circuit) -> None:
    source = render_dot(circuit)
    assert source.startswith("digraph circuit {")
    root = svg_of_cli(source)
    assert root.tag == f"{SVG}svg"
    groups = {g.get("id"): g.get("class") for g in root.iter(f"{SVG}g")}
    for e in range(len(EDGES)):
        assert groups[f"cc_e{e}"] == "edge"
    assert groups["cc_n0"] == "node"  # input


def test_input_is_below_logits_and_layers_are_ordered(circuit: Circuit, layout: dict[str, Any]) -> None:
    nodes = layout["nodes"]
    # dot's own coordinates grow upwards
    assert y_of(nodes["input"]) < y_of(nodes["a0.h0"]) < y_of(nodes["m0"]) < y_of(nodes["a1.h0"])
    assert y_of(nodes["a1.h0"]) < y_of(nodes["m1"]) < y_of(nodes["a2.h2"]) < y_of(nodes["a3.h1"])
    assert y_of(nodes["a3.h1"]) < y_of(nodes["logits"])
    # same layer, same rank
    assert y_of(nodes["a0.h0"]) == y_of(nodes["a0.h1"]) == y_of(nodes["a0.h2"])
    # in the SVG (y grows downwards) input is drawn lower on the page than logits
    root = svg_of_cli(render_dot(circuit))
    ys = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "node":
            title = g.find(f"{SVG}title")
            shape = g.find(f".//{SVG}polygon")
            if title is not None and shape is not None and title.text in ("input", "logits"):
                points = [float(p.split(",")[1]) for p in shape.get("points", "").split()]
                ys[title.text] = sum(points) / len(points)
    assert ys["input"] > ys["logits"]


def test_layers_keep_their_ranks_without_connecting_paths() -> None:
    # a1.h0 and a3.h0 feed the logits directly; nothing connects them, yet layer 3 sits above layer 1
    table = {"a1.h0->logits": 1.0, "a3.h0->logits": -1.0, "input->a1.h0<q>": 0.5, "input->a3.h0<k>": 0.5}
    nodes = dot_json(render_dot(make_circuit(table)))["nodes"]
    assert y_of(nodes["input"]) < y_of(nodes["a1.h0"]) < y_of(nodes["a3.h0"]) < y_of(nodes["logits"])


def test_node_shapes_per_kind(circuit: Circuit, layout: dict[str, Any]) -> None:
    nodes = layout["nodes"]
    shapes = {str(node): nodes[str(node)]["shape"] for node in circuit.nodes()}
    by_kind: dict[NodeKind, set[str]] = {}
    for node in circuit.nodes():
        by_kind.setdefault(node.kind, set()).add(shapes[str(node)])
    assert all(len(found) == 1 for found in by_kind.values())  # one shape per kind
    assert len({next(iter(s)) for s in by_kind.values()}) == 4  # and four different shapes
    assert by_kind[NodeKind.HEAD] == {DEFAULT_STYLE.nodes[NodeKind.HEAD].shape}
    assert by_kind[NodeKind.MLP] == {DEFAULT_STYLE.nodes[NodeKind.MLP].shape}


def test_only_touched_nodes_are_drawn(circuit: Circuit, layout: dict[str, Any]) -> None:
    drawn = {name for name in layout["nodes"] if not name.startswith("axis") and name != "legend"}
    assert drawn == {str(n) for n in circuit.nodes()}
    assert "a2.h0" not in drawn and "m2" not in drawn and "m3" not in drawn


def _edge_rows(circuit: Circuit, layout: dict[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
    rows = []
    for i, edge in enumerate(circuit.edges()):
        rows.append((str(edge), float(circuit.scores[edge]), layout["edges"][f"cc_e{i}"]))
    return rows


def test_edge_styles_per_slot(circuit: Circuit, layout: dict[str, Any]) -> None:
    seen: dict[str, set[tuple[str, str]]] = {}
    for edge, _, attrs in _edge_rows(circuit, layout):
        slot = parse_edge(edge).receiver.slot
        seen.setdefault(slot.value if slot else "", set()).add((attrs["style"], attrs["arrowhead"]))
    assert seen["q"] == {("solid", "normal")}
    assert seen["k"] == {("dashed", "diamond")}
    assert seen["v"] == {("dotted", "dot")}
    assert seen[""] == {("solid", "normal")}  # into MLPs and logits: plain


def test_slot_labels_only_in_small_drawings(circuit: Circuit) -> None:
    assert 'headlabel=q' in render_dot(circuit) and 'headlabel=k' in render_dot(circuit)
    big = random_circuit(120, 6, 6)
    assert "headlabel" not in render_dot(big)


def test_penwidth_is_monotone_in_abs_score(circuit: Circuit, layout: dict[str, Any]) -> None:
    rows = sorted(_edge_rows(circuit, layout), key=lambda row: abs(row[1]))
    widths = [float(attrs["penwidth"]) for _, _, attrs in rows]
    assert widths == sorted(widths)
    for (_, a, wa), (_, b, wb) in itertools.pairwise(rows):
        if abs(b) > abs(a):
            assert float(wb["penwidth"]) > float(wa["penwidth"])
    assert math.isclose(widths[-1], DEFAULT_STYLE.max_penwidth)  # the strongest edge
    assert widths[0] >= DEFAULT_STYLE.min_penwidth


def test_colours_by_sign(circuit: Circuit, layout: dict[str, Any]) -> None:
    for edge, score, attrs in _edge_rows(circuit, layout):
        colour = attrs["color"].lower()
        if score > 0:
            assert colour.startswith(DEFAULT_STYLE.positive), edge
        elif score < 0:
            assert colour.startswith(DEFAULT_STYLE.negative), edge
        else:
            assert colour.startswith(DEFAULT_STYLE.neutral), edge
    assert re.fullmatch(r"#[0-9a-f]{8}", layout["edges"]["cc_e0"]["color"])  # opacity by |score|


def test_non_finite_scores_are_grey_and_rank_last() -> None:
    table = {"input->a0.h0<q>": math.nan, "input->a0.h1<k>": math.inf, "a0.h0->m0": 2.0, "m0->logits": -1.0}
    c = make_circuit(table)
    edges = dot_json(render_dot(c))["edges"]
    colours = {str(e): edges[f"cc_e{i}"]["color"] for i, e in enumerate(c.edges())}
    assert colours["input->a0.h0<q>"] == colours["input->a0.h1<k>"] == DEFAULT_STYLE.neutral
    assert {str(e) for e in filter_circuit(c, top=2).edges()} == {"a0.h0->m0", "m0->logits"}
    assert "nan" in render_html(c)


def test_parallel_residual_graphs_render() -> None:
    graph = ComputationGraph(3, 2, parallel_residual=True)
    table = {"input->a0.h0<q>": 1.0, "input->m0": -1.0, "a0.h0->m1": 0.5, "m0->a1.h1<v>": 0.2, "m1->logits": 2.0}
    c = Circuit.from_edges(graph, table, scored(graph, table))
    nodes = dot_json(render_dot(c))["nodes"]
    assert y_of(nodes["input"]) < y_of(nodes["a0.h0"]) < y_of(nodes["m0"]) < y_of(nodes["a1.h1"]) < y_of(nodes["m1"])


def test_unscored_circuit_gets_uniform_grey_edges() -> None:
    graph = ComputationGraph(4, 3)
    plain = Circuit.from_edges(graph, list(EDGES))
    edges = dot_json(render_dot(plain))["edges"]
    assert {e["penwidth"] for e in edges.values()} == {f"{DEFAULT_STYLE.uniform_penwidth:.3f}"}
    assert {e["color"] for e in edges.values()} == {DEFAULT_STYLE.neutral}
    assert "unscored circuit" in svg_text(svg_of_cli(render_dot(plain)))


def test_legend_is_present(circuit: Circuit) -> None:
    source = render_dot(circuit)
    assert "cc_legend" in source
    root = svg_of_cli(source)
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("id") == "cc_legend")
    text = " ".join("".join(t.itertext()) for t in legend.iter(f"{SVG}text"))
    for needle in ("legend", "score < 0", "score > 0", "q: query", "k: key", "v: value", "dashed", "dotted", "|score|"):
        assert needle in text
    assert "score 0 or not finite" in text  # the drawing has a zero-score edge


def test_title_from_provenance_and_override(circuit: Circuit) -> None:
    text = svg_text(svg_of_cli(render_dot(circuit)))
    for needle in ("model: tiny-gpt2", "task: ioi", "method: eap-ig", "faithfulness: 0.8765", "15 edges"):
        assert needle in text
    assert "seed" not in text
    text = svg_text(svg_of_cli(render_dot(circuit, title="My circuit")))
    assert "My circuit" in text and "tiny-gpt2" not in text
    bare = make_circuit(provenance={})
    assert "method: hand" in svg_text(svg_of_cli(render_dot(bare)))  # falls back to the scores' method


# ====================================================================== escaping
@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_labels_are_escaped(hostile: str) -> None:
    prov = {"model": hostile, "task": hostile, "method": {"nested": hostile}, "faithfulness": hostile}
    c = make_circuit(provenance=prov)
    diff = render_diff_dot(c, make_circuit(), labels=(hostile, hostile))
    for source in (render_dot(c), render_dot(c, title=hostile), diff):
        root = svg_of_cli(source)  # DOT compiles and the SVG is well-formed XML
        raw = run_dot(source, "svg").decode()
        assert "<script" not in raw.lower()
        assert not any(el.tag.lower().endswith("script") for el in root.iter())
    visible = hostile.replace("\r\n", " ").replace("\n", " ")
    if "\x01" not in hostile and "\ud800" not in hostile and "\u2028" not in hostile:
        assert visible in svg_text(svg_of_cli(render_dot(c, title=hostile)))  # shown verbatim


def test_hostile_text_in_html_is_inert() -> None:
    c = make_circuit(provenance={"model": HOSTILE[0], "task": HOSTILE[1]})
    page = render_html(c, title=" ".join(HOSTILE))
    scripts = _Scripts()
    scripts.feed(page)
    assert scripts.count == 2 and scripts.types == ["application/json", None]
    assert page.lower().count("<script") == 2
    assert "alert(1)" not in page.replace("&lt;script&gt;alert(1)", "")  # only ever escaped


def test_hostile_labels_survive_every_output(circuit: Circuit, tmp_path: Path) -> None:
    label = "".join(HOSTILE)
    hostile = make_circuit(provenance={"model": label})
    for i, suffix in enumerate((".svg", ".html", ".dot", ".png")):
        render(hostile, tmp_path / f"a{i}{suffix}", title=label)
        render_diff(hostile, circuit, tmp_path / f"d{i}{suffix}", labels=(label, label), title=label)
    for path in tmp_path.glob("*.svg"):
        ET.parse(path)
    for path in tmp_path.glob("*.html"):
        scripts = _Scripts()
        scripts.feed(path.read_text(encoding="utf-8"))
        assert scripts.count == 2


def test_script_json_cannot_close_the_script_element() -> None:
    text = script_json({"x": "</script><script>alert(1)</script><!-- & \u2028"})
    assert "</" not in text and "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"x": "</script><script>alert(1)</script><!-- & \u2028"}


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.types: list[str | None] = []
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        data = dict(attrs)
        for key in ("src", "href", "xlink:href"):
            if data.get(key):
                self.sources.append(str(data[key]))
        if tag == "script":
            self.count += 1
            self.types.append(data.get("type"))


# ====================================================================== HTML viewer
def test_html_viewer_is_self_contained(circuit: Circuit) -> None:
    page = render_html(circuit)
    parser = _Scripts()
    parser.feed(page)
    assert parser.sources == []  # no src / href at all
    for bad in ("<link", "@import", "url(", "<iframe", "<img"):
        assert bad not in page.lower()
    for match in re.finditer(r"https?://", page):
        before = page[max(0, match.start() - 14) : match.start()]
        assert "xmlns" in before, page[match.start() - 40 : match.start() + 40]  # namespace names only
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    block = re.search(r'<script type="application/json" id="cc-data">(.*?)</script>', page, re.DOTALL)
    data = json.loads(block.group(1))
    items = data["items"]
    assert dict(items["cc_n0"])["kind"] == "input"
    head = dict(items["cc_n" + str(circuit.graph.head_sender(1, 0))])
    assert head["layer"] == "1" and head["head"] == "0" and head["in by slot"] == "q 1 \u00b7 k 0 \u00b7 v 1"
    edge = dict(items["cc_e0"])
    assert edge["edge"] == str(circuit.edges()[0]) and edge["slot"] == "q" and edge["score"] == "-1"
    for key in items:  # every hover target exists in the inlined SVG
        assert f'id="{key}"' in page
    assert page.count('<tr data-target="') == len(EDGES)
    first = re.search(r'<tr data-target="(cc_e\d+)">', page).group(1)
    assert dict(items[first])["edge"] == "a3.h1->logits"  # the table starts with the top |score| edge


def test_html_csp_hashes_match_inline_code(circuit: Circuit) -> None:
    import base64
    import hashlib

    page = render_html(circuit)
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL).group(1)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in page


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_viewer_script_shows_details_on_hover(circuit: Circuit, tmp_path: Path) -> None:
    page = render_html(circuit)
    data = re.search(r'id="cc-data">(.*?)</script>', page, re.DOTALL).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL).group(1)
    harness = """
    const listeners = {}; const made = [];
    function el(id) { return { id, listeners: {}, children: [], classList: { add() {}, remove() {} },
      addEventListener(t, f) { this.listeners[t] = f; }, appendChild(c) { this.children.push(c); },
      removeChild(c) { this.children.splice(this.children.indexOf(c), 1); },
      get firstChild() { return this.children[0] || null; }, getAttribute() { return null; } }; }
    const elements = {};
    global.document = {
      getElementById(id) { if (id === "cc-data") return { textContent: DATA };
        return elements[id] || (elements[id] = el(id)); },
      createElement(tag) { const e = el(tag); e.tag = tag; return e; },
      querySelectorAll() { return []; },
    };
    """
    code = f"const DATA = {json.dumps(data)};\n{harness}\n{script}\n" + (
        'elements["cc_e0"].listeners.mouseenter();\n'
        'console.log(JSON.stringify(elements["cc-details"].children.map(c => c.textContent)));\n'
    )
    path = tmp_path / "viewer.js"
    path.write_text(code)
    done = subprocess.run(["node", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown[:2] == ["edge", "input->a0.h0<q>"] and "score" in shown


# ====================================================================== determinism, filters, size
def test_output_is_deterministic(circuit: Circuit) -> None:
    again = make_circuit()  # an equal circuit built separately
    assert render_dot(circuit) == render_dot(again)
    assert run_dot(render_dot(circuit), "svg") == run_dot(render_dot(again), "svg")
    assert render_html(circuit) == render_html(again)
    assert render_diff_dot(circuit, again) == render_diff_dot(again, circuit)


def test_filters_select_a_sub_circuit_without_mutating(circuit: Circuit) -> None:
    before = circuit.in_circuit.clone()
    top = filter_circuit(circuit, top=4)
    assert top is not circuit and torch.equal(circuit.in_circuit, before)
    assert {str(e) for e in top.edges()} == {"a3.h1->logits", "m0->a1.h0<q>", "m1->a3.h1<q>", "a0.h0->m0"}
    assert top.provenance == circuit.provenance
    kept = filter_circuit(circuit, min_score=1.0)
    assert {str(e) for e in kept.edges()} == {e for e, s in EDGES.items() if abs(s) >= 1.0}
    both = filter_circuit(circuit, top=2, min_score=0.2)
    assert {str(e) for e in both.edges()} == {"a3.h1->logits", "m0->a1.h0<q>"}
    assert filter_circuit(circuit, top=1000).n_edges == circuit.n_edges
    assert filter_circuit(circuit) is circuit
    # the drawing of the top edges draws only their nodes
    names = {n for n in dot_json(render_dot(circuit, top=4))["nodes"] if not n.startswith("axis") and n != "legend"}
    assert names == {str(n) for n in top.nodes()}
    assert "showing 4 of 15 circuit edges (top 4 by |score|)" in render_dot(circuit, top=4)


def test_filter_ties_break_in_graph_order() -> None:
    table = {"input->a0.h0<q>": 1.0, "input->a0.h1<q>": -1.0, "input->m0": 1.0}
    c = make_circuit(table)
    assert [str(e) for e in filter_circuit(c, top=2).edges()] == ["input->a0.h0<q>", "input->a0.h1<q>"]


@pytest.mark.parametrize(
    "kwargs", [{"top": -1}, {"top": 1.5}, {"top": True}, {"min_score": -0.1}, {"min_score": math.nan}]
)
def test_bad_filters_raise(circuit: Circuit, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        filter_circuit(circuit, **kwargs)


def test_filters_need_scores() -> None:
    plain = Circuit.from_edges(ComputationGraph(4, 3), list(EDGES))
    with pytest.raises(ValueError, match="no scores"):
        render_dot(plain, top=3)


def test_empty_drawing_still_renders(circuit: Circuit) -> None:
    source = render_dot(circuit, top=0)
    assert "no edges to draw" in source
    svg_of_cli(source)


def test_refuses_absurd_sizes(circuit: Circuit) -> None:
    with pytest.raises(ValueError, match="--top"):
        render_dot(circuit, max_edges=5)
    render_dot(circuit, top=5, max_edges=5)


def test_500_edge_circuit_renders_quickly(tmp_path: Path) -> None:
    c = random_circuit(500)
    start = time.perf_counter()
    result = render(c, tmp_path / "big.svg")
    elapsed = time.perf_counter() - start
    assert result.n_edges == 500
    ET.parse(result.path)
    assert elapsed < 15.0, f"500 edges took {elapsed:.1f}s"  # about 1 s on a laptop-class CPU
    assert "headlabel" not in render_dot(c)


# ====================================================================== files and errors
@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf", ".dot", ".gv", ".html", ".htm"])
def test_render_writes_every_format(circuit: Circuit, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    result = render(circuit, path, top=10)
    assert result.path == path and (result.n_edges, result.n_circuit_edges) == (10, 15)
    assert result.n_nodes == len(filter_circuit(circuit, top=10).nodes())
    data = path.read_bytes()
    signature = {".svg": b"<?xml", ".png": b"\x89PNG", ".pdf": b"%PDF", ".dot": b"digraph", ".gv": b"digraph"}
    signature |= {".html": b"<!DOCTYPE html>", ".htm": b"<!DOCTYPE html>"}
    assert data.startswith(signature[suffix])
    assert list(tmp_path.iterdir()) == [path]  # atomic write: no temporary files left


def test_explicit_format_overrides_the_suffix(circuit: Circuit, tmp_path: Path) -> None:
    result = render(circuit, tmp_path / "picture.out", fmt="svg")
    assert result.format == "svg" and (tmp_path / "picture.out").read_bytes().startswith(b"<?xml")
    assert output_format("x.SVG") == "svg" and output_format("x", "HTML") == "html"
    assert output_format("x", ".gv") == "dot"
    assert set(FORMATS) == {"svg", "png", "pdf", "dot", "html"}


@pytest.mark.parametrize(("name", "fmt"), [("c.jpg", None), ("noext", None), ("c.svg", "bmp")])
def test_unknown_format_is_a_clear_error(circuit: Circuit, tmp_path: Path, name: str, fmt: str | None) -> None:
    with pytest.raises(ValueError, match="format|suffix") as info:
        render(circuit, tmp_path / name, fmt)
    assert "svg" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_dot_is_a_clear_error(circuit: Circuit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        render(circuit, tmp_path / "c.svg")
    with pytest.raises(GraphvizNotFoundError):
        render_html(circuit)
    assert not (tmp_path / "c.svg").exists()
    render(circuit, tmp_path / "c.dot")  # DOT source needs no graphviz
    assert (tmp_path / "c.dot").read_text().startswith("digraph")


def test_dot_failures_are_wrapped() -> None:
    with pytest.raises(RenderError, match="dot -Tsvg failed"):
        run_dot("digraph { a -> }", "svg")


# ====================================================================== diffs
def test_diff_colours_edges_by_membership(circuit: Circuit, tmp_path: Path) -> None:
    other_table = {e: s for e, s in EDGES.items() if e not in ("a3.h1->logits", "m1->logits")} | {"a2.h2->logits": 1.0}
    other = make_circuit(other_table)
    source = render_diff_dot(circuit, other, labels=("EAP", "ACDC"))
    layout = dot_json(source)
    union = filter_circuit(Circuit(circuit.graph, circuit.in_circuit | other.in_circuit))
    colour_of = {str(e): layout["edges"][f"cc_e{i}"]["color"] for i, e in enumerate(union.edges())}
    assert colour_of["a3.h1->logits"] == colour_of["m1->logits"] == DEFAULT_STYLE.diff_only_a
    assert colour_of["a2.h2->logits"] == DEFAULT_STYLE.diff_only_b
    assert colour_of["input->a0.h0<q>"] == DEFAULT_STYLE.diff_both
    assert layout["edges"]["cc_e0"]["style"] == "solid"
    text = svg_text(svg_of_cli(source))
    for needle in ("EAP vs ACDC", "in both (13)", "only in EAP (2)", "only in ACDC (1)", "edge IoU 0.812"):
        assert needle in text
    result = render_diff(circuit, other, tmp_path / "diff.html", labels=("EAP", "ACDC"))
    assert result.n_edges == 16 and "only EAP" in result.path.read_text()


def test_diff_needs_the_same_graph(circuit: Circuit) -> None:
    with pytest.raises(ValueError, match="different graphs"):
        render_diff_dot(circuit, make_circuit({"input->logits": 1.0}, n_layers=5))


def test_diff_filters_each_circuit(circuit: Circuit) -> None:
    source = render_diff_dot(circuit, circuit, top=3)
    assert "in both (3)" in source and "only in A (0)" in source
