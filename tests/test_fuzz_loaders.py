"""Hostile input for every loader: circuit JSON and MIB JSON files, task JSONL / CSV files and
``--config`` TOML files. Malformed, huge, deeply nested, wrong types, NaN / infinite scores, ids
that name nodes not in the graph: each gives a clear error of the documented type (CLI: exit 2 and
one ``error:`` line), quickly, without executing anything or touching existing outputs.

tests/test_io.py and tests/test_tasks.py already fuzz the in-memory parsers (random JSON structures
and mutated valid documents); this module goes through the *file* entry points with the hostile
literals those tests cannot produce (NaN / Infinity tokens, 5000-digit integers, 10^5-deep
nesting, duplicate keys), and covers TOML configs and failed ``discover`` runs.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuits.tasks import TaskError, load_task_file
from cli.main import cli
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.io import (
    CircuitFileError,
    circuit_to_dict,
    circuit_to_mib_dict,
    import_circuit,
    load_circuit,
    load_mib_json,
)
from graphs.scores import EdgeScores
from tests.tasks_fixtures import digit_tokenizer  # noqa: F401 - fixture used by name

QUICK = timedelta(seconds=10)  # per example: loaders must answer quickly, never hang
FUZZ = settings(max_examples=60, deadline=QUICK, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _small() -> Circuit:
    g = ComputationGraph(2, 2)
    values = torch.linspace(-1, 1, g.n_senders * g.n_receivers).view(g.n_senders, g.n_receivers)
    edges = ["input->a0.h0<q>", "a0.h0->m0", "m0->a1.h1<v>", "a1.h1->logits", "input->logits"]
    return Circuit.from_edges(g, edges, EdgeScores(g, values, "eap", {}), {"model": "tiny", "d_model": 16})


OWN_TEXT = json.dumps(circuit_to_dict(_small()))
MIB_TEXT = json.dumps(circuit_to_mib_dict(_small()))
LOADERS = (load_circuit, load_mib_json, import_circuit)


def _refused(path: Path, *loaders: Any) -> list[str]:
    """Every loader raises CircuitFileError (and nothing else) within the time limit; the messages."""
    messages = []
    for load in loaders or LOADERS:
        start = time.perf_counter()
        with pytest.raises(CircuitFileError) as info:
            load(path)
        assert time.perf_counter() - start < QUICK.total_seconds()
        messages.append(str(info.value))
    return messages


# ============================================================================ circuit files
HOSTILE_NUMBERS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" + "0" * 5000, "1e-99999"]


@FUZZ
@given(which=st.sampled_from(["own", "mib"]), token=st.sampled_from(HOSTILE_NUMBERS), index=st.integers(0, 50))
def test_non_finite_or_absurd_scores_are_refused(tmp_path: Path, which: str, token: str, index: int) -> None:
    text = OWN_TEXT if which == "own" else MIB_TEXT
    scores = [m for m in re.finditer(r'"score": (-?[0-9.e-]+)', text)]
    m = scores[index % len(scores)]
    hostile = text[: m.start(1)] + token + text[m.end(1) :]
    path = tmp_path / "c.json"
    path.write_text(hostile)
    if token == "1e-99999":  # underflows to 0.0: a legal score
        assert import_circuit(path).scores is not None
        return
    load = load_circuit if which == "own" else load_mib_json
    (message,) = _refused(path, load)
    assert re.search(r"NaN|Infinity|infinity|finite|too large|digits|not valid JSON", message), message
    _refused(path, import_circuit)


node_ids = st.one_of(
    st.builds("a{}.h{}".format, st.integers(0, 40), st.integers(0, 40)),
    st.builds("m{}".format, st.integers(0, 40)),
    st.sampled_from(["input", "logits", "a0.h0", "m1", "embed", "a-1.h0", "a0.h", "", "a0.h0.x"]),
)
receivers = st.one_of(node_ids, st.builds("{}<{}>".format, node_ids, st.sampled_from("qkvx")))


@FUZZ
@given(which=st.sampled_from(["own", "mib"]), sender=node_ids, receiver=receivers, index=st.integers(0, 50))
def test_ids_of_nodes_not_in_the_graph_are_refused(tmp_path: Path, which: str, sender: str, receiver: str,
                                                   index: int) -> None:
    g = ComputationGraph(2, 2)
    edge = f"{sender}->{receiver}"
    data = json.loads(OWN_TEXT if which == "own" else MIB_TEXT)
    if which == "own":
        data["edges"][index % len(data["edges"])]["id"] = edge
    else:
        items = list(data["edges"].items())
        items[index % len(items)] = (edge, items[index % len(items)][1])
        data["edges"] = dict(items)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    try:
        circuit = import_circuit(path)
    except CircuitFileError as err:
        assert str(path) in str(err)
        return
    # accepted only when the id is a real edge of the 2-layer, 2-head graph that no other entry names
    assert circuit.graph == g and edge in {str(e) for e in g.edges()}


@pytest.mark.parametrize("which", ["own", "mib"])
def test_deep_nesting_huge_keys_and_huge_graphs(tmp_path: Path, which: str) -> None:
    path = tmp_path / "c.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert any("nested too deeply" in m for m in _refused(path))
    data = json.loads(OWN_TEXT if which == "own" else MIB_TEXT)
    (data["provenance"] if which == "own" else data["causal_circuits"]["provenance"])["deep"] = "@DEEP@"
    deep = '{"x": ' * 5000 + "1" + "}" * 5000  # parses, but is nested far beyond any provenance
    path.write_text(json.dumps(data).replace('"@DEEP@"', deep))
    _refused(path)
    data = json.loads(OWN_TEXT if which == "own" else MIB_TEXT)
    spec = data["graph"] if which == "own" else data["cfg"]
    spec["n_layers"] = 10**9
    path.write_text(json.dumps(data))
    assert any("cap" in m or "dense" in m for m in _refused(path))
    path.write_text('{"' + "k" * 3_000_000 + '": 1}')
    _refused(path)
    with pytest.raises(CircuitFileError, match="larger than the limit"):
        load_circuit(path, max_bytes=1_000_000)


@pytest.mark.parametrize("payload", [
    ('{{"format": "causal-circuits/circuit", "version": 1, "py/object": "os.system", "__reduce__": ["os.system", '
     '["touch {marker}"]], "!!python/object/apply:os.system": ["touch {marker}"], "graph": null}}'),
    ('{{"cfg": {{"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": false, "__class__": "subprocess.Popen"}}, '
     '"nodes": {{}}, "edges": {{}}, "x": "$(touch {marker})"}}'),
])
def test_loading_never_executes_anything(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "c.json"
    path.write_text(payload.format(marker=marker))
    try:
        import_circuit(path)
    except CircuitFileError:
        pass
    assert not marker.exists()


# ============================================================================ task files
hostile_values = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1" + "0" * 5000, "1e999", "null", "true", "[]", "{}",
                     '"\\ud800"', '"\\u0000"', "[" * 5000 + "]" * 5000, '{"a": ' * 3000 + "1" + "}" * 3000]),
    st.integers().map(str),
    st.text(max_size=8).map(json.dumps),
)


@FUZZ
@given(field=st.sampled_from(["clean", "corrupted", "answer", "wrong", "extra"]), value=hostile_values,
       ext=st.sampled_from([".jsonl", ".json"]), duplicate=st.booleans())
def test_hostile_json_task_values_raise_task_error(tmp_path: Path, digit_tokenizer, field: str, value: str,  # noqa: F811
                                                    ext: str, duplicate: bool) -> None:
    row = {"clean": '" Mary gave"', "corrupted": '" John gave"', "answer": '" Mary"', "wrong": '" John"'}
    row[field] = value
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in row.items()) + (', "clean": " x"' if duplicate else "") + "}"
    path = tmp_path / f"t{ext}"
    path.write_text(f"[{body}]" if ext == ".json" else body + "\n")
    start = time.perf_counter()
    try:
        load_task_file(path, digit_tokenizer)
    except TaskError:
        pass
    else:  # only a value that is a plain string can pass (and then the row is an ordinary one)
        assert not duplicate and field != "extra" and value.startswith('"')
    assert time.perf_counter() - start < QUICK.total_seconds()


def test_huge_task_rows_and_cells(tmp_path: Path, digit_tokenizer) -> None:  # noqa: F811
    path = tmp_path / "big.csv"
    path.write_text("clean,corrupted,answer,wrong\n" + "x" * 300_000 + ",y, a, b\n")
    with pytest.raises(TaskError, match="field limit"):
        load_task_file(path, digit_tokenizer)
    path = tmp_path / "many.jsonl"
    row = json.dumps({"clean": " Mary gave", "corrupted": " John gave", "answer": " Mary", "wrong": " John"})
    path.write_text((row + "\n") * 2_000)
    start = time.perf_counter()
    task = load_task_file(path, digit_tokenizer)
    assert len(task) == 2_000 and time.perf_counter() - start < 60
    path = tmp_path / "answer.jsonl"
    path.write_text(json.dumps({"clean": " Mary gave", "corrupted": " John gave", "answer": " Mary" * 10_000,
                                "wrong": " John"}) + "\n")
    with pytest.raises(TaskError, match="row 1"):
        load_task_file(path, digit_tokenizer)


# ============================================================================ --config TOML
DISCOVER_KEYS = ["model", "task", "task-file", "method", "edges", "threshold", "target-faithfulness", "selection",
                 "ablation", "metric", "n-prompts", "seed", "batch-size", "steps", "ig-variant", "tau", "k",
                 "no-curve", "no-svg", "out", "json", "resume", "distributed", "n_prompts", "batch_size",
                 "curve", "random-samples", "circuit"]  # the last three: evaluate's
toml_values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "+inf", "1e400", "-0.0", "0.5", "1.0", "true", "false",
                     "1979-05-27", "1979-05-27T07:32:00Z", "07:32:00", "[]", "[1, 2]", '["a", ["b"]]', "{}",
                     "{ a = 1 }", '"eap"', '"acdc"', '"top-n"', '"kl"', '""', "'''multi\nline'''",
                     "[" * 2000 + "]" * 2000, "0x10", "0o7", "1_000"]),
    st.text(max_size=10).map(json.dumps),
    st.floats().map(lambda f: repr(f).replace("inf", "inf").replace("nan", "nan")),
)
toml_docs = st.lists(
    st.tuples(st.sampled_from(["", "[discover]\n", "[evaluate]\n", "[nope]\n", "[discover.x]\n"]),
              st.sampled_from(DISCOVER_KEYS) | st.text(min_size=1, max_size=6).map(json.dumps), toml_values),
    min_size=1, max_size=4,
).map(lambda items: "".join(f"{table}{key} = {value}\n" for table, key, value in items))


def _config_run(tmp_path: Path, text: str | bytes, command: str = "discover") -> Any:
    config = tmp_path / "c.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    # a model (or circuit) that does not exist: every config that is accepted fails fast (exit 2)
    if command == "evaluate":
        args = ["evaluate", str(tmp_path / "no-circuit.json"), "--config", str(config)]
    else:
        args = ["discover", "--config", str(config), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    return CliRunner().invoke(cli, args, prog_name="circuits")


def _assert_clear_error(result: Any) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(("error: ", "Error: ")), result.stderr


@settings(max_examples=100, deadline=QUICK, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(toml_docs | st.binary(max_size=200), st.sampled_from(["discover", "evaluate"]))
def test_any_config_file_is_run_or_refused_with_exit_code_2(tmp_path: Path, text: str | bytes, command: str) -> None:
    _assert_clear_error(_config_run(tmp_path, text, command))


@pytest.mark.parametrize("text", [
    "x = " + "[" * 100_000 + "]" * 100_000,  # nested too deeply for the parser
    "x = " + "{a = " * 5000 + "1" + "}" * 5000,
    "n-prompts = 99999999999\n",  # would generate for ever
    "tau = nan\n", "threshold = inf\n", "n-prompts = 1e400\n", "edges = [1, 2]\n", "seed = 1979-05-27\n",
    "seed = 99999999999999999999999\n", "method = 1\n", "[discover]\nbatch-size = 0\n",
    "# " + "x" * (2 << 20) + "\n",  # larger than 1 MB
])
def test_hostile_configs_are_refused(tmp_path: Path, text: str) -> None:
    result = _config_run(tmp_path, text)
    _assert_clear_error(result)
    assert "no-model" not in result.stderr  # refused for the config itself, before any model is looked for


# ============================================================================ outputs survive failures
def test_a_failed_discover_leaves_old_outputs_intact(tiny_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import graphs.render
    from circuits.metrics import MetricError
    from circuits.pipeline import DiscoverySettings, clear_progress, run
    from graphs.loading import load_model

    out = tmp_path / "run"
    base = DiscoverySettings(model=str(tiny_dir), method="eap", edges=10, target_faithfulness=None, n_prompts=6,
                             batch_size=3, curve=False)
    run(base, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"circuit.json", "scores.safetensors", "curve.json", "circuit.svg"}

    def unchanged() -> None:
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no temporary files either

    # 1. failing while writing the last file (the drawing): nothing is replaced
    def broken_render(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(graphs.render, "render", broken_render)
    with pytest.raises(OSError, match="disk full"):
        run(DiscoverySettings(**{**base.__dict__, "seed": 1}), out)
    unchanged()
    assert (out / "progress" / "scores.safetensors").is_file()  # kept: --resume would skip the scoring
    monkeypatch.undo()
    clear_progress(out)

    # 2. failing in the method (NaN logits): nothing is written
    loaded = load_model(str(tiny_dir))
    with torch.no_grad():
        loaded.model.transformer.wpe.weight[2] = float("nan")
    with pytest.raises(MetricError, match="prompt 0 of task"):
        run(base, out, loaded=loaded)
    unchanged()

    # 3. a bad task file through the CLI: exit 2, nothing touched
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "x"}\n')
    result = CliRunner().invoke(cli, ["discover", "--model", str(tiny_dir), "--task-file", str(bad), "--out", str(out)],
                                prog_name="circuits")
    assert result.exit_code == 2 and "row 1" in result.stderr
    unchanged()
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", ".partial"))]
