"""Exact interventions: node activation patching, edge patching and path patching.

Every score follows one convention: the effect on the metric ``m`` (higher = more task behaviour)
of the intervention, averaged over the prompts.

* ``node_patching(mode="noising")``: ``m(clean, node u ablated) - m(clean)`` - u's output replaced
  by its ablation value for every receiver downstream.
  ``mode="denoising"``: ``m(corrupted, node u restored to clean) - m(corrupted)`` (resample
  ablation only): positive for nodes that carry the behaviour.
* ``edge_patching``: ``m(clean, edge u->r ablated) - m(clean)`` for every edge (one edge per batch
  row, runs resumed from a clean checkpoint at the receiver's layer, so an edge into layer l costs
  only the layers after it).
* ``positional_edge_patching``: ``m(clean, edge u@t -> r@t ablated) - m(clean)`` for every
  (edge, position) pair, or a candidate subset (docs/positions.md): the edge is ablated at token
  ``t`` only. Pairs that cannot change the metric are skipped and score exactly 0: receivers at
  positions after the (shared) read position - attention is causal - and edges into ``logits`` at
  any position but the read position.
* ``path_patching`` (Wang et al. 2022): for each sender s and a receiver set R, run the clean prompts
  with s set to its ablation value and every *other head frozen* to its clean output while MLPs
  (and their norms) are recomputed; record what the receivers in R read; then rerun the clean
  prompts with only R's inputs replaced by those recordings. Unlike edge patching this includes the
  paths s -> MLP -> ... -> R, and excludes paths through other heads.

All three take ``checkpoint=`` (resume after a crash: per batch, per (batch, layer) for edge
patching), all-reduce their partial sums on a distributed shard, and stop on a non-finite metric
naming the prompt (docs/scale.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from circuits.checkpoint import BatchProgress, Checkpointer, batches_from
from circuits.distributed import reducer
from circuits.experiment import Experiment, PreparedBatch
from circuits.numerics import score
from circuits.positional import check_alignment
from circuits.progress import progress_bar
from graphs import ops
from graphs import runtime as rt
from graphs.graph import ComputationGraph
from graphs.ids import NodeId, NodeKind, ReceiverId, parse_node, parse_receiver
from graphs.positional import PositionalEdgeScores
from graphs.scores import EdgeScores, NodeScores


class PatchingError(ValueError):
    """A patching method was asked for something it cannot compute."""


def _sender_layer(graph: ComputationGraph, sender: int) -> int:
    """The layer whose checkpoint precedes ``sender``'s first receiver (input: 0)."""
    node = graph.senders[sender]
    return 0 if node.kind is NodeKind.INPUT else int(node.layer)  # type: ignore[arg-type]


def _receiver_layer(graph: ComputationGraph, receiver: int) -> int:
    node = graph.receivers[receiver].node
    return graph.n_layers if node.kind is NodeKind.LOGITS else int(node.layer)  # type: ignore[arg-type]


