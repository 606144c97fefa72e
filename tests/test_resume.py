"""Checkpoint and resume: a run killed with SIGKILL (or crashing) midway, resumed, equals an
uninterrupted run - for ACDC, the per-batch methods, the path-patching search, the minimal-circuit
search, and ``circuits discover`` end to end (which also refuses foreign or unannounced progress)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from circuits import checkpoint as ck
from circuits.checkpoint import Checkpointer, CheckpointError
from circuits.experiment import Experiment
from circuits.methods.acdc import acdc
from circuits.methods.eap import atp_star, eap, eap_ig
from circuits.methods.patching import node_patching, path_patching
from circuits.methods.path_search import path_patching_search
from circuits.prune import minimal_circuit
from cli.main import cli
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task

ROOT = Path(__file__).resolve().parents[1]


def _acdc_experiment() -> Experiment:
    return Experiment(build_spec(make_tiny("gpt2-mini")), random_task(4, 6, seed=5), "kl", batch_size=2)


def _experiment() -> Experiment:
    return Experiment(build_spec(make_tiny("gpt2-mini")), random_task(8, 6, seed=2), "logit_diff", batch_size=2)


def _kill_after(command: list[str], saves: int, cwd: Path = ROOT) -> None:
    """Run ``command`` (which prints ``SAVED <n>`` lines on stderr) and SIGKILL it after ``saves`` saves."""
    child = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=cwd,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.stderr is not None
    seen = 0
    tail: list[str] = []
    for line in child.stderr:
        tail = (tail + [line])[-20:]
        if line.startswith("SAVED "):
            seen = int(line.split()[1])
            if seen >= saves:
                os.kill(child.pid, signal.SIGKILL)
                break
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL, "".join(tail)


SLOW_SAVES = """
import sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from circuits import checkpoint as ck
_original = ck.Checkpointer.save
_count = [0]
def _slow_save(self, tensors, meta):
    _original(self, tensors, meta)
    _count[0] += 1
    print("SAVED", _count[0], file=sys.stderr, flush=True)
    time.sleep(0.15)
