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
    is_positional,
    json_option,
    load,
    read_any_circuit,
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
@click.option("--aligned-subset/--all-prompts", "aligned", default=None,
              help="Token-position circuits: keep the largest group of prompts sharing one token alignment. "
                   "Default: as the circuit was found.")
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
    aligned: bool | None,
    as_json: bool,
) -> None:
    """Measure a saved circuit: faithfulness, curve (CPR / CMD) and a random baseline.

    \b
    Faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty)) is a ratio of dataset means
    (docs/evaluation.md). The model, task, prompt count, seed, ablation and metric default to the
    ones recorded in the circuit file, so evaluating a discover run again needs no options; pass
    them to test the circuit elsewhere (more prompts, another seed or ablation). The model must
    have the circuit's computation graph. Accepts our circuit JSON, MIB / EAP-IG JSON and
    token-position circuits (docs/positions.md): those are evaluated with positional masks on prompts
    that share the circuit's token alignment (--aligned-subset as recorded by discover), the random
    baseline draws positional edges and the curve takes top-n positional circuits.

    \b
    Examples:
      circuits evaluate runs/ioi/circuit.json
      circuits evaluate runs/ioi/circuit.json --n-prompts 256 --seed 1 --json
      circuits evaluate runs/ioi/circuit.json --ablation mean --no-curve
      circuits evaluate mib-circuit.json --model smollm2-135m --task ioi
      circuits evaluate runs/ioi/circuit.json --config run.toml --seed 2   # flags override the file
      circuits evaluate runs/pos/circuit.json --n-prompts 64              # token-position circuit
    """
    from circuits.evaluate import (
        faithfulness,
        faithfulness_curve,
        positional_faithfulness,
        positional_faithfulness_curve,
        positional_random_baseline,
        random_baseline,
        reference_metrics,
    )
    from circuits.experiment import Experiment
    from circuits.metrics import make_metric
    from circuits.pipeline import DiscoverySettings, load_task
    from circuits.tasks import available_tasks
    from graphs.adapters import build_spec

    start = time.perf_counter()
    found = read_any_circuit(circuit)
    positional = is_positional(found)
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
    recorded = prov.get("settings") if isinstance(prov.get("settings"), Mapping) else {}
    generated = _from_provenance(recorded, "prompts_generated", int) if positional else None
    n_prompts = n_prompts or generated or _from_provenance(prov, "n_prompts", int, 32)
    seed = seed if seed is not None else _from_provenance(prov, "seed", int, 0)
    ablation = ablation or _from_provenance(prov, "ablation", str, "corrupted")
    metric = metric or _from_provenance(prov, "metric", str, "logit_diff")
    if positional and selection == "greedy":
        raise InputError("token-position circuits have top-n curves only; drop --selection greedy")
    selection = "top-n" if positional else selection or _curve_selection(prov)
    if aligned is not None and not positional:
        raise InputError(f"{circuit} is not a token-position circuit; --aligned-subset / --all-prompts need one")
    aligned = bool(aligned if aligned is not None else _from_provenance(recorded, "aligned_subset", bool, False))
    batch_size = batch_size or _from_provenance(recorded, "batch_size", int, 16)

    loaded = load(model)
    spec = build_spec(loaded.model)
    check_same_graph(found.graph, spec.graph, f"the circuit in {circuit}", f"model {model!r}")
    settings = DiscoverySettings(model=model, task=task or "ioi", task_file=task_file, n_prompts=n_prompts, seed=seed,
                                 ablation=ablation, metric=metric, batch_size=batch_size)
    tokenized = load_task(settings, loaded)
    alignment = None
    if positional:
        tokenized, alignment = _aligned(tokenized, aligned, found, circuit, loaded.tokenizer)
    experiment = Experiment(spec, tokenized, make_metric(metric), ablation=ablation, batch_size=batch_size)

    kind = "positional edges" if positional else "edges"
    click.echo(f"evaluating {found.n_edges} {kind} on {len(tokenized)} prompts of {tokenized.name} "
               f"({ablation} ablation, {metric})", err=True)
    base = reference_metrics(experiment)
    faith = positional_faithfulness(experiment, found, base) if positional else faithfulness(experiment, found, base)
    rand = None
    if random_samples:
        click.echo(f"random baseline: {random_samples} circuits of {found.n_edges} {kind}", err=True)
        if positional:
            rand = positional_random_baseline(experiment, found.n_edges, found.tokens, samples=random_samples, seed=seed,
                                              baseline=base)
        else:
            rand = random_baseline(experiment, found.n_edges, samples=random_samples, seed=seed, baseline=base)
    result_curve = None
    if curve and found.scores is not None:
        click.echo("faithfulness curve at 10 edge fractions", err=True)
        if positional:
            result_curve = positional_faithfulness_curve(experiment, found.scores, baseline=base)
        else:
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
        "graph_edges": found.n_graph_edges if positional else found.graph.n_edges,
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
    if alignment is not None:
        report["positional"] = {
            "n_positions": alignment.length,
            "read_position": alignment.read_position,
            "aligned_subset": aligned,
            "same_tokens": tuple(alignment.tokens) == tuple(found.tokens),
        }
    if as_json:
        echo_json(report)
    else:
        click.echo("\n".join(_table(report)))


