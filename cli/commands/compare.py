"""``circuits compare A.json B.json``: overlap, IoU, precision / recall of two circuits, and a diff drawing."""

from __future__ import annotations

from typing import Any

import click

from cli.options import (
    InputError,
    bad_input,
    check_same_graph,
    circuit_title,
    echo_json,
    json_option,
    read_circuit,
)

LEVELS = ("edge", "node")


def comparison(a: Any, b: Any, level: str) -> dict[str, Any]:
    """The numbers of one level: sizes, overlap, only-A / only-B, union, IoU, precision, recall and
    (when A has scores) the ROC AUC of A's |scores| as a classifier of membership in B."""
    from circuits.evaluate import EvaluationError, roc_auc

    size_a = a.n_edges if level == "edge" else len(a.nodes())
    size_b = b.n_edges if level == "edge" else len(b.nodes())
    both = a.overlap(b, level)
    auc = None
    if a.scores is not None:
        try:
            auc = roc_auc(a.scores, b, level)
        except EvaluationError:  # B is empty or everything: no ROC
            auc = None
    return {
        "a": size_a,
        "b": size_b,
        "overlap": both,
        "only_a": size_a - both,
        "only_b": size_b - both,
        "union": size_a + size_b - both,
        "iou": a.iou(b, level),
        "precision": a.precision(b, level),
        "recall": a.recall(b, level),
        "auc": auc,
    }


def _side(path: str, circuit: Any) -> dict[str, Any]:
    prov = circuit.provenance
    return {"path": path, "title": circuit_title(circuit), "edges": circuit.n_edges, "nodes": len(circuit.nodes()),
            "method": prov.get("method"), "task": prov.get("task"), "model": prov.get("model")}


@click.command()
@click.argument("a_path", metavar="A.json")
@click.argument("b_path", metavar="B.json")
@click.option("--level", type=click.Choice(LEVELS), help="Compare at this level only (default: edges and nodes).")
@click.option("--svg", "--diff", "diff_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also draw both circuits, coloured by membership (.svg .png .pdf .dot .html).")
@click.option("--labels", nargs=2, default=("A", "B"), show_default=True, metavar="NAME_A NAME_B",
              help="Names of the two circuits in the drawing.")
@click.option("--top", type=click.IntRange(min=0), metavar="N", help="Drawing: the top N edges of each circuit by |score|.")
@click.option("--min-score", type=click.FloatRange(min=0), metavar="X", help="Drawing: only edges with |score| >= X.")
@json_option
def compare(a_path: str, b_path: str, level: str | None, diff_path: str | None, labels: tuple[str, str],
            top: int | None, min_score: float | None, as_json: bool) -> None:
    """Compare two circuits on the same graph: overlap, IoU, precision and recall.

    \b
    A is the prediction and B the reference: precision = |A & B| / |A|, recall = |A & B| / |B|,
    IoU = |A & B| / |A | B|. At node level a circuit's nodes are those its edges touch (input and
    logits included). When A has scores, AUC is the ROC area of A's |scores| as a classifier of
    membership in B (docs/evaluation.md). Reads our circuit JSON and MIB / EAP-IG JSON.

    \b
    Examples:
      circuits compare runs/eap/circuit.json runs/acdc/circuit.json
      circuits compare runs/eap/circuit.json reference.json --level edge --json
      circuits compare runs/eap/circuit.json runs/acdc/circuit.json --svg diff.svg --labels EAP ACDC
    """
    a, b = read_circuit(a_path), read_circuit(b_path)
    check_same_graph(a.graph, b.graph, f"A ({a_path})", f"B ({b_path})")
    levels = (level,) if level else LEVELS
    report: dict[str, Any] = {"a": _side(a_path, a), "b": _side(b_path, b)}
    for name in levels:
        report[name] = comparison(a, b, name)
    if diff_path is not None:
        from graphs.render import output_format, render_diff

        try:
            kind = output_format(diff_path)  # before drawing: a bad suffix fails fast
        except ValueError:
            raise InputError(f"cannot tell the drawing format of {diff_path!r} from its suffix; use .svg, .png, "
                             ".pdf, .dot, .gv, .html or .htm") from None
        with bad_input():
            drawn = render_diff(a, b, diff_path, kind, labels=labels, top=top, min_score=min_score)
        report["diff"] = {"path": str(drawn.path), "format": drawn.format, "edges": drawn.n_edges, "nodes": drawn.n_nodes}
    if as_json:
        echo_json(report)
        return
    click.echo(f"A  {a_path}: {report['a']['title']}, {a.n_edges} edges, {report['a']['nodes']} nodes")
    click.echo(f"B  {b_path}: {report['b']['title']}, {b.n_edges} edges, {report['b']['nodes']} nodes")
    click.echo("")
    click.echo(f"{'level':<6} {'|A|':>6} {'|B|':>6} {'both':>6} {'only A':>7} {'only B':>7} "
               f"{'IoU':>6} {'precision':>9} {'recall':>6} {'AUC':>6}")
    for name in levels:
        r = report[name]
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        click.echo(f"{name:<6} {r['a']:>6} {r['b']:>6} {r['overlap']:>6} {r['only_a']:>7} {r['only_b']:>7} "
                   f"{r['iou']:>6.3f} {r['precision']:>9.3f} {r['recall']:>6.3f} {auc:>6}")
    if "diff" in report:
        d = report["diff"]
        click.echo("")
        click.echo(f"wrote {d['path']} ({d['format']}): {d['edges']} edges, {d['nodes']} nodes")
