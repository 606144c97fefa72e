"""EAP on SmolLM2-135M: speed against a plain HF forward + backward, peak memory, rank agreement.

    python benchmarks/bench_eap.py [--prompts 32] [--threads N] [--sample-edges 1500] [--edge-patching-scores F]
                                    [--speed-only] [--out NAME]

1. Time of EAP for all 123,211 edges on the IOI prompts divided by the time of one plain HF forward
   + backward on the same batch (gradients with respect to the input embeddings only, which is what
   EAP needs; the ratio against a backward that also makes parameter gradients is reported too).
2. Peak memory (RSS of a fresh child process) of EAP and of EAP-IG with 5 steps, at two batch sizes,
   and of just loading the model.
3. Rank agreement (Spearman, top-100 overlap) of EAP and EAP-IG with exact edge patching. Exact
   patching of every edge of SmolLM2 takes hours on two cores, so by default a seeded uniform sample
   of edges is patched exactly and the agreement is measured on that sample; pass
   ``--edge-patching-scores`` (a scores.safetensors from ``circuits discover --method edge-patching``)
   to use full exact scores, which also enables its faithfulness curve.
4. Faithfulness curves (CPR, CMD) of EAP, EAP-IG (and edge patching when given).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import peak_rss_mb, run_child, save, smollm2_ioi, timed  # noqa: E402

SCRIPT = Path(__file__).resolve()


def child(args: argparse.Namespace) -> None:
    """Measure one thing in this fresh process and print a JSON line."""
    import json

    from circuits.methods.eap import eap, eap_ig

    _, exp = smollm2_ioi(args.prompts, batch_size=args.batch)
    before = peak_rss_mb()
    if args.what == "eap":
        eap(exp)
    elif args.what == "eap-ig":
        eap_ig(exp, steps=5)
    print(json.dumps({"what": args.what, "batch": args.batch, "peak_rss_mb": peak_rss_mb(), "after_load_mb": before}))


def hf_forward_backward(model, exp, parameter_grads: bool) -> None:
    """One plain HF forward + backward of the metric on the whole prompt batch."""
    task = exp.task
    ids = task.clean_ids
    for p in model.parameters():
        p.requires_grad_(parameter_grads)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[torch.arange(len(task)), task.read_positions]
    exp.metric.per_prompt(logits, task.answers, task.wrongs).mean().backward()
    model.zero_grad(set_to_none=True)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each run, ``repeats`` rounds of all runs one after the other (after one warm-up
    round), so a slow spell of a shared machine hits every run alike; per run, in round order."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 100) -> float:
    k = min(k, a.numel())
    top_a = set(torch.topk(a.abs(), k).indices.tolist())
    top_b = set(torch.topk(b.abs(), k).indices.tolist())
    return len(top_a & top_b) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--sample-edges", type=int, default=1500)
    parser.add_argument("--edge-patching-scores", type=Path)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only section 1 (no memory, agreement or curves)")
    parser.add_argument("--out", default="eap", help="results name: benchmarks/results/<out>.json")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--what", default="eap")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    from circuits.evaluate import faithfulness_curve, reference_metrics
    from circuits.methods.eap import eap, eap_ig
    from circuits.methods.patching import edge_patching
    from graphs.scores import EdgeScores

    record: dict = {"model": "smollm2-135m", "task": "ioi", "prompts": args.prompts, "threads": torch.get_num_threads()}
    loaded, exp = smollm2_ioi(args.prompts, batch_size=args.prompts)
    g = exp.spec.graph
    record["edges"] = g.n_edges
    record["tokens_per_prompt"] = exp.task.max_length

    # 1. speed, as ratios measured in this process
    _, exp8 = smollm2_ioi(args.prompts, batch_size=8)
    runs = {
        "hf_fwd_bwd_activation_grads": lambda: hf_forward_backward(loaded.model, exp, parameter_grads=False),
        "hf_fwd_bwd_parameter_grads": lambda: hf_forward_backward(loaded.model, exp, parameter_grads=True),
        "eap_batch32": lambda: eap(exp),
        "eap_batch8": lambda: eap(exp8),
    }
    times = interleaved(runs, args.repeats)
    t_act, t_par, t_eap, t_eap8 = (statistics.median(times[k]) for k in runs)
    record["repeats"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    paired = [e / h for e, h in zip(times["eap_batch32"], times["hf_fwd_bwd_activation_grads"], strict=True)]
    record["ratio_eap_to_hf_fwd_bwd_paired_median"] = statistics.median(paired)
    t_ig = timed(lambda: eap_ig(exp8, steps=5), 1)
    record["seconds"] = {"hf_fwd_bwd_activation_grads": t_act, "hf_fwd_bwd_parameter_grads": t_par,
                         "eap_batch32": t_eap, "eap_batch8": t_eap8, "eap_ig5_batch8": t_ig}
    record["ratio_eap_to_hf_fwd_bwd"] = t_eap / t_act
    record["ratio_eap_to_hf_fwd_bwd_with_param_grads"] = t_eap / t_par
    record["ratio_eap_batch8_to_hf_fwd_bwd"] = t_eap8 / t_act

    # 2. peak memory, each in a fresh child
    if args.speed_only:
        print_table(record)
        print(f"\nwritten to {save(args.out, record)}")
        return
    if not args.skip_memory:
        record["memory"] = [run_child(SCRIPT, ["--what", what, "--batch", str(b), "--prompts", str(args.prompts)])
                            for what, b in (("load", 32), ("eap", 32), ("eap", 8), ("eap-ig", 8), ("eap-ig", 32))]

    # 3. rank agreement with exact edge patching
    eap_scores, ig_scores = eap(exp8), eap_ig(exp8, steps=5)
    if args.edge_patching_scores is not None:
        from safetensors.torch import load_file

        exact = EdgeScores(g, load_file(str(args.edge_patching_scores))["scores"], "edge-patching")
        chosen = g.edge_mask
        record["agreement_on"] = "all edges"
    else:
        gen = torch.Generator().manual_seed(0)
        flat = torch.nonzero(g.edge_mask)
        pick = flat[torch.randperm(flat.shape[0], generator=gen)[: args.sample_edges]]
        chosen = torch.zeros_like(g.edge_mask)
        chosen[pick[:, 0], pick[:, 1]] = True
        exact = edge_patching(exp8, edges=chosen, max_rows=256)
        record["agreement_on"] = f"a uniform sample of {int(chosen.sum())} edges (seed 0)"
    x = exact.values[chosen]
    for name, s in (("eap", eap_scores), ("eap_ig", ig_scores)):
        record[f"spearman_{name}"] = spearman(s.values[chosen], x)
        record[f"spearman_abs_{name}"] = spearman(s.values[chosen].abs(), x.abs())
        record[f"top100_overlap_{name}"] = top_overlap(s.values[chosen], x)

    # 4. faithfulness curves
    base = reference_metrics(exp8)
    curves = {"eap": eap_scores, "eap_ig": ig_scores}
    if args.edge_patching_scores is not None:
        curves["edge_patching"] = exact
    record["curves"] = {}
    for name, s in curves.items():
        c = faithfulness_curve(exp8, s, baseline=base)
        record["curves"][name] = {"cpr": c.cpr, "cmd": c.cmd, "faithfulness": list(c.values), "n_edges": list(c.n_edges)}
    path = save(args.out, record)
    print_table(record)
    print(f"\nwritten to {path}")


def print_table(r: dict) -> None:
    s = r["seconds"]
    print(f"SmolLM2-135M, IOI, {r['prompts']} prompts x {r['tokens_per_prompt']} tokens, {r['edges']} edges")
    print(f"HF forward+backward (activation grads): {s['hf_fwd_bwd_activation_grads']:.2f} s;"
          f" with parameter grads: {s['hf_fwd_bwd_parameter_grads']:.2f} s")
    print(f"EAP (one batch of {r['prompts']}): {s['eap_batch32']:.2f} s -> ratio {r['ratio_eap_to_hf_fwd_bwd']:.2f}"
          f" (median of paired rounds {r['ratio_eap_to_hf_fwd_bwd_paired_median']:.2f}; {r['threads']} threads)"
          f" ({r['ratio_eap_to_hf_fwd_bwd_with_param_grads']:.2f} vs the backward with parameter grads)")
    print(f"EAP (batches of 8): {s['eap_batch8']:.2f} s; EAP-IG 5 steps (batches of 8): {s['eap_ig5_batch8']:.2f} s")
    for m in r.get("memory", []):
        print(f"peak RSS {m['what']:7s} batch {m['batch']:2d}: {m['peak_rss_mb']:.0f} MB (after load {m['after_load_mb']:.0f} MB)")
    if "agreement_on" not in r:
        return
    print(f"agreement with exact edge patching ({r['agreement_on']}):")
    for name in ("eap", "eap_ig"):
        print(f"  {name}: Spearman {r[f'spearman_{name}']:.3f} (|.| {r[f'spearman_abs_{name}']:.3f}),"
              f" top-100 overlap {r[f'top100_overlap_{name}']:.2f}")
    for name, c in r["curves"].items():
        print(f"  curve {name}: CPR {c['cpr']:.3f}, CMD {c['cmd']:.3f}")


if __name__ == "__main__":
    main()
