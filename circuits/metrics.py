"""Task metrics on the logits at the read positions, with one sign convention: higher = more task.

Every metric maps logits ``[..., N, V]`` (N prompts, V vocabulary; optional leading dims, e.g. one
per edge mask of a batched run) and the task's answer / wrong-answer sets ``[N, K]`` (token ids
padded with -1) to one value per prompt ``[..., N]``:

- ``logit_diff``: mean logit over the answer set minus mean logit over the wrong set.
- ``prob_diff``: total probability of the answer set minus total probability of the wrong set.
- ``logprob``: log of the total probability of the answer set (the wrong set is not used).
- ``kl``: *negative* KL divergence ``-KL(reference || current)`` summed over the vocabulary, where the
  reference is the full model's log-probs on the clean prompts. KL is a distance (0 = identical to
  the full model, larger = worse), so it is negated to follow the convention: the full model scores
  0, and anything that moves away from it scores below 0. Faithfulness ratios, "higher is better"
  pruning and ACDC's "metric changes by less than tau" all then read the same way for every metric.

All are differentiable (gradient methods use them). A NaN or infinite value raises ``MetricError``
naming the prompt. ``Metric.__call__`` / ``Metric.mean`` average over prompts (and leading dims
stay): the dataset mean used by faithfulness.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor


class MetricError(ValueError):
    """A metric cannot be computed: unknown name, bad shapes or ids, or a non-finite value."""


MetricFn = Callable[[Tensor, Tensor | None, Tensor | None, Tensor | None], Tensor]


@dataclass(frozen=True)
class Metric:
    """A named per-prompt metric (higher = more task behaviour); see the module docstring."""

    name: str
    description: str
    fn: MetricFn = field(repr=False)
    uses_answers: bool = True
    uses_wrongs: bool = True
    needs_reference: bool = False

    def per_prompt(
        self,
        logits: Tensor,
        answers: Tensor | None = None,
        wrongs: Tensor | None = None,
        reference_logprobs: Tensor | None = None,
    ) -> Tensor:
        """The metric per prompt: logits [..., N, V], answers [N, Ka], wrongs [N, Kw] -> [..., N].

        ``reference_logprobs`` [N, V] (or the logits' full shape) is needed by ``kl``: the full
        model's clean log-probs at the read positions (logits are accepted too; they are normalised).
        """
        x = _check_logits(logits)
        N, V = x.shape[-2], x.shape[-1]
        a = _check_ids(answers, N, V, self.name, "answers") if self.uses_answers else None
        w = _check_ids(wrongs, N, V, self.name, "wrongs") if self.uses_wrongs else None
        ref = None
        if self.needs_reference:
            if reference_logprobs is None:
                raise MetricError(f"metric {self.name!r} needs reference_logprobs (the full model's clean log-probs)")
            ref = reference_logprobs.to(device=x.device, dtype=x.dtype).detach()
            try:
                torch.broadcast_shapes(ref.shape, x.shape)
            except RuntimeError as e:
                raise MetricError(f"reference_logprobs {tuple(ref.shape)} do not match logits {tuple(x.shape)}") from e
        values = self.fn(x, a, w, ref)  # [..., N]
        _check_finite(values, self.name)
        return values

    def mean(
        self,
        logits: Tensor,
        answers: Tensor | None = None,
        wrongs: Tensor | None = None,
        reference_logprobs: Tensor | None = None,
    ) -> Tensor:
        """The mean over prompts: [...] (a scalar for logits [N, V])."""
        return self.per_prompt(logits, answers, wrongs, reference_logprobs).mean(dim=-1)

    __call__ = mean


# --------------------------------------------------------------------------- helpers


def logits_at(logits: Tensor, positions: Tensor) -> Tensor:
    """The logits at one position per prompt: logits [N, T, V], positions [N] -> [N, V]."""
    if logits.ndim != 3 or positions.shape != (logits.shape[0],):
        raise MetricError(
            f"expected logits [N, T, V] and positions [N], got {tuple(logits.shape)} and {tuple(positions.shape)}"
        )
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, positions.to(logits.device)]


def reference_logprobs(logits: Tensor) -> Tensor:
    """The reference for ``kl``: detached float log-probs of the full model's clean logits [..., V]."""
    return F.log_softmax(_check_logits(logits), dim=-1).detach()


def _check_logits(logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.ndim < 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise MetricError(f"logits must be a floating tensor [..., N, V], got {shape}")
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_ids(ids: Tensor | None, N: int, V: int, metric: str, what: str) -> Tensor:
    if ids is None:
        raise MetricError(f"metric {metric!r} needs {what}")
    if ids.ndim != 2 or ids.shape[0] != N or ids.is_floating_point():
        raise MetricError(f"{what} must be integer ids [N={N}, K] padded with -1, got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= V):
        raise MetricError(f"{what} hold ids outside [-1, {V}) (vocabulary size {V})")
    empty = (ids < 0).all(dim=-1).nonzero().flatten() if ids.shape[1] else torch.arange(N)
    if empty.numel():
        raise MetricError(f"metric {metric!r}: prompt {int(empty[0])} has no {what} (every id is -1 padding)")
    return ids.long()


def _check_finite(values: Tensor, metric: str) -> None:
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        lead = f" (batch index {tuple(idx[:-1])})" if len(idx) > 1 else ""
        value = float(values.detach()[tuple(idx)])
        raise MetricError(f"metric {metric!r} is {value} for prompt {idx[-1]}{lead}")


def _gather(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """values [..., N, V], ids [N, K] -> (values at ids [..., N, K], valid mask [N, K])."""
    valid = ids >= 0
    index = ids.clamp(min=0).to(values.device).expand(*values.shape[:-2], *ids.shape)
    return values.gather(-1, index), valid.to(values.device)


def _set_mean(values: Tensor, ids: Tensor) -> Tensor:
    g, valid = _gather(values, ids)
    return torch.where(valid, g, 0.0).sum(-1) / valid.sum(-1)


def _set_sum(values: Tensor, ids: Tensor) -> Tensor:
    g, valid = _gather(values, ids)
    return torch.where(valid, g, 0.0).sum(-1)


# --------------------------------------------------------------------------- the metrics


def _logit_diff(x: Tensor, a: Tensor | None, w: Tensor | None, _ref: Tensor | None) -> Tensor:
    assert a is not None and w is not None
    return _set_mean(x, a) - _set_mean(x, w)


def _prob_diff(x: Tensor, a: Tensor | None, w: Tensor | None, _ref: Tensor | None) -> Tensor:
    assert a is not None and w is not None
    p = torch.softmax(x, dim=-1)
    return _set_sum(p, a) - _set_sum(p, w)


def _logprob(x: Tensor, a: Tensor | None, _w: Tensor | None, _ref: Tensor | None) -> Tensor:
    assert a is not None
    g, valid = _gather(F.log_softmax(x, dim=-1), a)
    return torch.logsumexp(torch.where(valid, g, -torch.inf), dim=-1)


def _neg_kl(x: Tensor, _a: Tensor | None, _w: Tensor | None, ref: Tensor | None) -> Tensor:
    assert ref is not None
    ref_lp = F.log_softmax(ref, dim=-1)  # normalise (a no-op for log-probs, also accepts logits)
    cur_lp = F.log_softmax(x, dim=-1)
    p = ref_lp.exp()
    if not cur_lp.requires_grad and bool(torch.isfinite(ref_lp).all()):
        # every token in the support (the usual case), no gradient: the same terms in place, two passes fewer
        return cur_lp.sub_(ref_lp).mul_(p).sum(dim=-1)
    support = p > 0  # 0 * log 0 = 0: tokens the reference rules out contribute nothing
    terms = torch.where(support, p * (torch.where(support, ref_lp, 0.0) - cur_lp), 0.0)
    return -terms.sum(dim=-1)


_METRICS: Mapping[str, Metric] = MappingProxyType(
    {
        m.name: m
        for m in (
            Metric("logit_diff", "mean logit of the answers minus mean logit of the wrong answers", _logit_diff),
            Metric("prob_diff", "total probability of the answers minus that of the wrong answers", _prob_diff),
            Metric("logprob", "log of the total probability of the answers", _logprob, uses_wrongs=False),
            Metric(
                "kl",
                "negative KL(full model's clean distribution || current), summed over the vocabulary",
                _neg_kl,
                uses_answers=False,
                uses_wrongs=False,
                needs_reference=True,
            ),
        )
    }
)


def available_metrics() -> dict[str, str]:
    """Metric name -> one-line description."""
    return {name: m.description for name, m in _METRICS.items()}


def make_metric(name: str) -> Metric:
    """The metric called ``name``; ``MetricError`` listing the known names otherwise."""
    metric = _METRICS.get(name)
    if metric is None:
        raise MetricError(f"unknown metric {name!r}; known metrics: {', '.join(_METRICS)}")
    return metric
