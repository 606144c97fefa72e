"""The built-in tasks by name: ``available_tasks()`` and ``make_task(name, tokenizer, ...)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from transformers import PreTrainedTokenizerBase

from . import country_capital, docstring, greater_than, induction, ioi, subject_verb
from .base import TaskError, TokenizedTask


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its one-line description and its builder ``(tokenizer, n_prompts, seed, **options)``."""

    name: str
    description: str
    build: Callable[..., TokenizedTask]


_TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            TaskSpec("ioi", ioi.DESCRIPTION, ioi.make_ioi),
            TaskSpec("greater-than", greater_than.DESCRIPTION, greater_than.make_greater_than),
            TaskSpec("induction", induction.DESCRIPTION, induction.make_induction),
            TaskSpec("docstring", docstring.DESCRIPTION, docstring.make_docstring),
            TaskSpec("subject-verb", subject_verb.DESCRIPTION, subject_verb.make_subject_verb),
            TaskSpec("country-capital", country_capital.DESCRIPTION, country_capital.make_country_capital),
        )
    }
)


def available_tasks() -> dict[str, str]:
    """Built-in task name -> one-line description (a fresh dict; editing it changes nothing)."""
    return {name: spec.description for name, spec in _TASKS.items()}


def make_task(
    name: str, tokenizer: PreTrainedTokenizerBase, n_prompts: int = 100, seed: int = 0, **options: Any
) -> TokenizedTask:
    """Generate the built-in task ``name`` with ``n_prompts`` prompt pairs, deterministic in ``seed``.

    ``options`` are task-specific (``induction`` takes ``seq_len``). Raises ``TaskError`` for an
    unknown name (listing the known ones) or a task this tokenizer cannot express.
    """
    spec = _TASKS.get(name)
    if spec is None:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}")
    try:
        return spec.build(tokenizer, n_prompts=n_prompts, seed=seed, **options)
    except TypeError as e:
        if options and "unexpected keyword" in str(e):
            raise TaskError(f"task {name!r} does not take option(s) {sorted(options)}: {e}") from e
        raise
