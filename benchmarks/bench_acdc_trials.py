"""ACDC's trials on SmolLM2-135M: full runs, downstream trials at every position, and downstream
trials at the read positions, timed in one process on the same masks.

    python benchmarks/bench_acdc_trials.py [--task greater-than] [--prompts 16] [--width 64]
        [--circuit docs/results/greater-than/acdc/scores.safetensors] [--layers 4 12 20 26]

A pass of ACDC evaluates ``--width`` trials of one receiver: trial ``j`` removes its ``j + 1``
latest incoming edges on top of the current circuit. The current circuit at receiver ``r`` is the
one ACDC holds there: the edges into receivers after ``r`` as ACDC decided them (read from a
finished ACDC run of the study, ``benchmarks/study_smollm2.py --methods acdc``), every edge into
``r`` and before it present. For the MLP receiver of each ``--layers`` layer one pass is timed
three ways:

- *full runs*: the model run on from the receiver's layer for every trial (ACDC's fallback);
- *downstream, every position*: only the nodes the receiver reaches through kept edges;
- *downstream, read positions*: the same, with the nodes the kept edges need at the read positions
  only computed there (the default).

The three must give the same metrics (checked). CPU seconds, medians of ``--repeats`` interleaved
rounds; rebuilding the base run at a new layer is timed apart (ACDC does it once per layer).
Writes benchmarks/results/acdc_trials.json.

With ``--base-updates`` it times instead what ACDC does between passes: moving the base runs from
each ``--layers`` layer's last receiver to its first by setting the decided columns, copying the
base run at each receiver (as before 2026-12-08) and writing into it (``with_column(reuse=True)``);
the two must give the same base runs bitwise (sender outputs, receiver inputs, patterns, masks,
every batch). Writes benchmarks/results/acdc_base_updates_<task>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save

if TYPE_CHECKING:
    from circuits.methods.acdc import _DownstreamEvaluator
    from graphs.graph import ComputationGraph


def cpu(fn):  # type: ignore[no-untyped-def]
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def base_updates(g: ComputationGraph, down: _DownstreamEvaluator, ablated: torch.Tensor, layers: list[int],
                 repeats: int) -> list[dict]:
    """CPU seconds to move the base runs from a layer's last receiver to its first, setting every
    decided column as ACDC does, with a copy of the base run per receiver and written in place."""
    rows = []
    for layer in layers:
        last, first = g.mlp_receiver(layer), g.qkv_receivers(layer).start
        times: dict[str, list[float]] = {"copy": [], "reuse": []}
        results: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        for _ in range(repeats):
            for name, reuse in (("copy", False), ("reuse", True)):
                down.reuse_base, down.layer = reuse, None  # a new base run at the layer's last receiver
                down.start_receiver(ablated, last)
                t, _ = cpu(lambda: down.start_receiver(ablated, first))  # noqa: B023
                times[name].append(t)
                results[name] = [(b.senders.clone(), b.inputs.clone(), b.patterns.clone(), b.mask.clone())
                                 for b in down.bases]
        if not all(torch.equal(x, y) for a, b in zip(results["copy"], results["reuse"], strict=True)
                   for x, y in zip(a, b, strict=True)):
            raise SystemExit(f"layer {layer}: copying and reusing the base run give different runs")
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append({"layer": layer, "receivers": last - first, "seconds": med, "speedup": med["copy"] / med["reuse"]})
        print(f"layer {layer}: {last - first} receivers set: copy {med['copy']:.2f} s, reuse {med['reuse']:.2f} s "
              f"({med['copy'] / med['reuse']:.1f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="greater-than")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--circuit", type=Path, default=None,
                        help="scores.safetensors of an ACDC run (default docs/results/<task>/acdc/)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 20, 26])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base-updates", action="store_true",
                        help="instead: time moving the base runs through each layer's receivers, copying or reusing them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors import safe_open

    from circuits.experiment import Experiment
    from circuits.methods import acdc
    from circuits.metrics import make_metric
    from circuits.pipeline import DiscoverySettings, load_task
    from graphs.adapters import build_spec
    from graphs.loading import load_model

    path = args.circuit or Path(f"docs/results/{args.task}/acdc/scores.safetensors")
    if not path.exists():
        raise SystemExit(f"{path} not found: run benchmarks/study_smollm2.py --tasks {args.task} --methods acdc first")
    loaded = load_model("smollm2-135m", progress=False)
    task = load_task(DiscoverySettings(task=args.task, n_prompts=args.prompts), loaded)
    exp = Experiment(build_spec(loaded.model), task, make_metric("kl"), batch_size=args.prompts)
    g = exp.spec.graph
    with safe_open(str(path), "pt") as f:
        kept = f.get_tensor("in_circuit").bool()  # [S, R]
    ablated = g.edge_mask & ~kept

    cache = acdc.default_cache_floats()
    full = acdc._Evaluator(exp, 256, cache)
    plain = acdc._Evaluator(exp, 256, cache)
    if not acdc._DownstreamEvaluator.fits(exp, plain, cache):
        raise SystemExit(acdc._DownstreamEvaluator.why_not(exp, plain, cache))
    down = acdc._DownstreamEvaluator(plain)

    record: dict = {"model": "smollm2-135m", "task": args.task, "prompts": args.prompts, "width": args.width,
                    "threads": args.threads, "circuit_edges": int(kept.sum()), "receivers": []}
    if args.base_updates:
        record = {**record, "layers": base_updates(g, down, ablated, args.layers, args.repeats)}
        del record["width"], record["receivers"]
        print(f"written to {save(f'acdc_base_updates_{args.task}', record)}")
        return
    for layer in args.layers:
        r = g.mlp_receiver(layer)
        removed = torch.zeros_like(ablated)
        removed[:, r + 1 :] = ablated[:, r + 1 :]
        n = g.n_upstream[r]
        k = min(args.width, n)
        columns = torch.zeros(k, n, dtype=torch.bool)
        for j in range(k):
            columns[j, n - 1 - j :] = True  # the j + 1 latest senders removed
        masks = removed.repeat(k, 1, 1)
        masks[:, :n, r] = columns
        t_base, _ = cpu(lambda: down.start_receiver(removed, r))  # noqa: B023
        times: dict[str, list[float]] = {"full runs": [], "downstream, every position": [], "downstream, read positions": []}
        values: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            t, values["full runs"] = cpu(lambda: full(masks, layer))  # noqa: B023
            times["full runs"].append(t)
            for name, at_read in (("downstream, every position", False), ("downstream, read positions", True)):
                down.at_read_positions = at_read
                t, values[name] = cpu(lambda: down.trials(removed, r, columns))  # noqa: B023
                times[name].append(t)
        for name, v in values.items():
            if not torch.allclose(v, values["full runs"], atol=1e-4, rtol=1e-4):
                raise SystemExit(f"layer {layer}: {name} differs from the full runs by {float((v - values['full runs']).abs().max())}")
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = {"layer": layer, "receiver": str(g.receivers[r].node), "trials": k, "base_run_s": t_base,
               "seconds": med, "narrow_senders": len(down.bases[0].narrow(g)),
               "speedup_vs_full": {name: med["full runs"] / s for name, s in med.items()}}
        record["receivers"].append(row)
        print(f"m{layer} ({k} trials): full runs {med['full runs']:.2f} s, every position "
              f"{med['downstream, every position']:.2f} s, read positions {med['downstream, read positions']:.2f} s "
              f"({row['speedup_vs_full']['downstream, read positions']:.1f}x vs full, "
              f"{med['downstream, every position'] / med['downstream, read positions']:.1f}x vs every position); "
              f"base run {t_base:.2f} s; {row['narrow_senders']} narrow senders", flush=True)
    print(f"written to {save('acdc_trials', record)}")


if __name__ == "__main__":
    main()
