"""Circuit files: exact round trips (own JSON, MIB JSON), exports, hostile input, atomic writes."""

from __future__ import annotations

import copy
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphs.io as gio
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.io import (
    CircuitFileError,
    circuit_from_dict,
    circuit_from_mib_dict,
    circuit_to_dict,
    circuit_to_mib_dict,
    export_circuit,
    import_circuit,
    load_circuit,
    load_mib_json,
    parse_json_bytes,
    save_circuit,
    save_mib_json,
)
from graphs.provenance import ProvenanceError, make_provenance, tool_version
from graphs.scores import EdgeScores

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------- strategies
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
provenances = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
graphs = st.builds(ComputationGraph, st.integers(1, 3), st.integers(1, 3), st.booleans())


@st.composite
def circuits(draw: st.DrawFn, scored: bool | None = None) -> Circuit:
    """Random graph, mask and scores: bulk values from a seeded generator, plus hypothesis-chosen
    awkward floats (signed zeros, subnormals, extremes of the dtype) at hypothesis-chosen edges."""
    graph = draw(graphs)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    mask = (torch.rand(graph.n_senders, graph.n_receivers, generator=gen) < draw(st.floats(0, 1))) & graph.edge_mask
    has_scores = draw(st.booleans()) if scored is None else scored
    scores = None
    if has_scores:
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        width = 32 if dtype is torch.float32 else 64
        scale = 10.0 ** draw(st.integers(-30, 30))
        values = (torch.randn(graph.n_senders, graph.n_receivers, generator=gen, dtype=torch.float64) * scale).to(dtype)
        special = st.sampled_from([0.0, -0.0, 1 / 3, -1e-45 if width == 32 else -5e-324])
        floats = st.floats(width=width, allow_nan=False, allow_infinity=False) | special
        cells = [graph.edge_index(e) for e in graph.edges()]
        for i, v in draw(st.lists(st.tuples(st.integers(0, len(cells) - 1), floats), max_size=8)):
            values[cells[i]] = v
        settings_ = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
        scores = EdgeScores(graph, values, draw(st.text(max_size=10)), settings_)
    return Circuit(graph, mask, scores, draw(provenances))


def assert_same(a: Circuit, b: Circuit) -> None:
    assert a.graph == b.graph
    assert torch.equal(a.in_circuit, b.in_circuit)
    assert dict(a.provenance) == dict(b.provenance)
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None and b.scores is not None:
        assert a.scores.values.dtype == b.scores.values.dtype
        # bit-exact, including the sign of zero
        assert torch.equal(a.scores.values.view(torch.int32 if a.scores.values.dtype == torch.float32 else torch.int64),
                           b.scores.values.view(torch.int32 if b.scores.values.dtype == torch.float32 else torch.int64))
        assert a.scores.method == b.scores.method
        assert dict(a.scores.settings) == dict(b.scores.settings)


def _small(scored: bool = True) -> Circuit:
    g = ComputationGraph(2, 2)
    values = torch.arange(g.n_senders * g.n_receivers, dtype=torch.float32).view(g.n_senders, g.n_receivers) / 7
    scores = EdgeScores(g, values, "eap", {"steps": 5}) if scored else None
    edges = ["input->a0.h0<q>", "a0.h0->m0", "m0->a1.h1<v>", "a1.h1->logits", "input->logits"]
    return Circuit.from_edges(g, edges, scores, {"model": "tiny", "d_model": 16, "seed": 0})


# ---------------------------------------------------------------------- round trips
@FAST
@given(circuits())
def test_own_json_round_trip_is_exact(tmp_path: Path, circuit: Circuit) -> None:
    path = tmp_path / "c.json"
    save_circuit(circuit, path)
    assert_same(circuit, load_circuit(path))
    assert_same(circuit, import_circuit(path))


@FAST
@given(circuits(), st.integers(1, 4096))
def test_mib_json_round_trip_is_exact(tmp_path: Path, circuit: Circuit, d_model: int) -> None:
    circuit = circuit.with_provenance(d_model=d_model)
    path = tmp_path / "c.mib.json"
    save_mib_json(circuit, path)
    assert_same(circuit, load_mib_json(path))
    assert_same(circuit, import_circuit(path))


@FAST
@given(circuits())
def test_dict_round_trip_through_text(circuit: Circuit) -> None:
    text = json.dumps(circuit_to_dict(circuit)).encode()
    assert_same(circuit, circuit_from_dict(parse_json_bytes(text)))


