"""Turning prompt pairs into a ``TokenizedTask`` with any Hugging Face tokenizer.

One place decides how text becomes token ids, so built-in tasks and user files agree:

- Each prompt is encoded as a whole with ``add_special_tokens=False`` and prefixed by the special
  tokens the tokenizer puts *before* a text by default (its BOS, if it adds one; nothing for GPT-2
  or SmolLM2). Special tokens a tokenizer would append (an EOS) are never added: the prompt is
  meant to be continued.
- Answers are tokenized *in context*: an answer's token is what the answer string adds when it is
  appended to the clean prompt, and it must be exactly one token. For GPT-2-style tokenizers this
  is the same as encoding ``" Mary"`` alone; for SentencePiece tokenizers with a dummy prefix
  (Llama-2, Mistral), where ``" Mary"`` alone encodes as ``["▁", "▁Mary"]``, it is the right token.
- Clean and corrupted prompts of a pair must have the same number of tokens. Nothing is truncated.
- Ids are right-padded with the pad token (else EOS, else 0) and ``read_positions = lengths - 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random

import torch
from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask


@dataclass(frozen=True)
class PromptPair:
    """A clean / corrupted prompt pair with its answer strings (each must be one token)."""

    clean: str
    corrupted: str
    answers: tuple[str, ...]
    wrongs: tuple[str, ...]


@dataclass(frozen=True)
class EncodedPair:
    """A prompt pair as token ids: what a ``TokenizedTask`` row holds before padding."""

    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    wrong_ids: tuple[int, ...]
    clean_text: str
    corrupted_text: str


def pad_id_for(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's pad token, else its EOS token, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
    return 0


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text by default (e.g. ``(bos_id,)`` or ``()``).

    Found by encoding a probe text with and without special tokens: whatever precedes the plain
    encoding is the prefix. Tokens added after the text (an EOS) are deliberately ignored.
    """
    probe = "Hello world"
    plain = list(tokenizer.encode(probe, add_special_tokens=False))
    full = list(tokenizer.encode(probe, add_special_tokens=True))
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, prefix: Sequence[int]) -> tuple[int, ...]:
    """``prefix`` + the tokens of ``text`` (no special tokens of its own)."""
    return tuple(prefix) + tuple(tokenizer.encode(text, add_special_tokens=False))


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own: how a string split into tokens, for error messages."""
    return [str(tokenizer.decode([i], clean_up_tokenization_spaces=False)) for i in ids]


def continuation(tokenizer: PreTrainedTokenizerBase, context: str, text: str) -> tuple[int, ...] | None:
    """The tokens ``text`` adds when appended to ``context`` (no special tokens).

    ``None`` if ``context``'s own tokens are not a prefix of the tokens of ``context + text`` (the
    two merge across the boundary, e.g. a prompt ending in a space and an answer without one).
    """
    base = list(tokenizer.encode(context, add_special_tokens=False))
    full = list(tokenizer.encode(context + text, add_special_tokens=False))
    if full[: len(base)] != base:
        return None
    return tuple(int(i) for i in full[len(base) :])


# A neutral context for "is this word one token": a word followed by " word" tokenizes like a name
# or noun in the middle of a prompt (after a word, a comma or a full stop).
WORD_CONTEXT = "Hello"


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str, context: str = WORD_CONTEXT) -> int | None:
    """The id of ``text`` if it adds exactly one token after ``context``, else ``None``."""
    ids = continuation(tokenizer, context, text)
    return ids[0] if ids is not None and len(ids) == 1 else None


def single_token_words(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> dict[str, int]:
    """The words of ``words`` that are one token with a leading space (mid-sentence), with their ids.

    Duplicates: first occurrence kept; input order preserved (deterministic sampling).
    """
    out: dict[str, int] = {}
    for w in words:
        if w in out:
            continue
        tid = single_token_id(tokenizer, " " + w)
        if tid is not None:
            out[w] = tid
    return out


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, pair: PromptPair, prefix: Sequence[int], *, where: str = "pair"
) -> EncodedPair:
    """Encode one pair; answers must be single tokens after the clean prompt (``TaskError`` naming
    ``where`` otherwise). Lengths are *not* checked here (callers drop or reject misaligned pairs).
    """
    if pair.clean == "" or pair.corrupted == "":
        raise TaskError(f"{where}: the clean and corrupted prompts must not be empty")
    answer_ids = _answer_ids(tokenizer, pair.clean, pair.answers, where, "answer")
    wrong_ids = _answer_ids(tokenizer, pair.clean, pair.wrongs, where, "wrong")
    shared = set(answer_ids) & set(wrong_ids)
    if shared:
        raise TaskError(
            f"{where}: token(s) {token_pieces(tokenizer, sorted(shared))!r} are both an answer and a wrong answer"
        )
    return EncodedPair(
        clean_ids=encode_prompt(tokenizer, pair.clean, prefix),
        corrupted_ids=encode_prompt(tokenizer, pair.corrupted, prefix),
        answer_ids=answer_ids,
        wrong_ids=wrong_ids,
        clean_text=pair.clean,
        corrupted_text=pair.corrupted,
    )


def _answer_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, texts: Sequence[str], where: str, what: str
) -> tuple[int, ...]:
    if len(texts) == 0:
        raise TaskError(f"{where}: the {what} list is empty")
    ids: list[int] = []
    for text in texts:
        toks = continuation(tokenizer, prompt, text)
        if toks is None:
            tail = list(tokenizer.encode(prompt + text, add_special_tokens=False))[-4:]
            raise TaskError(
                f"{where}: the {what} {text!r} does not tokenize separately from the end of the clean "
                f"prompt (prompt + {what} ends in tokens {token_pieces(tokenizer, tail)!r}); does the "
                f"prompt end in a space that belongs to the {what}?"
            )
        if len(toks) != 1:
            raise TaskError(
                f"{where}: the {what} {text!r} is not a single token: after the clean prompt it splits "
                f"into {len(toks)} tokens {token_pieces(tokenizer, toks)!r} (ids {list(toks)})"
            )
        if toks[0] not in ids:
            ids.append(toks[0])
    return tuple(ids)


def is_aligned(pair: EncodedPair) -> bool:
    """Whether clean and corrupted have the same number of tokens."""
    return len(pair.clean_ids) == len(pair.corrupted_ids)


def assemble(
    name: str,
    rows: Sequence[EncodedPair],
    *,
    pad_id: int,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
) -> TokenizedTask:
    """Pad aligned rows into a ``TokenizedTask`` (``TaskError`` if empty or any row is misaligned)."""
    if len(rows) == 0:
        raise TaskError(f"task {name!r} is empty: it has no prompts")
    for i, r in enumerate(rows):
        if not is_aligned(r):
            raise TaskError(
                f"task {name!r} row {i}: clean has {len(r.clean_ids)} tokens, corrupted {len(r.corrupted_ids)}"
            )
    N = len(rows)
    T = max(len(r.clean_ids) for r in rows)
    Ka = max(len(r.answer_ids) for r in rows)
    Kw = max(len(r.wrong_ids) for r in rows)
    clean = torch.full((N, T), pad_id, dtype=torch.long)  # [N, T]
    corrupted = torch.full((N, T), pad_id, dtype=torch.long)  # [N, T]
    answers = torch.full((N, Ka), -1, dtype=torch.long)  # [N, Ka]
    wrongs = torch.full((N, Kw), -1, dtype=torch.long)  # [N, Kw]
    lengths = torch.tensor([len(r.clean_ids) for r in rows], dtype=torch.long)  # [N]
    for i, r in enumerate(rows):
        L = len(r.clean_ids)
        clean[i, :L] = torch.tensor(r.clean_ids, dtype=torch.long)
        corrupted[i, :L] = torch.tensor(r.corrupted_ids, dtype=torch.long)
        answers[i, : len(r.answer_ids)] = torch.tensor(r.answer_ids, dtype=torch.long)
        wrongs[i, : len(r.wrong_ids)] = torch.tensor(r.wrong_ids, dtype=torch.long)
    return TokenizedTask(
        name=name,
        clean_ids=clean,
        corrupted_ids=corrupted,
        lengths=lengths,
        answers=answers,
        wrongs=wrongs,
        read_positions=lengths - 1,
        pad_id=pad_id,
        clean_texts=tuple(r.clean_text for r in rows),
        corrupted_texts=tuple(r.corrupted_text for r in rows),
        seed=seed,
        metadata=dict(metadata or {}),
    )


def generate_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    sample: Callable[[Random], PromptPair | EncodedPair | None],
    *,
    n_prompts: int,
    seed: int,
    metadata: dict[str, str] | None = None,
    max_attempts: int | None = None,
) -> TokenizedTask:
    """Draw pairs from ``sample`` (seeded) until ``n_prompts`` aligned ones are found, then assemble.

    Misaligned candidates (clean and corrupted of different token lengths), candidates whose
    answers are not single tokens after the prompt, and candidates the sampler rejects itself (it
    returns ``None``) are skipped, never truncated; how many were skipped
    is recorded in ``metadata["rejected"]``. Fails with a
    ``TaskError`` if too few aligned pairs turn up in ``max_attempts`` draws.
    """
    if n_prompts < 1:
        raise TaskError(f"n_prompts must be at least 1, got {n_prompts}")
    rng = Random(seed)
    prefix = special_prefix(tokenizer)
    limit = max_attempts if max_attempts is not None else 20 * n_prompts + 200
    rows: list[EncodedPair] = []
    rejected = 0
    last_error = ""
    for _ in range(limit):
        if len(rows) == n_prompts:
            break
        drawn = sample(rng)
        if drawn is None:
            rejected += 1
            continue
        try:
            row = drawn if isinstance(drawn, EncodedPair) else encode_pair(tokenizer, drawn, prefix, where=name)
        except TaskError as e:  # e.g. an answer that merges with this template's last token
            rejected += 1
            last_error = str(e)
            continue
        if is_aligned(row):
            rows.append(row)
        else:
            rejected += 1
    if len(rows) < n_prompts:
        raise TaskError(
            f"task {name!r}: only {len(rows)} of {n_prompts} prompt pairs had equal clean/corrupted "
            f"token lengths and single-token answers after {limit} draws with this tokenizer"
            + (f" (last problem: {last_error})" if last_error else "")
        )
    meta = {"bos": "yes" if prefix else "no", "rejected": str(rejected), **(metadata or {})}
    return assemble(name, rows, pad_id=pad_id_for(tokenizer), seed=seed, metadata=meta)
