"""Docstring argument completion (Heimersheim & Janiak 2023, as used in ACDC).

Clean::

    def load(self, files, size, mode, root):
        \"\"\"token board group

        :param files: cache row
        :param size: user end
        :param

-> answer ``" mode"`` (the next argument in ``def`` order). The function has 3..5 arguments and the
docstring documents the first ``j`` of them (``1 <= j < n_args``, at least 2 when there are more
than 3 arguments); the answer is argument ``j+1``. Wrong answers: every *other* argument name of
the ``def`` (those already documented and those after the answer).

Corrupted ("random_random" in the ACDC paper): the argument names in the ``def`` and, separately,
the documented names in the docstring are replaced by fresh random names (all distinct, none a
clean argument), so the prompt no longer says which argument comes next; function name and
description words are unchanged. Names and words are kept only if ``" word"`` is one token.
"""

from __future__ import annotations

from random import Random

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import PromptPair, generate_task, single_token_words
from .words import load_words

DESCRIPTION = "docstring: 'def f(self, a, b, c): ... :param a: ... :param' -> next argument name"


def render(fn: str, args: list[str], documented: list[str], summary: list[str], descs: list[list[str]]) -> str:
    """The prompt text: ``def`` line, docstring summary, ``:param`` lines, and a final ``:param``."""
    lines = [f"def {fn}(self, {', '.join(args)}):", f'    """{" ".join(summary)}', ""]
    lines += [f"    :param {a}: {' '.join(d)}" for a, d in zip(documented, descs, strict=True)]
    lines.append("    :param")
    return "\n".join(lines)


def make_docstring(tokenizer: PreTrainedTokenizerBase, n_prompts: int = 100, seed: int = 0) -> TokenizedTask:
    """``n_prompts`` docstring pairs, deterministic in ``seed`` (see the module docstring)."""
    words = tuple(single_token_words(tokenizer, load_words("code_words.txt")))
    if len(words) < 20:
        raise TaskError(f"docstring needs at least 20 single-token words for this tokenizer, found {len(words)}")

    def sample(rng: Random) -> PromptPair:
        n_args = rng.randint(3, 5)
        n_doc = rng.randint(1 if n_args == 3 else 2, n_args - 1)
        names = rng.sample(words, 3 * n_args + 1)
        args, fresh_def, fresh_doc, fn = (
            names[:n_args],
            names[n_args : 2 * n_args],
            names[2 * n_args : 3 * n_args],
            names[-1],
        )
        others = [w for w in words if w not in names]  # description words never repeat a name
        summary = [rng.choice(others) for _ in range(3)]
        descs = [[rng.choice(others), rng.choice(others)] for _ in range(n_doc)]
        clean = render(fn, args, args[:n_doc], summary, descs)
        corrupted = render(fn, fresh_def, fresh_doc[:n_doc], summary, descs)
        answer = args[n_doc]
        wrongs = tuple(" " + a for a in args if a != answer)
        return PromptPair(clean, corrupted, answers=(" " + answer,), wrongs=wrongs)

    meta = {"corruption": "random_random (def and docstring names replaced)", "n_words": str(len(words))}
    return generate_task("docstring", tokenizer, sample, n_prompts=n_prompts, seed=seed, metadata=meta)
