"""``circuits query CIRCUIT.json nodes|edges|paths|stats``: ask a circuit file questions.

Every subcommand is a thin wrapper over a ``graphs.circuit.Circuit`` query (docs/query.md) and
takes ``--json``. The circuit is read by each subcommand, not by the group, so
``circuits query FILE SUBCOMMAND --help`` works before the file exists.
"""

from __future__ import annotations

import json
import math
from typing import Any

import click

from cli.errors import CircuitsGroup
from cli.options import (
    InputError,
    bad_input,
    circuit_argument,
    echo_json,
    json_option,
    read_circuit,
)

KINDS = ("input", "head", "mlp", "logits")


def _circuit(ctx: click.Context) -> Any:
    return read_circuit(ctx.obj["circuit"])


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _edge_row(edge: Any, score: float | None) -> dict[str, Any]:
    slot = edge.receiver.slot
    return {"edge": str(edge), "sender": str(edge.sender), "receiver": str(edge.receiver.node),
            "slot": None if slot is None else slot.value, "score": score}


@click.group(cls=CircuitsGroup)
@circuit_argument
@click.pass_context
def query(ctx: click.Context, circuit: str) -> None:
    """Ask a circuit file about its nodes, edges, paths and statistics.

    \b
    Node ids: input, a<layer>.h<head> (attention head), m<layer> (MLP), logits; a head's input
    slots are a3.h2<q>, a3.h2<k>, a3.h2<v>. Every subcommand takes --json. Reads our circuit JSON
    and MIB / EAP-IG JSON.

    \b
    Examples:
      circuits query runs/ioi/circuit.json stats
      circuits query runs/ioi/circuit.json nodes --kind head --layer 3
      circuits query runs/ioi/circuit.json edges --into a9.h9 --top 20
      circuits query runs/ioi/circuit.json edges --from a3.h2 --json
      circuits query runs/ioi/circuit.json paths --from input --to logits --limit 10
    """
    ctx.ensure_object(dict)
    ctx.obj["circuit"] = circuit


# --------------------------------------------------------------------------- nodes
@query.command()
@click.option("--kind", type=click.Choice(KINDS), help="Only nodes of this kind.")
@click.option("--layer", type=click.IntRange(min=0), help="Only nodes of this layer (input and logits have none).")
@json_option
@click.pass_context
def nodes(ctx: click.Context, kind: str | None, layer: int | None, as_json: bool) -> None:
    """List the circuit's nodes (those its edges touch) with their in- and out-degree.

    \b
    Degrees count circuit edges; a head's in-degree counts its q, k and v edges.

    \b
    Examples:
      circuits query runs/ioi/circuit.json nodes
      circuits query runs/ioi/circuit.json nodes --kind head --layer 3 --json
    """
    found = _circuit(ctx)
    chosen = found.nodes_by(kind, layer)
    degree_in: dict[str, int] = {}
    degree_out: dict[str, int] = {}
    for edge in found.edges():
        degree_out[str(edge.sender)] = degree_out.get(str(edge.sender), 0) + 1
        degree_in[str(edge.receiver.node)] = degree_in.get(str(edge.receiver.node), 0) + 1
    rows = [{"id": str(n), "kind": n.kind.value, "layer": n.layer, "head": n.head,
             "in_edges": degree_in.get(str(n), 0), "out_edges": degree_out.get(str(n), 0)} for n in chosen]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no nodes match")
        return
    width = max(6, *(len(r["id"]) for r in rows))
    click.echo(f"{'node':<{width}}  {'kind':<6}  {'layer':>5}  {'head':>4}  {'in':>5}  {'out':>5}")
    for r in rows:
        layer_text = "-" if r["layer"] is None else str(r["layer"])
        head_text = "-" if r["head"] is None else str(r["head"])
        click.echo(f"{r['id']:<{width}}  {r['kind']:<6}  {layer_text:>5}  {head_text:>4}  "
                   f"{r['in_edges']:>5}  {r['out_edges']:>5}")
    click.echo(f"{len(rows)} nodes")


