"""Attribution methods: EAP, EAP-IG (inputs / activations) and AtP*.

All give ``EdgeScores`` in the convention of the exact methods: a first-order estimate of
``m(clean, edge ablated) - m(clean)`` for the dataset-mean metric ``m``.

* EAP (Syed et al. 2023): ``score(u -> r) = (A_u - a_u) . dm/d in_r`` summed over positions and
  averaged over prompts; one clean forward (which also yields ``a_u``), the ablation values, one
  backward. All edges into ``r`` share one gradient. Scores are accumulated *during* the backward
  pass, layer by layer, so the ``[B, T, R, d]`` gradient is never held at once.
* EAP-IG, inputs (Hanna et al. 2024): the gradient is averaged over ``steps`` interpolations of the
  input embedding from its ablation value (alpha = 0) to the clean embedding (alpha = 1); the
  deltas ``A_u - a_u`` stay those of the clean run.
* EAP-IG, activations: every edge is ablated by the same fraction ``1 - alpha`` (a fractional edge
  mask), i.e. each receiver reads senders interpolated between clean and ablated; the score is
  ``(A_u - a_u(alpha)) . dm/d in_r`` averaged over alpha: exactly the integrated gradient of ``m``
  with respect to the edge mask, so the scores of *all* edges sum to ``m(everything ablated) -
  m(clean)`` as ``steps`` grows.
* Step schedule (both variants): ``midpoint`` (default) uses alpha = (k + 1/2) / steps, k = 0..steps-1,
  and includes neither endpoint; ``left`` uses k / steps (includes the ablated endpoint, as the
  reference EAP-IG code does for inputs); ``right`` uses (k + 1) / steps (includes the clean one).
* AtP* (Kramar et al. 2024) = EAP plus two fixes. QK fix: for edges into query and key slots the
  attention pattern is recomputed exactly with the patched query or key (norm and projection
  included), and only the map from the pattern to the metric is linearised:
  ``score = sum (pattern' - pattern) * dm/d pattern``. GradDrop: L more backward passes, the l-th
  with the gradient through layer l's heads and MLP dropped; the score is
  ``sign(AtP estimate) * sum_l |estimate_l| / (L - 1)`` (magnitudes as in the paper; the sign of the
  undropped estimate is kept so the convention holds). The layer that owns an edge's receiver is
  never dropped for that edge.

A KL metric has zero gradient at the clean point, so EAP and AtP* refuse it (EAP-IG accepts it).

Positional variants (docs/positions.md): ``positional_eap`` and ``positional_eap_ig`` keep the token
position instead of summing over it, ``score[u, r, t] = sum_b (A_u - a_u)[b, t] . dm/d in_r[b, t]``
(averaged over prompts), so ``PositionalEdgeScores.summed()`` equals ``eap`` / ``eap_ig`` exactly.
They need a task whose prompts share one token alignment (``circuits.positional.check_alignment``).

Scale and hygiene (docs/scale.md): scores are accumulated in float64 from products formed in
float32 or wider (half-precision deltas and gradients are cast per block); a non-finite logit,
metric, gradient or delta stops the run naming the prompt; ``checkpoint=`` saves the partial sums
after every batch; on a distributed shard the partial sums are all-reduced (AtP*'s estimates before
they are combined), so every rank returns the whole dataset's scores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.checkpoint import BatchProgress, Checkpointer
from circuits.distributed import reducer
from circuits.experiment import Experiment, PreparedBatch
from circuits.numerics import check_finite, score, wide
from circuits.positional import check_alignment
from circuits.progress import progress_bar
from graphs import ops
from graphs import runtime as rt
from graphs.adapters.spec import ModelSpec
from graphs.graph import ComputationGraph
from graphs.ids import Slot
from graphs.positional import PositionalEdgeScores
from graphs.scores import EdgeScores

SCHEDULES = ("midpoint", "left", "right")


class AttributionError(ValueError):
    """An attribution method cannot be run as asked (e.g. KL with plain EAP)."""


def alphas(steps: int, schedule: str = "midpoint") -> list[float]:
    """Interpolation points in (0, 1] / [0, 1) (see the module docstring); alpha = 1 is clean."""
    if steps < 1:
        raise AttributionError("steps must be at least 1")
    if schedule == "midpoint":
        return [(k + 0.5) / steps for k in range(steps)]
    if schedule == "left":
        return [k / steps for k in range(steps)]
    if schedule == "right":
        return [(k + 1) / steps for k in range(steps)]
    raise AttributionError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _refuse_kl(experiment: Experiment, method: str) -> None:
    if experiment.metric.needs_reference:
        raise AttributionError(
            f"{method} needs the metric's gradient at the clean run, and the gradient of KL to the clean "
            "distribution is zero there; use a task metric (logit_diff, prob_diff, logprob) or eap-ig"
        )


# --------------------------------------------------------------------------- streaming accumulation

def _empty_rows(spec: ModelSpec, B: int, T: int) -> Tensor:
    """An uninitialised delta-row matrix [S, B*T*d] (float32 for half-precision models)."""
    dtype = wide(torch.empty((), dtype=spec.dtype)).dtype
    return torch.empty(spec.graph.n_senders, B * T * spec.d_model, dtype=dtype, device=spec.device)


def _fill_rows(rows: Tensor, ablated: Tensor, first: int, senders: Tensor) -> None:
    """Write ``A - a`` of one block of senders (``senders`` [B, T, k, d], the ``a`` of senders
    ``first..first+k-1``) into their delta rows; ``ablated`` [1|B, 1|T, S, d]."""
    B, T, k, d = senders.shape
    A = ablated[:, :, first : first + k].expand(B, T, k, d).permute(2, 0, 1, 3)  # [k, B, T, d]
    out = rows[first : first + k].view(k, B, T, d)
    if out.dtype == senders.dtype:
        torch.sub(A, senders.permute(2, 0, 1, 3), out=out)
    else:  # half-precision senders: the difference in their precision, then widened
        out.copy_(A - senders.permute(2, 0, 1, 3))


def _corrupted_rows(spec: ModelSpec, batch: PreparedBatch) -> Tensor | None:
    """The batch's own corrupted-run sender outputs seen as delta rows [S, B*T*d], or None.

    Resample ablation makes a fresh ``[B, T, S, d]`` buffer per batch, stored sender-major; EAP
    turns it into ``A - a`` in place (``_subtract_rows``) instead of allocating a second buffer of
    the same size (444 MB for SmolLM2-135M at 32 prompts). The batch's ablation values are then
    spent, so only a pass that reads them nowhere else may ask (plain EAP: no mask, no mixing)."""
    values = batch.ablation.values  # [B, T, S, d] for a per-batch corrupted run
    B, T = batch.clean_ids.shape
    wide_dtype = wide(torch.empty((), dtype=spec.dtype)).dtype
    if batch.ablation.kind != "corrupted" or tuple(values.shape[:2]) != (B, T) or values.dtype != wide_dtype:
        return None
    sender_major = values.permute(2, 0, 1, 3)  # [S, B, T, d]
    if not sender_major.is_contiguous():
        return None
    return sender_major.view(values.shape[2], -1)


def _subtract_rows(rows: Tensor, first: int, senders: Tensor) -> None:
    """Turn the rows of senders ``first..first+k-1`` from ``A`` into ``A - a``; ``senders`` [B, T, k, d]."""
    B, T, k, d = senders.shape
    rows[first : first + k].view(k, B, T, d).sub_(senders.permute(2, 0, 1, 3))


def _prompt_view(rows: Tensor, B: int) -> Tensor:
    """Delta rows [S, B*T*d] viewed per prompt: [B, S, T*d] (for error messages)."""
    return rows.view(rows.shape[0], B, -1).transpose(0, 1)


def _block_scores(rows: Tensor, grad: Tensor, n_up: int, spans: Sequence[int] | None = None) -> Tensor:
    """``sum_{b,t} D[b,t,u] . grad[b,t,r]`` for the first ``n_up`` senders: [n_up, R_block] in float32
    (or wider); ``grad`` [B, T, R_block, d] or [B, T, d].

    ``spans[b]``: prompt b's gradient is zero after its first ``spans[b]`` positions (causal
    attention: nothing after the read position reaches the metric), so only those positions enter
    the product - one matrix product per prompt instead of one over the padded batch."""
    grad = grad if grad.dim() == 4 else grad[:, :, None, :]  # [B, T, R_block, d]
    B, T, Rb, d = grad.shape
    # receiver-major [R_block, B, T, d]: a view when the gradient is laid out receiver-first (the
    # shared-residual slot gradients are), one copy otherwise
    columns = wide(grad).permute(2, 0, 1, 3).to(rows.dtype)
    if spans is None or min(spans) >= T:
        # this operand order runs ~30 % faster on CPU BLAS than rows @ columns
        return (columns.reshape(Rb, -1) @ rows[:n_up].T).T
    D = rows[:n_up].view(n_up, B, T, d)
    out = torch.zeros(Rb, n_up, dtype=rows.dtype, device=rows.device)
    for b, n in enumerate(spans):
        out.addmm_(columns[:, b, :n].reshape(Rb, n * d), D[:, b, :n].reshape(n_up, n * d).T)
    return out.T


POSITION_FLOATS = 2**24  # floats of one positional block product's copy of the deltas (chunked over positions)


def _positional_block_scores(rows: Tensor, grad: Tensor, n_up: int) -> Tensor:
    """``sum_b D[b,t,u] . grad[b,t,r]`` per position: [n_up, R_block, T] in float32 (or wider).

    ``grad`` [B, T, R_block, d] or [B, T, d]. The product runs over chunks of positions so the
    re-laid-out deltas it needs stay below ``POSITION_FLOATS`` floats whatever T is."""
    grad = grad if grad.dim() == 4 else grad[:, :, None, :]  # [B, T, R_block, d]
    B, T, Rb, d = grad.shape
    D = rows[:n_up].view(n_up, B, T, d)  # [n_up, B, T, d]
    out = torch.empty(n_up, Rb, T, dtype=rows.dtype, device=rows.device)
    step = max(1, POSITION_FLOATS // max(1, n_up * B * d))
    for lo in range(0, T, step):
        hi = min(T, lo + step)
        g = wide(grad[:, lo:hi]).to(rows.dtype)  # [B, t, R_block, d]
        out[:, :, lo:hi] = torch.einsum("sbtd,btrd->srt", D[:, :, lo:hi], g)
    return out


# receiver gradients gathered into one window; None: FUSED_LAYERS layers' worth, 6 (3H + 1). The
# product of a window with the delta rows is bound by arithmetic only when the window is wide: on
# SmolLM2-135M at 32 prompts (two threads) 66-100 GFLOP/s for 28-56 receivers, 110-140 for 112-224.
# One product over the senders upstream of the window's last layer also forms entries that are not
# edges (up to 5 layers' senders for its first receivers); they are dropped. Wall time of all
# products per EAP call there: one layer at a time 1.40 s; 6 layers 0.80-0.92 s, 8-15 layers
# 0.86-0.93 s (and 1.05 s for 6 layers with exact per-block tail products instead of the waste).
FUSED_RECEIVERS: int | None = None
FUSED_LAYERS = 6


@dataclass(frozen=True)
class _PendingBlock:
    """One receiver block's gradient, held in the window buffer until the window is multiplied."""

    at: int  # its first row in the window buffer
    width: int  # its receivers
    n_up: int  # senders upstream of these receivers
    cols: slice  # their receiver indices


