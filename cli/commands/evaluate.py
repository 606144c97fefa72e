"""``circuits evaluate``: faithfulness of a saved circuit, its scores' curve and a random baseline."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import click

from cli.commands.discover import ABLATIONS, METRICS
from cli.options import (
    InputError,
    check_same_graph,
    circuit_argument,
    config_option,
    echo_json,
    json_option,
    load,
)

SELECTIONS = ("top-n", "greedy")


def _from_provenance(prov: Mapping[str, Any], key: str, kind: type, fallback: Any = None) -> Any:
    """``prov[key]`` when it is a ``kind`` (not a bool posing as an int), else ``fallback``."""
    value = prov.get(key)
    if value is None or isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        return fallback
    return value


def _curve_selection(prov: Mapping[str, Any]) -> str:
    settings = prov.get("settings")
    chosen = settings.get("selection") if isinstance(settings, Mapping) else None
    return chosen if chosen in SELECTIONS else "top-n"


@click.command()
@config_option
@circuit_argument
@click.option("--model", "-m", metavar="NAME",
              help="Alias, local folder, .gguf file or hub id. Default: the model named in the circuit file.")
@click.option("--task", "-t", help="Built-in task (see `circuits tasks`). Default: the circuit's task.")
@click.option("--task-file", type=click.Path(dir_okay=False), help="A JSONL/CSV task file instead of --task.")
@click.option("--n-prompts", type=click.IntRange(min=1), help="Prompts to generate. Default: as many as the circuit's.")
@click.option("--seed", type=int, help="Seed of the prompts and the random circuits. Default: the circuit's.")
@click.option("--ablation", type=click.Choice(ABLATIONS), help="What an ablated edge carries. Default: the circuit's.")
@click.option("--metric", type=click.Choice(METRICS), help="Default: the circuit's metric.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Prompts per forward pass. Default: the circuit's (else 16); only speed and memory depend on it.")
@click.option("--curve/--no-curve", default=True, show_default=True,
              help="Faithfulness curve of the circuit's scores at 10 edge fractions, with CPR / CMD "
                   "(needs a scored circuit).")
@click.option("--selection", type=click.Choice(SELECTIONS),
              help="How the curve's circuits are picked from the scores. Default: the circuit's selection.")
@click.option("--random-samples", type=click.IntRange(min=0), default=5, show_default=True,
              help="Random circuits of the same size for the baseline (0: none).")
@json_option
def evaluate(
    circuit: str,
    model: str | None,
    task: str | None,
    task_file: str | None,
    n_prompts: int | None,
    seed: int | None,
    ablation: str | None,
    metric: str | None,
    batch_size: int | None,
    curve: bool,
    selection: str | None,
    random_samples: int,
    as_json: bool,
) -> None:
    """Measure a saved circuit: faithfulness, curve (CPR / CMD) and a random baseline.

    \b
    Faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty)) is a ratio of dataset means
    (docs/evaluation.md). The model, task, prompt count, seed, ablation and metric default to the
    ones recorded in the circuit file, so evaluating a discover run again needs no options; pass
    them to test the circuit elsewhere (more prompts, another seed or ablation). The model must
    have the circuit's computation graph. Accepts our circuit JSON and MIB / EAP-IG JSON.

    \b
    Examples:
      circuits evaluate runs/ioi/circuit.json
      circuits evaluate runs/ioi/circuit.json --n-prompts 256 --seed 1 --json
      circuits evaluate runs/ioi/circuit.json --ablation mean --no-curve
      circuits evaluate mib-circuit.json --model smollm2-135m --task ioi
      circuits evaluate runs/ioi/circuit.json --config run.toml --seed 2   # flags override the file
    """
    from circuits.evaluate import (
        faithfulness,
        faithfulness_curve,
        random_baseline,
        reference_metrics,
    )
    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from circuits.pipeline import DiscoverySettings, load_task
    from circuits.tasks import available_tasks
    from cli.options import read_circuit
    from graphs.adapters import build_spec

    start = time.perf_counter()
    found = read_circuit(circuit)
    prov = found.provenance
    model = model or _from_provenance(prov, "model", str)
    if model is None:
        raise InputError(f"{circuit} does not record its model; pass --model")
    recorded_task = _from_provenance(prov, "task", str)
    if task_file is None and task is None:
        if recorded_task is None:
            raise InputError(f"{circuit} does not record its task; pass --task or --task-file")
        if recorded_task not in available_tasks():
            raise InputError(
                f"{circuit} was found on task {recorded_task!r}, which is not a built-in task (a task file?); "
                "pass --task-file FILE or --task NAME"
            )
        task = recorded_task
    n_prompts = n_prompts or _from_provenance(prov, "n_prompts", int, 32)
    seed = seed if seed is not None else _from_provenance(prov, "seed", int, 0)
    ablation = ablation or _from_provenance(prov, "ablation", str, "corrupted")
    metric = metric or _from_provenance(prov, "metric", str, "logit_diff")
    selection = selection or _curve_selection(prov)
    recorded = prov.get("settings") if isinstance(prov.get("settings"), Mapping) else {}
    batch_size = batch_size or _from_provenance(recorded, "batch_size", int, 16)

    loaded = load(model)
    spec = build_spec(loaded.model)
    check_same_graph(found.graph, spec.graph, f"the circuit in {circuit}", f"model {model!r}")
    settings = DiscoverySettings(model=model, task=task or "ioi", task_file=task_file, n_prompts=n_prompts, seed=seed,
                                 ablation=ablation, metric=metric, batch_size=batch_size)
    tokenized = load_task(settings, loaded)
    experiment = Experiment(spec, tokenized, make_metric(metric), ablation=ablation, batch_size=batch_size)

    click.echo(f"evaluating {found.n_edges} edges on {len(tokenized)} prompts of {tokenized.name} "
               f"({ablation} ablation, {metric})", err=True)
    base = reference_metrics(experiment)
    faith = faithfulness(experiment, found, base)
    rand = None
    if random_samples:
        click.echo(f"random baseline: {random_samples} circuits of {found.n_edges} edges", err=True)
        rand = random_baseline(experiment, found.n_edges, samples=random_samples, seed=seed, baseline=base)
    result_curve = None
    if curve and found.scores is not None:
        click.echo("faithfulness curve at 10 edge fractions", err=True)
        result_curve = faithfulness_curve(experiment, found.scores, baseline=base, selection=selection)
    elif curve and not as_json:
        click.echo("no curve: the circuit has no scores", err=True)

    recorded_hash = _from_provenance(prov, "dataset_sha256", str)
    dataset = tokenized.dataset_hash()
    nodes = found.nodes()
    report: dict[str, Any] = {
        "circuit": circuit,
        "model": model,
        "task": tokenized.name,
        "task_file": task_file,
        "n_prompts": len(tokenized),
        "seed": seed,
        "ablation": ablation,
        "metric": metric,
        "dataset_sha256": dataset,
        "same_dataset": None if recorded_hash is None else recorded_hash == dataset,
        "edges": found.n_edges,
        "edge_fraction": found.edge_fraction,
        "graph_edges": found.graph.n_edges,
        "nodes": len(nodes),
        "heads": sum(1 for n in nodes if n.kind.value == "head"),
        "mlps": sum(1 for n in nodes if n.kind.value == "mlp"),
        "faithfulness": asdict(faith),
        "recorded_faithfulness": _from_provenance(prov, "faithfulness", float),
        "random_baseline": None if rand is None else {
            "n_edges": rand.n_edges, "values": list(rand.values), "mean": rand.mean, "std": rand.std, "seed": rand.seed,
        },
        "curve": None if result_curve is None else {
            "fractions": list(result_curve.fractions), "n_edges": list(result_curve.n_edges),
            "faithfulness": list(result_curve.values), "cpr": result_curve.cpr, "cmd": result_curve.cmd,
            "selection": result_curve.selection,
        },
        "seconds": time.perf_counter() - start,
    }
    if as_json:
        echo_json(report)
    else:
        click.echo("\n".join(_table(report)))


def _table(r: dict[str, Any]) -> list[str]:
    f = r["faithfulness"]
    same = {None: "", True: ", the circuit's own prompts", False: ", not the prompts the circuit was found on"}
    lines = [
        (f"circuit      {r['circuit']}: {r['edges']} edges ({100 * r['edge_fraction']:.2f}% of {r['graph_edges']}), "
         f"{r['nodes']} nodes: {r['heads']} heads, {r['mlps']} MLPs"),
        f"evaluated on {r['task']} ({r['model']}, {r['n_prompts']} prompts, seed {r['seed']}{same[r['same_dataset']]})",
        f"             {r['ablation']} ablation, metric {r['metric']}",
        (f"faithfulness {f['value']:.3f}   m(C) {f['m_circuit']:.4g}, m(full) {f['m_full']:.4g}, "
         f"m(empty) {f['m_empty']:.4g}"),
    ]
    rand = r["random_baseline"]
    if rand is not None:
        lines.append(f"random       {rand['mean']:.3f} +- {rand['std']:.3f} "
                     f"({len(rand['values'])} random circuits of {rand['n_edges']} edges)")
    c = r["curve"]
    if c is not None:
        lines.append(f"curve        CPR {c['cpr']:.3f}   CMD {c['cmd']:.3f}   ({c['selection']} circuits of the scores)")
        lines.append("             " + "  ".join(f"{100 * x:g}%: {v:.2f}" for x, v in zip(c["fractions"], c["faithfulness"],
                                                                                    strict=True)))
    lines.append(f"time         {r['seconds']:.1f} s")
    return lines
