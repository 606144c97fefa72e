"""Numerical guards shared by the methods: a NaN or infinity stops the run, naming the prompt.

* ``score(experiment, batch, logits)``: the batch's per-prompt metric; non-finite logits or metric
  values raise ``MetricError`` naming the prompt by its index *in the task* (and its text when the
  task has texts), not by its row in the batch or in a distributed shard.
* ``check_finite(value, experiment, batch, what, per_prompt)``: for accumulated blocks (an EAP
  score block, an AtP* estimate): if ``value`` holds a NaN or infinity, find the prompts whose
  ``per_prompt`` tensors (gradients, deltas; batch first) are not finite and raise
  ``NumericalError`` naming them.
* ``wide(t)``: ``t`` in float32 when it is a half type (bf16 / fp16), for accumulations: products
  of half-precision deltas and gradients are formed and summed in float32, then added into float64.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from circuits.distributed import row_offset
from circuits.experiment import Experiment, PreparedBatch
from circuits.metrics import MetricError

_PROMPT = re.compile(r"for prompt (\d+)")
HALF = (torch.float16, torch.bfloat16)


class NumericalError(ValueError):
    """A gradient, delta or score became NaN or infinite."""


def wide(t: Tensor) -> Tensor:
    """``t`` as float32 if it is a half type, else unchanged."""
    return t.float() if t.dtype in HALF else t


def prompt_name(experiment: Experiment, row: int) -> str:
    """``prompt 17 of task 'ioi' ("When Mary and John ...")``: ``row`` counts from the task's start."""
    task = experiment.task
    local = row - row_offset(experiment)
    text = ""
    if 0 <= local < len(task.clean_texts):
        snippet = task.clean_texts[local]
        text = f" ({snippet[:60]!r}{'...' if len(snippet) > 60 else ''})"
    return f"prompt {row} of task {task.name!r}{text}"


def _dataset_row(experiment: Experiment, batch: PreparedBatch, p: int) -> int:
    return row_offset(experiment) + batch.rows.start + p


def score(experiment: Experiment, batch: PreparedBatch, logits: Tensor) -> Tensor:
    """``batch.score(logits)`` (logits [..., P, V] -> [..., P]) with errors naming the task's prompt."""
    # a sum over the vocabulary is finite when every logit is (one pass); only otherwise look closer
    bad = ~torch.isfinite(logits.detach().sum(-1))  # [..., P]
    if bool(bad.any()):
        bad = ~torch.isfinite(logits.detach()).all(-1)
    if bool(bad.any()):
        p = int(bad.nonzero()[0][-1])
        raise MetricError(
            f"the model's logits are not finite (NaN or infinity) for {prompt_name(experiment, _dataset_row(experiment, batch, p))}"
        )
    try:
        return batch.score(logits)
    except MetricError as err:
        match = _PROMPT.search(str(err))
        if match is None:
            raise
        p = int(match.group(1))
        raise MetricError(f"{err}: that is {prompt_name(experiment, _dataset_row(experiment, batch, p))}") from None


def check_finite(
    value: Tensor, experiment: Experiment, batch: PreparedBatch, what: str, per_prompt: Iterable[tuple[str, Tensor]]
) -> None:
    """Raise ``NumericalError`` if ``value`` is not finite, naming the prompts whose per-prompt
    tensors (``(name, tensor)`` pairs, batch dimension first) are not finite."""
    if bool(torch.isfinite(value).all()):
        return
    found: dict[int, list[str]] = {}  # prompt in the batch -> which of its tensors are not finite
    for name, t in per_prompt:
        if t.dim() == 0:
            continue
        bad = ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1)
        for p in bad.nonzero().flatten().tolist():
            names = found.setdefault(int(p), [])
            if name not in names:
                names.append(name)
    culprits = [
        f"{' and '.join(names)} of {prompt_name(experiment, _dataset_row(experiment, batch, p))}"
        for p, names in sorted(found.items())[:3]
    ]
    more = f" (and {len(found) - 3} more prompts)" if len(found) > 3 else ""
    where = "; ".join(culprits) + more if culprits else (
        f"in the batch of prompts {_dataset_row(experiment, batch, 0)}.."
        f"{_dataset_row(experiment, batch, batch.size - 1)}"
    )
    raise NumericalError(f"{what} is not finite (NaN or infinity): {where}")