def test_unscored_file_lists_only_circuit_edges(tmp_path: Path) -> None:
    c = _small(scored=False)
    data = circuit_to_dict(c)
    assert [e["id"] for e in data["edges"]] == [str(e) for e in c.edges()]
    assert all(e["score"] is None and e["in_circuit"] for e in data["edges"])
    assert data["scores"] is None
    scored = circuit_to_dict(_small())
    assert len(scored["edges"]) == c.graph.n_edges
    assert scored["scores"] == {"method": "eap", "settings": {"steps": 5}, "dtype": "float32"}
    assert scored["format"] == "causal-circuits/circuit" and scored["version"] == 1
    nodes = {n["id"]: n for n in scored["nodes"]}
    assert nodes["a0.h0"] == {"id": "a0.h0", "kind": "head", "layer": 0, "head": 0, "in_circuit": True}
    assert nodes["input"]["layer"] is None and nodes["a1.h0"]["in_circuit"] is False


def test_mib_layout_matches_eap_ig(tmp_path: Path) -> None:
    c = _small()
    path = tmp_path / "m.json"
    save_mib_json(c, path)
    data = json.loads(path.read_text())
    assert data["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 16}
    assert list(data["nodes"]) == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"]
    assert data["nodes"]["logits"] == {"in_graph": True}
    assert data["nodes"]["a0.h1"] == {"in_graph": False}
    assert len(data["edges"]) == c.graph.n_edges
    assert data["edges"]["a0.h0->m0"]["in_graph"] is True
    assert data["edges"]["input->a0.h0<k>"] == {"score": c.scores["input->a0.h0<k>"], "in_graph": False}
    assert {"input->a0.h0<q>", "a0.h1->a1.h0<k>", "a1.h1->m1", "m1->logits"} <= set(data["edges"])
    parallel = circuit_to_mib_dict(Circuit.empty(ComputationGraph(2, 2, True)), d_model=8)
    assert "a0.h0->m0" not in parallel["edges"] and parallel["cfg"]["parallel_attn_mlp"] is True


def test_foreign_mib_file_without_extension(tmp_path: Path) -> None:
    """A file as EAP-IG's Graph.to_json writes it (node scores NaN = not scored, all neurons kept)."""
    g = ComputationGraph(2, 1)
    edges = {str(e): {"score": 0.5 if str(e) == "a0.h0->m1" else 0.0, "in_graph": str(e) == "a0.h0->m1"} for e in g.edges()}
    nodes: dict[str, Any] = {str(n): {"in_graph": False, "score": float("nan"), "neurons": [True] * 4} for n in g.nodes}
    nodes["m0"]["score"] = -1.25
    text = json.dumps({"cfg": {"n_layers": 2, "n_heads": 1, "parallel_attn_mlp": False, "d_model": 4, "extra": 1},
                       "nodes": nodes, "edges": edges})
    assert "NaN" in text
    path = tmp_path / "eap.json"
    path.write_text(text)
    c = load_mib_json(path)
    assert [str(e) for e in c.edges()] == ["a0.h0->m1"]
    assert c.scores is not None and c.scores["a0.h0->m1"] == 0.5 and c.scores.method == "unknown"
    assert dict(c.provenance) == {"source_format": "mib-json", "node_scores": {"m0": -1.25}, "d_model": 4}
    # re-export writes the node score back
    again = circuit_to_mib_dict(c)
    assert again["nodes"]["m0"]["score"] == -1.25 and "score" not in again["nodes"]["a0.h0"]
    # the own-format loader points at the right function
    with pytest.raises(CircuitFileError, match="load_mib_json"):
        load_circuit(path)


def test_mib_without_scores_or_d_model(tmp_path: Path) -> None:
    g = ComputationGraph(1, 1)
    data = {"cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": True},
            "nodes": {}, "edges": {"input->logits": {"in_graph": True}}}
    c = circuit_from_mib_dict(data)
    assert c.scores is None and [str(e) for e in c.edges()] == ["input->logits"] and c.graph == ComputationGraph(1, 1, True)
    with pytest.raises(ValueError, match="d_model"):
        save_mib_json(Circuit.empty(g), tmp_path / "x.json")
    save_mib_json(Circuit.empty(g), tmp_path / "x.json", d_model=8)
    assert load_mib_json(tmp_path / "x.json").provenance["d_model"] == 8


