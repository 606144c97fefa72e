"""SmolLM2-135M: exact edge patching on a candidate set, for the real-model study (docs/results.md).

    python benchmarks/study_edge_patching.py --task greater-than [--prompts 16] [--candidates 0.03]
        [--candidates-from atp*] [--candidate-scores docs/results/greater-than/atp-star/scores.safetensors]

Exact edge patching of all 123,211 edges costs one forward from the receiver's layer per edge and
prompt batch, about half a day for 16 prompts on this machine. So the exact scores are computed on a
*candidate set*: the ``--candidates`` fraction of edges that a fast method (``--candidates-from``,
AtP* by default: it estimates exactly this single-edge effect) ranks highest by |score|. Its scores
are computed here, or read from a study run's ``scores.safetensors`` (``--candidate-scores``; the
file's task and dataset must match).

The ranking evaluated is the *candidates by exact |score|, then the other edges in the candidate
method's order* (their scores scaled below every exact one). On it: the minimal circuit at
faithfulness 0.9 (and whether it lies inside the exactly scored part), the faithfulness curve,
CPR / CMD, a same-size random circuit, and the top ``--fraction`` circuits by exact and by candidate
scores. Writes docs/results/<task>/edge-patching/{circuit.svg, curve.json, ...}, adds the run to
benchmarks/results/study_smollm2.json and writes benchmarks/results/edge_patching_<task>.json.
Progress is checkpointed in ``--work`` so a killed run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import read_study_scores, record_study_run, save


def candidate_scores(args, exp, task, graph):
    """The candidate method's scores [S, R]: read from ``--candidate-scores`` (checked) or computed."""
    if args.candidate_scores is None:
        from circuits.methods.registry import method

        return method(args.candidates_from).run(exp, False, steps=5, ig_variant="inputs").scores.values
    values, provenance = read_study_scores(args.candidate_scores, task, graph)
    args.candidates_from = provenance.get("method", args.candidates_from)
    return values


