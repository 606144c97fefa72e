"""Real-model study: circuits of SmolLM2-135M on IOI, greater-than and induction, every method.

    python benchmarks/study_smollm2.py [--tasks ioi greater-than induction] [--methods eap eap-ig ...]
                                       [--prompts 32] [--out docs/results]

For every (task, method): the discovery pipeline (scores -> minimal circuit at faithfulness 0.9 ->
faithfulness curve, CPR / CMD -> random baseline of the same size), the heads in the circuit, the
SVG. Writes docs/results/<task>/<method>/{circuit.json, circuit.svg, curve.json} and a summary
JSON (benchmarks/results/study_smollm2.json) that docs/results.md quotes. Methods that cannot
finish on this machine in reasonable time are listed with the reason instead of silently skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record_study_run

DEFAULT_METHODS = ("eap", "eap-ig", "atp*", "cdt", "path-patching")


def heads_of(circuit) -> list[str]:
    return [str(n) for n in circuit.nodes() if n.kind.value == "head"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["ioi", "greater-than", "induction"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--tau", type=float, default=0.01, help="ACDC's threshold (its metric: KL)")
    parser.add_argument("--work", type=Path, default=Path("runs/study-smollm2"),
                        help="progress files: a killed run resumes from WORK/<task>/<method>")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); use 1 on a shared machine, where a second "
                        "thread waits on preempted peers")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from circuits.pipeline import (
        DiscoverySettings,
        clear_progress,
        discover,
        write_outputs,
    )
    from graphs.loading import load_model

    loaded = load_model("smollm2-135m", progress=False)
    for task in args.tasks:
        for method in args.methods:
            start = time.perf_counter()
            settings = DiscoverySettings(task=task, method=method, n_prompts=args.prompts, batch_size=args.batch_size,
                                         tau=args.tau)
            work = args.work / task / method.replace("*", "-star")
            try:
                result = discover(settings, progress=args.progress, loaded=loaded, run_dir=work, resume=True)
            except Exception as err:  # noqa: BLE001 - record and go on with the other runs
                record_study_run({"task": task, "method": method, "error": f"{type(err).__name__}: {err}"})
                print(f"{task} / {method}: failed: {err}", flush=True)
                continue
            out = args.out / task / method.replace("*", "-star")
            write_outputs(result, out)
            clear_progress(work)
            s = result.summary()
            run = {
                "task": task,
                "method": method,
                "prompts": args.prompts,
                "edges": s["edges"],
                "edge_fraction": s["edge_fraction"],
                "faithfulness": s["faithfulness"],
                "random_faithfulness": s["random_faithfulness"],
                "cpr": s["cpr"],
                "cmd": s["cmd"],
                "heads": heads_of(result.circuit),
                "mlps": s["mlps"],
                "seconds": time.perf_counter() - start,
                "seconds_scores": s["seconds"]["scores"],
                **({"tau": args.tau, "metric": "kl"} if method == "acdc" else {}),
                "curve": None if result.curve is None else list(result.curve.values),
                "svg": str(out / "circuit.svg"),
            }
            print(f"{task} / {method}: {run['edges']} edges, f={run['faithfulness']:.3f} "
                  f"(random {run['random_faithfulness']:.3f}), CPR {run['cpr']:.3f}, CMD {run['cmd']:.3f}, "
                  f"{len(run['heads'])} heads, {run['seconds']:.0f} s", flush=True)
            print(f"written to {record_study_run(run)}")


if __name__ == "__main__":
    main()
