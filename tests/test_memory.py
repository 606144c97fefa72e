"""Bounded memory: EAP streams the dataset in batches, so its peak memory does not grow with the
number of prompts. Two fresh child processes run EAP on N and 8N prompts at a fixed batch size and
report their peak resident set size.

How the peak is measured: each child imports everything and runs a warm-up EAP first (allocator
pools, lazy imports), then resets its high-water mark (``/proc/self/clear_refs``) and reads
``VmHWM`` after the measured run. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is only the
fallback off Linux: in a child it includes the *parent's* peak (Linux copies the hiwater mark of
the forking process into the child's maxrss at exec), so under pytest it reads the test runner's
memory, not the child's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
N_SMALL = 32

CHILD = """
import gc, json, resource, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from transformers import GPT2Config, GPT2LMHeadModel
from circuits.experiment import Experiment
from circuits.methods.eap import eap
from graphs.adapters import build_spec
from tests.conftest import random_task

def status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=8, n_embd=128, vocab_size=101, n_positions=64,
                                   initializer_range=0.1)).eval()
spec = build_spec(model)
n = int(sys.argv[1])
task = random_task(n, 24, seed=1)
eap(Experiment(spec, task.subset(slice(0, 2 * {batch})), "logit_diff", batch_size={batch}))  # warm-up
gc.collect()
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    source = "VmHWM"
except OSError:
    source = "ru_maxrss"
scores = eap(Experiment(spec, task, "logit_diff", batch_size={batch}))
assert bool(torch.isfinite(scores.values).all())
peak = status("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"prompts": n, "before": before, "peak": peak, "source": source}}))
"""


@pytest.mark.timeout(300)
def test_eap_peak_memory_is_flat_in_the_number_of_prompts(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), batch=BATCH))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, str(script), str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT, env=env)
                for n in (N_SMALL, 8 * N_SMALL)]  # fresh processes, run side by side
    reports = []
    for child in children:
        out, err = child.communicate(timeout=280)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    small, large = reports
    mb = 2**20
    print(f"peak RSS: {small['peak'] / mb:.1f} MB for {N_SMALL} prompts, {large['peak'] / mb:.1f} MB for "
          f"{8 * N_SMALL} prompts ({small['source']}); above the pre-run RSS: "
          f"{(small['peak'] - small['before']) / mb:.1f} MB and {(large['peak'] - large['before']) / mb:.1f} MB")
    # the peak of 8x the prompts stays within 15 % + 8 MB of the peak of N ...
    assert large["peak"] <= 1.15 * small["peak"] + 8 * mb
    if small["source"] == "VmHWM":  # ... and so does the memory the run adds on top of the warm process (a few MB;
        # keeping one [B, T, S, d] delta tensor per batch would add 32 x 3.6 MB = 116 MB here)
        assert large["peak"] - large["before"] <= max(0, small["peak"] - small["before"]) + 32 * mb
