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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.experiment import Experiment, PreparedBatch
from circuits.progress import progress_bar
from graphs import ops
from graphs import runtime as rt
from graphs.adapters.spec import ModelSpec
from graphs.graph import ComputationGraph
from graphs.ids import Slot
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


class _ScoreSink:
    """Adds ``sum_{b,t} D[b,t,u] . grad_r[b,t]`` into ``scores[u, r]`` as receiver gradients arrive.

    The deltas are held once as a contiguous ``[S, B*T*d]`` matrix, so each receiver block costs one
    matrix product with a prefix of its rows (no per-layer copies of the deltas)."""

    def __init__(self, graph: ComputationGraph, scores: Tensor) -> None:
        self.graph = graph
        self.scores = scores  # [S, R] float64 accumulator

    def attach(self, receivers: rt.ReceiverInputs, deltas: Tensor, weight: float) -> None:
        """Register gradient hooks on every receiver input; deltas [B, T, S, d] (detached)."""
        g = self.graph
        rows = deltas.permute(2, 0, 1, 3).reshape(deltas.shape[2], -1).contiguous()  # [S, B*T*d]
        for layer, (qkv, mlp) in enumerate(zip(receivers.qkv, receivers.mlp, strict=True)):
            self._hook(qkv, rows, g.attention_upstream(layer), g.qkv_receivers(layer), weight)
            r = g.mlp_receiver(layer)
            self._hook(mlp, rows, g.mlp_upstream(layer), slice(r, r + 1), weight)
        r = g.logits_receiver
        self._hook(receivers.logits, rows, g.n_senders, slice(r, r + 1), weight)

    def _hook(self, tensor: Tensor, rows: Tensor, n_up: int, cols: slice, weight: float) -> None:
        def on_grad(grad: Tensor) -> None:
            grad = grad if grad.dim() == 4 else grad[:, :, None, :]  # [B, T, R_block, d]
            columns = grad.permute(0, 1, 3, 2).reshape(-1, grad.shape[2])  # [B*T*d, R_block]
            self.scores[:n_up, cols] += weight * (rows[:n_up] @ columns).double()  # [n_up, R_block]

        tensor.register_hook(on_grad)


def _gradient_pass(
    spec: ModelSpec,
    batch: PreparedBatch,
    scores: Tensor,
    weight: float,
    *,
    deltas: Tensor | None = None,
    input_embeddings: Tensor | None = None,
    mask: Tensor | None = None,
) -> None:
    """One forward + backward on the batch's clean prompts, accumulating EAP-style scores.

    ``deltas`` [B, T, S, d]: fixed ``A - a`` (None: ``A - a`` with ``a`` from this very run - the
    clean senders for EAP, the interpolated ones for the activation variant). ``weight`` scales this
    pass (1 / (prompts * steps))."""
    with torch.enable_grad():
        out = rt.run(
            spec,
            batch.clean_ids,
            mask=mask,
            ablation=batch.ablation if mask is not None else None,
            input_embeddings=input_embeddings,
            read_positions=batch.read_positions,
            keep_receivers=True,
            keep_senders=deltas is None,
        )
        assert out.receivers is not None
        if deltas is None:
            assert out.senders is not None
            deltas = (batch.ablation.values - out.senders).detach()
        _ScoreSink(spec.graph, scores).attach(out.receivers, deltas, weight)
        value = batch.score(out.logits).sum()
        value.backward()


def _clean_deltas(spec: ModelSpec, batch: PreparedBatch) -> Tensor:
    """``A - a`` with ``a`` the clean run's senders: [B, T, S, d]."""
    return batch.ablation.values - rt.sender_outputs(spec, batch.clean_ids)


# --------------------------------------------------------------------------- EAP and EAP-IG


