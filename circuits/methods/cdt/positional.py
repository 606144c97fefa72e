"""CD-T edge scores per token position: ``kappa(u@t -> r@t)`` for every edge and position.

The non-positional edge source of ``u -> r`` is ``delta_u = a_u - A_u`` placed in receiver ``r``'s
input at every position (``circuits.methods.cdt.edges``). Its positional split gives token ``t`` the
part of that contribution due to ``delta_u`` at ``t``, by **prefixes** (causal order): with
``f(X)`` the edge's contribution (either mode) when its source is ``X`` [P, T, d],

    kappa(u@t -> r@t) = f(delta_u at positions <= t) - f(delta_u at positions < t)

so ``sum_t kappa(u@t -> r@t) = f(delta_u) - f(0) = kappa(u -> r)`` by construction (``f(0) = 0``
exactly: no relevance gives exactly zero everywhere), in both modes, with any normalisation.

Where ``f`` is additive over positions the prefix increment is exactly the contribution of
``delta_u`` at ``t`` alone (the "part of ``r``'s input at ``t`` that comes from ``u`` at ``t``"):

* ``mode="projected"``: the q slot, the v slot, the MLP input and the logits are additive (their
  relevant parts act per position, values enter the mixing linearly, and the inner product with
  ``delta_v`` and the scale ``kappa(v) / |delta_v|^2`` are linear). The **k slot** is not: keys at
  several positions share one softmax, so token ``t``'s increment is its contribution given the
  relevant keys of the tokens before it.
* ``mode="exact"``: the propagation to the metric is nonlinear in general (later attention, MLPs,
  normalisation), so every slot uses the prefix increment; on a linear network (nonlinearities
  removed, ``normalize="none"``, biases irrelevant) it is additive and equals positional edge
  patching ``m(clean) - m(u@t -> r@t ablated)`` exactly (tested).

Positions after the read position cannot reach the metric and score 0; ``u -> logits@t`` is
nonzero only at the read position. The alignment rule of ``circuits.positional`` applies.

Cost (``P`` prompts, ``T`` positions up to the read position): ``projected`` - the non-positional
local evaluations plus one extra softmax per (upstream sender, head layer, prefix) for the k slot;
``exact`` - ``T`` decomposed passes per edge (``T`` times the non-positional exact mode). Memory is
bounded like the non-positional passes: (sender, prefix) pairs are chunked so that at most
``sources_per_pass`` of them share a pass, whatever ``T`` is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
from circuits.methods.cdt.edges import Mode, _metric_of, _mlp_output, _sources, combine
from circuits.methods.cdt.forward import (
    BatchState,
    PassPlan,
    Point,
    head_sum,
    post_factor,
)
from circuits.methods.cdt.layers import decompose_attention_slot_prefixes
from circuits.methods.cdt.readout import Readout, metric_contributions
from circuits.methods.cdt.rules import CDTConfig, CDTError
from circuits.methods.cdt.sources import resolve_all
from circuits.positional import check_alignment
from circuits.progress import progress_bar
from graphs.graph import SLOTS
from graphs.positional import PositionalEdgeScores


@dataclass(frozen=True)
class PositionalEdgeContributions:
    """Raw positional CD-T results: ``kappa`` [S, R, T] (metric units, positive = supports the
    behaviour; ``kappa.sum(2)`` is the non-positional ``EdgeContributions.kappa``), the per-sender
    contributions ``node_kappa`` [S] (dataset means, not split), the mode and the shared alignment's
    ``tokens`` and ``read_position``."""

    kappa: Tensor
    node_kappa: Tensor
    mode: str
    tokens: tuple[str, ...]
    read_position: int


class _Accumulator:
    """Sums over batches: positional numerators R [S, R, T], |delta_v|^2 [S], node kappas [S]."""

    def __init__(self, experiment: Experiment, T: int) -> None:
        g = experiment.spec.graph
        self.R = torch.zeros(g.n_senders, g.n_receivers, T, dtype=torch.float64)
        self.norms = torch.zeros(g.n_senders, dtype=torch.float64)
        self.node = torch.zeros(g.n_senders, dtype=torch.float64)


def prefix_chunks(n: int, length: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """``(lo, hi, t0, t1)``: senders ``lo..hi-1`` with prefix ends ``t0..t1-1``, at most ``size``
    (sender, prefix) pairs per chunk. For each sender chunk the position chunks come in increasing
    order, so the caller can carry the last prefix value into the next chunk."""
    size = max(1, size)
    if size >= length:
        per = size // length
        for lo in range(0, n, per):
            yield lo, min(lo + per, n), 0, length
        return
    for lo in range(n):
        for t0 in range(0, length, size):
            yield lo, lo + 1, t0, min(t0 + size, length)


def telescope(values: Tensor, previous: Tensor) -> Tensor:
    """Per-position increments [k, E, ...] from prefix values [k, E, ...] (ends t0..t1-1) and the
    value at ``t0 - 1`` ``previous`` [k, ...] (zeros for t0 = 0)."""
    full = torch.cat([previous[:, None], values], 1)
    return full[:, 1:] - full[:, :-1]


def _slot_prefixes(state: BatchState, layer: int, X: Tensor, t0: int, t1: int, config: CDTConfig
                   ) -> tuple[dict[str, Tensor], Tensor | None]:
    """Mixed values [k*E, P, T, H, dh] per slot for relevance X [k, P, T, d] restricted to the
    prefixes ending at t0..t1-1, and the post-attention norm's factor [P, T, d] (or None)."""
    lay = state.spec.layers[layer]
    out = decompose_attention_slot_prefixes(
        lay.attn, lay.attn_norm, state.resid[layer], X, state.rotary[layer], config, range(t0, t1)
    )
    z_total = out.pop("total")
    assert z_total is not None
    factor = post_factor(lay.post_attn_norm, head_sum(lay.attn, z_total))
    return {slot: z for slot, z in out.items() if z is not None}, factor


