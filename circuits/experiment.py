"""``Experiment``: what a method or an evaluation measures - a model, a task, a metric, an ablation.

It streams the task in batches of bounded size and prepares, for each batch, everything an
intervened run needs: clean and corrupted ids, the ablation values, the read positions, the answer
sets, and (for the KL metric) the full model's clean log-probs. Every method and every evaluation
goes through it, so "the metric of a masked run" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from circuits.metrics import Metric, make_metric, reference_logprobs
from circuits.tasks.base import TokenizedTask
from graphs import runtime as rt
from graphs.adapters.spec import ModelSpec

ABLATIONS: dict[str, str] = {
    "corrupted": "resample: ablated edges carry the sender's value on the corrupted prompt (default)",
    "mean": "per-node mean over all real tokens of the reference prompts",
    "positional-mean": "per-node, per-position mean over the reference prompts",
    "zero": "ablated edges carry zero",
}


class ExperimentError(ValueError):
    """An experiment is set up inconsistently (unknown ablation, task too long for the model...)."""


@dataclass(frozen=True)
class PreparedBatch:
    """One batch of prompts, ready for intervened runs."""

    rows: slice  # which prompts of the task
    clean_ids: Tensor  # [B, T]
    corrupted_ids: Tensor  # [B, T]
    read_positions: Tensor  # [B]
    answers: Tensor  # [B, Ka]
    wrongs: Tensor  # [B, Kw]
    ablation: rt.AblationValues  # [1|B, 1|T, S, d]
    reference: Tensor | None  # [B, V] full-model clean log-probs (KL only)
    metric: Metric

    @property
    def size(self) -> int:
        return int(self.clean_ids.shape[0])

    def score(self, logits: Tensor) -> Tensor:
        """Per-prompt metric of read-position logits [..., B, V] -> [..., B]."""
        return self.metric.per_prompt(logits, self.answers, self.wrongs, self.reference)


@dataclass(frozen=True, eq=False)
class Experiment:
    """A model (as its spec), a task, a metric and an ablation; streamed in ``batch_size`` prompts."""

    spec: ModelSpec
    task: TokenizedTask
    metric: Metric
    ablation: str = "corrupted"
    batch_size: int = 16
    reference_task: TokenizedTask | None = None  # prompts for mean ablations (default: the task's clean ones)

    def __post_init__(self) -> None:
        if isinstance(self.metric, str):
            object.__setattr__(self, "metric", make_metric(self.metric))
        if self.ablation not in ABLATIONS:
            raise ExperimentError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if self.batch_size < 1:
            raise ExperimentError("batch_size must be at least 1")
        if self.spec.max_positions is not None and self.task.max_length > self.spec.max_positions:
            raise ExperimentError(
                f"task {self.task.name!r} has prompts of {self.task.max_length} tokens; "
                f"the model takes at most {self.spec.max_positions}"
            )
        vocab = self.spec.W_U.shape[0]
        if int(self.task.clean_ids.max()) >= vocab or int(self.task.answers.max()) >= vocab:
            raise ExperimentError(f"task {self.task.name!r} holds token ids outside the model's vocabulary ({vocab})")

    @property
    def n_prompts(self) -> int:
        return len(self.task)

    @cached_property
    def _shared_ablation(self) -> rt.AblationValues | None:
        """Ablation values that do not depend on the batch (mean / zero), computed once."""
        if self.ablation == "zero":
            return rt.zero_values(self.spec)
        if self.ablation in ("mean", "positional-mean"):
            ref = self.reference_task or self.task
            values = rt.mean_values(
                self.spec,
                ref.clean_ids,
                ref.lengths,
                positional=self.ablation == "positional-mean",
                chunk_size=self.batch_size,
            )
            if values.values.shape[1] > 1 and values.values.shape[1] < self.task.max_length:
                raise ExperimentError("positional-mean ablation needs reference prompts at least as long as the task's")
            return values
        return None

    def ablation_for(self, clean_ids: Tensor, corrupted_ids: Tensor) -> rt.AblationValues:
        shared = self._shared_ablation
        if shared is None:
            return rt.corrupted_values(self.spec, corrupted_ids)
        if shared.values.shape[1] > 1:  # positional: trim to this batch's length
            return rt.AblationValues(shared.kind, shared.values[:, : clean_ids.shape[1]])
        return shared

    def batches(self, batch_size: int | None = None) -> Iterator[PreparedBatch]:
        """The task in consecutive batches, each with its ablation values (and KL reference)."""
        size = batch_size or self.batch_size
        for lo in range(0, self.n_prompts, size):
            rows = slice(lo, min(lo + size, self.n_prompts))
            part = self.task.subset(rows)
            reference = None
            if self.metric.needs_reference:
                with torch.no_grad():
                    clean_logits = rt.run(self.spec, part.clean_ids, read_positions=part.read_positions).logits
                reference = reference_logprobs(clean_logits)
            yield PreparedBatch(
                rows=rows,
                clean_ids=part.clean_ids,
                corrupted_ids=part.corrupted_ids,
                read_positions=part.read_positions,
                answers=part.answers,
                wrongs=part.wrongs,
                ablation=self.ablation_for(part.clean_ids, part.corrupted_ids),
                reference=reference,
                metric=self.metric,
            )

    # ------------------------------------------------------------------ common measurements
    @torch.no_grad()
    def masked_metric(self, batch: PreparedBatch, mask: Tensor | None) -> Tensor:
        """Per-prompt metric [B] of the clean prompts with ``mask`` [S, R] (or positional [S, R, T])
        applied (None: no ablation)."""
        logits = rt.run(
            self.spec,
            batch.clean_ids,
            mask=mask,
            ablation=batch.ablation if mask is not None else None,
            read_positions=batch.read_positions,
        ).logits
        return batch.score(logits)

    @torch.no_grad()
    def masked_metrics(self, batch: PreparedBatch, masks: Tensor) -> Tensor:
        """Per-prompt metrics [K, B] for K masks [K, S, R], run as one grid of K x B rows
        (the batch's ablation values are shared by the K groups, not copied)."""
        K, B = masks.shape[0], batch.size
        logits = rt.run(
            self.spec,
            batch.clean_ids.repeat(K, 1),  # [K*B, T]: group k holds the batch's prompts
            mask=masks,
            ablation=batch.ablation,
            read_positions=batch.read_positions.repeat(K),
        ).logits  # [K*B, V]
        return batch.score(logits.view(K, B, -1))

    def dataset_mean(self, mask: Tensor | None) -> float:
        """The metric's dataset mean with ``mask`` applied (mean over all prompts)."""
        total = 0.0
        for batch in self.batches():
            total += float(self.masked_metric(batch, mask).sum())
        return total / self.n_prompts
