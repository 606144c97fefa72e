"""How EAP and exact edge patching scale with the model: time and peak memory on random GPT-2
configs, deeper at a fixed width and wider at a fixed depth, with the exponent fitted against the
edge count.

    python benchmarks/scaling.py [--prompts 4] [--tokens 12] [--threads 1] [--out docs/scaling]

Every (config, method) runs in a fresh child process (one torch thread by default) that reports
the wall time of the method call (after a warm-up on one prompt) and its peak RSS (``VmHWM``).
The exponent ``b`` of ``time ~ a * edges^b`` is the least-squares slope in log-log space over all
configs of a method. Writes ``benchmarks/results/scaling.json``, ``<out>.md`` (a table) and
``<out>.svg`` (a log-log plot, with matplotlib when it is installed: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import peak_rss_mb, run_child, save  # noqa: E402

SCRIPT = Path(__file__).resolve()
VOCAB = 512
DEPTHS = ((2, 128, 4), (4, 128, 4), (8, 128, 4), (16, 128, 4))  # (layers, d_model, heads)
WIDTHS = ((4, 64, 2), (4, 128, 4), (4, 256, 8), (4, 512, 16))


def _experiment(layers: int, width: int, heads: int, prompts: int, tokens: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from circuits.tasks.base import TokenizedTask
    from graphs.adapters import build_spec

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (prompts, tokens), generator=gen)  # [N, T]
    corrupted = torch.randint(0, VOCAB, (prompts, tokens), generator=gen)
    answers = torch.randint(0, VOCAB, (prompts, 1), generator=gen)
    task = TokenizedTask("random", clean, corrupted, torch.full((prompts,), tokens), answers, (answers + 1) % VOCAB,
                         torch.full((prompts,), tokens - 1))
    return Experiment(build_spec(model), task, make_metric("logit_diff"), batch_size=prompts)


def child(args: argparse.Namespace) -> None:
    import torch

    from circuits.methods.eap import eap
    from circuits.methods.patching import edge_patching

    torch.set_num_threads(args.threads)
    exp = _experiment(args.layers, args.width, args.heads, args.prompts, args.tokens)
    warm = _experiment(args.layers, args.width, args.heads, 1, args.tokens)
    run = {"eap": lambda e: eap(e), "edge-patching": lambda e: edge_patching(e)}[args.method]
    if args.method == "eap":
        run(warm)  # first-call costs (allocator, kernels) out of the measurement
    start = time.perf_counter()
    run(exp)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "edges": exp.spec.graph.n_edges}))


def fit_exponent(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in (("eap", "o"), ("edge-patching", "s")):
        for sweep, style in (("depth", "-"), ("width", "--")):
            sel = sorted((r for r in rows if r["method"] == method and r["sweep"] == sweep), key=lambda r: r["edges"])
            label = f"{method}, {sweep}"
            axes[0].plot([r["edges"] for r in sel], [r["seconds"] for r in sel], style, marker=marker, label=label)
            axes[1].plot([r["edges"] for r in sel], [r["peak_rss_mb"] for r in sel], style, marker=marker, label=label)
    for ax, what in zip(axes, ("seconds", "peak RSS (MB)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edges")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("EAP and edge patching on random GPT-2 configs (1 thread)")
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/scaling"))
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--method", default="eap")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows: list[dict] = []
    common = ["--prompts", str(args.prompts), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    for sweep, configs in (("depth", DEPTHS), ("width", WIDTHS)):
        for layers, width, heads in configs:
            for method in ("eap", "edge-patching"):
                shape = ["--layers", str(layers), "--width", str(width), "--heads", str(heads)]
                result = run_child(SCRIPT, ["--method", method, *shape, *common])
                row = {"sweep": sweep, "method": method, "layers": layers, "width": width, "heads": heads, **result}
                rows.append(row)
                print(f"{sweep:5s} L={layers:2d} d={width:3d} H={heads:2d} {method:13s} {row['edges']:6d} edges "
                      f"{row['seconds']:8.2f} s {row['peak_rss_mb']:7.0f} MB", flush=True)
    exponents = {
        method: {
            "time": fit_exponent([(r["edges"], r["seconds"]) for r in rows if r["method"] == method]),
            **{
                f"time_{sweep}": fit_exponent(
                    [(r["edges"], r["seconds"]) for r in rows if r["method"] == method and r["sweep"] == sweep]
                )
                for sweep in ("depth", "width")
            },
        }
        for method in ("eap", "edge-patching")
    }
    record = {"prompts": args.prompts, "tokens": args.tokens, "threads": args.threads, "rows": rows, "exponents": exponents}
    path = save("scaling", record)
    lines = ["| sweep | layers | d_model | heads | edges | EAP s | EAP peak MB | edge patching s | edge patching peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "eap":
            continue
        ep = next(x for x in rows if x["method"] == "edge-patching" and x["sweep"] == r["sweep"]
                  and (x["layers"], x["width"]) == (r["layers"], r["width"]))
        lines.append(f"| {r['sweep']} | {r['layers']} | {r['width']} | {r['heads']} | {r['edges']:,} | {r['seconds']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {ep['seconds']:.1f} | {ep['peak_rss_mb']:.0f} |")
    lines.append("")
    for method, e in exponents.items():
        lines.append(f"- {method}: time ~ edges^{e['time']:.2f} over all configs "
                     f"(depth sweep {e['time_depth']:.2f}, width sweep {e['time_width']:.2f})")
    header = [
        "# Scaling: EAP and edge patching against model size",
        "",
        f"`python benchmarks/scaling.py` (random GPT-2 configs, {args.prompts} prompts x {args.tokens} tokens, "
        f"{args.threads} torch thread(s), every run in a fresh child process). Peak RSS includes the ~0.4 GB "
        "of the interpreter with torch and transformers imported. Plot: [scaling.svg](scaling.svg).",
        "",
    ]
    table = "\n".join(header + lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table)
    drew = plot(rows, args.out.with_suffix(".svg"))
    print(table)
    print(f"written to {path}, {args.out.with_suffix('.md')}" + (f", {args.out.with_suffix('.svg')}" if drew else ""))


if __name__ == "__main__":
    main()
