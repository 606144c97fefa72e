"""``circuits query CIRCUIT.json nodes|edges|paths|stats``: ask a circuit file questions.

Every subcommand is a thin wrapper over a ``graphs.circuit.Circuit`` query (docs/query.md) or, for a
token-position circuit file, the same query of ``graphs.positional.PositionalCircuit`` (ids
``a3.h7@12``; ``--position T`` keeps one token), and takes ``--json``. The circuit is read by each subcommand, not by the group, so
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
    check_position,
    circuit_argument,
    echo_json,
    is_positional,
    json_option,
    position_option,
    read_any_circuit,
)

KINDS = ("input", "head", "mlp", "logits")


def _circuit(ctx: click.Context, position: int | None = None) -> Any:
    """The circuit file of the group (Circuit or PositionalCircuit), ``--position`` checked against it."""
    found = read_any_circuit(ctx.obj["circuit"])
    check_position(found, position, ctx.obj["circuit"])
    return found


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _edge_row(edge: Any, score: float | None) -> dict[str, Any]:
    slot = edge.receiver.slot
    row = {"edge": str(edge), "sender": str(edge.sender), "receiver": str(edge.receiver.node),
           "slot": None if slot is None else slot.value, "score": score}
    if edge.position is not None:
        row["position"] = edge.position
    return row


def _at(node: str | None, position: int | None) -> str | None:
    """A node id given without ``@t`` placed at ``--position`` (positional circuits); else as given."""
    if node is None or position is None or "@" in node:
        return node
    base, slot = (node.split("<", 1) + [""])[:2]
    return f"{base}@{position}" + (f"<{slot}" if slot else "")


@click.group(cls=CircuitsGroup)
@circuit_argument
@click.pass_context
def query(ctx: click.Context, circuit: str) -> None:
    """Ask a circuit file about its nodes, edges, paths and statistics.

    \b
    Node ids: input, a<layer>.h<head> (attention head), m<layer> (MLP), logits; a head's input
    slots are a3.h2<q>, a3.h2<k>, a3.h2<v>. Every subcommand takes --json. Reads our circuit JSON,
    MIB / EAP-IG JSON and token-position circuits (circuits discover --positional): there ids carry
    a token position, a3.h2@12 and a3.h2@12<q>, and nodes / edges / paths / stats take --position T.

    \b
    Examples:
      circuits query runs/ioi/circuit.json stats
      circuits query runs/ioi/circuit.json nodes --kind head --layer 3
      circuits query runs/ioi/circuit.json edges --into a9.h9 --top 20
      circuits query runs/ioi/circuit.json edges --from a3.h2 --json
      circuits query runs/ioi/circuit.json paths --from input --to logits --limit 10
      circuits query runs/pos/circuit.json edges --position 14 --top 10
    """
    ctx.ensure_object(dict)
    ctx.obj["circuit"] = circuit


# --------------------------------------------------------------------------- nodes
@query.command()
@click.option("--kind", type=click.Choice(KINDS), help="Only nodes of this kind.")
@click.option("--layer", type=click.IntRange(min=0), help="Only nodes of this layer (input and logits have none).")
@position_option
@json_option
@click.pass_context
def nodes(ctx: click.Context, kind: str | None, layer: int | None, position: int | None, as_json: bool) -> None:
    """List the circuit's nodes (those its edges touch) with their in- and out-degree.

    \b
    Degrees count circuit edges; a head's in-degree counts its q, k and v edges. Token-position
    circuits list (component, position) nodes with their token; --position T keeps one token.

    \b
    Examples:
      circuits query runs/ioi/circuit.json nodes
      circuits query runs/ioi/circuit.json nodes --kind head --layer 3 --json
      circuits query runs/pos/circuit.json nodes --kind head --position 14
    """
    found = _circuit(ctx, position)
    positional = is_positional(found)
    chosen = found.nodes_by(kind, layer, position) if positional else found.nodes_by(kind, layer)
    degree_in: dict[str, int] = {}
    degree_out: dict[str, int] = {}
    for edge in found.edges():
        degree_out[str(edge.sender)] = degree_out.get(str(edge.sender), 0) + 1
        degree_in[str(edge.receiver.node)] = degree_in.get(str(edge.receiver.node), 0) + 1
    rows = [{"id": str(n), "kind": n.kind.value, "layer": n.layer, "head": n.head,
             "in_edges": degree_in.get(str(n), 0), "out_edges": degree_out.get(str(n), 0)} for n in chosen]
    if positional:
        for row, n in zip(rows, chosen, strict=True):
            row["position"], row["token"] = n.position, found.tokens[n.position]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no nodes match")
        return
    width = max(6, *(len(r["id"]) for r in rows))
    token_head = "  token" if positional else ""
    click.echo(f"{'node':<{width}}  {'kind':<6}  {'layer':>5}  {'head':>4}  {'in':>5}  {'out':>5}{token_head}")
    for r in rows:
        layer_text = "-" if r["layer"] is None else str(r["layer"])
        head_text = "-" if r["head"] is None else str(r["head"])
        token = f"  {r['token']!r}" if positional else ""
        click.echo(f"{r['id']:<{width}}  {r['kind']:<6}  {layer_text:>5}  {head_text:>4}  "
                   f"{r['in_edges']:>5}  {r['out_edges']:>5}{token}")
    click.echo(f"{len(rows)} nodes")


# --------------------------------------------------------------------------- edges
@query.command()
@click.option("--into", "into", metavar="NODE", help="Edges into this node (all its slots) or one slot (a9.h9<q>).")
@click.option("--from", "source", metavar="NODE", help="Edges out of this node.")
@click.option("--top", type=click.IntRange(min=0), metavar="N", help="Only the N edges with the highest |score|.")
@click.option("--signed", is_flag=True, help="With --top: rank by signed score (highest first), not |score|.")
@position_option
@json_option
@click.pass_context
def edges(ctx: click.Context, into: str | None, source: str | None, top: int | None, signed: bool,
          position: int | None, as_json: bool) -> None:
    """List circuit edges with their scores, optionally into / out of a node, or the top N.

    \b
    Without --top, edges come in graph order (by receiver, then sender); with --top, by |score|
    (ties in graph order). Remember the sign convention: an edge's score is the change of the
    metric when it is ablated, so edges the behaviour relies on are negative (docs/metrics.md).
    Token-position circuits: edges u@t -> r@t in position-major order; --into / --from take
    positional ids (a9.h9@14, or a9.h9 with --position 14); --position T keeps token T.

    \b
    Examples:
      circuits query runs/ioi/circuit.json edges --top 20
      circuits query runs/ioi/circuit.json edges --into a9.h9
      circuits query runs/ioi/circuit.json edges --into 'a9.h9<q>' --from a3.h2 --json
      circuits query runs/pos/circuit.json edges --into a9.h9 --position 14
    """
    found = _circuit(ctx, position)
    positional = is_positional(found)
    if (top is not None or signed) and found.scores is None:
        raise InputError(f"{ctx.obj['circuit']} has no scores; --top and --signed need them")
    into, source = _at(into, position), _at(source, position)
    if positional and any(x is not None and "@" not in x for x in (into, source)):
        raise InputError(f"{ctx.obj['circuit']} is a token-position circuit: give --into / --from with a "
                         "position (a9.h9@14) or pass --position")
    with bad_input():
        if into is None and source is None and positional:
            rows = found.top_edges(top, absolute=not signed, position=position) if top is not None else [
                (e, found.score_of(e)) for e in found.edges(position)]
        elif into is None and source is None:
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
@position_option
@json_option
@click.pass_context
def paths(ctx: click.Context, source: str, target: str, limit: int, position: int | None, as_json: bool) -> None:
    """List simple paths through the circuit between two nodes.

    \b
    A path may enter a head through any of its q/k/v slots; each node sequence is listed once.
    Paths come in depth-first order (deterministic for a given circuit).

    \b
    Token-position circuits: residual edges stay at one token; a path moves to a later token only
    inside a head, from its <k>/<v> input at token t to its output at t' >= t (a1.h0@2 -> a1.h0@5).
    --from / --to without @t mean every token where the node is in the circuit; --position T keeps
    the paths that stay at token T.

    \b
    Examples:
      circuits query runs/ioi/circuit.json paths
      circuits query runs/ioi/circuit.json paths --from a0.h1 --to a9.h9 --limit 50 --json
      circuits query runs/pos/circuit.json paths --from input@3 --to logits
    """
    found = _circuit(ctx, position)
    if is_positional(found):
        with bad_input():
            listed = found.paths(source, target, limit=limit + 1, position=position)
    else:
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
    out = {
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
    if is_positional(found):  # counts above are over (component, position) nodes and positional edges
        per_position = found.in_circuit.flatten(0, 1).sum(0).tolist()  # [T] circuit edges per token
        out["positional"] = {
            "n_positions": found.n_positions,
            "graph_edges": found.n_graph_edges,
            "positions": [{"position": t, "token": found.tokens[t], "edges": int(n)}
                          for t, n in enumerate(per_position) if n],
            "head_positions": found.head_positions(),
        }
    return out


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _stats_table(s: dict[str, Any]) -> list[str]:
    k, g = s["nodes_by_kind"], s["graph"]
    blocks = "parallel" if g["parallel_residual"] else "sequential"
    pos = s.get("positional")
    if pos is None:
        head = (f"circuit  {s['edges']} edges ({100 * s['edge_fraction']:.2f}% of {g['edges']}), {s['nodes']} nodes: "
                f"{k['input']} input, {k['head']} heads, {k['mlp']} MLPs, {k['logits']} logits")
    else:
        head = (f"circuit  {s['edges']} positional edges ({100 * s['edge_fraction']:.3f}% of {pos['graph_edges']}), "
                f"{s['nodes']} (node, position) pairs: {k['input']} input, {k['head']} heads, {k['mlp']} MLPs, "
                f"{k['logits']} logits")
    lines = [
        head,
        f"graph    {g['layers']} layers x {g['heads']} heads, {blocks} blocks"
        + ("" if pos is None else f", {pos['n_positions']} token positions"),
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
    if pos is not None:
        lines += ["", f"{'position':<8}  {'edges':>6}  token"]
        lines += [f"{p['position']:<8}  {p['edges']:>6}  {p['token']!r}" for p in pos["positions"]]
        if s.get("position") is not None:
            lines.append(f"(only position {s['position']})")
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
@position_option
@json_option
@click.pass_context
def stats(ctx: click.Context, position: int | None, as_json: bool) -> None:
    """Edge and node counts by kind and layer, a score summary and the provenance.

    \b
    Token-position circuits count positional edges and (node, position) pairs and add circuit
    edges per token; --position T gives the statistics of token T alone.

    \b
    Examples:
      circuits query runs/ioi/circuit.json stats
      circuits query runs/ioi/circuit.json stats --json | jq .edges_into
      circuits query runs/pos/circuit.json stats --position 14
    """
    found = _circuit(ctx, position)
    if position is not None:
        only = found.in_circuit.clone()
        only[:, :, :position] = False
        only[:, :, position + 1 :] = False
        found = found.with_mask(only)
    summary = circuit_stats(found)
    if position is not None:
        summary["position"] = position
    if as_json:
        echo_json(summary)
    else:
        click.echo("\n".join(_stats_table(summary)))
