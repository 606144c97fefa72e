"""Token-position circuit files in ``circuits evaluate``, ``render``, ``query`` and ``export``, and the
library pieces they use (``PositionalCircuit.to_networkx`` / ``paths``, ``import_any_circuit``,
positional curves and random baselines).

``circuits discover --positional`` runs once on the tiny GPT-2 of ``tests.conftest.tiny_dir`` (IOI,
largest aligned group) to make the positional circuit file every CLI test reads; outputs are checked
against the library's own answers for the same circuit.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
import torch

from cli.errors import EXIT_BAD_INPUT
from graphs.adapters import build_spec
from graphs.circuit import Circuit
from graphs.io import (
    CircuitFileError,
    import_any_circuit,
    load_mib_json,
    load_positional_circuit,
    save_circuit,
    save_positional_circuit,
)
from graphs.positional import PositionalCircuit, PositionalEdgeScores
from tests.cli_helpers import ok, ok_json, run
from tests.conftest import make_tiny


def bad(*args: str | Path, match: str) -> str:
    """The one-line error of a bad-input run (exit 2), checked to contain ``match``."""
    result = run(*args)
    assert result.exit_code == EXIT_BAD_INPUT, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pos_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A positional EAP circuit (40 edges) from ``circuits discover --positional``."""
    out = tmp_path_factory.mktemp("pos-run")
    ok("discover", "--model", tiny_dir, "--positional", "--aligned-subset", "--method", "eap", "--edges", "40",
       "--n-prompts", "8", "--batch-size", "4", "--no-svg", "--out", out)
    return out / "circuit.json"


@pytest.fixture(scope="module")
def plain_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, pos_file: Path) -> Path:
    """The collapse of the positional circuit as an ordinary circuit file (for --position errors)."""
    path = tmp_path_factory.mktemp("plain") / "plain.json"
    save_circuit(load_positional_circuit(pos_file).collapsed(), path)
    return path


# ----------------------------------------------------------------------------- library
def _hand_circuit() -> PositionalCircuit:
    """input@2 -> a1.h0@2<k>, a1.h0@4 -> logits@4, input@4 -> a1.h0@4<q>, input@3 -> m0@3 (tiny GPT-2)."""
    spec = build_spec(make_tiny("gpt2-mini"))
    g = spec.graph
    tokens = [f"t{i}" for i in range(5)]
    edges = ["input@2->a1.h0@2<k>", "a1.h0@4->logits@4", "input@4->a1.h0@4<q>", "input@3->m0@3"]
    mask = PositionalCircuit.from_edges(g, tokens, edges).in_circuit
    scores = torch.zeros(g.n_senders, g.n_receivers, 5)
    scores[mask] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    return PositionalCircuit(g, mask, tokens, PositionalEdgeScores(g, scores, tokens, "test"), {"method": "test"})


def test_positional_paths_move_between_tokens_only_inside_heads() -> None:
    c = _hand_circuit()
    listed = [[str(n) for n in p] for p in c.paths("input", "logits")]
    assert listed == [["input@2", "a1.h0@2", "a1.h0@4", "logits@4"], ["input@4", "a1.h0@4", "logits@4"]]
    assert [[str(n) for n in p] for p in c.paths("input@4", "logits", position=4)] == [["input@4", "a1.h0@4", "logits@4"]]
    assert c.paths("input", "logits", position=2) == []  # the k edge needs the move to token 4
    assert c.paths("input", "logits", limit=1) == c.paths("input", "logits")[:1]
    assert c.paths("m0", "logits") == []


def test_positional_networkx_view_and_any_loader(tmp_path: Path) -> None:
    c = _hand_circuit()
    view = c.to_networkx()
    assert view.nodes["a1.h0@4"] == {"kind": "head", "layer": 1, "head": 0, "position": 4, "token": "t4"}
    assert view.edges["input@2", "a1.h0@2"]["slot"] == "k" and view.graph["tokens"] == list(c.tokens)
    assert view.number_of_edges() == c.n_edges
    path = tmp_path / "c.json"
    save_positional_circuit(c, path)
    loaded = import_any_circuit(path)
    assert isinstance(loaded, PositionalCircuit) and torch.equal(loaded.in_circuit, c.in_circuit)
    save_circuit(c.collapsed(), tmp_path / "plain.json")
    assert isinstance(import_any_circuit(tmp_path / "plain.json"), Circuit)
    (tmp_path / "junk.json").write_text('{"nodes": []}')
    with pytest.raises(CircuitFileError, match="positional-circuit"):
        import_any_circuit(tmp_path / "junk.json")


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_positional_circuit(pos_file: Path, plain_file: Path) -> None:
    found = load_positional_circuit(pos_file)
    report = ok_json("evaluate", pos_file, "--random-samples", "2")
    assert report["edges"] == 40 and report["graph_edges"] == found.n_graph_edges
    assert report["positional"]["n_positions"] == found.n_positions and report["positional"]["same_tokens"]
    assert report["same_dataset"] is True
    assert report["faithfulness"]["value"] == pytest.approx(found.provenance["faithfulness"], abs=1e-5)
    assert len(report["random_baseline"]["values"]) == 2
    curve = report["curve"]
    assert len(curve["fractions"]) == 10 and curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
    text = ok("evaluate", pos_file, "--no-curve", "--random-samples", "0").stdout
    assert "positional edges" in text and "metric read at" in text
    bad("evaluate", pos_file, "--all-prompts", "--no-curve", "--random-samples", "0", match="--aligned-subset")
    bad("evaluate", pos_file, "--selection", "greedy", match="top-n curves only")
    bad("evaluate", plain_file, "--aligned-subset", "--model", "x", "--task", "ioi", match="not a token-position")


