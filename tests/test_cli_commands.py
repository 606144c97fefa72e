"""The circuit-file commands of ``circuits``: evaluate, render, query, compare, export, and --config.

One tiny GPT-2 with an offline tokenizer is saved once; ``circuits discover`` runs twice on it (EAP
and EAP-IG) to make the circuit files every test reads. Outputs are checked against the library's
own answers for the same circuit.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest
import torch
from click.testing import Result
from transformers import GPT2Config, GPT2LMHeadModel

from cli.errors import EXIT_BAD_INPUT
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.io import load_circuit, load_mib_json, save_circuit
from tests.cli_helpers import ok, ok_json, run

COMMANDS = ("evaluate", "render", "query", "compare", "export")


def one_line_error(result: Result, code: int = EXIT_BAD_INPUT) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with another graph shape (3 layers x 2 heads); no tokenizer needed."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=50, n_positions=32)).save_pretrained(path)
    return path


def _discover(tiny_dir: Path, out: Path, method: str) -> Path:
    ok("discover", "--model", tiny_dir, "--method", method, "--edges", "15", "--n-prompts", "6", "--batch-size", "3",
       "--steps", "2", "--no-curve", "--no-svg", "--out", out)
    return out / "circuit.json"


@pytest.fixture(scope="module")
def eap_path(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _discover(tiny_dir, tmp_path_factory.mktemp("runs") / "eap", "eap")


@pytest.fixture(scope="module")
def ig_path(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _discover(tiny_dir, tmp_path_factory.mktemp("runs") / "eap-ig", "eap-ig")


@pytest.fixture(scope="module")
def circuit(eap_path: Path) -> Circuit:
    return load_circuit(eap_path)


@pytest.fixture(scope="module")
def unscored_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made circuit of the tiny model's graph shape: no scores, no provenance."""
    path = tmp_path_factory.mktemp("hand") / "unscored.json"
    save_circuit(Circuit.from_edges(ComputationGraph(2, 3), ["input->m0", "m0->logits", "input->a1.h0<q>",
                                                             "a1.h0->logits"]), path)
    return path


