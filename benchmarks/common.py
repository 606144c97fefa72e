"""Shared pieces of the benchmark scripts: the real model and task, timing, peak memory in a child.

Speed is always reported as a *ratio* against a baseline run in the same process (so a busy
machine slows both alike); peak memory is the peak resident set size of a fresh child process that
does one thing, minus nothing (the model's own weights are included and reported separately).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphs.allocator import tune_cpu_allocator

tune_cpu_allocator()  # every benchmark process (ours and the peers' children) alike

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB: ``VmHWM`` of /proc/self/status.

    Not ``getrusage(...).ru_maxrss``: Linux carries that over from the parent across fork + exec, so
    a child started by a 5 GB benchmark process would report at least 5 GB whatever it did."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``script --child ...`` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def save(name: str, record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def record_study_run(run: dict[str, Any], model: str = "smollm2-135m") -> Path:
    """Put ``run`` into benchmarks/results/study_smollm2.json in place of the run of the same task
    and method. The file is read again right before writing, so studies running side by side
    (study_smollm2.py, study_edge_patching.py) do not drop each other's runs."""
    path = RESULTS / "study_smollm2.json"
    study = json.loads(path.read_text()) if path.exists() else {"model": model, "runs": []}
    study["runs"] = [r for r in study["runs"] if (r["task"], r["method"]) != (run["task"], run["method"])]
    study["runs"].append(run)
    return save("study_smollm2", study)


def update_study_run(task: str, method: str, **fields: Any) -> Path:
    """Add ``fields`` to the study run of ``task`` and ``method`` in study_smollm2.json (read again
    right before writing, as ``record_study_run``)."""
    path = RESULTS / "study_smollm2.json"
    study = json.loads(path.read_text())
    matches = [r for r in study["runs"] if (r["task"], r["method"]) == (task, method)]
    if not matches:
        raise SystemExit(f"study_smollm2.json has no {method} run on {task}")
    matches[0].update(fields)
    return save("study_smollm2", study)


def read_study_scores(path: Path, task: Any, graph: Any) -> tuple[Any, dict[str, Any]]:
    """A study run's ``scores.safetensors``: the scores [S, R] and their provenance, after checking
    that they were made on ``task``'s dataset (name, hash, prompt count) and ``graph``'s shape."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        provenance = json.loads(f.metadata()["provenance"])
        values = f.get_tensor("scores")
    want = {"task": task.name, "dataset_sha256": task.dataset_hash(), "n_prompts": len(task)}
    got = {k: provenance.get(k) for k in want}
    if got != want or tuple(values.shape) != (graph.n_senders, graph.n_receivers):
        raise SystemExit(f"{path} was made on {got}, not on {want}")
    return values, provenance


def smollm2_ioi(n_prompts: int, seed: int = 0, batch_size: int = 32, metric: str = "logit_diff"):
    """(LoadedModel, Experiment) for SmolLM2-135M on IOI."""
    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from circuits.tasks import make_task
    from graphs.adapters import build_spec
    from graphs.loading import load_model

    loaded = load_model("smollm2-135m", progress=False)
    task = make_task("ioi", loaded.tokenizer, n_prompts=n_prompts, seed=seed)
    exp = Experiment(build_spec(loaded.model), task, make_metric(metric), batch_size=batch_size)
    return loaded, exp
