"""CD-T scores for every edge ``u -> r`` of the graph.

An edge carries the sender's relevant output ``delta_u = a_u - A_u`` into one receiver ``r``
(``in_r = c_r + sum_u a_u``: the edge's share of ``r``'s input is exactly ``a_u``, and ``A_u`` is its
irrelevant part). The edge's *source* is therefore ``delta_u`` placed in ``r``'s input alone, with the
rest of that input irrelevant. Two scores (both signed, in metric units; ``EdgeScores.values`` hold
``-kappa``, the project's "effect of ablating" sign, see ``graphs.scores``):

* ``mode="exact"``: ``kappa(u -> r)`` = the CD-T contribution of that edge source to the metric:
  the receiver's node is decomposed with the edge's relevance in slot ``r`` only, and its relevant
  output is propagated through the rest of the network to the metric. On a linear network this is
  exactly edge patching's ``m(clean) - m(edge ablated)``. Cost: one decomposed pass per edge (batched
  over edges and prompts), like edge patching - for small models.
* ``mode="projected"`` (default): the same local decomposition of the receiver's node ``v``, but
  instead of propagating, the node's relevant output ``beta_v(u -> r)`` is measured against the
  node's own relevant output ``delta_v`` and scaled by the node's contribution to the metric:

      kappa(u -> r) = kappa(v) * <beta_v(u -> r), delta_v> / <delta_v, delta_v>

  (inner products summed over prompts and positions up to each read position; 0 when ``delta_v``
  is 0), i.e. the fraction of ``v``'s relevant output the edge explains, times what ``v``'s relevant
  output is worth. For ``r = logits`` both modes use the exact readout of ``delta_u`` at the final
  residual. Cost: one decomposed pass per sender (for ``kappa(v)``) plus one local evaluation of
  every layer per upstream sender - about two path-patching sweeps, whatever the edge count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from circuits.distributed import reducer
from circuits.experiment import Experiment, PreparedBatch
from circuits.methods.cdt.contributions import (
    batch_metric_contributions,
    read_groups,
    settings,
    sources_per_pass,
)
from circuits.methods.cdt.forward import (
    BatchState,
    PassPlan,
    Point,
    head_sum,
    post_factor,
    propagate,
)
from circuits.methods.cdt.layers import decompose_attention_slots, decompose_mlp
from circuits.methods.cdt.readout import Readout, metric_contributions
from circuits.methods.cdt.rules import CDTConfig, CDTError
from circuits.methods.cdt.sources import resolve_all
from circuits.progress import progress_bar
from graphs.adapters.spec import ModelSpec
from graphs.graph import SLOTS, ComputationGraph
from graphs.scores import EdgeScores, NodeScores

Mode = Literal["projected", "exact"]


@dataclass(frozen=True)
class EdgeContributions:
    """Raw CD-T edge results: ``kappa`` [S, R] (metric units, positive = supports the behaviour) and
    the per-sender contributions to the metric ``node_kappa`` [S] (dataset means)."""

    kappa: Tensor
    node_kappa: Tensor
    mode: str


def _mlp_input_total(state: BatchState, layer: int) -> Tensor:
    """The clean total an MLP reads [P, T, d] (the residual, plus this layer's heads if sequential)."""
    spec, g = state.spec, state.spec.graph
    resid = state.resid[layer]
    if g.parallel_residual:
        return resid
    attn = state.outputs(g.attention_senders(layer)).sum(2)
    b_O = spec.layers[layer].attn.b_O
    return resid + attn + (b_O if b_O is not None else 0.0)


def _slot_outputs(state: BatchState, layer: int, X: Tensor, config: CDTConfig) -> tuple[dict[str, Tensor], Tensor | None]:
    """Mixed values [k, P, T, H, dh] of every head of ``layer`` with relevance X [k, P, T, d] in one
    slot (q, k or v) and none elsewhere (slots that cannot carry relevance are left out), and the
    post-attention norm's factor [P, T, d] (Gemma; None without one): a head's relevant sender
    output is ``factor * z_h W_O[h]``."""
    lay = state.spec.layers[layer]
    out = decompose_attention_slots(lay.attn, lay.attn_norm, state.resid[layer], X, state.rotary[layer], config)
    z_total = out.pop("total")
    assert z_total is not None
    factor = post_factor(lay.post_attn_norm, head_sum(lay.attn, z_total))
    return {slot: z for slot, z in out.items() if z is not None}, factor


def _mlp_output(state: BatchState, layer: int, X: Tensor, config: CDTConfig) -> Tensor | None:
    """The relevant sender output [k, P, T, d] of MLP ``layer`` with relevance X [k, P, T, d] in its input."""
    lay = state.spec.layers[layer]
    out_b, out_t = decompose_mlp(lay.mlp, lay.mlp_norm, _mlp_input_total(state, layer), X, config)
    if out_b is None or lay.post_mlp_norm is None:
        return out_b
    return out_b * post_factor(lay.post_mlp_norm, out_t)  # type: ignore[operator]


def _sources(state: BatchState, lo: int, hi: int) -> Tensor:
    """Relevant outputs of senders lo..hi-1 as edge sources: [k, P, T, d]."""
    return state.delta(slice(lo, hi)).permute(2, 0, 1, 3)


def _metric_of(state: BatchState, readout: Readout, plan: PassPlan, config: CDTConfig) -> Tensor:
    """Summed (over prompts) metric contributions [S] of one pass to the final read positions."""
    res = propagate(state, plan, config, last_query_only=True)
    beta = None if res.beta is None else res.beta[:, :, -1]
    return metric_contributions(state.spec, readout, beta, res.total[:, -1], config).double().sum(1)


class _Accumulator:
    """Sums over batches: projection numerators R [S, R], |delta_v|^2 [S], readouts, node kappas."""

    def __init__(self, spec: ModelSpec) -> None:
        g = spec.graph
        self.R = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
        self.norms = torch.zeros(g.n_senders, dtype=torch.float64)
        self.node = torch.zeros(g.n_senders, dtype=torch.float64)


def _projected_batch(
    experiment: Experiment, batch: PreparedBatch, state: BatchState, acc: _Accumulator, config: CDTConfig
) -> None:
    spec, g = experiment.spec, experiment.spec.graph
    H = g.n_heads
    for rows, length in read_groups(batch):
        sub = state.subset(rows, length)
        P = rows.numel()
        size = sources_per_pass(spec, P, length, config)
        readout = Readout.of(batch, rows)
        # logits: exact readout of delta_u at the read position
        for lo in range(0, g.n_senders, size):
            hi = min(lo + size, g.n_senders)
            acc.norms[lo:hi] += _sources(sub, lo, hi).pow(2).sum((1, 2, 3), dtype=torch.float64)
            kappa = metric_contributions(spec, readout, _sources(sub, lo, hi)[:, :, -1], sub.resid[-1][:, -1], config)
            acc.R[lo:hi, g.logits_receiver] += kappa.double().sum(1)
        for layer in range(g.n_layers):
            lay = spec.layers[layer]
            heads = g.attention_senders(layer)
            n_up = g.attention_upstream(layer)
            target = None
            for lo in range(0, n_up, size):
                hi = min(lo + size, n_up)
                slots, factor = _slot_outputs(sub, layer, _sources(sub, lo, hi), config)
                if target is None:  # delta_v pulled back to head space: <z W_O * f, delta> = <z, (delta * f) W_O^T>
                    delta_v = sub.delta(heads)  # [P, T, H, d]
                    delta_v = delta_v if factor is None else delta_v * factor[:, :, None, :]
                    target = torch.einsum("pthd,hed->pthe", delta_v, lay.attn.W_O)
                for slot, z_b in slots.items():
                    r0 = g.slot_receiver(layer, 0, next(s for s in SLOTS if s.value == slot))
                    acc.R[lo:hi, r0 : r0 + H] += torch.einsum("sbthe,bthe->sh", z_b, target).double()
            mlp_delta = sub.delta(g.mlp_sender(layer))  # [P, T, d]
            n_up = g.mlp_upstream(layer)
            for lo in range(0, n_up, size):
                hi = min(lo + size, n_up)
                out_b = _mlp_output(sub, layer, _sources(sub, lo, hi), config)
                if out_b is not None:
                    acc.R[lo:hi, g.mlp_receiver(layer)] += torch.einsum("sbtd,btd->s", out_b, mlp_delta).double()


def _exact_batch(
    experiment: Experiment, batch: PreparedBatch, state: BatchState, acc: _Accumulator, config: CDTConfig
) -> None:
    spec, g = experiment.spec, experiment.spec.graph
    H = g.n_heads
    for rows, length in read_groups(batch):
        sub = state.subset(rows, length)
        P = rows.numel()
        readout = Readout.of(batch, rows)
        size = sources_per_pass(spec, P, length, config)

        for lo in range(0, g.n_senders, size):
            hi = min(lo + size, g.n_senders)
            kappa = metric_contributions(spec, readout, _sources(sub, lo, hi)[:, :, -1], sub.resid[-1][:, -1], config)
            acc.R[lo:hi, g.logits_receiver] += kappa.double().sum(1)
        per_chunk = max(1, size // H)
        for layer in range(g.n_layers):
            lay = spec.layers[layer]
            W_O = lay.attn.W_O  # [H, dh, d]
            n_up = g.attention_upstream(layer)
            for lo in range(0, n_up, per_chunk):
                hi = min(lo + per_chunk, n_up)
                k = hi - lo
                slots, factor = _slot_outputs(sub, layer, _sources(sub, lo, hi), config)
                for slot, z_b in slots.items():
                    out = torch.einsum("sbthe,hed->shbtd", z_b, W_O)  # [k, H, P, T, d]: one head at a time
                    out = (out if factor is None else out * factor).reshape(k * H, *z_b.shape[1:3], -1)
                    plan = PassPlan(k * H, Point(layer, "mlp"), attn=out)
                    r0 = g.slot_receiver(layer, 0, next(s for s in SLOTS if s.value == slot))
                    acc.R[lo:hi, r0 : r0 + H] += _metric_of(sub, readout, plan, config).view(k, H)
            n_up = g.mlp_upstream(layer)
            for lo in range(0, n_up, size):
                hi = min(lo + size, n_up)
                out_b = _mlp_output(sub, layer, _sources(sub, lo, hi), config)
                if out_b is not None:
                    plan = PassPlan(hi - lo, Point(layer + 1), resid=out_b)
                    acc.R[lo:hi, g.mlp_receiver(layer)] += _metric_of(sub, readout, plan, config)


@torch.no_grad()
def cdt_edge_contributions(
    experiment: Experiment, mode: Mode = "projected", *, config: CDTConfig | None = None, progress: bool = False
) -> EdgeContributions:
    """``kappa(u -> r)`` for every edge and ``kappa(v)`` for every sender (see the module docstring)."""
    if mode not in ("projected", "exact"):
        raise CDTError(f"mode must be 'projected' or 'exact', got {mode!r}")
    config = config or CDTConfig()
    spec, g = experiment.spec, experiment.spec.graph
    acc = _Accumulator(spec)
    senders = resolve_all(g, list(g.senders))
    bar = progress_bar(experiment.n_prompts, f"CD-T edges ({mode})", progress, "prompt")
    for batch in experiment.batches():
        state = BatchState.build(spec, batch.clean_ids, batch.ablation)
        acc.node += batch_metric_contributions(spec, batch, senders, config, state).double().sum(1)
        (_projected_batch if mode == "projected" else _exact_batch)(experiment, batch, state, acc, config)
        bar.update(batch.size)
    bar.close()
    red = reducer(experiment)  # a shard of a distributed run: add every rank's sums before combining them
    N = red.count(experiment.n_prompts)
    acc.R, acc.norms, acc.node = red.sum(acc.R), red.sum(acc.norms), red.sum(acc.node)
    node = acc.node / N  # [S]
    kappa = combine(g, mode, acc.R, acc.norms, node, N)
    return EdgeContributions(kappa.float(), node.float(), mode)


def combine(g: ComputationGraph, mode: str, R: Tensor, norms: Tensor, node: Tensor, N: int) -> Tensor:
    """Edge contributions from the summed batch results: ``R`` [S, R, ...] (any trailing axes, e.g.
    positions), ``norms`` [S] (sum of ``|delta_v|^2``), ``node`` [S] (``kappa(v)``, dataset means).

    ``exact``: ``R / N``. ``projected``: ``R[u, r] * kappa(v) / |delta_v|^2`` with ``v`` the receiver's
    node (0 where ``delta_v = 0``); the logits column is the direct readout, ``R / N``. Linear in
    ``R``, so a split of ``R`` over positions gives contributions that sum to the unsplit ones."""
    extra = (None,) * (R.dim() - 2)
    if mode == "exact":
        kappa = R / N
    else:
        owner = _receiver_owner(g)  # [R] sender index of each receiver's node (-1: logits)
        scale = torch.zeros(g.n_receivers, dtype=torch.float64)
        has = owner >= 0
        own = norms[owner[has]]
        scale[has] = torch.where(own > 0, node[owner[has]] / own.clamp_min(1e-300), 0.0)
        kappa = R * scale[(None, slice(None), *extra)]
        kappa[:, g.logits_receiver] = R[:, g.logits_receiver] / N
    return torch.where(g.edge_mask[(..., *extra)], kappa, 0.0)


def _receiver_owner(g: ComputationGraph) -> Tensor:
    """[R] sender index of each receiver's node (-1: the logits receiver)."""
    owner = torch.full((g.n_receivers,), -1, dtype=torch.long)
    for layer in range(g.n_layers):
        for h in range(g.n_heads):
            for slot in SLOTS:
                owner[g.slot_receiver(layer, h, slot)] = g.head_sender(layer, h)
        owner[g.mlp_receiver(layer)] = g.mlp_sender(layer)
    return owner


def cdt_edge_scores(
    experiment: Experiment, mode: Mode = "projected", *, config: CDTConfig | None = None, progress: bool = False
) -> EdgeScores:
    """CD-T ``EdgeScores`` for every edge: ``values = -kappa(u -> r)`` (the effect-of-ablation sign)."""
    config = config or CDTConfig()
    result = cdt_edge_contributions(experiment, mode, config=config, progress=progress)
    return to_edge_scores(experiment, result, config)


def to_edge_scores(experiment: Experiment, result: EdgeContributions, config: CDTConfig) -> EdgeScores:
    return EdgeScores(
        experiment.spec.graph, -result.kappa, f"cdt/{result.mode}", settings(experiment, config, mode=result.mode)
    )


def to_node_scores(experiment: Experiment, result: EdgeContributions, config: CDTConfig) -> NodeScores:
    return NodeScores(experiment.spec.graph, -result.node_kappa, "cdt", settings(experiment, config))