def _slot_receiver0(g: Any, layer: int, slot: str) -> int:
    return g.slot_receiver(layer, 0, next(s for s in SLOTS if s.value == slot))


def _logits_and_norms(
    experiment: Experiment, sub: BatchState, readout: Readout, acc: _Accumulator, length: int, size: int,
    config: CDTConfig,
) -> None:
    """The ``-> logits`` column (exact readout of delta_u at the read position, the last of ``sub``)
    and the |delta_u|^2 sums of the projected scale, exactly as the non-positional scores."""
    spec, g = experiment.spec, experiment.spec.graph
    for lo in range(0, g.n_senders, size):
        hi = min(lo + size, g.n_senders)
        X = _sources(sub, lo, hi)  # [k, P, T, d]
        acc.norms[lo:hi] += X.pow(2).sum((1, 2, 3), dtype=torch.float64)
        kappa = metric_contributions(spec, readout, X[:, :, -1], sub.resid[-1][:, -1], config)  # [k, P]
        acc.R[lo:hi, g.logits_receiver, length - 1] += kappa.double().sum(1)


def _projected_batch(experiment: Experiment, batch: PreparedBatch, state: BatchState, acc: _Accumulator,
                     config: CDTConfig) -> None:
    spec, g = experiment.spec, experiment.spec.graph
    H = g.n_heads
    for rows, length in read_groups(batch):
        sub = state.subset(rows, length)
        P = rows.numel()
        size = sources_per_pass(spec, P, length, config)
        _logits_and_norms(experiment, sub, Readout.of(batch, rows), acc, length, size, config)
        for layer in range(g.n_layers):
            lay = spec.layers[layer]
            heads = g.attention_senders(layer)
            target = None  # delta_v pulled back to head space [P, T, H, dh]
            previous: dict[str, Tensor] = {}
            for lo, hi, t0, t1 in prefix_chunks(g.attention_upstream(layer), length, size):
                k, E = hi - lo, t1 - t0
                slots, factor = _slot_prefixes(sub, layer, _sources(sub, lo, hi), t0, t1, config)
                if target is None:  # <z W_O * f, delta> = <z, (delta * f) W_O^T>
                    delta_v = sub.delta(heads)  # [P, T, H, d]
                    delta_v = delta_v if factor is None else delta_v * factor[:, :, None, :]
                    target = torch.einsum("pthd,hed->pthe", delta_v, lay.attn.W_O)
                for slot, z_b in slots.items():
                    inner = torch.einsum("sbthe,bthe->sh", z_b, target).double().view(k, E, H)  # prefix values
                    before = previous[slot] if t0 > 0 else torch.zeros(k, H, dtype=torch.float64)
                    r0 = _slot_receiver0(g, layer, slot)
                    acc.R[lo:hi, r0 : r0 + H, t0:t1] += telescope(inner, before).permute(0, 2, 1)
                    previous[slot] = inner[:, -1]
            # the MLP acts per position: the prefix increment at t is position t's own inner product
            mlp_delta = sub.delta(g.mlp_sender(layer))  # [P, T, d]
            n_up = g.mlp_upstream(layer)
            for lo in range(0, n_up, size):
                hi = min(lo + size, n_up)
                out_b = _mlp_output(sub, layer, _sources(sub, lo, hi), config)  # [k, P, T, d]
                if out_b is not None:
                    inner = torch.einsum("sbtd,btd->st", out_b, mlp_delta).double()  # [k, T]
                    acc.R[lo:hi, g.mlp_receiver(layer), :length] += inner