class _ScoreSink:
    """Adds ``sum_{b,t} D[b,t,u] . grad_r[b,t]`` into ``scores[u, r]`` as receiver gradients arrive.

    The deltas are held once as a contiguous ``[S, B*T*d]`` matrix. A product of a few receivers
    with a prefix of its rows streams that whole prefix from memory for little arithmetic, so the
    receiver gradients arriving one after the other during the backward pass are copied into one
    window buffer (``FUSED_RECEIVERS`` receivers, reused for every window: no fresh allocation)
    and multiplied together, over the senders upstream of the window's latest receivers; each block
    keeps only its own upstream senders. Products are formed in float32 at least and added into the
    float64 accumulator; a block that is not finite stops the run naming the prompts whose gradient
    or delta is at fault. ``flush`` must be called after the backward pass."""

    def __init__(self, experiment: Experiment, batch: PreparedBatch, scores: Tensor, rows: Tensor, weight: float) -> None:
        self.experiment = experiment
        self.batch = batch
        self.graph = experiment.spec.graph
        self.scores = scores  # [S, R] (or positional [S, R, T]) float64 accumulator
        self.rows = rows  # [S, B*T*d]
        self.weight = weight
        self.pending: list[_PendingBlock] = []
        self.limit = FUSED_RECEIVERS or FUSED_LAYERS * (3 * self.graph.n_heads + 1)
        self.window: Tensor | None = None  # [capacity, B, T, d] receiver-major, allocated at the first gradient
        self.filled = 0
        if scores.dim() == 3:
            self.block: Callable[[Tensor, Tensor, int], Tensor] = _positional_block_scores
        else:
            spans = (batch.read_positions + 1).tolist()  # positions that can reach the metric
            self.block = functools.partial(_block_scores, spans=spans)

    def attach(self, receivers: rt.ReceiverInputs) -> None:
        """Register gradient hooks on every receiver input."""
        g = self.graph
        for layer, (qkv, mlp) in enumerate(zip(receivers.qkv, receivers.mlp, strict=True)):
            self._hook(qkv, g.attention_upstream(layer), g.qkv_receivers(layer))
            r = g.mlp_receiver(layer)
            self._hook(mlp, g.mlp_upstream(layer), slice(r, r + 1))
        r = g.logits_receiver
        self._hook(receivers.logits, g.n_senders, slice(r, r + 1))

    def _hook(self, tensor: Tensor, n_up: int, cols: slice) -> None:
        def on_grad(grad: Tensor) -> None:
            grad = grad.permute(2, 0, 1, 3) if grad.dim() == 4 else grad[None]  # [R_block, B, T, d]
            width = grad.shape[0]
            if self.window is None:
                capacity = max(self.limit, 3 * self.graph.n_heads + 1)  # a layer's q/k/v block always fits
                self.window = torch.empty(capacity, *grad.shape[1:], dtype=self.rows.dtype, device=grad.device)
            if self.filled + width > min(self.limit, self.window.shape[0]) and self.pending:
                self.flush()
            self.window[self.filled : self.filled + width].copy_(grad)
            self.pending.append(_PendingBlock(self.filled, width, n_up, cols))
            self.filled += width

        tensor.register_hook(on_grad)

    def flush(self) -> None:
        """Multiply the gathered gradients with the deltas and add them into the scores."""
        if not self.pending:
            return
        assert self.window is not None
        pending, self.pending = self.pending, []
        grads = self.window[: self.filled]  # [R, B, T, d]
        self.filled = 0
        n_up = max(p.n_up for p in pending)
        block = self.block(self.rows, grads.permute(1, 2, 0, 3), n_up)  # [n_up, R] (positional: [n_up, R, T])
        for p in pending:  # each block keeps only its own upstream senders
            part = block[: p.n_up, p.at : p.at + p.width]
            check_finite(part, self.experiment, self.batch, "an EAP score (delta . gradient)",
                         (("the gradient", grads.transpose(0, 1)), ("the delta A - a", _prompt_view(self.rows, grads.shape[1]))))
            self.scores[: p.n_up, p.cols] += self.weight * part.double()


