"""``circuits export``: write a circuit file as GraphML, GEXF, MIB / EAP-IG JSON, node-link JSON or our JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.options import (
    InputError,
    bad_input,
    circuit_argument,
    echo_json,
    is_positional,
    json_option,
    read_any_circuit,
)

FORMATS = ("graphml", "gexf", "mib-json", "node-link", "json")
_BY_SUFFIX = {".graphml": "graphml", ".gexf": "gexf"}


@click.command()
@circuit_argument
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS),
              help="Output format (default: from the suffix of --out, for .graphml and .gexf).")
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Output file (written atomically).")
@click.option("--d-model", type=click.IntRange(min=1),
              help="mib-json: the model's residual width, when the circuit file does not record it.")
@click.option("--collapse", is_flag=True,
              help="mib-json of a token-position circuit: write its collapse (edges in at any position, "
                   "scores summed over positions); MIB has no positions.")
@json_option
def export(circuit: str, fmt: str | None, out_path: str, d_model: int | None, collapse: bool, as_json: bool) -> None:
    """Convert a circuit file for other tools.

    \b
    Formats (docs/formats.md):
      graphml    GraphML for networkx, Gephi, yEd, Cytoscape (one edge per node pair; q/k/v
                 slots merged, per-slot scores as score_q / score_k / score_v)
      gexf       GEXF, Gephi's own format (same attributes)
      mib-json   MIB / EAP-IG circuit JSON (loads in EAP-IG's Graph.from_json; round-trips here)
      node-link  networkx / d3 node-link JSON
      json       our circuit JSON (e.g. to turn a MIB file into ours)
    The input may be our circuit JSON, MIB / EAP-IG JSON or a token-position circuit: its graphml,
    gexf and node-link nodes are a3.h7@12 with position and token attributes, json keeps the
    positional format, and mib-json needs --collapse (MIB has no token positions).

    \b
    Examples:
      circuits export runs/ioi/circuit.json -o ioi.graphml
      circuits export runs/ioi/circuit.json --format mib-json -o ioi.mib.json
      circuits export eap-ig-circuit.json --format json -o ours.json
      circuits export runs/pos/circuit.json -o pos.graphml          # token-position circuit
      circuits export runs/pos/circuit.json --format mib-json --collapse -o pos.mib.json
    """
    from graphs.io import export_circuit

    if fmt is None:
        fmt = _BY_SUFFIX.get(Path(out_path).suffix.lower())
        if fmt is None:
            raise InputError(f"cannot tell the export format of {out_path!r} from its suffix; "
                             f"pass --format ({', '.join(FORMATS)})")
    found = read_any_circuit(circuit)
    positional = is_positional(found)
    if positional and fmt == "mib-json" and not collapse:
        raise InputError(f"{circuit} is a token-position circuit and MIB / EAP-IG JSON has no token positions; "
                         "pass --collapse to write its collapse (edges in at any position, scores summed)")
    if collapse and not (positional and fmt == "mib-json"):
        raise InputError("--collapse applies to mib-json of a token-position circuit only")
    if fmt == "mib-json" and d_model is None and not isinstance(found.provenance.get("d_model"), int):
        raise InputError(f"MIB / EAP-IG JSON needs the model's d_model and {circuit} does not record it; "
                         "pass --d-model")
    with bad_input():
        export_circuit(found, out_path, fmt, d_model=d_model, collapse=collapse)
    written = found.collapsed() if collapse else found
    nodes = len(written.nodes())
    kind = "positional " if positional and not collapse else ""
    if as_json:
        info: dict[str, Any] = {"path": out_path, "format": fmt, "edges": written.n_edges, "nodes": nodes}
        if positional:  # a token-position circuit: were positional edges written, or its collapse?
            info["positional"] = not collapse
        echo_json(info)
    else:
        suffix = f" (collapsed from {found.n_edges} positional edges)" if collapse else ""
        click.echo(f"wrote {out_path} ({fmt}): {written.n_edges} {kind}edges, {nodes} {kind}nodes{suffix}")