def eap(experiment: Experiment, progress: bool = False) -> EdgeScores:
    """Edge attribution patching; see the module docstring."""
    _refuse_kl(experiment, "EAP")
    spec, g = experiment.spec, experiment.spec.graph
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    bar = progress_bar(experiment.n_prompts, "EAP", progress, "prompt")
    for batch in experiment.batches():
        _gradient_pass(spec, batch, scores, 1.0 / experiment.n_prompts)  # deltas from the same clean pass
        bar.update(batch.size)
    bar.close()
    return EdgeScores(g, scores.float(), "eap", _settings(experiment))


def eap_ig(
    experiment: Experiment,
    steps: int = 5,
    variant: str = "inputs",
    schedule: str = "midpoint",
    progress: bool = False,
) -> EdgeScores:
    """EAP with integrated gradients over the inputs or over the edge activations."""
    if variant not in ("inputs", "activations"):
        raise AttributionError("variant must be 'inputs' or 'activations'")
    points = alphas(steps, schedule)
    spec, g = experiment.spec, experiment.spec.graph
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    weight = 1.0 / (experiment.n_prompts * steps)
    bar = progress_bar(experiment.n_prompts * steps, f"EAP-IG ({variant})", progress, "prompt-step")
    for batch in experiment.batches():
        if variant == "inputs":
            deltas = _clean_deltas(spec, batch)
            clean_in = rt.embed(spec, batch.clean_ids)  # [B, T, d]
            ablated_in = batch.ablation.values[:, :, 0].expand_as(clean_in)  # the input sender's ablation value
            for alpha in points:
                mixed = (ablated_in + alpha * (clean_in - ablated_in)).detach()
                _gradient_pass(spec, batch, scores, weight, deltas=deltas, input_embeddings=mixed)
                bar.update(batch.size)
        else:
            for alpha in points:
                mask = g.edge_mask.to(spec.dtype) * (1.0 - alpha)
                _gradient_pass(spec, batch, scores, weight, mask=mask)
                bar.update(batch.size)
    bar.close()
    return EdgeScores(
        g, scores.float(), f"eap-ig-{variant}", _settings(experiment, steps=steps, variant=variant, schedule=schedule)
    )


def _settings(experiment: Experiment, **extra: object) -> dict[str, object]:
    return {"metric": experiment.metric.name, "ablation": experiment.ablation, "n_prompts": experiment.n_prompts, **extra}


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
) -> Tensor:
    """The per-backward-pass estimates AtP* combines: [1 + L, S, R] (index 0: nothing dropped;
    index 1 + l: layer l's heads and MLP dropped from the backward pass), or [1, S, R]."""
    _refuse_kl(experiment, "AtP*")
    spec, g = experiment.spec, experiment.spec.graph
    drops: list[int | None] = [None] + (list(range(g.n_layers)) if grad_drop else [])
    estimates = torch.zeros(len(drops), g.n_senders, g.n_receivers, dtype=torch.float64)
    bar = progress_bar(experiment.n_prompts, "AtP*", progress, "prompt")
    for batch in experiment.batches():
        _atp_batch(spec, batch, drops, estimates, qk_fix, sender_chunk, 1.0 / experiment.n_prompts)
        bar.update(batch.size)
    bar.close()
    return estimates


def atp_star(
    experiment: Experiment,
    qk_fix: bool = True,
    grad_drop: bool = True,
    sender_chunk: int = 32,
    progress: bool = False,
) -> EdgeScores:
    """AtP*: EAP with the QK fix and GradDrop (see the module docstring)."""
    g = experiment.spec.graph
    estimates = atp_estimates(experiment, qk_fix, grad_drop, sender_chunk, progress)
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