# ---------------------------------------------------------------------- exports
def test_graphml_export_reads_back(tmp_path: Path) -> None:
    c = _small()
    path = tmp_path / "c.graphml"
    export_circuit(c, path, "graphml")
    view = nx.read_graphml(path)
    assert set(view.nodes) == {str(n) for n in c.nodes()}
    assert view.nodes["logits"] == {"kind": "logits", "layer": 2, "head": -1}
    edge = view.edges["input", "a0.h0"]
    assert edge["slot"] == "q" and edge["score"] == c.scores["input->a0.h0<q>"] == edge["score_q"]
    assert json.loads(view.graph["provenance_json"]) == dict(c.provenance)
    unscored = tmp_path / "u.graphml"
    export_circuit(_small(scored=False), unscored, "graphml")
    assert "score" not in nx.read_graphml(unscored).edges["input", "a0.h0"]


def test_gexf_and_node_link_exports(tmp_path: Path) -> None:
    c = _small()
    export_circuit(c, tmp_path / "c.gexf", "gexf")
    gexf = nx.read_gexf(tmp_path / "c.gexf")
    assert set(gexf.nodes) == {str(n) for n in c.nodes()}
    assert gexf.edges["a0.h0", "m0"]["score"] == c.scores["a0.h0->m0"]
    export_circuit(c, tmp_path / "c.nl.json", "node-link")
    data = json.loads((tmp_path / "c.nl.json").read_text())
    back = nx.node_link_graph(data, edges="edges")
    assert set(back.edges) == set(c.to_networkx().edges)
    assert back.edges["input", "a0.h0"]["slot_scores"] == {"q": c.scores["input->a0.h0<q>"]}
    assert back.graph["provenance"] == dict(c.provenance)
    with pytest.raises(ValueError, match="unknown export format"):
        export_circuit(c, tmp_path / "x", "dot")


def test_export_escapes_hostile_provenance(tmp_path: Path) -> None:
    c = _small().with_provenance(model='<evil attr="1">&</evil>\x01')
    export_circuit(c, tmp_path / "c.graphml", "graphml")
    back = nx.read_graphml(tmp_path / "c.graphml")
    assert json.loads(back.graph["provenance_json"])["model"].startswith('<evil attr="1">&</evil>')


# ---------------------------------------------------------------------- provenance
def test_make_provenance_fills_and_validates() -> None:
    p = make_provenance(model="gpt2", seed=3, settings={"ms": (1, 2)}, faithfulness=0.93)
    assert p["tool_version"] == tool_version() != "" and p["date"].endswith("+00:00")
    assert p["settings"] == {"ms": [1, 2]}
    assert make_provenance(date="then", tool_version="x")["date"] == "then"
    assert make_provenance(x=torch.tensor(2.5))["x"] == 2.5
    for bad in ({"x": float("nan")}, {"x": object()}, {"x": {1: 2}}, {"x": torch.ones(2)}, {"x": Path("a")}):
        with pytest.raises(ProvenanceError):
            make_provenance(**bad)


def test_saving_unstorable_things_is_a_clear_error(tmp_path: Path) -> None:
    c = _small()
    with pytest.raises(ValueError, match="not JSON-safe"):
        save_circuit(c.with_provenance(path=Path("x")), tmp_path / "a.json")
    values = c.scores.values.clone()
    values[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"input->a0\.h0<q>.*nan"):
        save_circuit(Circuit(c.graph, c.in_circuit, c.scores.with_values(values)), tmp_path / "b.json")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- hostile files: each case
def _bad(data: Any, match: str) -> None:
    text = data if isinstance(data, (bytes, str)) else json.dumps(data)
    raw = text.encode() if isinstance(text, str) else text
    with pytest.raises(CircuitFileError, match=match):
        circuit_from_dict(parse_json_bytes(raw))


def _valid() -> dict[str, Any]:
    return circuit_to_dict(_small())