def _gradient_pass(
    experiment: Experiment,
    batch: PreparedBatch,
    scores: Tensor,
    weight: float,
    *,
    rows: Tensor | None = None,
    input_embeddings: Tensor | None = None,
    mask: Tensor | None = None,
) -> None:
    """One forward + backward on the batch's clean prompts, accumulating EAP-style scores.

    ``rows`` [S, B*T*d]: fixed ``A - a`` (None: ``A - a`` with ``a`` from this very run - the
    clean senders for EAP, the interpolated ones for the activation variant; without a mask, a
    corrupted batch's ablation values become these rows and are spent). ``weight`` scales this
    pass (1 / (prompts * steps))."""
    spec = experiment.spec
    sink = None
    if rows is None:  # A - a with a from this very run: fill the delta rows as the senders are made
        B, T = batch.clean_ids.shape
        rows = None if mask is not None else _corrupted_rows(spec, batch)
        if rows is not None:  # the corrupted run's buffer becomes A - a in place (the batch's values are spent)
            sink = functools.partial(_subtract_rows, rows)
        else:
            rows = _empty_rows(spec, B, T)
            sink = functools.partial(_fill_rows, rows, batch.ablation.values.detach())
    with torch.enable_grad():
        out = rt.run(
            spec,
            batch.clean_ids,
            mask=mask,
            ablation=batch.ablation if mask is not None else None,
            input_embeddings=input_embeddings,
            read_positions=batch.read_positions,
            keep_receivers=True,
            on_senders=sink,
        )
        assert out.receivers is not None
        receivers, logits = out.receivers, out.logits
        del out
        products = _ScoreSink(experiment, batch, scores, rows, weight)
        products.attach(receivers)
        value = score(experiment, batch, logits).sum()
        value.backward()
        products.flush()