def _atp_batch(
    spec: ModelSpec,
    batch: PreparedBatch,
    drops: list[int | None],
    estimates: Tensor,
    qk_fix: bool,
    sender_chunk: int,
    weight: float,
) -> None:
    g = spec.graph
    deltas = _clean_deltas(spec, batch).detach()  # [B, T, S, d]
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
        value = batch.score(out.logits).sum()
        inputs = out.receivers.as_list()
        patterns = [trace.pattern[layer] for layer in range(g.n_layers)]
        for i, drop in enumerate(drops):
            dropped["layer"] = drop
            grads = torch.autograd.grad(value, inputs + patterns, retain_graph=i < len(drops) - 1, allow_unused=True)
            receiver_grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads[: len(inputs)], inputs)]
            pattern_grads = [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads[len(inputs) :], patterns)]
            part = _linear_scores(g, receiver_grads, deltas)  # [S, R] for this batch
            if qk_fix:
                _apply_qk_fix(spec, out.resid, trace, pattern_grads, deltas, part, sender_chunk)
            estimates[i] += weight * part


def _drop_hook(state: dict[str, int | None], layer: int) -> Callable[[Tensor], Tensor | None]:
    def hook(grad: Tensor) -> Tensor | None:
        return torch.zeros_like(grad) if state["layer"] == layer else None

    return hook


def _linear_scores(g: ComputationGraph, grads: list[Tensor], deltas: Tensor) -> Tensor:
    """[S, R] EAP scores of one batch from receiver gradients (ordered as ``ReceiverInputs.as_list()``)."""
    out = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    for layer in range(g.n_layers):
        qkv, mlp = grads[2 * layer], grads[2 * layer + 1]
        n = g.attention_upstream(layer)
        out[:n, g.qkv_receivers(layer)] = torch.einsum("btsd,btrd->sr", deltas[:, :, :n], qkv).double()
        n = g.mlp_upstream(layer)
        out[:n, g.mlp_receiver(layer)] = torch.einsum("btsd,btd->s", deltas[:, :, :n], mlp).double()
    out[:, g.logits_receiver] = torch.einsum("btsd,btd->s", deltas, grads[-1]).double()
    return out


@torch.no_grad()
def _apply_qk_fix(
    spec: ModelSpec,
    resid: Tensor,
    trace: _Trace,
    pattern_grads: list[Tensor],
    deltas: Tensor,
    part: Tensor,
    sender_chunk: int,
) -> None:
    """Overwrite the linear estimates of every q and k edge in ``part`` [S, R] with
    ``sum (pattern' - pattern) * dm/dpattern``, ``pattern'`` recomputed exactly from the patched query
    or key (the receiver's norm and projection included)."""
    g = spec.graph
    H = g.n_heads
    B, T = deltas.shape[:2]
    positions = rt.positions_for(spec, T)
    for layer in range(g.n_layers):
        lay = spec.layers[layer]
        x = resid[layer]  # [B, T, d]: in a clean run every slot of this layer reads this residual
        q0, k0, pattern0 = trace.q[layer], trace.k[layer], trace.pattern[layer].detach()
        gp = pattern_grads[layer]  # [B, H, T, T]
        n_up = g.attention_upstream(layer)
        rotary = spec.rotary(x, positions) if spec.rotary is not None else None
        q_start = g.slot_receiver(layer, 0, Slot.Q)
        k_start = g.slot_receiver(layer, 0, Slot.K)
        for lo in range(0, n_up, sender_chunk):
            hi = min(n_up, lo + sender_chunk)
            U = hi - lo
            patched = (x[None] + deltas[:, :, lo:hi].permute(2, 0, 1, 3)).reshape(U * B, T, -1)  # [U*B, T, d]
            q_new, k_new, _ = ops.qkv(lay.attn, lay.attn_norm, patched, patched, patched, rotary)  # [U*B, T, H, dh]
            for start, new_pattern in (
                (q_start, ops.attention_pattern(lay.attn, q_new, k0.repeat(U, 1, 1, 1))),
                (k_start, ops.attention_pattern(lay.attn, q0.repeat(U, 1, 1, 1), k_new)),
            ):
                change = (new_pattern.view(U, B, H, T, T) - pattern0[None]) * gp[None]  # [U, B, H, T, T]
                part[lo:hi, start : start + H] = change.sum((1, 3, 4)).double()  # [U, H]
