"""The token alignment positional circuits need, and picking an aligned subset of a task.

A positional edge ``u@t -> r@t`` means the same thing for every prompt only if position ``t`` holds
the same role in every prompt. The rule (docs/positions.md): every prompt of the dataset has the
same token length, no padding, and the same read position (where the metric reads the logits).
``check_alignment`` enforces it and names the first misaligned prompt and what differs;
``aligned_subset`` keeps the largest group of prompts that share one alignment (e.g. one IOI
template), for tasks generated from several templates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from circuits.tasks.base import TaskError, TokenizedTask


class AlignmentError(TaskError):
    """The prompts of a task do not share one token alignment."""


@dataclass(frozen=True)
class TokenAlignment:
    """The shared alignment of a task: ``length`` tokens, metric read at ``read_position``.

    ``tokens``: one display string per position (from the first prompt; positions where the
    prompts disagree - e.g. the names of IOI - show the first prompt's token)."""

    length: int
    read_position: int
    tokens: tuple[str, ...]


def _prompt(task: TokenizedTask, row: int) -> str:
    text = ""
    if 0 <= row < len(task.clean_texts):
        snippet = task.clean_texts[row]
        text = f" ({snippet[:60]!r}{'...' if len(snippet) > 60 else ''})"
    return f"prompt {row} of task {task.name!r}{text}"


def check_alignment(task: TokenizedTask, tokenizer: Any | None = None) -> TokenAlignment:
    """The task's shared alignment; ``AlignmentError`` naming the first misaligned prompt otherwise.

    ``tokenizer`` (optional) turns the first prompt's ids into display strings; without one they
    are shown as ``#id``."""
    T = task.max_length
    lengths = task.lengths.tolist()
    reads = task.read_positions.tolist()
    for row, (n, rp) in enumerate(zip(lengths, reads, strict=True)):
        if n != T:
            other = next((i for i, m in enumerate(lengths) if m == T), None)
            versus = f"{_prompt(task, other)} has {T}" if other is not None else f"the ids are padded to {T}"
            raise AlignmentError(
                f"positional circuits need one token alignment, but {_prompt(task, row)} has {n} tokens and "
                f"{versus}; use prompts of one template and length (circuits.positional.aligned_subset keeps "
                "the largest aligned group)"
            )
        if rp != reads[0]:
            raise AlignmentError(
                f"positional circuits need one token alignment, but {_prompt(task, row)} reads the logits at "
                f"position {rp} and {_prompt(task, 0)} at position {reads[0]}"
            )
    return TokenAlignment(T, int(reads[0]), token_strings(task.clean_ids[0].tolist(), tokenizer))


def token_strings(ids: Sequence[int], tokenizer: Any | None = None) -> tuple[str, ...]:
    """Display strings of token ids (``#id`` without a tokenizer or when decoding fails)."""
    if tokenizer is None:
        return tuple(f"#{i}" for i in ids)
    out = []
    for i in ids:
        try:
            text = tokenizer.decode([int(i)])
        except Exception:  # noqa: BLE001 - a display string only; any tokenizer failure falls back
            text = f"#{i}"
        out.append(text if isinstance(text, str) and text != "" else f"#{i}")
    return tuple(out)


def aligned_subset(task: TokenizedTask) -> TokenizedTask:
    """The largest group of prompts sharing (length without padding, read position), in task order.

    Ties go to the group whose first prompt comes first. A task that is already aligned is
    returned as it is."""
    keys = list(zip(task.lengths.tolist(), task.read_positions.tolist(), strict=True))
    counts = Counter(keys)
    best = max(counts.values())
    chosen = next(k for k in keys if counts[k] == best)
    rows = torch.tensor([i for i, k in enumerate(keys) if k == chosen])
    if len(rows) == len(task) and chosen[0] == task.max_length:
        return task
    return task.subset(rows)


__all__ = ["AlignmentError", "TokenAlignment", "aligned_subset", "check_alignment", "token_strings"]
