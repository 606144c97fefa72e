"""SmolLM2-135M: the minimal circuit at faithfulness 0.9 of a saved ranking, for the real-model study.

    python benchmarks/study_ranking_minimal.py --scores docs/results/ioi/acdc/scores.safetensors [--threads 1]

ACDC's circuit is the set of edges it kept at its threshold, and that set may fall short of 0.9 (its
per-edge threshold lets small losses add up: docs/results.md section 3). Its scores, the drop in
the metric each edge caused when ACDC tried it, still rank the edges, and that ranking can be
bisected like every other method's. This reads a study run's ``scores.safetensors`` (the task and
prompt count come from its provenance, and the regenerated dataset must have the recorded hash),
finds the smallest top-n circuit reaching 0.9 (bisection over n with dangling edges removed, as
``circuits discover --target-faithfulness 0.9`` does, logit difference, corrupted ablation) and adds
it to that run's record in benchmarks/results/study_smollm2.json as ``ranking_minimal``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import read_study_scores, update_study_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, required=True, help="a study run's scores.safetensors")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetensors import safe_open

    from circuits.evaluate import reference_metrics
    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from circuits.pipeline import DiscoverySettings, load_task
    from circuits.prune import minimal_circuit
    from graphs.adapters import build_spec
    from graphs.loading import load_model
    from graphs.scores import EdgeScores

    with safe_open(str(args.scores), "pt") as f:
        recorded = json.loads(f.metadata()["provenance"])
    settings = DiscoverySettings(task=recorded["task"], n_prompts=recorded["n_prompts"],
                                 batch_size=recorded["n_prompts"])
    loaded = load_model("smollm2-135m", progress=False)
    task = load_task(settings, loaded)
    exp = Experiment(build_spec(loaded.model), task, make_metric("logit_diff"), ablation="corrupted",
                     batch_size=len(task))
    g = exp.spec.graph
    values, provenance = read_study_scores(args.scores, task, g)
    scores = EdgeScores(g, values.to(torch.float64), provenance["method"])

    t0 = time.perf_counter()
    search = minimal_circuit(exp, scores, args.target, baseline=reference_metrics(exp))
    seconds = time.perf_counter() - t0
    circuit = search.circuit
    heads = sorted(str(n) for n in circuit.nodes() if n.kind.value == "head")
    mlps = sum(1 for n in circuit.nodes() if n.kind.value == "mlp")
    record = {"target": args.target, "edges": circuit.n_edges, "edge_fraction": circuit.n_edges / g.n_edges,
              "n_selected": search.n, "faithfulness": search.faithfulness.value, "heads": heads, "mlps": mlps,
              "points": [[p.n, p.n_edges, p.faithfulness] for p in search.points], "seconds": seconds}
    update_study_run(task.name, provenance["method"], ranking_minimal=record)
    print(f"{task.name}, {provenance['method']} ranking, {len(task)} prompts: minimal circuit at {args.target}:"
          f" {circuit.n_edges} edges ({100 * circuit.n_edges / g.n_edges:.2f} %), f {search.faithfulness.value:.3f},"
          f" {len(heads)} heads, {mlps} MLPs; {len(search.points)} points in {seconds:.0f} s")


if __name__ == "__main__":
    main()