# ----------------------------------------------------------------------------- render
def test_render_positional_circuit(pos_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pos.dot"
    info = ok_json("render", pos_file, "-o", out, "--top", "10")
    assert info["format"] == "dot" and info["edges"] == 10 and info["circuit_edges"] == 40
    assert "@" in out.read_text()
    bad("render", pos_file, "-o", tmp_path / "pos.html", match="HTML viewer")


# ----------------------------------------------------------------------------- query
def test_query_positional_circuit(pos_file: Path, plain_file: Path) -> None:
    found = load_positional_circuit(pos_file)
    t = found.positions()[-1]
    nodes = ok_json("query", pos_file, "nodes")
    assert [n["id"] for n in nodes] == [str(n) for n in found.nodes()]
    at_t = ok_json("query", pos_file, "nodes", "--position", t)
    assert {n["position"] for n in at_t} == {t} and all(n["token"] == found.tokens[t] for n in at_t)
    edges = ok_json("query", pos_file, "edges", "--position", t)
    assert [e["edge"] for e in edges] == [str(e) for e in found.edges(t)]
    top = ok_json("query", pos_file, "edges", "--top", "3", "--position", t)
    assert [e["edge"] for e in top] == [str(e) for e, _ in found.top_edges(3, position=t)]
    head = next(n for n in found.nodes(t) if n.kind.value != "input")
    into = ok_json("query", pos_file, "edges", "--into", str(head.at(None)), "--position", t)
    assert [e["edge"] for e in into] == [str(e) for e, _ in found.in_edges(head)]
    assert "edges" in ok("query", pos_file, "edges", "--into", str(head)).stdout
    listed = ok_json("query", pos_file, "paths", "--limit", "5")
    assert listed["paths"] == [[str(n) for n in p] for p in found.paths(limit=5)] and listed["paths"]
    stats = ok_json("query", pos_file, "stats")
    assert stats["edges"] == 40 and stats["positional"]["graph_edges"] == found.n_graph_edges
    assert sum(p["edges"] for p in stats["positional"]["positions"]) == 40
    one = ok_json("query", pos_file, "stats", "--position", t)
    assert one["edges"] == found.at(t).n_edges and one["position"] == t
    assert "token positions" in ok("query", pos_file, "stats").stdout
    bad("query", plain_file, "nodes", "--position", "0", match="not a token-position circuit")
    bad("query", pos_file, "edges", "--position", str(found.n_positions), match="outside")
    bad("query", pos_file, "edges", "--into", str(head.at(None)), match="with a position")


# ----------------------------------------------------------------------------- export
def test_export_positional_circuit(pos_file: Path, tmp_path: Path) -> None:
    found = load_positional_circuit(pos_file)
    for fmt, reader in (("graphml", nx.read_graphml), ("gexf", nx.read_gexf)):
        out = tmp_path / f"pos.{fmt}"
        info = ok_json("export", pos_file, "-o", out)
        assert info["positional"] and info["edges"] == 40
        view = reader(out)
        assert set(view.nodes) == {str(n) for n in found.nodes()}
        some = next(iter(view.nodes(data=True)))
        assert int(some[1]["position"]) == int(some[0].split("@")[1])
        if fmt == "graphml":  # GEXF keeps no graph attributes
            assert json.loads(view.graph["tokens_json"]) == list(found.tokens)
    link = tmp_path / "pos.node-link.json"
    ok("export", pos_file, "--format", "node-link", "-o", link)
    data = json.loads(link.read_text())
    assert {n["id"] for n in data["nodes"]} == {str(n) for n in found.nodes()}
    ours = tmp_path / "copy.json"
    ok("export", pos_file, "--format", "json", "-o", ours)
    assert torch.equal(load_positional_circuit(ours).in_circuit, found.in_circuit)
    bad("export", pos_file, "--format", "mib-json", "-o", tmp_path / "m.json", match="--collapse")
    mib = tmp_path / "collapsed.mib.json"
    text = ok("export", pos_file, "--format", "mib-json", "--collapse", "-o", mib).stdout
    assert "collapsed from 40 positional edges" in text
    assert torch.equal(load_mib_json(mib).in_circuit, found.collapsed().in_circuit)
    bad("export", pos_file, "--format", "graphml", "--collapse", "-o", tmp_path / "x.graphml", match="--collapse")