def ranked(exact: torch.Tensor, approx: torch.Tensor, candidates: torch.Tensor, edge_mask: torch.Tensor) -> torch.Tensor:
    """Scores whose |value| order is: candidates by |exact|, then the other edges by |approx|."""
    floor = exact[candidates].abs()
    floor = floor[floor > 0].min() if bool((floor > 0).any()) else torch.tensor(1.0, dtype=exact.dtype)
    rest = approx.to(exact.dtype).masked_fill(candidates | ~edge_mask, 0)
    top = rest.abs().max()
    scale = 0.5 * floor / top if top > 0 else 0.0
    return torch.where(candidates, exact, rest * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--candidates", type=float, default=0.03)
    parser.add_argument("--candidates-from", default="atp*")
    parser.add_argument("--candidate-scores", type=Path, default=None)
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--random-samples", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--work", type=Path, default=None, help="progress files (default runs/study-edge-patching-<task>)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from circuits.checkpoint import Checkpointer, fingerprint
    from circuits.evaluate import (
        faithfulness,
        faithfulness_curve,
        random_baseline,
        reference_metrics,
    )
    from circuits.experiment import Experiment
    from circuits.methods.patching import edge_patching
    from circuits.metrics import make_metric
    from circuits.pipeline import (
        DiscoveryResult,
        DiscoverySettings,
        load_task,
        write_outputs,
    )
    from circuits.prune import minimal_circuit, top_n
    from graphs.adapters import build_spec
    from graphs.loading import load_model
    from graphs.scores import EdgeScores

    settings = DiscoverySettings(task=args.task, method="edge-patching", n_prompts=args.prompts, batch_size=args.prompts)
    loaded = load_model("smollm2-135m", progress=False)
    task = load_task(settings, loaded)
    exp = Experiment(build_spec(loaded.model), task, make_metric("logit_diff"), ablation="corrupted",
                     batch_size=args.prompts)
    g = exp.spec.graph
    base = reference_metrics(exp)
    n_keep = round(args.fraction * g.n_edges)
    n_cand = round(args.candidates * g.n_edges)

    t0 = time.perf_counter()
    approx_values = candidate_scores(args, exp, task, g).to(torch.float64)
    t_approx = time.perf_counter() - t0
    approx = EdgeScores(g, approx_values, args.candidates_from)
    order = torch.argsort(approx.values.abs().masked_fill(~g.edge_mask, -1).flatten(), descending=True)[:n_cand]
    candidates = torch.zeros(g.n_senders * g.n_receivers, dtype=torch.bool)
    candidates[order] = True
    candidates = candidates.view(g.n_senders, g.n_receivers)

    work = args.work or Path(f"runs/study-edge-patching-{args.task}")
    work.mkdir(parents=True, exist_ok=True)
    ck = Checkpointer(work / "edge-patching.safetensors",
                      fingerprint(study="edge-patching", task=args.task, prompts=args.prompts, candidates=n_cand,
                                  source=args.candidates_from, model="smollm2-135m",
                                  picked=hashlib.sha256(order.sort().values.numpy().tobytes()).hexdigest()))
    t0 = time.perf_counter()
    exact = edge_patching(exp, edges=candidates, progress=True, checkpoint=ck)
    t_exact = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = EdgeScores(g, ranked(exact.values.double(), approx.values, candidates, g.edge_mask), "edge-patching",
                        {"exact_on": f"top {n_cand} edges by |{args.candidates_from}|", "then": args.candidates_from})
    search = minimal_circuit(exp, scores, 0.9, baseline=base)
    curve = faithfulness_curve(exp, scores, baseline=base)
    rand = random_baseline(exp, search.circuit.n_edges, samples=args.random_samples, baseline=base)
    t_eval = time.perf_counter() - t0
    result = DiscoveryResult(settings, search.circuit, scores, search.faithfulness, rand, curve, search,
                             {"scores": t_approx + t_exact, "evaluate": t_eval}, exp.spec.d_model)
    out = args.out / args.task / "edge-patching"
    write_outputs(result, out)
    inside = bool((search.circuit.in_circuit & ~candidates).sum() == 0)

    record: dict = {"model": "smollm2-135m", "task": args.task, "prompts": args.prompts, "edges": g.n_edges,
                    "candidates": n_cand, "candidates_from": args.candidates_from, "circuit_edges": n_keep,
                    "seconds": {args.candidates_from: t_approx, "edge_patching": t_exact, "evaluate": t_eval},
                    "m_full": base.m_full, "m_empty": base.m_empty,
                    "minimal": {"edges": search.circuit.n_edges, "faithfulness": search.faithfulness.value,
                                "inside_candidates": inside}}
    for name, s in (("edge_patching", scores), (args.candidates_from, approx)):
        circuit = top_n(s, n_keep)
        f = faithfulness(exp, circuit, base)
        record[name] = {"faithfulness": f.value, "metric": f.m_circuit, "edges": len(circuit.edges())}
    record["random"] = {"mean": rand.mean, "std": rand.std, "samples": list(rand.values)}
    record["overlap_top"] = (top_n(scores, n_keep).in_circuit & top_n(approx, n_keep).in_circuit).sum().item() / n_keep
    path = save(f"edge_patching_{args.task}", record)

    s = result.summary()
    record_study_run({
        "task": args.task, "method": "edge-patching", "prompts": args.prompts, "edges": s["edges"],
        "edge_fraction": s["edge_fraction"], "faithfulness": s["faithfulness"],
        "random_faithfulness": s["random_faithfulness"], "cpr": s["cpr"], "cmd": s["cmd"],
        "heads": sorted(str(n) for n in search.circuit.nodes() if n.kind.value == "head"),
        "mlps": s["mlps"], "seconds": t_approx + t_exact + t_eval, "seconds_scores": t_approx + t_exact,
        "curve": list(curve.values), "svg": str(out / "circuit.svg"),
        "exact_on": {"edges": n_cand, "ranked_by": args.candidates_from, "minimal_inside": inside},
    })
    print(f"{args.task}, {args.prompts} prompts; m(full) {base.m_full:.3f}, m(empty) {base.m_empty:.3f}")
    print(f"minimal circuit at 0.9: {search.circuit.n_edges} edges, f {search.faithfulness.value:.3f}, "
          f"{'inside' if inside else 'NOT inside'} the {n_cand} exactly patched candidates; CPR {curve.cpr:.3f}, "
          f"CMD {curve.cmd:.3f}; random {rand.mean:.3f} +- {rand.std:.3f}")
    print(f"top {n_keep} edges: exact {record['edge_patching']['faithfulness']:.3f}, "
          f"{args.candidates_from} {record[args.candidates_from]['faithfulness']:.3f}, overlap {record['overlap_top']:.2f}")
    print(f"time: {args.candidates_from} {t_approx:.0f} s, edge patching {t_exact:.0f} s, evaluation {t_eval:.0f} s; "
          f"written to {path}")


if __name__ == "__main__":
    main()
