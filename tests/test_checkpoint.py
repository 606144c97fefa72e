"""Progress files: atomic, refuse other runs, and a run killed with SIGKILL resumes to the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from circuits.checkpoint import Checkpointer, CheckpointError, fingerprint
from circuits.experiment import Experiment
from circuits.metrics import make_metric
from circuits.methods.patching import edge_patching
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task

ROOT = Path(__file__).resolve().parents[1]


def _experiment() -> Experiment:
    return Experiment(build_spec(make_tiny("gpt2")), random_task(8, 7, seed=4), make_metric("logit_diff"), batch_size=2)


def test_state_round_trip_and_foreign_runs(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    mine = Checkpointer(path, fingerprint(method="x", n=1))
    assert mine.load() is None
    mine.save({"totals": torch.arange(6.0).view(2, 3)}, {"done": ["0:1"]})
    tensors, meta = mine.load()
    assert torch.equal(tensors["totals"], torch.arange(6.0).view(2, 3)) and meta["done"] == ["0:1"]
    with pytest.raises(CheckpointError, match="another run"):
        Checkpointer(path, fingerprint(method="x", n=2)).load()
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        mine.load()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    from circuits import checkpoint as ck
    from tests.test_checkpoint import _experiment
    from circuits.methods.patching import edge_patching

    original = ck.Checkpointer.save
    def slow_save(self, tensors, meta):
        original(self, tensors, meta)
        print(len(meta["done"]), flush=True)
        time.sleep(0.3)
    ck.Checkpointer.save = slow_save
    edge_patching(_experiment(), max_rows=64, checkpoint=ck.Checkpointer(ck.Path({path!r}), "run-1"))
    print("finished", flush=True)
    """
)


def test_sigkill_midway_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    path = tmp_path / "progress.safetensors"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), path=str(path)))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    units = 0
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip().isdigit():
            units = int(line)
        if units >= 5:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    saved = Checkpointer(path, "run-1").load()
    assert saved is not None and 5 <= len(saved[1]["done"]) < 16  # stopped midway (4 batches x 4 layers)
    resumed = edge_patching(_experiment(), max_rows=64, checkpoint=Checkpointer(path, "run-1"))
    plain = edge_patching(_experiment(), max_rows=64)
    assert torch.allclose(resumed.values, plain.values, atol=1e-6)
