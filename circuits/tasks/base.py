"""``TokenizedTask``: a behaviour as clean / corrupted prompt pairs with answer tokens.

Every clean prompt and its corrupted counterpart have the same token length (checked when the task
is built, never silently truncated). Prompts of different pairs may differ in length: ids are
right-padded with ``pad_id`` to the longest prompt, which is inert under causal attention, and the
metric is read at ``read_positions`` (the last real token of each prompt, by default).

Answers are *sets* of token ids per prompt (one id for IOI, several for greater-than), padded
with -1; metrics compare the answer set against the wrong-answer set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


class TaskError(ValueError):
    """A task or dataset cannot be built (bad rows, multi-token answers, misaligned lengths...)."""


@dataclass(frozen=True)
class TokenizedTask:
    name: str
    clean_ids: Tensor  # [N, T] long, right-padded with pad_id
    corrupted_ids: Tensor  # [N, T] long, right-padded with pad_id
    lengths: Tensor  # [N] real tokens per prompt (same for clean and corrupted)
    answers: Tensor  # [N, Ka] long, token ids of correct answers, padded with -1
    wrongs: Tensor  # [N, Kw] long, token ids of wrong answers, padded with -1
    read_positions: Tensor  # [N] where the metric reads the logits (usually lengths - 1)
    pad_id: int = 0
    clean_texts: tuple[str, ...] = ()
    corrupted_texts: tuple[str, ...] = ()
    seed: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = self.clean_ids.shape[0]
        if N == 0:
            raise TaskError(f"task {self.name!r} is empty: it has no prompts")
        if self.clean_ids.shape != self.corrupted_ids.shape:
            raise TaskError("clean and corrupted ids must have the same shape")
        for name in ("lengths", "answers", "wrongs", "read_positions"):
            if getattr(self, name).shape[0] != N:
                raise TaskError(f"{name} must have one entry per prompt ({N})")

    def __len__(self) -> int:
        return int(self.clean_ids.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.clean_ids.shape[1])

    def subset(self, rows: slice | Tensor | list[int]) -> TokenizedTask:
        """The prompts ``rows`` as a new task, trimmed to their own longest prompt."""
        idx = torch.arange(len(self))[rows] if not isinstance(rows, Tensor) else rows
        idx_list = [int(i) for i in idx.reshape(-1)]
        T = int(self.lengths[idx].max())
        pick = lambda seq: tuple(seq[i] for i in idx_list) if seq else ()  # noqa: E731
        return TokenizedTask(
            name=self.name,
            clean_ids=self.clean_ids[idx, :T],
            corrupted_ids=self.corrupted_ids[idx, :T],
            lengths=self.lengths[idx],
            answers=self.answers[idx],
            wrongs=self.wrongs[idx],
            read_positions=self.read_positions[idx],
            pad_id=self.pad_id,
            clean_texts=pick(self.clean_texts),
            corrupted_texts=pick(self.corrupted_texts),
            seed=self.seed,
            metadata=dict(self.metadata),
        )

    def batches(self, batch_size: int) -> Iterator[TokenizedTask]:
        """Consecutive chunks of at most ``batch_size`` prompts (for bounded memory)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        for lo in range(0, len(self), batch_size):
            yield self.subset(slice(lo, lo + batch_size))

    def dataset_hash(self) -> str:
        """SHA-256 over the token ids, answers and read positions: identifies the data in provenance."""
        h = hashlib.sha256()
        for t in (self.clean_ids, self.corrupted_ids, self.lengths, self.answers, self.wrongs, self.read_positions):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()
