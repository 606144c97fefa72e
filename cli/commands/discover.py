"""``circuits discover``: find a circuit and write circuit.json, scores.safetensors, circuit.svg, curve.json."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cli.options import config_option, echo_json, json_option

METHOD_NAMES = ("edge-patching", "path-patching", "acdc", "eap", "eap-ig", "atp*", "cdt")
ABLATIONS = ("corrupted", "mean", "positional-mean", "zero")
METRICS = ("logit_diff", "prob_diff", "logprob", "kl")


@click.command()
@config_option
@click.option("--model", "-m", default="smollm2-135m", show_default=True, metavar="NAME",
              help="Alias, local folder, .gguf file or hub id (see `circuits models`).")
@click.option("--task", "-t", default="ioi", show_default=True, help="Built-in task (see `circuits tasks`).")
@click.option("--task-file", type=click.Path(dir_okay=False), help="A JSONL/CSV task file instead of --task.")
@click.option("--method", type=click.Choice(METHOD_NAMES), default="eap-ig", show_default=True,
              help="How edges are scored (see docs/methods/).")
@click.option("--edges", type=click.IntRange(min=1), help="Keep this many top-scoring edges.")
@click.option("--threshold", type=float, help="Keep edges whose |score| is at least this.")
@click.option("--target-faithfulness", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Smallest circuit reaching this faithfulness (used unless --edges/--threshold).")
@click.option("--selection", type=click.Choice(("top-n", "greedy")), default="top-n", show_default=True,
              help="Rank edges globally, or grow greedily from the logits.")
@click.option("--ablation", type=click.Choice(ABLATIONS), default="corrupted", show_default=True,
              help="What an ablated edge carries.")
@click.option("--metric", type=click.Choice(METRICS), help="Default: kl for acdc, logit_diff otherwise.")
@click.option("--n-prompts", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated prompts and baselines.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="EAP-IG interpolation steps.")
@click.option("--ig-variant", type=click.Choice(("inputs", "activations")), default="inputs", show_default=True)
@click.option("--tau", type=click.FloatRange(min=0), default=0.01, show_default=True, help="ACDC threshold.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Path-patching search: senders kept per slot.")
@click.option("--positional", is_flag=True,
              help="Token-position circuit (eap, eap-ig, edge-patching, cdt): nodes a3.h7@12; see docs/positions.md.")
@click.option("--aligned-subset", is_flag=True,
              help="With --positional: keep the largest group of prompts sharing one token alignment.")
@click.option("--no-curve", is_flag=True, help="Skip the faithfulness curve (saves time).")
@click.option("--no-svg", is_flag=True, help="Do not render circuit.svg.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default="runs/discover", show_default=True)
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from the progress files in --out (same settings, model and data).")
@click.option("--distributed", is_flag=True,
              help="Data-parallel run under torchrun: each rank scores a shard of the prompts, rank 0 writes.")
@json_option
def discover(out_dir: str, no_curve: bool, no_svg: bool, as_json: bool, resume: bool, distributed: bool,
             **options: object) -> None:
    """Find the minimal circuit of a model on a task.

    \b
    Writes OUT/circuit.json (the circuit with scores and provenance), OUT/scores.safetensors (the
    [senders, receivers] score matrix), OUT/circuit.svg and OUT/curve.json (faithfulness curve,
    CPR/CMD, random baseline, the minimal-circuit search), then prints a summary.

    \b
    Long runs keep their progress in OUT/progress/ (written atomically); after a crash or a kill,
    the same command with --resume continues where it stopped. Without --resume, existing progress
    in OUT is an error. Outputs replace old ones only once all of them are complete.

    \b
    Examples:
      circuits discover --out runs/ioi                       # SmolLM2-135M, IOI, EAP-IG, f >= 0.9
      circuits discover --method edge-patching --edges 200 --out runs/ep
      circuits discover --method acdc --tau 0.05 --model ./tiny-gpt2 --out runs/acdc
      circuits discover --config run.toml --n-prompts 64    # flags override the file
      circuits discover --method edge-patching --edges 200 --out runs/ep --resume   # after a crash
      torchrun --nproc_per_node 2 -m cli.main discover --distributed --method eap --out runs/dp
      circuits discover --positional --method eap --aligned-subset --edges 300 --out runs/pos
    """
    from circuits import distributed as dp
    from circuits.pipeline import DiscoverySettings, check_progress, run

    start = time.perf_counter()
    settings = DiscoverySettings(curve=not no_curve, **options)  # type: ignore[arg-type]
    settings.rule()  # fail fast on conflicting selection flags
    check_progress(out_dir, resume)  # ... and on a run directory holding another run's progress
    world = dp.init_from_env() if distributed else dp.SINGLE
    try:
        done = run(settings, Path(out_dir), resume=resume, world=world, svg=not no_svg, progress=world.is_root)
    finally:
        if distributed:
            dp.shutdown()
    if done is None:  # a rank other than 0: rank 0 reports
        return
    result, paths = done
    summary = result.summary()
    summary["files"] = {k: str(v) for k, v in paths.items()}
    summary["seconds"]["total"] = time.perf_counter() - start
    if as_json:
        echo_json(summary)
        return
    click.echo(f"{result.settings.method} on {result.settings.task if result.settings.task_file is None else result.settings.task_file}"
               f" ({result.circuit.provenance.get('model')}, {result.circuit.provenance.get('n_prompts')} prompts)")
    if summary.get("positional"):
        click.echo(f"circuit      {result.circuit.describe()}")
        click.echo(f"heads        {summary['heads']} head-position nodes, {summary['heads_at_read_position']} at the "
                   f"read position {summary['read_position']}")
        click.echo(f"faithfulness {summary['faithfulness']:.3f}")
        for path in summary["files"].values():
            click.echo(f"wrote        {path}")
        return
    click.echo(f"circuit      {summary['edges']} edges ({100 * summary['edge_fraction']:.2f}% of "
               f"{result.circuit.graph.n_edges}), {summary['nodes']} nodes: {summary['heads']} heads, {summary['mlps']} MLPs")
    click.echo(f"faithfulness {summary['faithfulness']:.3f}   (random circuit of the same size: "
               f"{summary['random_faithfulness']:.3f})")
    if summary["cpr"] is not None:
        click.echo(f"curve        CPR {summary['cpr']:.3f}   CMD {summary['cmd']:.3f}")
    s = summary["seconds"]
    click.echo(f"time         {s['total']:.1f} s (load {s['load']:.1f}, scores {s['scores']:.1f}, "
               f"evaluate {s['evaluate']:.1f})")
    for path in summary["files"].values():
        click.echo(f"wrote        {path}")