@torch.no_grad()
def _clean_rows(spec: ModelSpec, batch: PreparedBatch) -> Tensor:
    """``A - a`` with ``a`` the clean run's senders, as delta rows [S, B*T*d] (filled block by block
    as the clean run makes them: no [B, T, S, d] cache is held)."""
    B, T = batch.clean_ids.shape
    rows = _empty_rows(spec, B, T)
    rt.run(spec, batch.clean_ids, read_positions=batch.read_positions,
           on_senders=functools.partial(_fill_rows, rows, batch.ablation.values))
    return rows


# --------------------------------------------------------------------------- EAP and EAP-IG


def eap(experiment: Experiment, progress: bool = False, checkpoint: Checkpointer | None = None) -> EdgeScores:
    """Edge attribution patching; see the module docstring.

    ``checkpoint``: save the partial sums after every batch and skip saved batches when resuming.
    On a shard of a distributed run (``circuits.distributed``) the partial sums of all ranks are
    added, so every rank returns the scores of the whole dataset."""
    scores = _eap_sums(experiment, None, progress, checkpoint)
    return EdgeScores(experiment.spec.graph, scores.float(), "eap", _settings(experiment))


def positional_eap(
    experiment: Experiment, tokenizer: object | None = None, progress: bool = False, checkpoint: Checkpointer | None = None
) -> PositionalEdgeScores:
    """EAP per token position: ``score[u, r, t]`` (see the module docstring). Same cost as ``eap``
    (one forward + one backward per batch); the accumulator is T times larger. ``tokenizer`` only
    names the positions (column headers)."""
    alignment = check_alignment(experiment.task, tokenizer)
    scores = _eap_sums(experiment, alignment.length, progress, checkpoint)
    settings = _settings(experiment, positional=True, read_position=alignment.read_position)
    return PositionalEdgeScores(experiment.spec.graph, scores.float(), alignment.tokens, "eap", settings)


