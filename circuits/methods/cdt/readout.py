"""Read a decomposed final residual through the final norm, the unembedding and the metric.

The contribution of the relevant part to a metric ``m`` of the logits at the read position is

    kappa = m(logits) - m(logits - beta_logits) = m(total) - m(gamma)

per prompt: the element-wise rule applied to the metric. For a metric that is linear in the
logits (``logit_diff``) this is exactly ``m(beta_logits)``, which is what is computed (no
cancellation against the total), and only the answer / wrong-answer columns of the unembedding are
computed. Positive kappa: the relevant part pushes the metric up (more task behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from circuits.experiment import PreparedBatch
from circuits.methods.cdt import rules
from circuits.methods.cdt.rules import CDTConfig
from circuits.metrics import Metric
from graphs import ops
from graphs.adapters.spec import ModelSpec

LINEAR_METRICS: frozenset[str] = frozenset({"logit_diff"})


@dataclass(frozen=True)
class Readout:
    """The metric and what it reads for P prompts: answers / wrongs [P, K] (ids into ``columns``
    when the unembedding is restricted), the KL reference [P, V] and the vocabulary columns."""

    metric: Metric
    answers: Tensor
    wrongs: Tensor
    reference: Tensor | None
    columns: Tensor | None  # [U] vocabulary ids the metric reads, or None: the whole vocabulary

    @staticmethod
    def of(batch: PreparedBatch, rows: Tensor | None = None) -> Readout:
        """The readout of a prepared batch (its prompts ``rows``)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        answers, wrongs = pick(batch.answers), pick(batch.wrongs)
        reference = None if batch.reference is None else pick(batch.reference)
        if batch.metric.name not in LINEAR_METRICS:
            return Readout(batch.metric, answers, wrongs, reference, None)
        ids = torch.cat([answers.flatten(), wrongs.flatten()])
        columns = torch.unique(ids[ids >= 0])  # sorted
        return Readout(batch.metric, _remap(answers, columns), _remap(wrongs, columns), reference, columns)

    @property
    def linear(self) -> bool:
        return self.metric.name in LINEAR_METRICS


def _remap(ids: Tensor, columns: Tensor) -> Tensor:
    """Vocabulary ids [P, K] (-1 padding) as indices into the sorted ``columns``."""
    return torch.where(ids >= 0, torch.searchsorted(columns, ids.clamp_min(0)), -1)


def _softcap(x: Tensor, cap: float) -> Tensor:
    return torch.tanh(x / cap) * cap


@torch.no_grad()
def decomposed_logits(
    spec: ModelSpec, beta: Tensor, total: Tensor, config: CDTConfig, columns: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(beta_logits [S, ..., V'], logits [..., V'])`` of a decomposed final residual ``beta``
    [S, ..., d] (``total`` [..., d]): final norm, unembedding (bias split) and soft-capping.
    ``columns``: compute only these vocabulary entries."""
    W, b = spec.W_U, spec.b_U
    if columns is not None:
        W = W[columns]
        b = None if b is None else b[columns]
    xn_t = ops.apply_norm(spec.final_norm, total)
    xn_b = rules.norm(spec.final_norm, beta, total, config.bias)
    lin_t = F.linear(xn_t, W)
    logits_t = lin_t if b is None else lin_t + b
    logits_b = rules.linear(xn_b, W, b, lin_t, config.bias)
    if spec.final_softcap is not None:
        cap = spec.final_softcap
        capped = _softcap(logits_t, cap)
        logits_b = rules.elementwise(lambda x: _softcap(x, cap), logits_b, logits_t, capped)
        logits_t = capped
    return logits_b, logits_t


@torch.no_grad()
def metric_contributions(
    spec: ModelSpec, readout: Readout, beta: Tensor | None, total: Tensor, config: CDTConfig
) -> Tensor:
    """Per-prompt contributions [S, P] of the relevant final residual ``beta`` [S, P, d] (at the read
    positions; ``total`` [P, d]) to the metric; zeros [1, P] when ``beta`` is None."""
    if beta is None:
        return torch.zeros(1, total.shape[0], dtype=total.dtype, device=total.device)
    logits_b, logits_t = decomposed_logits(spec, beta, total, config, readout.columns)
    m = readout.metric
    if readout.linear:  # m(total) - m(gamma) == m(beta) exactly for a linear metric
        return m.per_prompt(logits_b, readout.answers, readout.wrongs)
    full = m.per_prompt(logits_t, readout.answers, readout.wrongs, readout.reference)  # [P]
    return full - m.per_prompt(logits_t - logits_b, readout.answers, readout.wrongs, readout.reference)