ck.Checkpointer.save = _slow_save
"""


class _OldFormatCrash(Exception):
    pass


class _OldFormatCheckpointer(Checkpointer):
    """Writes ACDC progress as versions before predicted keeps did (no ``predicted_kept``), then
    stops the run after ``saves`` writes."""

    def __init__(self, path: Path, saves: int) -> None:
        super().__init__(path, "acdc-run")
        self.left = saves

    def save(self, tensors: Any, meta: Any) -> None:
        super().save({k: v for k, v in tensors.items() if k != "predicted_kept"}, meta)
        self.left -= 1
        if self.left == 0:
            raise _OldFormatCrash


def test_acdc_resumes_a_progress_file_without_predictions(tmp_path: Path) -> None:
    """A progress file written before predicted keeps existed still resumes; without its
    predictions the search evaluates other masks but ends with the same circuit and scores."""
    path = tmp_path / "acdc.safetensors"
    with pytest.raises(_OldFormatCrash):
        acdc(_acdc_experiment(), 0.01, checkpoint=_OldFormatCheckpointer(path, saves=8))
    saved = Checkpointer(path, "acdc-run").load()
    assert saved is not None and "predicted_kept" not in saved[0] and saved[1]["r"] >= 0
    resumed = acdc(_acdc_experiment(), 0.01, checkpoint=Checkpointer(path, "acdc-run"))
    plain = acdc(_acdc_experiment(), 0.01)
    assert torch.equal(resumed.circuit.in_circuit, plain.circuit.in_circuit)
    assert torch.allclose(resumed.scores.values, plain.scores.values, atol=1e-6)


# ----------------------------------------------------------------------------- ACDC, killed
def test_acdc_killed_midway_resumes_to_the_uninterrupted_circuit(tmp_path: Path) -> None:
    path = tmp_path / "acdc.safetensors"
    script = tmp_path / "child.py"
    script.write_text(SLOW_SAVES.format(root=str(ROOT)) + textwrap.dedent(f"""
        from circuits.methods.acdc import acdc
        from tests.test_resume import _acdc_experiment
        acdc(_acdc_experiment(), 0.01, checkpoint=ck.Checkpointer(ck.Path({str(path)!r}), "acdc-run"))
        print("finished", file=sys.stderr, flush=True)
    """))
    _kill_after([sys.executable, str(script)], saves=8)
    saved = Checkpointer(path, "acdc-run").load()
    assert saved is not None
    assert saved[1]["passes"] >= 1 and saved[1]["r"] >= 0  # stopped midway through the receivers

    resumed = acdc(_acdc_experiment(), 0.01, checkpoint=Checkpointer(path, "acdc-run"))
    plain = acdc(_acdc_experiment(), 0.01)
    assert torch.equal(resumed.circuit.in_circuit, plain.circuit.in_circuit)
    assert torch.equal(resumed.scores.values, plain.scores.values)
    assert resumed.metric == plain.metric and resumed.passes == plain.passes
    assert resumed.evaluations == plain.evaluations
    with pytest.raises(CheckpointError, match="tau"):
        acdc(_acdc_experiment(), 0.02, checkpoint=Checkpointer(path, "acdc-run"))


# ----------------------------------------------------------------------------- crashes, in process
class _Crash(Exception):
    pass


def _crash_after(monkeypatch: pytest.MonkeyPatch, saves: int) -> list[int]:
    """Make the ``saves``-th checkpoint save raise (after writing): a crash right after a unit."""
    original = ck.Checkpointer.save
    count = [0]

    def save(self: Checkpointer, tensors: Any, meta: Any) -> None:
        original(self, tensors, meta)
        count[0] += 1
        if count[0] == saves:
            raise _Crash

    monkeypatch.setattr(ck.Checkpointer, "save", save)
    return count


def _values(result: Any) -> torch.Tensor:
    return result.values if hasattr(result, "values") else result.scores.values


def test_acdc_crashes_anywhere_in_a_layer_resume_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ACDC's trials build on a base run that is made afresh at each layer's first receiver and
    then moved column by column; a run resumed in the middle of a layer rebuilds it the same way.
    Crashes after every save of a search (every receiver, at its first and later passes) must each
    resume to bitwise the uninterrupted scores, circuit, metric and pass count."""
    plain = acdc(_acdc_experiment(), 0.01)
    g = _acdc_experiment().spec.graph
    mid_layer = 0
    for saves in range(1, plain.passes + 1, 3):
        path = tmp_path / f"acdc-{saves}.safetensors"
        _crash_after(monkeypatch, saves=saves)
        with pytest.raises(_Crash):
            acdc(_acdc_experiment(), 0.01, checkpoint=Checkpointer(path, "acdc-run"))
        monkeypatch.undo()
        saved = Checkpointer(path, "acdc-run").load()
        assert saved is not None
        r = int(saved[1]["r"])
        if 0 <= r < g.logits_receiver and r != g.mlp_receiver(g.receivers[r].node.layer):  # type: ignore[arg-type]
            mid_layer += 1  # resumes after some of this layer's receivers were decided
        resumed = acdc(_acdc_experiment(), 0.01, checkpoint=Checkpointer(path, "acdc-run"))
        assert torch.equal(resumed.scores.values, plain.scores.values), saves
        assert torch.equal(resumed.circuit.in_circuit, plain.circuit.in_circuit), saves
        assert resumed.metric == plain.metric and resumed.passes == plain.passes, saves
    assert mid_layer >= 3


BATCH_METHODS: dict[str, Callable[..., Any]] = {
    "eap": lambda exp, c: eap(exp, checkpoint=c),
    "eap-ig": lambda exp, c: eap_ig(exp, steps=2, checkpoint=c),
    "atp*": lambda exp, c: atp_star(exp, checkpoint=c),
    "node-patching": lambda exp, c: node_patching(exp, checkpoint=c),
    "path-patching": lambda exp, c: path_patching(exp, checkpoint=c),
    "path-search": lambda exp, c: path_patching_search(exp, k=1, max_nodes=3, checkpoint=c),
}