def _eap_sums(
    experiment: Experiment, positions: int | None, progress: bool, checkpoint: Checkpointer | None
) -> Tensor:
    """The EAP scores of the whole dataset, float64 [S, R] (or [S, R, T] with ``positions`` = T)."""
    _refuse_kl(experiment, "EAP")
    g = experiment.spec.graph
    red = reducer(experiment)
    N = red.count(experiment.n_prompts)
    scores = torch.zeros(g.n_senders, g.n_receivers, *(() if positions is None else (positions,)), dtype=torch.float64)
    state = BatchProgress(experiment, checkpoint, {"scores": scores})
    bar = progress_bar(experiment.n_prompts, "EAP", progress, "prompt")
    bar.update(state.prompts_done())
    for batch in state.batches():
        _gradient_pass(experiment, batch, scores, 1.0 / N)  # deltas from the same clean pass
        bar.update(batch.size)
    bar.close()
    return red.sum(scores)


def eap_ig(
    experiment: Experiment,
    steps: int = 5,
    variant: str = "inputs",
    schedule: str = "midpoint",
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> EdgeScores:
    """EAP with integrated gradients over the inputs or over the edge activations (``checkpoint``
    and distributed shards as for ``eap``)."""
    scores = _eap_ig_sums(experiment, None, steps, variant, schedule, progress, checkpoint)
    return EdgeScores(
        experiment.spec.graph, scores.float(), f"eap-ig-{variant}",
        _settings(experiment, steps=steps, variant=variant, schedule=schedule),
    )


def positional_eap_ig(
    experiment: Experiment,
    steps: int = 5,
    variant: str = "inputs",
    schedule: str = "midpoint",
    tokenizer: object | None = None,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> PositionalEdgeScores:
    """EAP-IG per token position (``eap_ig`` without the sum over positions)."""
    alignment = check_alignment(experiment.task, tokenizer)
    scores = _eap_ig_sums(experiment, alignment.length, steps, variant, schedule, progress, checkpoint)
    settings = _settings(experiment, steps=steps, variant=variant, schedule=schedule, positional=True,
                         read_position=alignment.read_position)
    return PositionalEdgeScores(experiment.spec.graph, scores.float(), alignment.tokens, f"eap-ig-{variant}", settings)


def _eap_ig_sums(
    experiment: Experiment,
    positions: int | None,
    steps: int,
    variant: str,
    schedule: str,
    progress: bool,
    checkpoint: Checkpointer | None,
) -> Tensor:
    """The EAP-IG scores of the whole dataset, float64 [S, R] (or [S, R, T] with ``positions`` = T)."""
    if variant not in ("inputs", "activations"):
        raise AttributionError("variant must be 'inputs' or 'activations'")
    points = alphas(steps, schedule)
    spec, g = experiment.spec, experiment.spec.graph
    red = reducer(experiment)
    scores = torch.zeros(g.n_senders, g.n_receivers, *(() if positions is None else (positions,)), dtype=torch.float64)
    weight = 1.0 / (red.count(experiment.n_prompts) * steps)
    state = BatchProgress(experiment, checkpoint, {"scores": scores})
    bar = progress_bar(experiment.n_prompts * steps, f"EAP-IG ({variant})", progress, "prompt-step")
    bar.update(state.prompts_done() * steps)
    for batch in state.batches():
        if variant == "inputs":
            rows = _clean_rows(spec, batch)
            clean_in = rt.embed(spec, batch.clean_ids)  # [B, T, d]
            ablated_in = batch.ablation.values[:, :, 0].expand_as(clean_in)  # the input sender's ablation value
            for alpha in points:
                mixed = (ablated_in + alpha * (clean_in - ablated_in)).detach()
                _gradient_pass(experiment, batch, scores, weight, rows=rows, input_embeddings=mixed)
                bar.update(batch.size)
        else:
            for alpha in points:
                mask = g.edge_mask.to(spec.dtype) * (1.0 - alpha)
                _gradient_pass(experiment, batch, scores, weight, mask=mask)
                bar.update(batch.size)
    bar.close()
    return red.sum(scores)


def _settings(experiment: Experiment, **extra: object) -> dict[str, object]:
    n = reducer(experiment).count(experiment.n_prompts)  # the whole dataset, also on a shard
    return {"metric": experiment.metric.name, "ablation": experiment.ablation, "n_prompts": n, **extra}


# --------------------------------------------------------------------------- AtP*


@dataclass
class _Trace:
    """What AtP* records in one forward: per layer q, k, pattern, heads, MLP output."""

    q: dict[int, Tensor]
    k: dict[int, Tensor]
    pattern: dict[int, Tensor]
    blocks: dict[int, list[Tensor]]

    def __call__(self, layer: int, name: str, tensor: Tensor) -> None:
        if name == "q":
            self.q[layer] = tensor.detach()
        elif name == "k":
            self.k[layer] = tensor.detach()
        elif name == "pattern":
            self.pattern[layer] = tensor
        elif name in ("heads", "mlp_out"):
            self.blocks.setdefault(layer, []).append(tensor)


def atp_estimates(
    experiment: Experiment,
    qk_fix: bool = True,
    grad_drop: bool = True,
    sender_chunk: int = 32,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> Tensor:
    """The per-backward-pass estimates AtP* combines: [1 + L, S, R] (index 0: nothing dropped;
    index 1 + l: layer l's heads and MLP dropped from the backward pass), or [1, S, R].

    Dataset means over every rank's prompts (reduced *before* AtP* combines them non-linearly);
    ``checkpoint`` as for ``eap``."""
    _refuse_kl(experiment, "AtP*")
    g = experiment.spec.graph
    red = reducer(experiment)
    N = red.count(experiment.n_prompts)
    drops: list[int | None] = [None] + (list(range(g.n_layers)) if grad_drop else [])
    estimates = torch.zeros(len(drops), g.n_senders, g.n_receivers, dtype=torch.float64)
    state = BatchProgress(experiment, checkpoint, {"estimates": estimates})
    bar = progress_bar(experiment.n_prompts, "AtP*", progress, "prompt")
    bar.update(state.prompts_done())
    for batch in state.batches():
        _atp_batch(experiment, batch, drops, estimates, qk_fix, sender_chunk, 1.0 / N)
        bar.update(batch.size)
    bar.close()
    return red.sum(estimates)


def atp_star(
    experiment: Experiment,
    qk_fix: bool = True,
    grad_drop: bool = True,
    sender_chunk: int = 32,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
) -> EdgeScores:
    """AtP*: EAP with the QK fix and GradDrop (see the module docstring)."""
    g = experiment.spec.graph
    estimates = atp_estimates(experiment, qk_fix, grad_drop, sender_chunk, progress, checkpoint)
    base = estimates[0]
    if grad_drop:
        own = _own_layer_mask(g)  # [L, R]: the layer that owns each receiver is never dropped for it
        per_drop = torch.where(own[:, None, :], base[None], estimates[1:])  # [L, S, R]
        values = torch.sign(base) * per_drop.abs().sum(0) / max(1, g.n_layers - 1)
    else:
        values = base
    return EdgeScores(g, values.float(), "atp*", _settings(experiment, qk_fix=qk_fix, grad_drop=grad_drop))


def _own_layer_mask(g: ComputationGraph) -> Tensor:
    """[L, R] bool: receiver r is an input of layer l's heads or MLP."""
    own = torch.zeros(g.n_layers, g.n_receivers, dtype=torch.bool)
    for layer in range(g.n_layers):
        qkv = g.qkv_receivers(layer)
        own[layer, qkv.start : qkv.stop] = True
        own[layer, g.mlp_receiver(layer)] = True
    return own


QK_FIX_FLOATS = 2**27  # pattern gradients kept per group of GradDrop passes (512 MiB of float32)


def _atp_batch(
    experiment: Experiment,
    batch: PreparedBatch,
    drops: list[int | None],
    estimates: Tensor,
    qk_fix: bool,
    sender_chunk: int,
    weight: float,
) -> None:
    spec = experiment.spec
    g = spec.graph
    rows = _clean_rows(spec, batch)  # [S, B*T*d] delta rows (float32 or wider)
    trace = _Trace({}, {}, {}, {})
    dropped: dict[str, int | None] = {"layer": None}
    with torch.enable_grad():
        out = rt.run(
            spec, batch.clean_ids, read_positions=batch.read_positions, keep_receivers=True, observe=trace, keep_resid=True
        )
        assert out.receivers is not None and out.resid is not None
        for layer, tensors in trace.blocks.items():
            for t in tensors:
                t.register_hook(_drop_hook(dropped, layer))
        value = score(experiment, batch, out.logits).sum()
        inputs = out.receivers.as_list()
        patterns = [trace.pattern[layer] for layer in range(g.n_layers)]
        # The QK fix's recomputed patterns do not depend on which layer GradDrop drops; only the
        # pattern gradients do. So the gradients of a group of drops are kept and the patterns are
        # recomputed once per group, the group sized so its pattern gradients fit QK_FIX_FLOATS.
        per_drop = sum(p.numel() for p in patterns)
        group = max(1, QK_FIX_FLOATS // max(1, per_drop)) if qk_fix else 1
        for first in range(0, len(drops), group):
            members = range(first, min(len(drops), first + group))
            parts, kept_patterns = [], []
            for i in members:
                dropped["layer"] = drops[i]
                grads = torch.autograd.grad(value, inputs + patterns, retain_graph=i < len(drops) - 1, allow_unused=True)
                receiver_grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads[: len(inputs)], inputs)]
                part = _linear_scores(g, receiver_grads, rows)  # [S, R] for this batch
                check_finite(part, experiment, batch, "an AtP* estimate",
                             [("a receiver gradient", gr) for gr in receiver_grads]
                             + [("the delta A - a", _prompt_view(rows, batch.size))])
                parts.append(part)
                if qk_fix:
                    kept_patterns.append([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads[len(inputs) :], patterns)])
                del grads, receiver_grads
            stacked = torch.stack(parts)  # [G, S, R]
            if qk_fix:
                pattern_grads = [torch.stack(layers) for layers in zip(*kept_patterns)]  # per layer [G, B, H, T, T]
                del kept_patterns
                _apply_qk_fix(spec, out.resid, trace, pattern_grads, rows, stacked, sender_chunk)
                check_finite(stacked, experiment, batch, "an AtP* estimate (QK fix)",
                             [("an attention-pattern gradient", gr.transpose(0, 1)) for gr in pattern_grads]
                             + [("the delta A - a", _prompt_view(rows, batch.size))])
            estimates[first : first + len(members)] += weight * stacked


def _drop_hook(state: dict[str, int | None], layer: int) -> Callable[[Tensor], Tensor | None]:
    def hook(grad: Tensor) -> Tensor | None:
        return torch.zeros_like(grad) if state["layer"] == layer else None

    return hook


def _linear_scores(g: ComputationGraph, grads: list[Tensor], rows: Tensor) -> Tensor:
    """[S, R] EAP scores of one batch from receiver gradients (ordered as ``ReceiverInputs.as_list()``)
    and delta rows [S, B*T*d]; products in float32 or wider."""
    out = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    for layer in range(g.n_layers):
        qkv, mlp = grads[2 * layer], grads[2 * layer + 1]
        out[: g.attention_upstream(layer), g.qkv_receivers(layer)] = _block_scores(rows, qkv, g.attention_upstream(layer)).double()
        n = g.mlp_upstream(layer)
        out[:n, g.mlp_receiver(layer)] = _block_scores(rows, mlp, n)[:, 0].double()
    out[:, g.logits_receiver] = _block_scores(rows, grads[-1], g.n_senders)[:, 0].double()
    return out


@torch.no_grad()
def _apply_qk_fix(
    spec: ModelSpec,
    resid: Tensor,
    trace: _Trace,
    pattern_grads: list[Tensor],
    rows: Tensor,
    part: Tensor,
    sender_chunk: int,
) -> None:
    """Overwrite the linear estimates of every q and k edge in ``part`` [G, S, R] with
    ``sum (pattern' - pattern) * dm/dpattern``, ``pattern'`` recomputed exactly from the patched query
    or key (the receiver's norm and projection included); the sum is taken in float32 or wider.
    ``pattern_grads`` per layer [G, B, H, T, T]: G backward passes (GradDrop's) share each
    recomputed pattern."""
    g = spec.graph
    H = g.n_heads
    B, T, d = resid.shape[1:]
    positions = rt.positions_for(spec, T)
    for layer in range(g.n_layers):
        lay = spec.layers[layer]
        x = resid[layer]  # [B, T, d]: in a clean run every slot of this layer reads this residual
        q0, k0, pattern0 = trace.q[layer], trace.k[layer], trace.pattern[layer].detach()
        gp = wide(pattern_grads[layer])  # [G, B, H, T, T]: one per GradDrop pass
        n_up = g.attention_upstream(layer)
        rotary_fn = spec.rotary_for(layer)
        rotary = rotary_fn(x, positions) if rotary_fn is not None else None
        q_start = g.slot_receiver(layer, 0, Slot.Q)
        k_start = g.slot_receiver(layer, 0, Slot.K)
        for lo in range(0, n_up, sender_chunk):
            hi = min(n_up, lo + sender_chunk)
            U = hi - lo
            deltas = rows[lo:hi].view(U, B, T, d).to(x.dtype)  # senders lo..hi-1: [U, B, T, d]
            patched = (x[None] + deltas).reshape(U * B, T, -1)  # [U*B, T, d]
            q_new, k_new = ops.queries_and_keys(lay.attn, lay.attn_norm, patched, rotary)  # [U*B, T, H, dh]
            for start, new_pattern in (
                (q_start, ops.attention_pattern(lay.attn, q_new, k0.repeat(U, 1, 1, 1))),
                (k_start, ops.attention_pattern(lay.attn, q0.repeat(U, 1, 1, 1), k_new)),
            ):
                change = wide(new_pattern).view(U, B, H, T, T) - wide(pattern0)[None]  # [U, B, H, T, T]
                part[:, lo:hi, start : start + H] = torch.einsum("ubhqk,gbhqk->guh", change, gp).double()  # [G, U, H]