# --------------------------------------------------------------------------- edges
@query.command()
@click.option("--into", "into", metavar="NODE", help="Edges into this node (all its slots) or one slot (a9.h9<q>).")
@click.option("--from", "source", metavar="NODE", help="Edges out of this node.")
@click.option("--top", type=click.IntRange(min=0), metavar="N", help="Only the N edges with the highest |score|.")
@click.option("--signed", is_flag=True, help="With --top: rank by signed score (highest first), not |score|.")
@json_option
@click.pass_context
def edges(ctx: click.Context, into: str | None, source: str | None, top: int | None, signed: bool,
          as_json: bool) -> None:
    """List circuit edges with their scores, optionally into / out of a node, or the top N.

    \b
    Without --top, edges come in graph order (by receiver, then sender); with --top, by |score|
    (ties in graph order). Remember the sign convention: an edge's score is the change of the
    metric when it is ablated, so edges the behaviour relies on are negative (docs/metrics.md).

    \b
    Examples:
      circuits query runs/ioi/circuit.json edges --top 20
      circuits query runs/ioi/circuit.json edges --into a9.h9
      circuits query runs/ioi/circuit.json edges --into 'a9.h9<q>' --from a3.h2 --json
    """
    found = _circuit(ctx)
    if (top is not None or signed) and found.scores is None:
        raise InputError(f"{ctx.obj['circuit']} has no scores; --top and --signed need them")
    with bad_input():
        if into is None and source is None:
            rows = found.top_edges(top, absolute=not signed) if top is not None else [
                (e, found.score_of(e)) for e in found.edges()]
        else:
            rows = found.in_edges(into) if into is not None else found.out_edges(source)
            if into is not None and source is not None:
                wanted = {str(e) for e, _ in found.out_edges(source)}
                rows = [(e, s) for e, s in rows if str(e) in wanted]
            if top is not None:
                order = sorted(range(len(rows)), key=lambda i: (-(rows[i][1] if signed else abs(rows[i][1])), i))
                rows = [rows[i] for i in order[:top]]
    table = [_edge_row(e, s) for e, s in rows]
    if as_json:
        echo_json(table)
        return
    if not table:
        click.echo("no edges match")
        return
    width = max(len(r["edge"]) for r in table)
    for r in table:
        click.echo(f"{r['edge']:<{width}}  {_score(r['score']):>12}")
    click.echo(f"{len(table)} edges")


# --------------------------------------------------------------------------- paths
@query.command()
@click.option("--from", "source", default="input", show_default=True, metavar="NODE", help="Start node.")
@click.option("--to", "target", default="logits", show_default=True, metavar="NODE", help="End node.")
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True,
              help="List at most this many paths (their number can grow exponentially).")
@json_option
@click.pass_context
def paths(ctx: click.Context, source: str, target: str, limit: int, as_json: bool) -> None:
    """List simple paths through the circuit between two nodes.

    \b
    A path may enter a head through any of its q/k/v slots; each node sequence is listed once.
    Paths come in depth-first order (deterministic for a given circuit).

    \b
    Examples:
      circuits query runs/ioi/circuit.json paths
      circuits query runs/ioi/circuit.json paths --from a0.h1 --to a9.h9 --limit 50 --json
    """
    found = _circuit(ctx)
    listed = found.paths(source, target, limit=limit + 1)
    truncated = len(listed) > limit
    listed = [[str(n) for n in path] for path in listed[:limit]]
    if as_json:
        echo_json({"from": source, "to": target, "limit": limit, "truncated": truncated, "paths": listed})
        return
    for path in listed:
        click.echo(" -> ".join(path))
    if not listed:
        click.echo(f"no path from {source} to {target} in the circuit")
    elif truncated:
        click.echo(f"first {limit} paths (there are more; raise --limit)")
    else:
        click.echo(f"{len(listed)} paths")


