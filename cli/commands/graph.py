"""``circuits graph``: load a model and report the size of its computation graph."""

from __future__ import annotations

from typing import Any

import click

from cli.options import echo_json, json_option, load, model_option


def graph_facts(loaded: Any, spec: Any) -> dict[str, Any]:
    """Everything ``circuits graph`` reports: ``ComputationGraph.summary()`` plus the model's facts
    and the edge count split by receiver type (q/k/v slots, MLP inputs, logits)."""
    g = spec.graph
    into_qkv = sum(3 * g.n_heads * g.attention_upstream(layer) for layer in range(g.n_layers))
    into_mlp = sum(g.mlp_upstream(layer) for layer in range(g.n_layers))
    facts: dict[str, Any] = dict(g.summary())
    facts.update(
        {
            "model": loaded.name,
            "family": spec.family,
            "model_type": loaded.model_type,
            "architecture": type(loaded.model).__name__,
            "source": loaded.source,
            "revision": loaded.revision,
            "d_model": spec.d_model,
            "d_head": spec.d_head,
            "n_kv_heads": spec.n_kv_heads,
            "vocab_size": spec.vocab_size,
            "edges_by_receiver": {"qkv": into_qkv, "mlp": into_mlp, "logits": g.n_senders},
        }
    )
    return facts


def _table(f: dict[str, Any]) -> list[str]:
    by = f["edges_by_receiver"]
    blocks = "parallel-residual" if f["parallel_residual"] else "sequential"
    rows = [
        ("senders", f["senders"]),
        ("  input", 1),
        ("  attention heads", f["head_nodes"]),
        ("  MLPs", f["mlp_nodes"]),
        ("receivers", f["receivers"]),
        ("  q/k/v slots", f["qkv_receivers"]),
        ("  MLP inputs", f["mlp_nodes"]),
        ("  logits", 1),
        ("edges", f["edges"]),
        ("  into q/k/v", by["qkv"]),
        ("  into MLPs", by["mlp"]),
        ("  into logits", by["logits"]),
    ]
    revision = f" @ {f['revision']}" if f["revision"] else ""
    lines = [
        f"model   {f['model']} ({f['architecture']}, family {f['family']}, {f['source']}{revision})",
        (
            f"shape   {f['layers']} layers x {f['heads']} heads ({f['n_kv_heads']} kv heads), "
            f"d_model {f['d_model']}, d_head {f['d_head']}, {blocks} blocks"
        ),
        "",
    ]
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {value:>9,}" for name, value in rows]
    return lines


@click.command()
@model_option
@json_option
def graph(model_name: str, as_json: bool) -> None:
    """Load a model and print the node and edge counts of its computation graph.

    \b
    Nodes are the token embedding (input), every attention head and MLP; receivers are each
    head's q/k/v input slots, each MLP and the logits; an edge joins a sender to every receiver
    downstream of it in the residual stream.

    \b
    Examples:
      circuits graph --model smollm2-135m
      circuits graph --model ./my-gpt2-folder --json
    """
    from graphs.adapters import build_spec

    loaded = load(model_name)
    facts = graph_facts(loaded, build_spec(loaded.model))
    if as_json:
        echo_json(facts)
    else:
        click.echo("\n".join(_table(facts)))
