"""Child process: our EAP or ACDC on a model folder and a peers data file (project interpreter).

    python benchmarks/peers/run_ours.py --folder DIR --data data.safetensors --out scores.safetensors \
        --method eap --batch 8

Loads the model and the data, builds the ``Experiment`` (same ids, metric read at the last
position), then times only the scoring call (``eap(experiment)`` or ``acdc(experiment, tau)``,
ablation values included, as they are inside auto-circuit's call). With ``--order FILE`` (a score
file of auto-circuit's ACDC) ACDC instead visits the edges in the order recorded there, one
evaluation per edge (``benchmarks/peers/replay.py``). Prints one JSON line: seconds,
peak RSS of this process (``VmHWM``, via ``benchmarks.common.peak_rss_mb``) and the RSS peak reached before the call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# benchmarks.common is stdlib only: importable from the peers venv
from benchmarks.common import peak_rss_mb
from benchmarks.peers.scorefile import read_scores, write_scores


def build_experiment(folder: Path, data: Path, batch: int, metric: str):  # -> Experiment
    """The model in ``folder`` and the prompts of ``data`` as an ``Experiment``."""
    from benchmarks.peers.data import read_ioi_data
    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from circuits.tasks import TokenizedTask
    from graphs.adapters import build_spec
    from graphs.loading import load_model

    loaded = load_model(str(folder), progress=False)
    d = read_ioi_data(data)
    N, T = d["clean"].shape
    task = TokenizedTask(
        name="ioi",
        clean_ids=d["clean"],
        corrupted_ids=d["corrupted"],
        lengths=torch.full((N,), T),
        answers=d["answers"],
        wrongs=d["wrongs"],
        read_positions=torch.full((N,), T - 1),
    )
    return loaded, Experiment(build_spec(loaded.model), task, make_metric(metric), batch_size=batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", choices=("eap", "acdc"), default="eap")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--metric", default="logit_diff")
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--order", type=Path, help="ACDC: replay the edge order recorded in this score file")
    args = p.parse_args()

    _, exp = build_experiment(args.folder, args.data, args.batch, args.metric)
    g = exp.spec.graph
    before = peak_rss_mb()
    kept: set[str] | None = None
    extra: dict[str, object] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.method == "eap":
        from circuits.methods.eap import eap

        result = eap(exp)
    elif args.order is not None:
        from benchmarks.peers.replay import replay_acdc
        from graphs.scores import EdgeScores

        order = read_scores(args.order)[2]["visit_order"].split("\n")
        rep = replay_acdc(exp, args.tau, order)
        result = EdgeScores(g, rep.scores, "acdc-replay", {"tau": args.tau})
        kept = {str(g.edge_id(int(s), int(r))) for s, r in torch.nonzero(rep.kept).tolist()}
        extra = {"metric_circuit": rep.metric, "evaluations": rep.evaluations, "order_from": str(args.order)}
    else:
        from circuits.methods.acdc import acdc

        res = acdc(exp, args.tau)
        result = res.scores
        kept = {str(g.edge_id(int(s), int(r))) for s, r in torch.nonzero(res.circuit.in_circuit).tolist()}
        extra = {"metric_circuit": res.metric, "metric_full": res.full_metric, "evaluations": res.evaluations,
                 "passes": res.passes}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    values = result.flat().tolist()
    scores = {str(e): v for e, v in zip(g.edges(), values, strict=True)}
    method = args.method if args.order is None else "acdc-replay"
    write_scores(args.out, scores, {"side": "ours", "method": method}, kept)
    print(json.dumps({"side": "ours", "method": method, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_rss_mb": peak_rss_mb(), "rss_before_call_mb": before, "edges": g.n_edges, "kept": None if kept is None else len(kept),
                      "threads": torch.get_num_threads(), **extra}))


if __name__ == "__main__":
    main()