@pytest.fixture(scope="module")
def elsewhere_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A circuit on another graph (3 layers x 2 heads)."""
    path = tmp_path_factory.mktemp("hand") / "elsewhere.json"
    save_circuit(Circuit.from_edges(ComputationGraph(3, 2), ["input->logits"]), path)
    return path


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = ok(command, "--help")
    assert "Example" in result.stdout and f"circuits {command}" in result.stdout


@pytest.mark.parametrize("sub", ["nodes", "edges", "paths", "stats"])
def test_query_subcommands_have_help_without_a_file(sub: str, tmp_path: Path) -> None:
    result = ok("query", tmp_path / "not-yet.json", sub, "--help")
    assert f"circuits query runs/ioi/circuit.json {sub}" in result.stdout and "--json" in result.stdout


def test_root_help_lists_the_new_commands() -> None:
    out = ok("--help").stdout
    for command in COMMANDS:
        assert command in out


# ----------------------------------------------------------------------------- query
def test_query_nodes_match_the_library(eap_path: Path, circuit: Circuit) -> None:
    rows = ok_json("query", eap_path, "nodes")
    assert [r["id"] for r in rows] == [str(n) for n in circuit.nodes()]
    assert sum(r["in_edges"] for r in rows) == sum(r["out_edges"] for r in rows) == circuit.n_edges
    for row in rows:
        assert row["in_edges"] == len(circuit.in_edges(row["id"]))
        assert row["out_edges"] == len(circuit.out_edges(row["id"]))
    heads = ok_json("query", eap_path, "nodes", "--kind", "head", "--layer", "1")
    assert [r["id"] for r in heads] == [str(n) for n in circuit.nodes_by("head", 1)]
    assert all(r["kind"] == "head" and r["layer"] == 1 for r in heads)
    text = ok("query", eap_path, "nodes", "--kind", "mlp").stdout
    assert f"{len(circuit.nodes_by('mlp'))} nodes" in text


def test_query_edges_match_the_library(eap_path: Path, circuit: Circuit) -> None:
    every = ok_json("query", eap_path, "edges")
    assert [r["edge"] for r in every] == [str(e) for e in circuit.edges()]
    assert all(r["score"] == circuit.score_of(r["edge"]) for r in every)
    top = ok_json("query", eap_path, "edges", "--top", "5")
    assert [(r["edge"], r["score"]) for r in top] == [(str(e), s) for e, s in circuit.top_edges(5)]
    into = ok_json("query", eap_path, "edges", "--into", "logits")
    assert [r["edge"] for r in into] == [str(e) for e, _ in circuit.in_edges("logits")]
    assert all(r["receiver"] == "logits" and r["slot"] is None for r in into)
    sender = str(circuit.in_edges("logits")[0][0].sender)
    both = ok_json("query", eap_path, "edges", "--from", sender, "--into", "logits")
    assert [r["edge"] for r in both] == [f"{sender}->logits"]
    out = ok_json("query", eap_path, "edges", "--from", "input", "--top", "2")
    expected = sorted(circuit.out_edges("input"), key=lambda es: -abs(es[1] or 0.0))[:2]
    assert [r["edge"] for r in out] == [str(e) for e, _ in expected]
    text = ok("query", eap_path, "edges", "--top", "3").stdout.splitlines()
    assert text[-1] == "3 edges" and text[0].split()[0] == str(circuit.top_edges(1)[0][0])


def test_query_paths_match_the_library(eap_path: Path, circuit: Circuit) -> None:
    all_paths = [[str(n) for n in p] for p in circuit.paths()]
    assert all_paths, "the test circuit should connect input to logits"
    data = ok_json("query", eap_path, "paths", "--limit", str(len(all_paths) + 5))
    assert data["paths"] == all_paths and data["truncated"] is False
    first = ok_json("query", eap_path, "paths", "--limit", "1")
    assert first["paths"] == all_paths[:1] and first["truncated"] is (len(all_paths) > 1)
    text = ok("query", eap_path, "paths", "--limit", "1").stdout.splitlines()
    assert text[0] == " -> ".join(all_paths[0])


def test_query_stats(eap_path: Path, circuit: Circuit) -> None:
    s = ok_json("query", eap_path, "stats")
    assert s["edges"] == circuit.n_edges and s["nodes"] == len(circuit.nodes())
    assert s["nodes_by_kind"] == {k: len(circuit.nodes_by(k)) for k in ("input", "head", "mlp", "logits")}
    assert sum(s["edges_into"].values()) == sum(s["edges_from"].values()) == circuit.n_edges
    layer_edges = sum(row["edges_in"] for row in s["layers"].values()) + s["edges_into"]["logits"]
    assert layer_edges == circuit.n_edges
    assert s["layers"]["1"]["heads"] == len(circuit.nodes_by("head", 1))
    assert circuit.scores is not None
    chosen = circuit.scores.values[circuit.in_circuit]
    assert s["scores"]["count"] == circuit.n_edges and s["scores"]["method"] == "eap"
    assert s["scores"]["sum"] == pytest.approx(float(chosen.double().sum()))
    assert s["scores"]["positive"] + s["scores"]["negative"] + s["scores"]["zero"] == circuit.n_edges
    assert s["provenance"] == dict(circuit.provenance)
    text = ok("query", eap_path, "stats").stdout
    assert f"{circuit.n_edges} edges" in text and "provenance" in text and "eap" in text


def test_query_unscored_circuit(unscored_path: Path) -> None:
    assert ok_json("query", unscored_path, "stats")["scores"] is None
    assert [r["score"] for r in ok_json("query", unscored_path, "edges")] == [None] * 4
    line = one_line_error(run("query", unscored_path, "edges", "--top", "2"))
    assert "no scores" in line


# ----------------------------------------------------------------------------- errors
def test_unknown_node_id_is_bad_input(eap_path: Path) -> None:
    line = one_line_error(run("query", eap_path, "edges", "--into", "a99.h0"))
    assert "a99.h0" in line
    line = one_line_error(run("query", eap_path, "paths", "--from", "nonsense"))
    assert "nonsense" in line


def test_missing_circuit_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    for args in (("query", missing, "stats"), ("render", missing, "-o", tmp_path / "x.svg"),
                 ("export", missing, "-o", tmp_path / "x.graphml"), ("evaluate", missing)):
        line = one_line_error(run(*args))
        assert "nope.json" in line


def test_malformed_circuit_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "not valid JSON" in one_line_error(run("query", broken, "nodes"))
    neither = tmp_path / "neither.json"
    neither.write_text('{"hello": 1}')
    assert "neither" in one_line_error(run("render", neither, "-o", tmp_path / "x.svg"))
    bad_edge = tmp_path / "bad-edge.json"
    bad_edge.write_text(json.dumps({"format": "causal-circuits/circuit", "version": 1, "scores": None,
                                    "graph": {"n_layers": 1, "n_heads": 1, "parallel_residual": False},
                                    "edges": [{"id": "a5.h0->logits", "in_circuit": True}]}))
    assert "a5.h0" in one_line_error(run("export", bad_edge, "-o", tmp_path / "x.graphml"))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "query", tmp_path / "nope.json", "stats")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "Traceback (most recent call last)" in result.stderr and "CircuitFileError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


# ----------------------------------------------------------------------------- render
def test_render_svg_and_filters(eap_path: Path, circuit: Circuit, tmp_path: Path) -> None:
    out = tmp_path / "c.svg"
    text = ok("render", eap_path, "-o", out, "--title", "IOI <tiny>").stdout
    assert f"{circuit.n_edges} edges" in text
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    assert "IOI &lt;tiny&gt;" in out.read_text()
    data = ok_json("render", eap_path, "-o", tmp_path / "top.html", "--top", "5")
    assert (data["edges"], data["circuit_edges"], data["format"]) == (5, circuit.n_edges, "html")
    assert (tmp_path / "top.html").read_text().startswith("<!DOCTYPE html>")
    biggest = abs(circuit.top_edges(1)[0][1])
    data = ok_json("render", eap_path, "-o", tmp_path / "min.dot", "--min-score", str(biggest * 0.999))
    assert data["edges"] == 1 and "digraph" in (tmp_path / "min.dot").read_text()
    data = ok_json("render", eap_path, "-o", tmp_path / "forced.txt", "--format", "dot")
    assert data["format"] == "dot"


def test_render_errors(eap_path: Path, unscored_path: Path, tmp_path: Path) -> None:
    assert "--format" in one_line_error(run("render", eap_path, "-o", tmp_path / "c.txt"))
    assert "no scores" in one_line_error(run("render", unscored_path, "-o", tmp_path / "u.svg", "--top", "2"))
    assert not (tmp_path / "u.svg").exists()
    assert run("render", eap_path).exit_code == 2  # -o is required


# ----------------------------------------------------------------------------- export
def test_export_graphml_gexf_node_link(eap_path: Path, circuit: Circuit, tmp_path: Path) -> None:
    view = circuit.to_networkx()
    ok("export", eap_path, "-o", tmp_path / "c.graphml")  # format from the suffix
    loaded = nx.read_graphml(tmp_path / "c.graphml")
    assert set(loaded.nodes) == set(view.nodes) and set(loaded.edges) == set(view.edges)
    assert json.loads(loaded.graph["provenance_json"]) == dict(circuit.provenance)
    data = ok_json("export", eap_path, "--format", "gexf", "-o", tmp_path / "c.gexf")
    assert data == {"path": str(tmp_path / "c.gexf"), "format": "gexf", "edges": circuit.n_edges,
                    "nodes": len(circuit.nodes())}
    assert set(nx.read_gexf(tmp_path / "c.gexf").edges) == set(view.edges)
    ok("export", eap_path, "-f", "node-link", "-o", tmp_path / "c.nl.json")
    linked = nx.node_link_graph(json.loads((tmp_path / "c.nl.json").read_text()), edges="edges")
    assert set(linked.edges) == set(view.edges)


def test_export_mib_json_round_trips(eap_path: Path, circuit: Circuit, tmp_path: Path) -> None:
    mib = tmp_path / "c.mib.json"
    ok("export", eap_path, "--format", "mib-json", "-o", mib)
    raw = json.loads(mib.read_text())
    assert raw["cfg"]["d_model"] == 24
    back = load_mib_json(mib)
    assert {str(e) for e in back.edges()} == {str(e) for e in circuit.edges()}
    assert back.scores is not None and circuit.scores is not None
    assert torch.equal(back.scores.values, circuit.scores.values)
    # MIB input works everywhere a circuit is read: back to our JSON, queries, drawings
    ok("export", mib, "--format", "json", "-o", tmp_path / "ours.json")
    assert torch.equal(load_circuit(tmp_path / "ours.json").in_circuit, circuit.in_circuit)
    assert ok_json("query", mib, "stats")["edges"] == circuit.n_edges
    ok("render", mib, "-o", tmp_path / "mib.svg")
    assert ET.parse(tmp_path / "mib.svg").getroot().tag.endswith("svg")


def test_export_errors(eap_path: Path, unscored_path: Path, tmp_path: Path) -> None:
    assert "--format" in one_line_error(run("export", eap_path, "-o", tmp_path / "c.json"))
    assert "--d-model" in one_line_error(run("export", unscored_path, "-f", "mib-json", "-o", tmp_path / "u.json"))
    ok("export", unscored_path, "-f", "mib-json", "--d-model", "24", "-o", tmp_path / "u.json")
    assert load_mib_json(tmp_path / "u.json").n_edges == 4
    assert run("export", eap_path, "-f", "yaml", "-o", tmp_path / "c.yaml").exit_code == 2


# ----------------------------------------------------------------------------- compare
def test_compare_matches_the_library(eap_path: Path, ig_path: Path, circuit: Circuit, tmp_path: Path) -> None:
    other = load_circuit(ig_path)
    diff = tmp_path / "diff.svg"
    data = ok_json("compare", eap_path, ig_path, "--svg", diff)
    for level in ("edge", "node"):
        r = data[level]
        assert r["overlap"] == circuit.overlap(other, level)
        assert r["iou"] == pytest.approx(circuit.iou(other, level))
        assert r["precision"] == pytest.approx(circuit.precision(other, level))
        assert r["recall"] == pytest.approx(circuit.recall(other, level))
        assert r["only_a"] + r["overlap"] == r["a"] and r["only_b"] + r["overlap"] == r["b"]
        assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
    assert (data["edge"]["a"], data["edge"]["b"]) == (circuit.n_edges, other.n_edges)
    assert data["a"]["method"] == "eap" and data["b"]["method"] == "eap-ig"
    assert ET.parse(diff).getroot().tag.endswith("svg") and data["diff"]["path"] == str(diff)
    only_edges = ok_json("compare", eap_path, ig_path, "--level", "edge")
    assert "node" not in only_edges and "diff" not in only_edges
    text = ok("compare", eap_path, ig_path).stdout
    assert "precision" in text and text.count("\nedge ") == 1 and "\nnode " in text
    same = ok_json("compare", eap_path, eap_path)
    assert same["edge"]["iou"] == 1.0 and same["node"]["recall"] == 1.0


def test_compare_different_graphs(eap_path: Path, elsewhere_path: Path) -> None:
    line = one_line_error(run("compare", eap_path, elsewhere_path))
    assert "2 layers x 3 heads" in line and "3 layers x 2 heads" in line


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_defaults_to_the_circuits_provenance(eap_path: Path, circuit: Circuit) -> None:
    data = ok_json("evaluate", eap_path, "--random-samples", "2")
    prov = circuit.provenance
    assert (data["model"], data["task"], data["n_prompts"], data["seed"]) == (prov["model"], "ioi", 6, 0)
    assert (data["ablation"], data["metric"]) == (prov["ablation"], prov["metric"])
    assert data["same_dataset"] is True and data["dataset_sha256"] == prov["dataset_sha256"]
    # same prompts, batches and settings as discover: the recorded faithfulness is reproduced
    assert data["faithfulness"]["value"] == pytest.approx(prov["faithfulness"], abs=1e-6)
    assert data["recorded_faithfulness"] == prov["faithfulness"]
    assert data["edges"] == circuit.n_edges and data["faithfulness"]["n_edges"] == circuit.n_edges
    assert len(data["random_baseline"]["values"]) == 2 and data["random_baseline"]["n_edges"] == circuit.n_edges
    curve = data["curve"]
    assert len(curve["fractions"]) == 10 and curve["faithfulness"][-1] == pytest.approx(1.0)
    assert curve["cpr"] > 0 and curve["cmd"] >= 0


def test_evaluate_with_other_settings_and_text(eap_path: Path, tiny_dir: Path) -> None:
    result = ok("evaluate", eap_path, "--n-prompts", "4", "--seed", "3", "--ablation", "zero", "--no-curve",
                "--random-samples", "0", "--model", tiny_dir)
    out = result.stdout
    assert "faithfulness" in out and "zero ablation" in out and "4 prompts, seed 3" in out
    assert "not the prompts the circuit was found on" in out
    assert "curve" not in out and "random " not in out
    assert "evaluating" in result.stderr  # progress goes to stderr


def test_evaluate_graph_mismatch(eap_path: Path, other_dir: Path) -> None:
    result = run("evaluate", eap_path, "--model", other_dir)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.stderr
    assert "2 layers x 3 heads" in line and "3 layers x 2 heads" in line


def test_evaluate_needs_a_model_when_the_file_has_none(unscored_path: Path) -> None:
    assert "--model" in one_line_error(run("evaluate", unscored_path))


# ----------------------------------------------------------------------------- --config
def test_discover_config_values_are_defaults_and_flags_win(tiny_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{tiny_dir}"\nn-prompts = 4\nbatch_size = 2\nrandom-samples = 9\n'  # random-samples: evaluate's
        '[discover]\nmethod = "eap"\nedges = 5\nno-curve = true\nno-svg = true\n'
        '[evaluate]\nseed = 7\n'
    )
    first = ok_json("discover", "--config", config, "--out", tmp_path / "a")
    made = load_circuit(tmp_path / "a" / "circuit.json")
    assert first["method"] == "eap" and first["cpr"] is None and "svg" not in first["files"]
    assert made.provenance["n_prompts"] == 4 and made.provenance["settings"]["batch_size"] == 2
    assert made.provenance["seed"] == 0  # [evaluate] does not leak into discover
    ok("discover", "--config", config, "--n-prompts", "5", "--method", "eap-ig", "--steps", "1", "--out", tmp_path / "b")
    flagged = load_circuit(tmp_path / "b" / "circuit.json")
    assert flagged.provenance["n_prompts"] == 5 and flagged.provenance["method"] == "eap-ig"
    assert flagged.provenance["settings"]["batch_size"] == 2


def test_evaluate_config(eap_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "eval.toml"
    config.write_text('method = "eap"\n[evaluate]\nn-prompts = 4\ncurve = false\nrandom-samples = 0\n')
    data = ok_json("evaluate", eap_path, "--config", config)
    assert data["n_prompts"] == 4 and data["curve"] is None and data["random_baseline"] is None
    data = ok_json("evaluate", eap_path, "--config", config, "--n-prompts", "5", "--random-samples", "1")
    assert data["n_prompts"] == 5 and len(data["random_baseline"]["values"]) == 1 and data["curve"] is None


def test_config_errors(eap_path: Path, tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("n-promts = 4\n")
    result = run("evaluate", eap_path, "--config", typo)
    assert result.exit_code == 2 and "n-promts" in result.stderr and "n-prompts" in result.stderr
    wrong_table = tmp_path / "table.toml"
    wrong_table.write_text("[evaluate]\nmethod = 'eap'\n")  # discover's setting in evaluate's own table
    result = run("evaluate", eap_path, "--config", wrong_table)
    assert result.exit_code == 2 and "method" in result.stderr
    result = run("evaluate", eap_path, "--config", tmp_path / "missing.toml")
    assert result.exit_code == 2 and "does not exist" in result.stderr
