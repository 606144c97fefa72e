"""The ``circuits`` command line: commands, help texts, error lines and exit codes (cli/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE, exit_code_for, one_line
from cli.main import cli
from graphs.graph import count_edges


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="circuits")


def assert_one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=24, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def neox_parallel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neox")
    cfg = GPTNeoXConfig(
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=40,
        vocab_size=97,
        use_parallel_residual=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=8, vocab_size=50)
    BertForMaskedLM(cfg).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- help
def test_root_help_lists_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("models", "tasks", "graph", "--debug"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["models", "tasks", "graph"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert f"circuits {command}" in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert "circuits" in result.stdout


def test_help_does_not_import_torch() -> None:
    code = "import sys, cli.main; sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("circuits") == "cli.main:main"


# ----------------------------------------------------------------------------- models / tasks
def test_models_lists_families_types_and_aliases() -> None:
    from graphs.adapters import supported_model_types

    result = run("models")
    assert result.exit_code == 0, result.output
    for model_type, family in supported_model_types().items():
        assert model_type in result.stdout and family in result.stdout
    assert "smollm2-135m" in result.stdout
    assert "CAUSAL_CIRCUITS_CACHE" in result.stdout


def test_models_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAUSAL_CIRCUITS_CACHE", str(tmp_path))
    result = run("models", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["families"]["llama"] == ["llama", "mistral", "qwen2"]
    assert data["aliases"]["smollm2-135m"]["cached"] is False
    assert data["cache_dir"] == str(tmp_path)


def test_tasks_lists_the_builtin_tasks() -> None:
    tasks_module = pytest.importorskip("circuits.tasks")
    if not hasattr(tasks_module, "available_tasks"):
        pytest.skip("circuits.tasks.available_tasks is not written yet")
    expected = tasks_module.available_tasks()
    result = run("tasks")
    assert result.exit_code == 0, result.output
    for name in expected:
        assert name in result.stdout
    as_json = run("tasks", "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == dict(expected)


# ----------------------------------------------------------------------------- graph
def test_graph_json_counts_match_the_closed_form(gpt2_dir: Path) -> None:
    result = run("graph", "--model", str(gpt2_dir), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    L, H = 2, 3
    assert data["edges"] == count_edges(L, H) == 75
    assert data["senders"] == 1 + L * (H + 1)
    assert data["receivers"] == L * (3 * H + 1) + 1
    assert (data["layers"], data["heads"], data["n_kv_heads"], data["d_model"]) == (L, H, H, 24)
    assert data["family"] == "gpt2"
    assert data["model"] == str(gpt2_dir)
    assert data["source"] == "local"
    assert data["revision"].startswith("sha256:")
    assert sum(data["edges_by_receiver"].values()) == data["edges"]


def test_graph_json_parallel_residual(neox_parallel_dir: Path) -> None:
    result = run("graph", "-m", str(neox_parallel_dir), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["family"] == "gpt_neox"
    assert data["parallel_residual"] is True
    assert data["edges"] == count_edges(3, 4, parallel_residual=True)
    assert sum(data["edges_by_receiver"].values()) == data["edges"]


def test_graph_table(gpt2_dir: Path) -> None:
    result = run("graph", "--model", str(gpt2_dir))
    assert result.exit_code == 0, result.output
    assert "2 layers x 3 heads" in result.stdout
    rows = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines() if line.strip()}
    assert rows["edges"] == "75" and rows["senders"] == "9" and rows["receivers"] == "21"


def test_graph_needs_a_model() -> None:
    result = run("graph")
    assert result.exit_code == 2
    assert "--model" in result.stderr


# ----------------------------------------------------------------------------- errors
def test_missing_path_is_a_one_line_bad_input_error(tmp_path: Path) -> None:
    line = assert_one_line_error(run("graph", "--model", str(tmp_path / "nope")), EXIT_BAD_INPUT)
    assert "does not exist" in line


def test_unsupported_architecture_names_supported_families(bert_dir: Path) -> None:
    line = assert_one_line_error(run("graph", "--model", str(bert_dir)), EXIT_BAD_INPUT)
    assert "bert" in line
    for family in ("gpt2", "llama", "gpt_neox"):
        assert family in line


def test_unreachable_hub_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphs import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    line = assert_one_line_error(run("graph", "--model", "someone/not-here"), EXIT_BAD_INPUT)
    assert "network" in line and "smollm2-135m" in line


def test_debug_shows_the_traceback(bert_dir: Path) -> None:
    result = run("--debug", "graph", "--model", str(bert_dir))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "Traceback (most recent call last)" in result.stderr
    assert "UnsupportedArchitecture" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unsupported architecture")


def test_unexpected_failures_exit_1(gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from graphs import loading

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of\nmemory")

    monkeypatch.setattr(loading, "load_model", boom)
    line = assert_one_line_error(run("graph", "--model", str(gpt2_dir)), EXIT_FAILURE)
    assert "RuntimeError: out of memory" in line and "--debug" in line


def test_exit_code_mapping() -> None:
    from graphs.adapters import UnsupportedArchitecture
    from graphs.ids import IdError
    from graphs.loading import ModelLoadError

    for exc in (UnsupportedArchitecture("x"), IdError("x"), ModelLoadError("x"), FileNotFoundError("x")):
        assert exit_code_for(exc) == EXIT_BAD_INPUT
    for exc in (ValueError("from some other library"), RuntimeError("x"), KeyError("x")):
        assert exit_code_for(exc) == EXIT_FAILURE
    assert one_line(IdError("a\n  b")) == "a b"


def test_library_value_errors_from_circuits_are_bad_input() -> None:
    tasks_module = pytest.importorskip("circuits.tasks")
    assert exit_code_for(tasks_module.TaskError("bad row")) == EXIT_BAD_INPUT


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_graph_smollm2_json() -> None:
    result = run("graph", "--model", "smollm2-135m", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["edges"] == 123211 == count_edges(30, 9)
    assert (data["layers"], data["heads"], data["n_kv_heads"], data["d_model"]) == (30, 9, 3, 576)
    assert data["family"] == "llama"
    assert data["source"] == "alias"