def _rows_per_pass(max_rows: int, prompts: int) -> int:
    return max(1, max_rows // max(1, prompts))


# --------------------------------------------------------------------------- node patching


def node_patching(
    experiment: Experiment,
    mode: str = "noising",
    nodes: Iterable[NodeId | str] | None = None,
    max_rows: int = 256,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> NodeScores:
    """Activation patching of whole nodes (input, heads, MLPs); see the module docstring.

    ``checkpoint``: save the partial sums after every batch and skip saved batches when resuming.
    On a shard of a distributed run the partial sums of all ranks are added (see ``eap``)."""
    if mode not in ("noising", "denoising"):
        raise PatchingError("mode must be 'noising' or 'denoising'")
    if mode == "denoising" and experiment.ablation != "corrupted":
        raise PatchingError("denoising restores clean values into the corrupted run: it needs ablation='corrupted'")
    spec, g = experiment.spec, experiment.spec.graph
    chosen = _sender_indices(g, nodes)
    totals = torch.zeros(g.n_senders, dtype=torch.float64)
    edge_mask = g.edge_mask
    red = reducer(experiment)
    state = BatchProgress(experiment, checkpoint, {"totals": totals})
    bar = progress_bar(len(chosen) * experiment.n_prompts, f"node patching ({mode})", progress, "node-prompt")
    bar.update(len(chosen) * state.prompts_done())
    for batch in state.batches():
        P = batch.size
        if mode == "noising":
            base_ids, values = batch.clean_ids, batch.ablation
        else:
            base_ids = batch.corrupted_ids
            values = rt.AblationValues("clean", rt.sender_outputs(spec, batch.clean_ids))
        base = rt.clean_run(spec, base_ids, batch.read_positions)
        m_base = score(experiment, batch, base.logits)  # [P]
        by_layer: dict[int, list[int]] = {}
        for s in chosen:
            by_layer.setdefault(_sender_layer(g, s), []).append(s)
        K_max = _rows_per_pass(max_rows, P)
        for layer, senders in sorted(by_layer.items()):
            for lo in range(0, len(senders), K_max):
                group = torch.tensor(senders[lo : lo + K_max])
                K = group.numel()
                masks = torch.zeros(K, g.n_senders, g.n_receivers)
                masks[torch.arange(K), group] = edge_mask[group].float()
                with torch.no_grad():
                    logits = rt.run(
                        spec,
                        base_ids.repeat(K, 1),
                        mask=masks,
                        ablation=values,
                        read_positions=batch.read_positions.repeat(K),
                        start=base.at(spec, layer),
                    ).logits
                m = score(experiment, batch, logits.view(K, P, -1))  # [K, P]
                totals[group] += (m - m_base).sum(1).double()
                bar.update(K * P)
    bar.close()
    totals = red.sum(totals)
    scores = torch.zeros(g.n_senders)
    scores[chosen] = (totals[chosen] / red.count(experiment.n_prompts)).float()
    return NodeScores(g, scores, f"node-patching/{mode}", _settings(experiment, mode=mode))


def _sender_indices(g: ComputationGraph, nodes: Iterable[NodeId | str] | None) -> list[int]:
    if nodes is None:
        return list(range(g.n_senders))
    return sorted({g.sender_index(parse_node(n) if isinstance(n, str) else n) for n in nodes})


def _settings(experiment: Experiment, **extra: object) -> dict[str, object]:
    return {
        "metric": experiment.metric.name,
        "ablation": experiment.ablation,
        "n_prompts": reducer(experiment).count(experiment.n_prompts),  # the whole dataset, also on a shard
        **extra,
    }


# --------------------------------------------------------------------------- edge patching


def edge_patching(
    experiment: Experiment,
    max_rows: int = 256,
    progress: bool = False,
    edges: Tensor | None = None,
    checkpoint: Checkpointer | None = None,
) -> EdgeScores:
    """Every edge's single-edge effect ``m(clean, u->r ablated) - m(clean)``, exactly.

    ``edges`` [S, R] bool restricts the work to those edges (the others score 0), e.g. to check a
    sample of edges on a model too large to patch exhaustively. ``checkpoint``: save the partial
    sums after every (batch, layer) unit and skip units already done when resuming. On a shard of
    a distributed run the partial sums of all ranks are added (see ``eap``)."""
    spec, g = experiment.spec, experiment.spec.graph
    red = reducer(experiment)
    wanted = g.edge_mask if edges is None else (edges.to(torch.bool) & g.edge_mask)
    totals = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    done: set[str] = set()
    saved = None if checkpoint is None else checkpoint.load()
    if saved is not None:
        totals, done = saved[0]["totals"].double(), set(saved[1]["done"])
    blocks = _receiver_blocks(g)
    n_wanted = int(wanted.sum())
    first = 0  # batches before this one are finished: do not even prepare them
    while all(f"{first}:{layer}" in done for layer, _ in blocks) and first * experiment.batch_size < experiment.n_prompts:
        first += 1
    bar = progress_bar(n_wanted * experiment.n_prompts, "edge patching", progress, "edge-prompt")
    bar.update(n_wanted * min(experiment.n_prompts, first * experiment.batch_size))
    for index, batch in enumerate(batches_from(experiment, first), start=first):
        P = batch.size
        if all(f"{index}:{layer}" in done for layer, _ in blocks):
            bar.update(n_wanted * P)
            continue
        clean = rt.clean_run(spec, batch.clean_ids, batch.read_positions)
        m_clean = score(experiment, batch, clean.logits)  # [P]
        K_max = _rows_per_pass(max_rows, P)
        for layer, receivers in blocks:
            pairs = [(s, r) for r in receivers for s in range(g.n_upstream[r]) if wanted[s, r]]
            if f"{index}:{layer}" in done:
                bar.update(len(pairs) * P)
                continue
            resume_at = clean.at(spec, layer)
            for lo in range(0, len(pairs), K_max):
                chunk = pairs[lo : lo + K_max]
                K = len(chunk)
                senders = torch.tensor([s for s, _ in chunk])
                targets = torch.tensor([r for _, r in chunk])
                with torch.no_grad():
                    logits = rt.run(
                        spec,
                        batch.clean_ids.repeat(K, 1),
                        edits=rt.SparseEdits.one_edge_per_row(senders, targets, P),
                        ablation=batch.ablation,
                        read_positions=batch.read_positions.repeat(K),
                        start=resume_at,
                    ).logits
                m = score(experiment, batch, logits.view(K, P, -1))  # [K, P]
                totals[senders, targets] += (m - m_clean).sum(1).double()
                bar.update(K * P)
            if checkpoint is not None:
                done.add(f"{index}:{layer}")
                checkpoint.save({"totals": totals}, {"done": sorted(done)})
    bar.close()
    totals = red.sum(totals)
    settings = _settings(experiment) if edges is None else _settings(experiment, edges=n_wanted)
    return EdgeScores(g, (totals / red.count(experiment.n_prompts)).float(), "edge-patching", settings)


def positional_edge_patching(
    experiment: Experiment,
    max_rows: int = 256,
    progress: bool = False,
    edges: Tensor | None = None,
    tokenizer: object | None = None,
) -> PositionalEdgeScores:
    """Every (edge, position) pair's single-edge effect ``m(clean, u@t -> r@t ablated) - m(clean)``.

    ``edges``: candidates, [S, R] bool (those edges at every position) or [S, R, T] bool; the rest
    score 0. Cost: one row of a batched pass per (candidate, prompt), resumed from a clean
    checkpoint at the receiver's layer; at most ``max_rows`` rows per pass, so memory does not grow
    with the number of candidates. On a real model pass a candidate subset (e.g. the top edges of
    positional EAP): all pairs are T times the edges. Needs one token alignment."""
    alignment = check_alignment(experiment.task, tokenizer)
    spec, g = experiment.spec, experiment.spec.graph
    T, read = alignment.length, alignment.read_position
    red = reducer(experiment)
    wanted = _positional_candidates(g, T, read, edges)  # [S, R, T] bool
    n_wanted = int(wanted.sum())
    totals = torch.zeros(g.n_senders, g.n_receivers, T, dtype=torch.float64)
    bar = progress_bar(n_wanted * experiment.n_prompts, "positional edge patching", progress, "edge-prompt")
    for batch in experiment.batches():
        P = batch.size
        clean = rt.clean_run(spec, batch.clean_ids, batch.read_positions)
        m_clean = score(experiment, batch, clean.logits)  # [P]
        K_max = _rows_per_pass(max_rows, P)
        for layer, receivers in _receiver_blocks(g):
            block = torch.zeros_like(wanted)
            block[:, receivers] = wanted[:, receivers]
            ts, rs, ss = block.permute(2, 1, 0).nonzero(as_tuple=True)  # positional edge order: (t, r, s)
            if ss.numel() == 0:
                continue
            resume_at = clean.at(spec, layer)
            for lo in range(0, ss.numel(), K_max):
                senders, targets, positions = ss[lo : lo + K_max], rs[lo : lo + K_max], ts[lo : lo + K_max]
                K = senders.numel()
                with torch.no_grad():
                    logits = rt.run(
                        spec,
                        batch.clean_ids.repeat(K, 1),
                        edits=rt.SparseEdits.one_positional_edge_per_row(senders, targets, positions, P),
                        ablation=batch.ablation,
                        read_positions=batch.read_positions.repeat(K),
                        start=resume_at,
                    ).logits
                m = score(experiment, batch, logits.view(K, P, -1))  # [K, P]
                totals[senders, targets, positions] += (m - m_clean).sum(1).double()
                bar.update(K * P)
    bar.close()
    totals = red.sum(totals)
    settings = _settings(experiment, positional=True, read_position=read, edges=n_wanted)
    values = (totals / red.count(experiment.n_prompts)).float()
    return PositionalEdgeScores(g, values, alignment.tokens, "edge-patching", settings)


def _positional_candidates(g: ComputationGraph, T: int, read: int, edges: Tensor | None) -> Tensor:
    """[S, R, T] bool of the (edge, position) pairs to patch, without pairs that cannot act."""
    if edges is None:
        wanted = g.edge_mask[:, :, None].expand(-1, -1, T).clone()
    elif edges.dim() == 2 and tuple(edges.shape) == (g.n_senders, g.n_receivers):
        wanted = (edges.to(torch.bool) & g.edge_mask)[:, :, None].expand(-1, -1, T).clone()
    elif edges.dim() == 3 and tuple(edges.shape) == (g.n_senders, g.n_receivers, T):
        wanted = edges.to(torch.bool) & g.edge_mask[:, :, None]
    else:
        raise PatchingError(
            f"candidate edges must be [{g.n_senders}, {g.n_receivers}] or [{g.n_senders}, {g.n_receivers}, {T}] bool, "
            f"got {tuple(edges.shape)}"
        )
    wanted[:, :, read + 1 :] = False  # causal: later positions never reach the read position
    logits_row = wanted[:, g.logits_receiver].clone()
    wanted[:, g.logits_receiver] = False
    wanted[:, g.logits_receiver, read] = logits_row[:, read]  # the logits are read at one position
    return wanted


def _receiver_blocks(g: ComputationGraph) -> list[tuple[int, list[int]]]:
    """Receivers grouped by the layer a run must start at: (layer, receiver indices), logits last."""
    out = []
    for layer in range(g.n_layers):
        qkv = g.qkv_receivers(layer)
        out.append((layer, list(range(qkv.start, qkv.stop)) + [g.mlp_receiver(layer)]))
    out.append((g.n_layers, [g.logits_receiver]))
    return out


# --------------------------------------------------------------------------- path patching


def path_patching(
    experiment: Experiment,
    receivers: Sequence[ReceiverId | str] = ("logits",),
    senders: Iterable[NodeId | str] | None = None,
    max_rows: int = 256,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> NodeScores:
    """Path patching from each sender to the receiver set ``receivers`` (default: the logits).

    ``senders`` defaults to every head. Returns one score per sender (``m(patched) - m(clean)``);
    senders that are not upstream of any receiver in the set score 0. ``checkpoint`` and
    distributed shards as for ``node_patching``."""
    spec, g = experiment.spec, experiment.spec.graph
    recv = sorted({g.receiver_index(parse_receiver(r) if isinstance(r, str) else r) for r in receivers})
    if not recv:
        raise PatchingError("path patching needs at least one receiver")
    if senders is None:
        chosen = [g.head_sender(l, h) for l in range(g.n_layers) for h in range(g.n_heads)]
    else:
        chosen = _sender_indices(g, senders)
    totals = torch.zeros(g.n_senders, dtype=torch.float64)
    red = reducer(experiment)
    state = BatchProgress(experiment, checkpoint, {"totals": totals})
    bar = progress_bar(len(chosen) * experiment.n_prompts, "path patching", progress, "sender-prompt")
    bar.update(len(chosen) * state.prompts_done())
    for batch in state.batches():
        P = batch.size
        clean = rt.clean_run(spec, batch.clean_ids, batch.read_positions)
        m_clean = score(experiment, batch, clean.logits)  # [P]
        K_max = _rows_per_pass(max_rows, P)
        for lo in range(0, len(chosen), K_max):
            group = chosen[lo : lo + K_max]
            m = _path_patch_group(experiment, batch, clean, group, recv)  # [K, P]
            totals[torch.tensor(group)] += (m - m_clean).sum(1).double()
            bar.update(len(group) * P)
    bar.close()
    totals = red.sum(totals)
    scores = (totals / red.count(experiment.n_prompts)).float()
    names = ",".join(str(g.receivers[r]) for r in recv)
    return NodeScores(g, scores, "path-patching", _settings(experiment, receivers=names))


@torch.no_grad()
def _path_patch_group(
    experiment: Experiment, batch: PreparedBatch, clean: rt.CleanRun, group: list[int], recv: list[int]
) -> Tensor:
    """Metric [K, P] after path patching each sender of ``group`` to the receivers ``recv``.

    Run 1 needs no attention at all: every head except s is frozen to its clean output, so the
    residual of run 1 differs from the clean one by ``delta = A_s - a_s`` plus what the recomputed
    MLPs downstream of s change. We carry that delta through the MLPs and record it at each receiver
    of the set; run 2 adds the recorded deltas to those receivers' clean inputs."""
    spec, g = experiment.spec, experiment.spec.graph
    K, P, T, d = len(group), batch.size, batch.clean_ids.shape[1], spec.d_model
    C = clean.senders  # [P, T, S, d]
    A = batch.ablation.values  # [1|P, 1|T, S, d]
    idx = torch.tensor(group)
    delta = (A[:, :, idx] - C[:, :, idx]).permute(2, 0, 1, 3).expand(K, P, T, d).contiguous()  # [K, P, T, d]
    shift_at: dict[int, Tensor] = {}

    def record(receiver: int) -> None:
        if receiver in recv:
            upstream = idx < g.n_upstream[receiver]  # [K]: s feeds this receiver
            shift_at[receiver] = delta * upstream[:, None, None, None].to(delta.dtype)

    for layer in range(g.n_layers):
        qkv = g.qkv_receivers(layer)
        for r in range(qkv.start, qkv.stop):
            record(r)
        lay = spec.layers[layer]
        heads = C[:, :, g.attention_senders(layer)]  # frozen clean heads [P, T, H, d]
        attn = heads.sum(2) + (lay.attn.b_O if lay.attn.b_O is not None else 0.0)
        clean_mlp_in = clean.resid[layer] if g.parallel_residual else clean.resid[layer] + attn  # [P, T, d]
        m_index = g.mlp_sender(layer)
        feeds = idx < g.mlp_upstream(layer)  # [K]: s is upstream of this MLP
        record(g.mlp_receiver(layer))
        if bool(feeds.any()):
            x = clean_mlp_in[None] + delta  # [K, P, T, d]
            out = ops.mlp_sender(lay, x.reshape(K * P, T, d)).view(K, P, T, d)  # post-MLP norm included
            change = (out - C[None, :, :, m_index]) * feeds[:, None, None, None].to(out.dtype)
            delta = delta + change
    record(g.logits_receiver)

    if recv == [g.logits_receiver]:
        final = clean.resid[g.n_layers][None] + shift_at[g.logits_receiver]  # [K, P, T, d]
        rows = torch.arange(P)
        logits = rt.unembed(spec, final[:, rows, batch.read_positions])  # [K, P, V]
        return score(experiment, batch, logits)
    values = torch.stack([shift_at[r] for r in recv], dim=3).reshape(K * P, T, len(recv), d)  # [K*P, T, n, d]
    first = min(_receiver_layer(g, r) for r in recv)
    logits = rt.run(
        spec,
        batch.clean_ids.repeat(K, 1),
        shifts=rt.ReceiverShifts(torch.tensor(recv), values),
        read_positions=batch.read_positions.repeat(K),
        start=clean.at(spec, first),
    ).logits
    return score(experiment, batch, logits.view(K, P, -1))