def test_wrong_types_and_missing_keys() -> None:
    d = _valid()
    for path, value, match in [
        (("graph", "n_layers"), "2", "n_layers: expected an integer"),
        (("graph", "n_layers"), True, "n_layers: expected an integer"),
        (("graph", "n_heads"), 0, "n_heads: must be at least 1"),
        (("graph", "parallel_residual"), 0, "expected true or false"),
        (("edges", 0, "in_circuit"), 1, r"edges\[0\]\.in_circuit"),
        (("edges", 3, "score"), "0.5", r"edges\[3\]\.score: expected a number"),
        (("edges", 3, "score"), None, r"edges\[3\]\.score: expected a number"),
        (("edges",), {"a": 1}, "expected a list"),
        (("edges", 2), "input->m0", r"edges\[2\]: expected an object"),
        (("provenance",), [1], "provenance: expected an object"),
        (("scores", "dtype"), "float16", "unknown dtype"),
        (("nodes", 1, "id"), 7, r"nodes\[1\]\.id: expected a string"),
    ]:
        bad = copy.deepcopy(d)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        _bad(bad, match)
    for key in ("format", "version", "graph", "edges"):
        bad = copy.deepcopy(d)
        del bad[key]
        _bad(bad, f"missing key '{key}'")
    bad = copy.deepcopy(d)
    del bad["edges"][5]["in_circuit"]
    _bad(bad, r"edges\[5\]: missing key 'in_circuit'")
    for top in ("[]", "3", "\"x\"", "null"):
        _bad(top, "expected an object")


def test_unknown_format_or_version() -> None:
    d = _valid()
    _bad({**d, "format": "something-else"}, "not a causal-circuits/circuit file")
    _bad({**d, "version": 2}, "version 2.*newer")
    _bad({**d, "version": 0}, "unsupported format version 0")
    _bad({**d, "version": "1"}, "version: expected an integer")
    _bad({"cfg": {}}, "looks like MIB")


def test_ids_not_in_graph_non_edges_and_duplicates() -> None:
    d = _valid()
    for edge_id, match in [
        ("a7.h0->logits", "a7.h0"),  # layer beyond the graph: the error names the node
        ("a0.h9->m1", "a0.h9"),
        ("input->a4.h0<q>", "a4.h0"),
        ("a1.h0->a0.h0<q>", "not an edge: a1.h0 is not upstream of a0.h0<q>"),
        ("m1->m1", "not an edge"),
        ("logits->m0", "'logits' is not a sender"),
        ("a0.h0@3->m0", "a0.h0@3"),
        ("banana", "expected 'sender->receiver'"),
        ("input->m0<q>", "heads need a slot"),
    ]:
        bad = copy.deepcopy(d)
        bad["edges"][4]["id"] = edge_id
        _bad(bad, match)
    bad = copy.deepcopy(d)
    bad["edges"][1]["id"] = bad["edges"][0]["id"]
    _bad(bad, "duplicate edge 'input->a0.h0<q>'")
    bad = copy.deepcopy(d)
    bad["edges"][1]["id"] = " " + bad["edges"][0]["id"]  # the same edge spelled differently
    _bad(bad, "duplicate edge")
    bad = copy.deepcopy(d)
    bad["nodes"][2]["id"] = "a9.h9"
    _bad(bad, "a9.h9")
    bad = copy.deepcopy(d)
    del bad["edges"][7]
    _bad(bad, "lists every edge")


def test_scores_in_an_unscored_file_and_overflow() -> None:
    d = circuit_to_dict(_small(scored=False))
    d["edges"][0]["score"] = 1.0
    _bad(d, "declares no scores")
    d = _valid()
    d["edges"][0]["score"] = 1e300  # finite as a double, infinite as float32
    _bad(d, "overflows torch.float32")
    d["edges"][0]["score"] = 10**400
    _bad(d, "too large")


def test_non_finite_numbers_are_refused() -> None:
    text = json.dumps(_valid())
    first = json.dumps(_valid()["edges"][0]["score"])
    for token in ("NaN", "Infinity", "-Infinity", "1e999", "-1e400"):
        _bad(text.replace(f'"score": {first}', f'"score": {token}', 1), "NaN|Infinity|infinity|overflows")
    # MIB: a NaN node score means "not scored", a NaN edge score is refused, Infinity always
    mib = json.dumps(circuit_to_mib_dict(_small()))
    ok = mib.replace('"a0.h1": {"in_graph": false}', '"a0.h1": {"in_graph": false, "score": NaN}')
    assert ok != mib
    circuit_from_mib_dict(parse_json_bytes(ok.encode(), allow_nan=True))
    nan_edge = circuit_to_mib_dict(_small())
    nan_edge["edges"]["a0.h0->m0"]["score"] = float("nan")
    with pytest.raises(CircuitFileError, match=r"a0\.h0->m0.*finite"):
        circuit_from_mib_dict(parse_json_bytes(json.dumps(nan_edge).encode(), allow_nan=True))
    with pytest.raises(CircuitFileError, match="Infinity"):
        parse_json_bytes(b'{"a": Infinity}', allow_nan=True)


