"""Source -> target contributions over an ``Experiment``: batched over prompts and over sources.

Targets:

* ``"metric"`` (default): the per-prompt contribution ``kappa`` of each source to the experiment's
  metric at the read positions (``readout.metric_contributions``), [n_sources, N]. Prompts are
  grouped by read position and trimmed to it (positions after the read position cannot reach it),
  and the last layer computes only the read position.
* a receiver id (``"a3.h2<q>"``, ``"m5"``, ``"logits"``): the relevant part of that receiver's
  input, [n_sources, N, T, d] (T: the task's longest prompt; padding positions are zero). Every
  q / k / v slot of a layer reads the same residual, so they have the same relevant input.

Sources are grouped by the layer where they enter the residual stream; each group is split into
passes of at most ``sources_per_pass`` sources (from ``CDTConfig.max_floats``), so one decomposed
pass computes many sources side by side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from circuits.experiment import Experiment, PreparedBatch
from circuits.methods.cdt.forward import BatchState, PassResult, Point, propagate
from circuits.methods.cdt.readout import Readout, metric_contributions
from circuits.methods.cdt.rules import CDTConfig, CDTError
from circuits.methods.cdt.sources import (
    ResolvedSource,
    SourceLike,
    plan_pass,
    resolve_all,
)
from circuits.progress import progress_bar
from graphs import runtime as rt
from graphs.adapters.spec import ModelSpec
from graphs.graph import ComputationGraph
from graphs.ids import NodeId, NodeKind, ReceiverId, parse_node, parse_receiver
from graphs.scores import NodeScores

Target = str | ReceiverId


def receiver_point(graph: ComputationGraph, receiver: int) -> Point:
    """Where a receiver reads the residual stream: q/k/v of layer l before its attention, MLP l
    before the MLP, logits at the final residual."""
    node = graph.receivers[receiver].node
    if node.kind is NodeKind.LOGITS:
        return Point(graph.n_layers)
    assert node.layer is not None
    return Point(node.layer, "mlp" if node.kind is NodeKind.MLP else "attn")


def sources_per_pass(spec: ModelSpec, prompts: int, length: int, config: CDTConfig) -> int:
    """How many sources share one pass within ``config.max_floats`` (peak floats per source:
    attention parts, patterns and the MLP's hidden parts of P prompts x T positions)."""
    d_mlp = max(int(lay.mlp.W_in.shape[0]) for lay in spec.layers)
    per_token = 12 * spec.d_model + 6 * d_mlp + 3 * spec.n_heads * length
    return max(1, config.max_floats // max(1, prompts * length * per_token))


def read_groups(batch: PreparedBatch) -> list[tuple[Tensor, int]]:
    """The batch's prompts grouped by read position r: (rows, r + 1) - each group is trimmed to r+1."""
    groups = []
    for r in torch.unique(batch.read_positions).tolist():
        groups.append(((batch.read_positions == r).nonzero().flatten(), int(r) + 1))
    return groups


def _chunks(sources: Sequence[ResolvedSource], size: int) -> Iterator[list[int]]:
    """Indices of ``sources`` in passes: grouped by the layer where they enter (a layer's heads and
    its MLP share a pass), at most ``size`` per pass."""
    order = sorted(range(len(sources)), key=lambda i: (sources[i].start, i))
    chunk: list[int] = []
    for i in order:
        if chunk and (len(chunk) == size or sources[chunk[0]].start.layer != sources[i].start.layer):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


@torch.no_grad()
def batch_metric_contributions(
    spec: ModelSpec, batch: PreparedBatch, sources: Sequence[ResolvedSource], config: CDTConfig,
    state: BatchState | None = None,
) -> Tensor:
    """Per-prompt metric contributions [n_sources, B] of ``sources`` on one prepared batch."""
    state = state or BatchState.build(spec, batch.clean_ids, batch.ablation)
    out = torch.zeros(len(sources), batch.size, dtype=spec.dtype)
    for rows, length in read_groups(batch):
        sub = state.subset(rows, length)
        readout = Readout.of(batch, rows)
        size = sources_per_pass(spec, rows.numel(), length, config)
        for chunk in _chunks(sources, size):
            plan = plan_pass(sub, [sources[i] for i in chunk])
            res = propagate(sub, plan, config, last_query_only=True)
            beta = None if res.beta is None else res.beta[:, :, -1]
            kappa = metric_contributions(spec, readout, beta, res.total[:, -1], config)  # [S|1, P]
            out[torch.tensor(chunk)[:, None], rows[None, :]] = kappa.to(out.dtype)
    return out


@torch.no_grad()
def cdt_contributions(
    experiment: Experiment,
    sources: Sequence[SourceLike],
    target: Target = "metric",
    *,
    config: CDTConfig | None = None,
    progress: bool = False,
) -> Tensor:
    """Contributions of each source set to ``target`` (see the module docstring), signed.

    ``"metric"``: [n_sources, N] per-prompt ``kappa`` (positive = the source pushes the metric up;
    in a linear model ``kappa = m(clean) - m(source's out-edges ablated)``). A receiver:
    [n_sources, N, T, d] relevant part of its input."""
    config = config or CDTConfig()
    spec, g = experiment.spec, experiment.spec.graph
    resolved = resolve_all(g, sources)
    if not resolved:
        raise CDTError("no sources given")
    N = experiment.n_prompts
    bar = progress_bar(N, "CD-T", progress, "prompt")
    if isinstance(target, str) and target == "metric":
        out = torch.zeros(len(resolved), N, dtype=spec.dtype)
        for batch in experiment.batches():
            out[:, batch.rows] = batch_metric_contributions(spec, batch, resolved, config)
            bar.update(batch.size)
        bar.close()
        return out
    receiver = g.receiver_index(parse_receiver(target) if isinstance(target, str) else target)
    stop = receiver_point(g, receiver)
    T = experiment.task.max_length
    out = torch.zeros(len(resolved), N, T, spec.d_model, dtype=spec.dtype)
    for batch in experiment.batches():
        state = BatchState.build(spec, batch.clean_ids, batch.ablation)
        rows = torch.arange(batch.rows.start, batch.rows.stop)
        size = sources_per_pass(spec, batch.size, state.length, config)
        for chunk in _chunks(resolved, size):
            res = propagate(state, plan_pass(state, [resolved[i] for i in chunk]), config, stop=stop)
            if res.beta is not None:
                real = torch.arange(state.length)[None, :] < experiment.task.lengths[batch.rows][:, None]  # [B, T]
                out[torch.tensor(chunk)[:, None], rows[None, :], : state.length] = res.beta * real[None, :, :, None]
        bar.update(batch.size)
    bar.close()
    return out


def cdt_node_scores(
    experiment: Experiment,
    nodes: Sequence[NodeId | str] | None = None,
    *,
    config: CDTConfig | None = None,
    progress: bool = False,
) -> NodeScores:
    """Every sender's (or ``nodes``') CD-T contribution to the metric as ``NodeScores``.

    Sign: the project's convention (``graphs.scores``), the effect of ablating the node:
    ``score = -mean_prompts(kappa)`` (negative = the behaviour relies on the node), which equals
    node patching exactly on a linear model."""
    config = config or CDTConfig()
    g = experiment.spec.graph
    chosen = list(g.senders) if nodes is None else [parse_node(n) if isinstance(n, str) else n for n in nodes]
    kappa = cdt_contributions(experiment, chosen, config=config, progress=progress)  # [n, N]
    values = torch.zeros(g.n_senders)
    for node, k in zip(chosen, kappa.mean(1).tolist(), strict=True):
        values[g.sender_index(node)] = -k
    return NodeScores(g, values, "cdt", settings(experiment, config))


def settings(experiment: Experiment, config: CDTConfig, **extra: object) -> dict[str, object]:
    return {
        "metric": experiment.metric.name,
        "ablation": experiment.ablation,
        "n_prompts": experiment.n_prompts,
        **config.settings(),
        **extra,
    }


@torch.no_grad()
def decompose(
    spec: ModelSpec,
    input_ids: Tensor,
    sources: Sequence[SourceLike],
    ablation: rt.AblationValues | None = None,
    *,
    config: CDTConfig | None = None,
    stop: Point | None = None,
    trace: bool = False,
) -> PassResult:
    """One decomposed pass over ``input_ids`` [P, T] for ``sources`` side by side, from layer 0
    (so ``trace`` records every layer). ``ablation`` defaults to zero values (a source's relevant
    part is then its whole activation)."""
    state = BatchState.build(spec, input_ids, ablation or rt.zero_values(spec))
    plan = plan_pass(state, resolve_all(spec.graph, sources), start=Point(0))
    return propagate(state, plan, config or CDTConfig(), stop=stop, trace=trace)
