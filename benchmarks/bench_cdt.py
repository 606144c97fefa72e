"""CD-T against path patching (and attribution baselines) on SmolLM2-135M, IOI.

1. Time for head-level scores of every head (270 heads): CD-T contributions of each head to the
   logit difference vs exact path patching of every head to the logits
   (``path_patching(receivers=("logits",))``): same process, same prompts, same thread count,
   timed back to back (the machine may be shared: compare the ratio, not the seconds).
2. Faithfulness curves (CPR / CMD, ``circuits.evaluate.faithfulness_curve``) of CD-T's edge scores
   vs EAP-IG (inputs, 5 steps), EAP, and random circuits; edge patching only with
   ``--edge-patching`` (123,211 edges x the prompts: hours on a CPU).
3. The CD-T circuit search (``cdt_circuit``, k per round) on the same scores: size, faithfulness.

Prints a table and writes JSON (``--out``). A script, not a test:

    python benchmarks/bench_cdt.py --prompts 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from circuits.evaluate import (
    Curve,
    faithfulness,
    faithfulness_curve,
    random_curve,
    reference_metrics,
)
from circuits.experiment import Experiment
from circuits.methods.cdt import (
    CDTConfig,
    cdt_circuit,
    cdt_edge_scores,
    cdt_node_scores,
)
from circuits.methods.patching import path_patching
from circuits.metrics import make_metric
from circuits.tasks import make_task
from graphs.adapters import build_spec
from graphs.loading import load_model
from graphs.scores import EdgeScores, NodeScores

T = TypeVar("T")


CPU_SECONDS: dict[int, float] = {}  # id(result) -> CPU seconds of the call that made it


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall seconds of ``fn()`` (and its CPU seconds in ``CPU_SECONDS``: on a shared machine with
    one thread, CPU time is the contention-robust measure; ratios are reported for both)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    CPU_SECONDS[id(out)] = time.process_time() - cpu
    return time.perf_counter() - start, out


def cpu_of(result: object) -> float:
    return CPU_SECONDS[id(result)]


def head_values(scores: NodeScores, heads: list[str]) -> torch.Tensor:
    return torch.tensor([scores[h] for h in heads])


def rank_agreement(a: torch.Tensor, b: torch.Tensor, top: int = 10) -> dict[str, float]:
    """Spearman correlation of |scores|, overlap of the top-``top`` heads by |score|, sign agreement
    on the union of the top heads."""
    from scipy.stats import spearmanr  # type: ignore[import-untyped]

    rho = float(spearmanr(a.abs().numpy(), b.abs().numpy()).statistic)
    ta = set(torch.topk(a.abs(), top).indices.tolist())
    tb = set(torch.topk(b.abs(), top).indices.tolist())
    union = sorted(ta | tb)
    signs = float((torch.sign(a[union]) == torch.sign(b[union])).float().mean())
    return {"spearman_abs": rho, f"top{top}_overlap": len(ta & tb) / top, "sign_agreement_top": signs}


def curve_row(name: str, curve: Curve, seconds: float | None, cpu: float | None = None) -> dict[str, Any]:
    return {
        "method": name,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpr": curve.cpr,
        "cmd": curve.cmd,
        "points": [[f, n, v] for f, n, v in curve.points()],
    }


def eap_ig_scores(exp: Experiment, steps: int) -> EdgeScores | None:
    """EAP-IG (inputs) if ``circuits.methods.eap`` provides it (HOOK: it was being written alongside CD-T)."""
    try:
        from circuits.methods.eap import eap_ig
    except ImportError:
        return None
    return eap_ig(exp, steps=steps, variant="inputs")


def eap_scores(exp: Experiment) -> EdgeScores | None:
    try:
        from circuits.methods.eap import eap
    except ImportError:
        return None
    return eap(exp)


def profile(exp: Experiment, heads: list[str]) -> None:
    """Where CD-T's time goes: cumulative CPU seconds of the decomposed layers and of the matmuls."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    cdt_node_scores(exp, heads)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = {
        "MLP (decompose_mlp)": "decompose_mlp",
        "attention (decompose_attention)": "decompose_attention",
        "readout (final norm, unembedding, metric)": "metric_contributions",
        "clean run (checkpoints, sender outputs)": "clean_run",
        "ablation values (corrupted run)": "sender_outputs",
        "all matmuls (F.linear)": "linear",
    }
    found = {label: 0.0 for label in rows}
    for (_file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for label, fn in rows.items():
            if name == fn or name == f"<built-in method torch._C._nn.{fn}>":
                found[label] = max(found[label], ct)
    print(f"profile of CD-T on {len(heads)} heads: {total:.1f} CPU s")
    for label, seconds in found.items():
        print(f"  {label:<44}{seconds:>8.1f} s {100 * seconds / total:>6.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=5, help="sources kept per round of the CD-T circuit search")
    parser.add_argument("--random-samples", type=int, default=3)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--skip-frozen", action="store_true", help="skip timing the frozen-pattern (reference) rule")
    parser.add_argument("--skip-faithfulness", action="store_true")
    parser.add_argument("--edge-patching", action="store_true", help="also score every edge by edge patching (slow)")
    parser.add_argument("--profile-layers", type=int, default=0,
                        help="profile CD-T on the heads of the last N layers (where the time goes) and exit")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_cdt.json"))
    args = parser.parse_args()
    from graphs.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as the CLI does (graphs/allocator.py)
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m", progress=False)
    spec = build_spec(loaded.model)
    task = make_task("ioi", loaded.tokenizer, n_prompts=args.prompts, seed=0)
    exp = Experiment(spec, task, make_metric("logit_diff"), ablation="corrupted", batch_size=args.batch_size)
    g = spec.graph
    heads = [f"a{layer}.h{h}" for layer in range(g.n_layers) for h in range(g.n_heads)]
    if args.profile_layers:
        profile(exp, heads[-args.profile_layers * g.n_heads :])
        return
    report: dict[str, Any] = {
        "model": "smollm2-135m",
        "task": "ioi",
        "prompts": args.prompts,
        "max_length": task.max_length,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average_start": os.getloadavg(),
    }

    # ---------------------------------------------------------------- 1. head scores: time
    t_cdt, cdt_heads = timed(lambda: cdt_node_scores(exp, heads))
    t_pp, pp_heads = timed(lambda: path_patching(exp, receivers=("logits",)))
    c_cdt, c_pp = cpu_of(cdt_heads), cpu_of(pp_heads)
    timing: dict[str, Any] = {
        "cdt_seconds": t_cdt, "path_patching_seconds": t_pp, "speedup": t_pp / t_cdt,
        "cdt_cpu_seconds": c_cdt, "path_patching_cpu_seconds": c_pp, "speedup_cpu": c_pp / c_cdt,
    }
    if not args.skip_frozen:
        t_frozen, frozen_heads = timed(lambda: cdt_node_scores(exp, heads, config=CDTConfig(attention="frozen")))
        c_frozen = cpu_of(frozen_heads)
        timing.update(cdt_frozen_seconds=t_frozen, speedup_frozen=t_pp / t_frozen,
                      cdt_frozen_cpu_seconds=c_frozen, speedup_frozen_cpu=c_pp / c_frozen)
        timing["agreement_frozen_vs_pp"] = rank_agreement(head_values(frozen_heads, heads), head_values(pp_heads, heads))
    timing["agreement_cdt_vs_pp"] = rank_agreement(head_values(cdt_heads, heads), head_values(pp_heads, heads))
    timing["top_heads_cdt"] = [(str(n), v) for n, v in cdt_heads.top(10)]
    timing["top_heads_path_patching"] = [(str(n), v) for n, v in pp_heads.top(10)]
    report["head_scores"] = timing
    print(f"\nhead scores of all {len(heads)} heads, {args.prompts} IOI prompts, {args.threads} thread(s)")
    print(f"  {'method':<34}{'wall s':>9}{'CPU s':>9}{'speed-up (wall / CPU)':>26}")
    print(f"  {'path patching (receivers=logits)':<34}{t_pp:>9.1f}{c_pp:>9.1f}{'1.00x / 1.00x':>26}")
    print(f"  {'CD-T (decomposed pattern)':<34}{t_cdt:>9.1f}{c_cdt:>9.1f}{f'{t_pp / t_cdt:.2f}x / {c_pp / c_cdt:.2f}x':>26}")
    if not args.skip_frozen:
        ratio = f"{t_pp / t_frozen:.2f}x / {c_pp / c_frozen:.2f}x"
        print(f"  {'CD-T (frozen pattern, reference)':<34}{t_frozen:>9.1f}{c_frozen:>9.1f}{ratio:>26}")
    print(f"  agreement CD-T vs path patching: {timing['agreement_cdt_vs_pp']}")

    # ---------------------------------------------------------------- 2. faithfulness curves
    if not args.skip_faithfulness:
        baseline = reference_metrics(exp)
        report["baseline"] = {"m_full": baseline.m_full, "m_empty": baseline.m_empty}
        rows: list[dict[str, Any]] = []
        t_edges, cdt_edges = timed(lambda: cdt_edge_scores(exp))
        rows.append(curve_row("cdt (projected edges)", faithfulness_curve(exp, cdt_edges, baseline=baseline), t_edges, cpu_of(cdt_edges)))
        t_ig, ig = timed(lambda: eap_ig_scores(exp, args.ig_steps))
        if ig is not None:
            curve = faithfulness_curve(exp, ig, baseline=baseline)
            rows.append(curve_row(f"eap-ig (inputs, {args.ig_steps} steps)", curve, t_ig, cpu_of(ig)))
        else:
            rows.append({"method": "eap-ig", "note": "HOOK: circuits.methods.eap.eap_ig not available"})
        t_eap, eap = timed(lambda: eap_scores(exp))
        if eap is not None:
            rows.append(curve_row("eap", faithfulness_curve(exp, eap, baseline=baseline), t_eap, cpu_of(eap)))
        if args.edge_patching:
            from circuits.methods.patching import edge_patching

            t_ep, ep = timed(lambda: edge_patching(exp))
            rows.append(curve_row("edge patching", faithfulness_curve(exp, ep, baseline=baseline), t_ep, cpu_of(ep)))
        else:
            rows.append({"method": "edge patching", "note": f"not run ({g.n_edges} edges x {args.prompts} prompts; pass --edge-patching)"})
        rand = random_curve(exp, samples=args.random_samples, baseline=baseline)
        rows.append({"method": f"random ({args.random_samples} samples)", "cpr": rand.cpr[0], "cpr_std": rand.cpr[1],
                     "cmd": rand.cmd[0], "cmd_std": rand.cmd[1], "mean": list(rand.mean)})
        report["faithfulness"] = rows
        t_search, search = timed(lambda: cdt_circuit(exp, k=args.k, scores=cdt_edges))
        f = faithfulness(exp, search.circuit, baseline)
        report["cdt_circuit"] = {
            "k": args.k, "rounds": len(search.rounds), "found_edges": search.found.n_edges,
            "edges": search.circuit.n_edges, "nodes": [str(n) for n in search.circuit.nodes()],
            "faithfulness": f.value, "search_seconds_after_scores": t_search,
        }
        print(f"\nfaithfulness (m(full) = {baseline.m_full:.3f}, m(empty) = {baseline.m_empty:.3f})")
        print(f"  {'method':<30}{'seconds':>10}{'CPR (higher)':>14}{'CMD (lower)':>13}")
        for row in rows:
            if "cpr" in row:
                sec = row.get("seconds")
                print(f"  {row['method']:<30}{'' if sec is None else f'{sec:.1f}':>10}{row['cpr']:>14.3f}{row['cmd']:>13.3f}")
            else:
                print(f"  {row['method']:<30}  {row['note']}")
        c = report["cdt_circuit"]
        print(f"  CD-T circuit search (k={args.k}): {c['rounds']} rounds, {c['edges']} edges, faithfulness {c['faithfulness']:.3f}")

    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
