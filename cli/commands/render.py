"""``circuits render``: draw a circuit file as SVG, PNG, PDF, DOT or a self-contained HTML page."""

from __future__ import annotations

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

FORMATS = ("svg", "png", "pdf", "dot", "html")


@click.command()
@circuit_argument
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Output file; its suffix picks the format: .svg .png .pdf .dot/.gv .html/.htm")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Format to write, whatever the suffix of --out.")
@click.option("--top", type=click.IntRange(min=0), metavar="N", help="Draw only the N circuit edges with the highest |score|.")
@click.option("--min-score", type=click.FloatRange(min=0), metavar="X", help="Draw only circuit edges with |score| >= X.")
@click.option("--title", help="Title above the drawing (default: model, task, method, faithfulness; '' for none).")
@json_option
def render(circuit: str, out_path: str, fmt: str | None, top: int | None, min_score: float | None,
           title: str | None, as_json: bool) -> None:
    """Draw a circuit: layers bottom to top, heads and MLPs as nodes, edges coloured by score.

    \b
    Edge width grows with |score|; colour shows its sign; q/k/v inputs of a head are told apart
    (docs/rendering.md). SVG, PNG and PDF need Graphviz `dot`; .dot writes the DOT source without
    it; .html is one offline page with the SVG and hover details. Reads our circuit JSON, MIB /
    EAP-IG JSON and token-position circuits (one column per token, headed by the token; svg, png,
    pdf and dot only). Big circuits (over 3000 edges) need --top or --min-score.

    \b
    Examples:
      circuits render runs/ioi/circuit.json -o ioi.svg
      circuits render runs/ioi/circuit.json -o ioi.html --top 100
      circuits render runs/ioi/circuit.json -o ioi.png --min-score 0.05 --title "IOI, EAP-IG"
      circuits render mib-circuit.json -o mib.pdf
      circuits render runs/pos/circuit.json -o pos.svg --top 200   # token-position circuit
    """
    from graphs.render import output_format
    from graphs.render import render as draw

    try:
        kind = output_format(out_path, fmt)  # before loading: a bad suffix fails fast
    except ValueError:
        raise InputError(f"cannot tell the drawing format of {out_path!r} from its suffix; use .svg, .png, .pdf, "
                         ".dot, .gv, .html or .htm, or pass --format") from None
    found = read_any_circuit(circuit)
    if is_positional(found):
        from graphs.render_positional import render_positional

        if kind == "html":
            raise InputError(f"{circuit} is a token-position circuit and the HTML viewer does not draw those yet; "
                             "write .svg, .png, .pdf or .dot")
        with bad_input():
            result = render_positional(found, out_path, kind, title=title, top=top, min_score=min_score)
    else:
        with bad_input():
            result = draw(found, out_path, kind, title=title, top=top, min_score=min_score)
    if as_json:
        echo_json({"path": str(result.path), "format": result.format, "edges": result.n_edges,
                   "nodes": result.n_nodes, "circuit_edges": result.n_circuit_edges})
        return
    shown = (f"{result.n_edges} edges" if result.n_edges == result.n_circuit_edges
             else f"{result.n_edges} of {result.n_circuit_edges} circuit edges")
    click.echo(f"wrote {result.path} ({result.format}): {shown}, {result.n_nodes} nodes")