def test_duplicate_json_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CircuitFileError, match="duplicate key 'input->m0'"):
        parse_json_bytes(b'{"edges": {"input->m0": {"in_graph": true}, "input->m0": {"in_graph": false}}}')
    mib = circuit_to_mib_dict(_small())
    mib["edges"]["input->logits "] = {"score": 0.0, "in_graph": True}  # same edge, other spelling
    with pytest.raises(CircuitFileError, match="duplicate edge"):
        circuit_from_mib_dict(mib)


def test_huge_files_are_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(gio.DEFAULT_MAX_BYTES + 1)  # sparse: costs nothing
    read = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: read.append(a) or (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(CircuitFileError, match="larger than the limit"):
        load_circuit(path)
    assert read == []
    monkeypatch.undo()
    small = tmp_path / "small.json"
    save_circuit(_small(), small)
    with pytest.raises(CircuitFileError, match="limit of 100 bytes"):
        load_circuit(small, max_bytes=100)
    with pytest.raises(CircuitFileError, match="limit"):
        load_mib_json(small, max_bytes=100)


def test_deep_nesting_invalid_utf8_and_unreadable(tmp_path: Path) -> None:
    for raw in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        with pytest.raises(CircuitFileError, match="nested too deeply"):
            parse_json_bytes(raw)
    d = _valid()
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    d["provenance"]["deep"] = deep
    _bad(d, "nested deeper")
    _bad(b'{"format": "\xff\xfe"}', "not valid UTF-8")
    _bad(b"\xef\xbb\xbf" + json.dumps(_valid()).encode() + b"\x00", "not valid JSON")
    assert circuit_from_dict(parse_json_bytes(b"\xef\xbb\xbf" + json.dumps(_valid()).encode())).n_edges == 5
    _bad(b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON")
    with pytest.raises(CircuitFileError, match="cannot read"):
        load_circuit(tmp_path / "missing.json")
    with pytest.raises(CircuitFileError, match="directory"):
        load_circuit(tmp_path)
    with pytest.raises(CircuitFileError, match="cannot read"):
        load_circuit("bad\x00path")


def test_absurd_graph_sizes_are_refused_before_allocating() -> None:
    d = _valid()
    for n_layers, n_heads in ((10**9, 12), (12, 10**9), (2000, 64)):
        bad = copy.deepcopy(d)
        bad["graph"].update(n_layers=n_layers, n_heads=n_heads)
        _bad(bad, "above the cap")
    with pytest.raises(CircuitFileError, match="above the cap"):
        circuit_from_mib_dict({"cfg": {"n_layers": 10**12, "n_heads": 1, "parallel_attn_mlp": False},
                               "nodes": {}, "edges": {}})


def test_mib_specific_errors() -> None:
    good = circuit_to_mib_dict(_small())
    cases: list[tuple[Any, str]] = []
    bad = copy.deepcopy(good)
    bad["nodes"]["a0.h0"]["neurons"] = [True, False]
    cases.append((bad, "neuron-level"))
    bad = copy.deepcopy(good)
    bad["nodes"]["a5.h0"] = {"in_graph": True}
    cases.append((bad, "a5.h0"))
    bad = copy.deepcopy(good)
    bad["edges"]["a0.h0->a0.h1<q>"] = {"score": 0.0, "in_graph": True}
    cases.append((bad, "not an edge"))
    bad = copy.deepcopy(good)
    bad["causal_circuits"]["version"] = 9
    cases.append((bad, "unsupported version 9"))
    bad = copy.deepcopy(good)
    del bad["cfg"]["parallel_attn_mlp"]
    cases.append((bad, "missing key 'parallel_attn_mlp'"))
    bad = copy.deepcopy(good)
    bad["edges"]["input->m0"] = {"score": 1.0}
    cases.append((bad, "missing key 'in_graph'"))
    for data, match in cases:
        with pytest.raises(CircuitFileError, match=match):
            circuit_from_mib_dict(data)


def test_import_detects_format(tmp_path: Path) -> None:
    save_circuit(_small(), tmp_path / "own.json")
    save_mib_json(_small(), tmp_path / "mib.json")
    assert import_circuit(tmp_path / "own.json").scores.method == "eap"
    assert import_circuit(tmp_path / "mib.json").scores.method == "eap"
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(CircuitFileError, match="neither"):
        import_circuit(tmp_path / "other.json")
    with pytest.raises(CircuitFileError, match="NaN"):
        import_circuit_text(tmp_path, json.dumps(_valid()).replace('"seed": 0', '"seed": NaN'))


def import_circuit_text(tmp_path: Path, text: str) -> Circuit:
    path = tmp_path / "t.json"
    path.write_text(text)
    return import_circuit(path)


# ---------------------------------------------------------------------- fuzz: only CircuitFileError
def _only_file_errors(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except CircuitFileError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes) -> None:
    for allow_nan in (False, True):
        _only_file_errors(lambda nan=allow_nan: circuit_from_dict(parse_json_bytes(raw, allow_nan=nan)))
        _only_file_errors(lambda nan=allow_nan: circuit_from_mib_dict(parse_json_bytes(raw, allow_nan=nan)))


SCHEMA_KEYS = ["format", "version", "graph", "n_layers", "n_heads", "parallel_residual", "provenance", "scores",
               "method", "settings", "dtype", "nodes", "edges", "id", "score", "in_circuit", "cfg",
               "parallel_attn_mlp", "d_model", "in_graph", "neurons", "causal_circuits", "kind", "layer", "head"]
SCHEMA_STRINGS = ["causal-circuits/circuit", "causal-circuits/mib-extension", "float32", "float64", "input",
                  "logits", "a0.h0", "m0", "input->m0", "a0.h0->m0", "input->a0.h0<q>", "m1->logits", "a9.h9->m0"]
schema_json = st.recursive(
    json_scalars | st.sampled_from(SCHEMA_STRINGS) | st.integers(-2, 3),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(SCHEMA_KEYS + SCHEMA_STRINGS) | st.text(max_size=4), inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=250, deadline=None)
@given(schema_json)
def test_fuzz_random_json_structures(data: Any) -> None:
    _only_file_errors(circuit_from_dict, data)
    _only_file_errors(circuit_from_mib_dict, data)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "schema"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(json_values)
        else:
            parent[path[-1]] = draw(st.sampled_from(SCHEMA_STRINGS) | st.integers(-3, 10**10) | st.booleans())
    return data


BASE_OWN = circuit_to_dict(_small())
BASE_MIB = circuit_to_mib_dict(_small())


@settings(max_examples=200, deadline=None)
@given(mutated(BASE_OWN), mutated(BASE_MIB))
def test_fuzz_mutated_valid_files(own: Any, mib: Any) -> None:
    _only_file_errors(circuit_from_dict, own)
    _only_file_errors(circuit_from_mib_dict, mib)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_mutated_bytes(data: st.DataObject) -> None:
    raw = bytearray(json.dumps(BASE_OWN).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del raw[at]
        else:
            raw.insert(at, data.draw(st.integers(0, 255)))
    _only_file_errors(lambda: circuit_from_dict(parse_json_bytes(bytes(raw))))


# ---------------------------------------------------------------------- atomic writes
def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    save_circuit(_small(), path)
    before = path.read_bytes()
    real_dumps, calls = json.dumps, []

    def flaky(*args: Any, **kwargs: Any) -> str:  # fails midway, after some output was written
        calls.append(1)
        if len(calls) > 20:
            raise RuntimeError("disk on fire")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(json, "dumps", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_circuit(Circuit.full(ComputationGraph(3, 3)), path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_mib_json(Circuit.full(ComputationGraph(3, 3)), path, d_model=4)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []
    assert_same(load_circuit(path), _small())


def test_failed_export_leaves_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.graphml"
    export_circuit(_small(), path, "graphml")
    before = path.read_bytes()

    def half(graph: Any, handle: Any, **_: Any) -> None:
        handle.write(b"<graphml>")
        raise OSError("no space left")

    monkeypatch.setattr(nx, "write_graphml", half)
    with pytest.raises(OSError, match="no space"):
        export_circuit(_small(scored=False), path, "graphml")
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


def test_atomic_write_keeps_permissions_and_creates_new_files(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_circuit(_small(), path)
    os.chmod(path, 0o640)
    save_circuit(_small(scored=False), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert load_circuit(path).scores is None
    with pytest.raises(FileNotFoundError):
        save_circuit(_small(), tmp_path / "no" / "such" / "dir.json")


def test_score_floats_survive_json_exactly() -> None:
    values = torch.tensor([1 / 3, -0.0, 1e-45, 3.4028234663852886e38, 0.1], dtype=torch.float32)
    for v in values.tolist():
        assert torch.tensor(json.loads(json.dumps(v)), dtype=torch.float32).view(torch.int32) == torch.tensor(
            v, dtype=torch.float32
        ).view(torch.int32)
    assert math.copysign(1, json.loads(json.dumps(-0.0))) == -1