# --------------------------------------------------------------------------- stats
def circuit_stats(found: Any) -> dict[str, Any]:
    """Counts by kind and layer, a score summary and the provenance of a circuit."""
    g = found.graph
    nodes_found = found.nodes()
    by_kind = dict.fromkeys(KINDS, 0)
    by_layer: dict[str, dict[str, int]] = {str(layer): {"heads": 0, "mlps": 0, "edges_in": 0} for layer in range(g.n_layers)}
    for n in nodes_found:
        by_kind[n.kind.value] += 1
        if n.layer is not None:
            by_layer[str(n.layer)]["heads" if n.kind.value == "head" else "mlps"] += 1
    into = {"q": 0, "k": 0, "v": 0, "mlp": 0, "logits": 0}
    out_of = {"input": 0, "head": 0, "mlp": 0}
    for edge in found.edges():
        receiver = edge.receiver
        into[receiver.slot.value if receiver.slot is not None else receiver.node.kind.value] += 1
        out_of[edge.sender.kind.value] += 1
        if receiver.node.layer is not None:
            by_layer[str(receiver.node.layer)]["edges_in"] += 1
    scores = None
    if found.scores is not None:
        every = found.scores.values[g.edge_mask].double()
        chosen = found.scores.values[found.in_circuit].double()
        total_abs = float(every.abs().sum())
        n = int(chosen.numel())
        scores = {
            "method": found.scores.method,
            "count": n,
            "sum": float(chosen.sum()),
            "mean": float(chosen.mean()) if n else None,
            "mean_abs": float(chosen.abs().mean()) if n else None,
            "min": float(chosen.min()) if n else None,
            "max": float(chosen.max()) if n else None,
            "positive": int((chosen > 0).sum()),
            "negative": int((chosen < 0).sum()),
            "zero": int((chosen == 0).sum()),
            "abs_share": float(chosen.abs().sum()) / total_abs if total_abs > 0 else None,
        }
    return {
        "graph": {**g.summary()},
        "edges": found.n_edges,
        "edge_fraction": found.edge_fraction,
        "nodes": len(nodes_found),
        "nodes_by_kind": by_kind,
        "layers": by_layer,
        "edges_into": into,
        "edges_from": out_of,
        "scores": scores,
        "provenance": dict(found.provenance),
    }


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _stats_table(s: dict[str, Any]) -> list[str]:
    k, g = s["nodes_by_kind"], s["graph"]
    blocks = "parallel" if g["parallel_residual"] else "sequential"
    lines = [
        (f"circuit  {s['edges']} edges ({100 * s['edge_fraction']:.2f}% of {g['edges']}), {s['nodes']} nodes: "
         f"{k['input']} input, {k['head']} heads, {k['mlp']} MLPs, {k['logits']} logits"),
        f"graph    {g['layers']} layers x {g['heads']} heads, {blocks} blocks",
        "",
        f"{'layer':<6}  {'heads':>5}  {'MLPs':>4}  {'edges in':>8}",
    ]
    for layer, row in s["layers"].items():
        lines.append(f"{layer:<6}  {row['heads']:>5}  {row['mlps']:>4}  {row['edges_in']:>8}")
    lines.append(f"{'logits':<6}  {'':>5}  {'':>4}  {s['edges_into']['logits']:>8}")
    into, out_of = s["edges_into"], s["edges_from"]
    lines += [
        "",
        "edges into  " + "  ".join(f"{key} {value}" for key, value in into.items()),
        f"edges from  input {out_of['input']}  heads {out_of['head']}  MLPs {out_of['mlp']}",
    ]
    sc = s["scores"]
    if sc is None:
        lines.append("scores      none (unscored circuit)")
    else:
        share = "-" if sc["abs_share"] is None else f"{100 * sc['abs_share']:.1f}%"
        lines += [
            (f"scores      {sc['method']}: sum {_number(sc['sum'])}, mean {_number(sc['mean'])}, "
             f"min {_number(sc['min'])}, max {_number(sc['max'])}, mean |score| {_number(sc['mean_abs'])}"),
            (f"            {sc['positive']} positive, {sc['negative']} negative, {sc['zero']} zero; "
             f"{share} of the graph's total |score|"),
        ]
    if s["provenance"]:
        lines += ["", "provenance"]
        width = max(len(key) for key in s["provenance"])
        for key, value in s["provenance"].items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            lines.append(f"  {key:<{width}}  {text}")
    return lines


@query.command()
@json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Edge and node counts by kind and layer, a score summary and the provenance.

    \b
    Examples:
      circuits query runs/ioi/circuit.json stats
      circuits query runs/ioi/circuit.json stats --json | jq .edges_into
    """
    summary = circuit_stats(_circuit(ctx))
    if as_json:
        echo_json(summary)
    else:
        click.echo("\n".join(_stats_table(summary)))
