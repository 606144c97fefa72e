"""Circuit queries, comparisons and networkx views on small hand-built graphs (numbers by hand)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import networkx as nx
import pytest
import torch

from graphs.circuit import Circuit, node_attributes
from graphs.graph import ComputationGraph
from graphs.ids import IdError, NodeId, NodeKind, parse_edge
from graphs.scores import EdgeScores

ROOT = Path(__file__).resolve().parents[1]

# A circuit on 3 layers x 2 heads (sequential). Paths input -> logits:
#   input -> a0.h0 (q, k) -> m0 -> a1.h0 (q, v) -> logits
#   input -> a0.h1 (v)    -> m0 -> ...
#   input -> logits
# and a dead end a0.h1 -> a2.h1 (k).
EDGES: dict[str, float] = {
    "input->a0.h0<q>": -1.0,
    "input->a0.h0<k>": 0.5,
    "input->a0.h1<v>": 0.25,
    "a0.h0->m0": -2.0,
    "a0.h1->m0": 0.125,
    "m0->a1.h0<q>": 3.0,
    "m0->a1.h0<v>": -0.5,
    "a1.h0->logits": 1.5,
    "a0.h1->a2.h1<k>": 0.75,
    "input->logits": -0.0625,
}
OUTSIDE = {"m2->logits": 10.0, "a1.h1->m1": -9.0}  # scored edges that are not in the circuit


def _graph() -> ComputationGraph:
    return ComputationGraph(3, 2)


def _scores(graph: ComputationGraph) -> EdgeScores:
    values = torch.zeros(graph.n_senders, graph.n_receivers)
    for text, score in {**EDGES, **OUTSIDE}.items():
        values[graph.edge_index(parse_edge(text))] = score
    return EdgeScores(graph, values, "hand", {"k": 1})


@pytest.fixture()
def circuit() -> Circuit:
    g = _graph()
    return Circuit.from_edges(g, EDGES, _scores(g), {"task": "toy"})


def _names(nodes: list[NodeId]) -> list[str]:
    return [str(n) for n in nodes]


# ---------------------------------------------------------------------- nodes and edges
def test_nodes_by_kind_and_layer(circuit: Circuit) -> None:
    assert _names(circuit.nodes()) == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a2.h1", "logits"]
    assert _names(circuit.nodes_by("head")) == ["a0.h0", "a0.h1", "a1.h0", "a2.h1"]
    assert _names(circuit.nodes_by(NodeKind.MLP)) == ["m0"]
    assert _names(circuit.nodes_by(layer=0)) == ["a0.h0", "a0.h1", "m0"]
    assert _names(circuit.nodes_by("head", 2)) == ["a2.h1"]
    assert circuit.nodes_by("mlp", 1) == []
    assert _names(circuit.nodes_by("input")) == ["input"]
    with pytest.raises(ValueError, match="unknown node kind 'attn'.*head"):
        circuit.nodes_by("attn")


def test_in_and_out_edges_in_graph_order_with_scores(circuit: Circuit) -> None:
    def show(items: list) -> list[tuple[str, float | None]]:
        return [(str(e), s) for e, s in items]

    assert show(circuit.in_edges("a0.h0")) == [("input->a0.h0<q>", -1.0), ("input->a0.h0<k>", 0.5)]
    assert show(circuit.in_edges("a1.h0<v>")) == [("m0->a1.h0<v>", -0.5)]
    assert show(circuit.in_edges(NodeId.mlp(0))) == [("a0.h0->m0", -2.0), ("a0.h1->m0", 0.125)]
    assert show(circuit.in_edges("logits")) == [("input->logits", -0.0625), ("a1.h0->logits", 1.5)]
    assert circuit.in_edges("input") == []
    assert circuit.in_edges("m2") == []  # a graph node outside the circuit
    # receiver order within layer 0: q0, q1, k0, k1, v0, v1, m0; logits last
    assert show(circuit.out_edges("input")) == [
        ("input->a0.h0<q>", -1.0),
        ("input->a0.h0<k>", 0.5),
        ("input->a0.h1<v>", 0.25),
        ("input->logits", -0.0625),
    ]
    assert show(circuit.out_edges("a0.h1")) == [("a0.h1->m0", 0.125), ("a0.h1->a2.h1<k>", 0.75)]
    assert circuit.out_edges("logits") == []
    unscored = Circuit.from_edges(circuit.graph, EDGES)
    assert show(unscored.in_edges("a0.h0")) == [("input->a0.h0<q>", None), ("input->a0.h0<k>", None)]


def test_queries_reject_nodes_outside_the_graph(circuit: Circuit) -> None:
    for call in (circuit.in_edges, circuit.out_edges, circuit.ancestors, circuit.descendants):
        with pytest.raises(IdError, match="a5.h0"):
            call("a5.h0")
    with pytest.raises(IdError):
        circuit.paths("a0.h7", "logits")
    with pytest.raises(IdError):
        circuit.in_edges("banana")


# ---------------------------------------------------------------------- paths and reachability
def test_paths_through_any_slot(circuit: Circuit) -> None:
    paths = sorted(" ".join(_names(p)) for p in circuit.paths())
    assert paths == [
        "input a0.h0 m0 a1.h0 logits",
        "input a0.h1 m0 a1.h0 logits",
        "input logits",
    ]
    assert len(circuit.paths(limit=2)) == 2
    assert circuit.paths(limit=0) == []
    assert [_names(p) for p in circuit.paths("a0.h1", "a2.h1")] == [["a0.h1", "a2.h1"]]
    assert circuit.paths("a2.h1", "logits") == []  # dead end
    assert circuit.paths("m2", "logits") == []  # not in the circuit
    assert all(isinstance(n, NodeId) for n in circuit.paths()[0])


def test_ancestors_and_descendants(circuit: Circuit) -> None:
    assert _names(circuit.ancestors("logits")) == ["input", "a0.h0", "a0.h1", "m0", "a1.h0"]
    assert _names(circuit.ancestors("a2.h1")) == ["input", "a0.h1"]
    assert _names(circuit.descendants("a0.h1")) == ["m0", "a1.h0", "a2.h1", "logits"]
    assert _names(circuit.descendants(NodeId.input())) == ["a0.h0", "a0.h1", "m0", "a1.h0", "a2.h1", "logits"]
    assert circuit.ancestors("input") == [] and circuit.descendants("logits") == []
    assert circuit.ancestors("m1") == []


def test_top_edges(circuit: Circuit) -> None:
    top = [(str(e), s) for e, s in circuit.top_edges(3)]
    assert top == [("m0->a1.h0<q>", 3.0), ("a0.h0->m0", -2.0), ("a1.h0->logits", 1.5)]  # OUTSIDE excluded
    signed = [(str(e), s) for e, s in circuit.top_edges(2, absolute=False)]
    assert signed == [("m0->a1.h0<q>", 3.0), ("a1.h0->logits", 1.5)]
    assert len(circuit.top_edges(100)) == len(EDGES)
    with pytest.raises(ValueError, match="no scores"):
        Circuit.from_edges(circuit.graph, EDGES).top_edges(1)


def test_top_edges_ties_follow_graph_order() -> None:
    g = _graph()
    c = Circuit.from_edges(g, ["m2->logits", "input->m0", "input->a0.h0<q>"], EdgeScores(g, g.edge_mask.float()))
    assert [str(e) for e, _ in c.top_edges(3)] == ["input->a0.h0<q>", "input->m0", "m2->logits"]


# ---------------------------------------------------------------------- comparison
REFERENCE = ["input->a0.h0<q>", "a0.h0->m0", "m0->a1.h0<q>", "a1.h0->logits", "m1->logits", "a1.h1->m1"]


def test_edge_level_comparison(circuit: Circuit) -> None:
    ref = Circuit.from_edges(circuit.graph, REFERENCE)
    assert circuit.overlap(ref) == 4
    assert circuit.iou(ref) == pytest.approx(4 / 12)
    assert circuit.precision(ref) == pytest.approx(4 / 10)
    assert circuit.recall(ref) == pytest.approx(4 / 6)
    assert ref.precision(circuit) == pytest.approx(4 / 6)  # the roles swap
    assert circuit.iou(circuit) == 1.0


def test_node_level_comparison(circuit: Circuit) -> None:
    ref = Circuit.from_edges(circuit.graph, REFERENCE)
    # circuit: input a0.h0 a0.h1 m0 a1.h0 a2.h1 logits; reference: input a0.h0 m0 a1.h0 logits m1 a1.h1
    assert circuit.overlap(ref, level="node") == 5
    assert circuit.iou(ref, level="node") == pytest.approx(5 / 9)
    assert circuit.precision(ref, level="node") == pytest.approx(5 / 7)
    assert circuit.recall(ref, level="node") == pytest.approx(5 / 7)


def test_comparison_edge_cases(circuit: Circuit) -> None:
    g = circuit.graph
    empty = Circuit.empty(g)
    assert empty.iou(Circuit.empty(g)) == 1.0
    assert empty.precision(Circuit.empty(g)) == 1.0 and empty.recall(Circuit.empty(g)) == 1.0
    assert empty.precision(circuit) == 0.0 and empty.recall(circuit) == 0.0
    assert circuit.recall(empty) == 0.0 and circuit.precision(empty) == 0.0
    assert empty.iou(circuit, level="node") == 0.0
    with pytest.raises(ValueError, match="different graphs"):
        circuit.iou(Circuit.empty(ComputationGraph(3, 2, parallel_residual=True)))
    with pytest.raises(ValueError, match="different graphs"):
        circuit.overlap(Circuit.empty(ComputationGraph(2, 2)))
    with pytest.raises(ValueError, match="level"):
        circuit.iou(circuit, level="head")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        circuit.iou(set())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- networkx views
def test_digraph_merges_slots(circuit: Circuit) -> None:
    view = circuit.to_networkx()
    assert isinstance(view, nx.DiGraph) and not view.is_multigraph()
    assert list(view.nodes) == _names(circuit.nodes())
    assert view.number_of_edges() == 8  # 10 circuit edges, two node pairs carry two slots each
    qk = view.edges["input", "a0.h0"]
    assert qk == {"slot": "q,k", "slot_scores": {"q": -1.0, "k": 0.5}, "score": -0.5}
    qv = view.edges["m0", "a1.h0"]
    assert qv["slot"] == "q,v" and qv["score"] == 2.5 and qv["slot_scores"] == {"q": 3.0, "v": -0.5}
    assert view.edges["a0.h0", "m0"] == {"slot": "", "slot_scores": {"": -2.0}, "score": -2.0}
    assert view.nodes["input"] == {"kind": "input", "layer": -1, "head": -1}
    assert view.nodes["logits"] == {"kind": "logits", "layer": 3, "head": -1}
    assert view.nodes["a2.h1"] == {"kind": "head", "layer": 2, "head": 1}
    assert view.nodes["m0"] == {"kind": "mlp", "layer": 0, "head": -1}
    assert view.graph["n_layers"] == 3 and view.graph["method"] == "hand"
    assert view.graph["provenance"] == {"task": "toy"}
    assert nx.is_directed_acyclic_graph(view)


def test_digraph_without_scores() -> None:
    c = Circuit.from_edges(_graph(), EDGES)
    view = c.to_networkx()
    assert view.edges["input", "a0.h0"] == {"slot": "q,k", "slot_scores": {"q": None, "k": None}, "score": None}
    assert "method" not in view.graph


def test_all_three_slots_merge_in_qkv_order() -> None:
    g = _graph()
    c = Circuit.from_edges(g, ["a0.h1->a1.h0<v>", "a0.h1->a1.h0<q>", "a0.h1->a1.h0<k>"])
    assert c.to_networkx().edges["a0.h1", "a1.h0"]["slot"] == "q,k,v"
    assert len(c.paths("a0.h1", "a1.h0")) == 1  # one path however many slots carry it


def test_multigraph_keeps_one_edge_per_slot(circuit: Circuit) -> None:
    multi = circuit.to_multigraph()
    assert isinstance(multi, nx.MultiDiGraph)
    assert multi.number_of_edges() == len(EDGES)
    assert set(multi["input"]["a0.h0"]) == {"q", "k"}
    assert multi["input"]["a0.h0"]["k"] == {"slot": "k", "score": 0.5, "edge_id": "input->a0.h0<k>"}
    assert set(multi["a0.h0"]["m0"]) == {""}
    assert {d["edge_id"] for _, _, d in multi.edges(data=True)} == set(EDGES)


def test_views_are_fresh_copies(circuit: Circuit) -> None:
    before = circuit.paths()
    circuit.to_networkx().remove_node("m0")
    circuit.to_networkx().add_edge("input", "a2.h1")
    assert circuit.paths() == before
    assert circuit.to_networkx().has_node("m0")


def test_node_attributes_helper() -> None:
    g = _graph()
    assert node_attributes(g, NodeId.attention_head(1, 0)) == {"kind": "head", "layer": 1, "head": 0}


def test_gpt2_sized_view_is_quick() -> None:
    g = ComputationGraph(12, 12)
    c = Circuit.full(g, EdgeScores(g, torch.randn(g.n_senders, g.n_receivers)))
    view = c.to_networkx()
    # every sender pair with a head receiver merges three slots
    assert view.number_of_edges() < g.n_edges
    assert sum(len(d["slot_scores"]) for _, _, d in view.edges(data=True)) == g.n_edges
    assert len(c.ancestors("logits")) == g.n_senders


# ---------------------------------------------------------------------- docs stay correct
def _run_markdown_doctests(path: Path) -> doctest.TestResults:
    """Run every ```python block of a markdown file as doctests, in order, sharing one namespace."""
    text = path.read_text(encoding="utf-8")
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    namespace: dict = {}
    blocks = list(re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL))
    assert blocks, f"no python blocks in {path}"
    for match in blocks:
        lineno = text[: match.start(1)].count("\n")  # so failures point at the real line
        test = parser.get_doctest(match.group(1), namespace, path.name, str(path), lineno)
        runner.run(test, clear_globs=False)
        namespace = test.globs  # DocTest copies its globals: carry them to the next block
    return runner.summarize(verbose=False)


def test_query_docs_doctests() -> None:
    result = _run_markdown_doctests(ROOT / "docs" / "query.md")
    assert result.attempted > 10
    assert result.failed == 0, f"{result.failed} doctest examples in docs/query.md failed (see output above)"


def test_provenance_doctest() -> None:
    import graphs.provenance

    result = doctest.testmod(graphs.provenance)
    assert result.failed == 0 and result.attempted > 0