def _exact_batch(experiment: Experiment, batch: PreparedBatch, state: BatchState, acc: _Accumulator,
                 config: CDTConfig) -> None:
    spec, g = experiment.spec, experiment.spec.graph
    H = g.n_heads
    for rows, length in read_groups(batch):
        sub = state.subset(rows, length)
        P = rows.numel()
        readout = Readout.of(batch, rows)
        size = sources_per_pass(spec, P, length, config)
        _logits_and_norms(experiment, sub, readout, acc, length, size, config)
        for layer in range(g.n_layers):
            W_O = spec.layers[layer].attn.W_O  # [H, dh, d]
            previous: dict[str, Tensor] = {}
            for lo, hi, t0, t1 in prefix_chunks(g.attention_upstream(layer), length, max(1, size // H)):
                k, E = hi - lo, t1 - t0
                slots, factor = _slot_prefixes(sub, layer, _sources(sub, lo, hi), t0, t1, config)
                for slot, z_b in slots.items():
                    out = torch.einsum("sbthe,hed->shbtd", z_b, W_O)  # [k*E, H, P, T, d]: one head at a time
                    out = (out if factor is None else out * factor).reshape(k * E * H, *z_b.shape[1:3], -1)
                    plan = PassPlan(k * E * H, Point(layer, "mlp"), attn=out)
                    value = _metric_of(sub, readout, plan, config).view(k, E, H)  # prefix values
                    before = previous[slot] if t0 > 0 else torch.zeros(k, H, dtype=torch.float64)
                    r0 = _slot_receiver0(g, layer, slot)
                    acc.R[lo:hi, r0 : r0 + H, t0:t1] += telescope(value, before).permute(0, 2, 1)
                    previous[slot] = value[:, -1]
            mlp_previous = None
            for lo, hi, t0, t1 in prefix_chunks(g.mlp_upstream(layer), length, size):
                k, E = hi - lo, t1 - t0
                out_b = _mlp_output(sub, layer, _sources(sub, lo, hi), config)  # [k, P, T, d], per position
                if out_b is None:
                    continue
                ends = torch.arange(t0, t1)
                keep = (torch.arange(length)[None, :] <= ends[:, None]).to(out_b.dtype)  # [E, T]
                prefixes = (out_b[:, None] * keep[None, :, None, :, None]).flatten(0, 1)  # [k*E, P, T, d]
                plan = PassPlan(k * E, Point(layer + 1), resid=prefixes)
                value = _metric_of(sub, readout, plan, config).view(k, E)
                before = mlp_previous if t0 > 0 and mlp_previous is not None else torch.zeros(k, dtype=torch.float64)
                acc.R[lo:hi, g.mlp_receiver(layer), t0:t1] += telescope(value, before)
                mlp_previous = value[:, -1]


@torch.no_grad()
def positional_cdt_edge_contributions(
    experiment: Experiment,
    mode: Mode = "projected",
    tokenizer: object | None = None,
    *,
    config: CDTConfig | None = None,
    progress: bool = False,
) -> PositionalEdgeContributions:
    """``kappa(u@t -> r@t)`` [S, R, T] for every edge and position (module docstring); the task
    must share one token alignment (``AlignmentError`` naming the first misaligned prompt)."""
    if mode not in ("projected", "exact"):
        raise CDTError(f"mode must be 'projected' or 'exact', got {mode!r}")
    alignment = check_alignment(experiment.task, tokenizer)
    config = config or CDTConfig()
    spec, g = experiment.spec, experiment.spec.graph
    acc = _Accumulator(experiment, alignment.length)
    senders = resolve_all(g, list(g.senders))
    bar = progress_bar(experiment.n_prompts, f"positional CD-T edges ({mode})", progress, "prompt")
    for batch in experiment.batches():
        state = BatchState.build(spec, batch.clean_ids, batch.ablation)
        acc.node += batch_metric_contributions(spec, batch, senders, config, state).double().sum(1)
        (_projected_batch if mode == "projected" else _exact_batch)(experiment, batch, state, acc, config)
        bar.update(batch.size)
    bar.close()
    red = reducer(experiment)  # a shard of a distributed run: add every rank's sums before combining them
    N = red.count(experiment.n_prompts)
    R, norms, node = red.sum(acc.R), red.sum(acc.norms), red.sum(acc.node)
    node = node / N  # [S]
    kappa = combine(g, mode, R, norms, node, N)  # [S, R, T] float64
    return PositionalEdgeContributions(kappa, node.float(), mode, alignment.tokens, alignment.read_position)


def positional_cdt_edge_scores(
    experiment: Experiment,
    mode: Mode = "projected",
    tokenizer: object | None = None,
    *,
    config: CDTConfig | None = None,
    progress: bool = False,
) -> PositionalEdgeScores:
    """CD-T ``PositionalEdgeScores`` [S, R, T]: ``values = -kappa(u@t -> r@t)`` (effect-of-ablation
    sign); ``summed()`` equals ``cdt_edge_scores(experiment, mode)`` (float rounding only).
    ``tokenizer`` only names the positions."""
    config = config or CDTConfig()
    result = positional_cdt_edge_contributions(experiment, mode, tokenizer, config=config, progress=progress)
    extra = settings(experiment, config, mode=mode, positional=True, read_position=result.read_position)
    return PositionalEdgeScores(experiment.spec.graph, -result.kappa.float(), result.tokens, f"cdt/{mode}", extra)


__all__ = [
    "PositionalEdgeContributions",
    "positional_cdt_edge_contributions",
    "positional_cdt_edge_scores",
    "prefix_chunks",
    "telescope",
]