def _aligned(task: Any, aligned: bool, found: Any, path: str, tokenizer: Any) -> tuple[Any, Any]:
    """The prompts a token-position circuit is evaluated on (the largest aligned group with
    ``aligned``) and their alignment; InputError when they do not fit the circuit's positions."""
    from circuits.positional import AlignmentError, aligned_subset, check_alignment

    if aligned:
        task = aligned_subset(task)
    try:
        alignment = check_alignment(task, tokenizer)
    except AlignmentError as err:
        raise InputError(f"{err}; here: pass --aligned-subset") from None
    if alignment.length != found.n_positions:
        raise InputError(f"{path} has {found.n_positions} token positions but the prompts have {alignment.length} "
                         "tokens; evaluate it on prompts of its own template and length")
    return task, alignment


def _positions_line(pos: dict[str, Any]) -> str:
    differs = "" if pos["same_tokens"] else " (the first prompt's tokens differ from the circuit's)"
    return f"positions    {pos['n_positions']} tokens, metric read at {pos['read_position']}{differs}"


def _table(r: dict[str, Any]) -> list[str]:
    f = r["faithfulness"]
    same = {None: "", True: ", the circuit's own prompts", False: ", not the prompts the circuit was found on"}
    pos = r.get("positional")
    what = "edges" if pos is None else "positional edges"
    nodes = "nodes" if pos is None else "(node, position) pairs"
    lines = [
        (f"circuit      {r['circuit']}: {r['edges']} {what} ({100 * r['edge_fraction']:.2f}% of {r['graph_edges']}), "
         f"{r['nodes']} {nodes}: {r['heads']} heads, {r['mlps']} MLPs"),
        f"evaluated on {r['task']} ({r['model']}, {r['n_prompts']} prompts, seed {r['seed']}{same[r['same_dataset']]})",
        f"             {r['ablation']} ablation, metric {r['metric']}",
        *([] if pos is None else [_positions_line(pos)]),
        (f"faithfulness {f['value']:.3f}   m(C) {f['m_circuit']:.4g}, m(full) {f['m_full']:.4g}, "
         f"m(empty) {f['m_empty']:.4g}"),
    ]
    rand = r["random_baseline"]
    if rand is not None:
        lines.append(f"random       {rand['mean']:.3f} +- {rand['std']:.3f} "
                     f"({len(rand['values'])} random circuits of {rand['n_edges']} {what})")
    c = r["curve"]
    if c is not None:
        lines.append(f"curve        CPR {c['cpr']:.3f}   CMD {c['cmd']:.3f}   ({c['selection']} circuits of the scores)")
        lines.append("             " + "  ".join(f"{100 * x:g}%: {v:.2f}" for x, v in zip(c["fractions"], c["faithfulness"],
                                                                                    strict=True)))
    lines.append(f"time         {r['seconds']:.1f} s")
    return lines