@pytest.mark.parametrize("name", sorted(BATCH_METHODS))
def test_crash_then_resume_equals_uninterrupted(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = BATCH_METHODS[name]
    plain = _values(run(_experiment(), None))
    path = tmp_path / "progress.safetensors"
    count = _crash_after(monkeypatch, saves=2)
    with pytest.raises(_Crash):
        run(_experiment(), Checkpointer(path, "run"))
    monkeypatch.undo()
    calls = count[0]
    resumed = run(_experiment(), Checkpointer(path, "run"))
    assert calls == 2
    assert torch.equal(_values(resumed), plain), name
    if name == "path-search":
        assert resumed.expanded == path_patching_search(_experiment(), k=1, max_nodes=3).expanded
    with pytest.raises(CheckpointError, match="another run"):
        run(_experiment(), Checkpointer(path, "another-run"))


def test_minimal_circuit_resumes_without_measuring_saved_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import circuits.evaluate as ev

    exp = _experiment()
    scores = eap(exp)
    plain = minimal_circuit(exp, scores, 0.8)
    path = tmp_path / "search.safetensors"
    _crash_after(monkeypatch, saves=3)
    with pytest.raises(_Crash):
        minimal_circuit(exp, scores, 0.8, checkpoint=Checkpointer(path, "search"))
    monkeypatch.undo()
    measured = []
    original = ev.faithfulness
    monkeypatch.setattr(ev, "faithfulness", lambda e, c, b=None: measured.append(c.n_edges) or original(e, c, b))
    resumed = minimal_circuit(exp, scores, 0.8, checkpoint=Checkpointer(path, "search"))
    assert resumed.n == plain.n and resumed.points == plain.points
    assert torch.equal(resumed.circuit.in_circuit, plain.circuit.in_circuit)
    assert resumed.faithfulness == plain.faithfulness
    assert len(measured) == len(plain.points) - 3  # the three saved points were not measured again


def test_batches_from_gives_the_same_batches() -> None:
    exp = Experiment(build_spec(make_tiny("gpt2-mini")), random_task(7, 6, seed=1), "logit_diff", ablation="mean",
                     batch_size=3)
    every = list(exp.batches())
    rest = list(ck.batches_from(exp, 1))
    assert len(rest) == 2
    for a, b in zip(every[1:], rest):
        assert a.rows == b.rows and torch.equal(a.clean_ids, b.clean_ids)
        assert torch.equal(a.ablation.values, b.ablation.values)  # mean over the full reference set
    assert list(ck.batches_from(exp, 3)) == []


# ----------------------------------------------------------------------------- discover, end to end
def _args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["discover", "--model", str(tiny_dir), "--method", "edge-patching", "--target-faithfulness", "0.8",
            "--n-prompts", "6", "--batch-size", "2", "--no-svg", "--out", str(out), *extra]


def _without_date(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    data["provenance"].pop("date")
    return data


def test_discover_killed_midway_resumes_to_the_same_files(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(SLOW_SAVES.format(root=str(ROOT)) + textwrap.dedent(f"""
        from cli.main import cli
        cli(args={_args(tiny_dir, out)!r}, prog_name="circuits")
    """))
    # 3 batches x 3 blocks of edge patching, the finished scores, then the minimal-circuit search:
    # the kill lands in the search
    _kill_after([sys.executable, str(script)], saves=12)
    progress = out / "progress"
    assert (progress / "scores.safetensors").is_file() and (progress / "search.safetensors").is_file()
    assert not (out / "circuit.json").exists()

    runner = CliRunner()
    refused = runner.invoke(cli, _args(tiny_dir, out), prog_name="circuits")
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    foreign = runner.invoke(cli, _args(tiny_dir, out, "--seed", "1", "--resume"), prog_name="circuits")
    assert foreign.exit_code == 2 and "another run" in foreign.stderr

    resumed = runner.invoke(cli, _args(tiny_dir, out, "--resume"), prog_name="circuits")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.stderr
    assert not progress.exists()
    plain = runner.invoke(cli, _args(tiny_dir, tmp_path / "plain"), prog_name="circuits")
    assert plain.exit_code == 0, plain.output
    assert _without_date(out / "circuit.json") == _without_date(tmp_path / "plain" / "circuit.json")
    assert (out / "curve.json").read_bytes() == (tmp_path / "plain" / "curve.json").read_bytes()


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("method", ["eap-ig", "acdc"])
def test_same_seed_gives_byte_identical_files_apart_from_the_date(tiny_dir: Path, tmp_path: Path, method: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from circuits.pipeline import DiscoverySettings, run

    settings = DiscoverySettings(model=str(tiny_dir), method=method, steps=2, tau=0.005, n_prompts=6, batch_size=2)
    svg = shutil.which("dot") is not None
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = run(settings, tmp_path / "a", svg=svg)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    second = run(settings, tmp_path / "b", svg=svg)
    assert first is not None and second is not None
    date_a, date_b = first[0].circuit.provenance["date"], second[0].circuit.provenance["date"]
    assert date_b == "2023-11-14T22:13:20+00:00" and len(date_a) == len(date_b)
    names = ["circuit.json", "scores.safetensors", "curve.json"] + (["circuit.svg"] if svg else [])
    for name in names:
        a = (tmp_path / "a" / name).read_bytes().replace(date_a.encode(), date_b.encode())
        assert a == (tmp_path / "b" / name).read_bytes(), name  # identical but for the date
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "scores.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["provenance"])["date"] == date_b
