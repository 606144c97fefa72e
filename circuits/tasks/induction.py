"""Induction on repeated random tokens (Olsson et al. 2022).

Clean: ``[prefix] r_1 .. r_L r_1 .. r_k`` with ``L`` (default 20) distinct random tokens, cut
inside the repeat at a seeded ``k`` in ``[L // 2, L - 1]`` (at least half the sequence repeated, so
induction is in full swing); the answer is the induced token ``r_{k+1}``.
Corrupted: ``[prefix] r_1 .. r_L s_1 .. s_k`` with fresh tokens ``s`` (distinct from each other and
from every ``r``): the same length, the same first half, but nothing to induce from.
Wrong answer: ``s_{k+1}``, the token the corrupted sequence has at the answer position: a fresh
token of the same distribution that appears in neither prompt, so the logit difference measures
how much the model prefers the induced token over an arbitrary ordinary token it has not seen.

``prefix`` is the tokenizer's default special prefix (its BOS if it adds one by default, else
nothing). Tokens are *ordinary*: a word-start token (GPT-2's ``Ġ`` or SentencePiece's ``▁``) of 3+
ASCII letters, not special, that tokenizes back to itself after a word, so ``clean_texts``
re-tokenize to the same ids. Of those, the
``pool_size`` (default 5000) with the lowest ids are used: BPE and SentencePiece vocabularies are
ordered by merge rank / frequency, so these are common whole words rather than rare word pieces
(a piece such as " marsup" makes the model complete the word instead of inducing; on SmolLM2-135M
top-1 induction accuracy drops from ~80 % to ~45 % with the full vocabulary). Ids are drawn
directly; the texts are their decodings.
"""

from __future__ import annotations

import re
from random import Random

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import WORD_CONTEXT, EncodedPair, generate_task, special_prefix

_ORDINARY = re.compile(r"^[\u0120\u2581]([A-Za-z]{3,})$")  # "Ġword" (byte-level BPE) or "▁word" (SentencePiece)
DESCRIPTION = "induction: random tokens repeated, 'A B C ... A B' -> ' C'; corrupted second half fresh tokens"


def ordinary_tokens(tokenizer: PreTrainedTokenizerBase, limit: int | None = None) -> tuple[int, ...]:
    """Ids of ordinary word tokens, ascending: see the module docstring.

    A token qualifies if its vocabulary string is a word-start marker (byte-level ``Ġ`` or
    SentencePiece ``▁``) followed by 3+ ASCII letters, it is not special, and ``" word"`` appended
    to a word tokenizes back to exactly this token. Scans ids in order, in chunks, and stops once
    ``limit`` tokens are found.
    """
    special = set(tokenizer.all_special_ids)
    ids = sorted(i for i in set(tokenizer.get_vocab().values()) if i not in special)
    base = list(tokenizer.encode(WORD_CONTEXT, add_special_tokens=False))
    found: list[int] = []
    for lo in range(0, len(ids), 4096):
        chunk = ids[lo : lo + 4096]
        pieces = tokenizer.convert_ids_to_tokens(chunk)
        cands = [(i, " " + m.group(1)) for i, p in zip(chunk, pieces, strict=True) if (m := _ORDINARY.match(p))]
        if cands:
            encoded = tokenizer([WORD_CONTEXT + t for _, t in cands], add_special_tokens=False)["input_ids"]
            found += [i for (i, _), enc in zip(cands, encoded, strict=True) if list(enc) == [*base, i]]
        if limit is not None and len(found) >= limit:
            return tuple(found[:limit])
    return tuple(found)


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, clean_up_tokenization_spaces=False))


def make_induction(
    tokenizer: PreTrainedTokenizerBase,
    n_prompts: int = 100,
    seed: int = 0,
    *,
    seq_len: int = 20,
    pool_size: int = 5000,
) -> TokenizedTask:
    """``n_prompts`` induction pairs over ``seq_len`` random tokens, deterministic in ``seed``."""
    if seq_len < 3:
        raise TaskError(f"induction needs seq_len >= 3, got {seq_len}")
    pool = ordinary_tokens(tokenizer, limit=pool_size)
    if len(pool) < 2 * seq_len:
        raise TaskError(f"induction needs {2 * seq_len} ordinary tokens, this tokenizer has {len(pool)}")
    prefix = special_prefix(tokenizer)

    def sample(rng: Random) -> EncodedPair:
        toks = rng.sample(pool, 2 * seq_len)
        r, s = toks[:seq_len], toks[seq_len:]
        k = rng.randint(seq_len // 2, seq_len - 1)
        clean = (*prefix, *r, *r[:k])
        corrupted = (*prefix, *r, *s[:k])
        return EncodedPair(
            clean_ids=clean,
            corrupted_ids=corrupted,
            answer_ids=(r[k],),
            wrong_ids=(s[k],),
            clean_text=_decode(tokenizer, list(clean[len(prefix) :])),
            corrupted_text=_decode(tokenizer, list(corrupted[len(prefix) :])),
        )

    meta = {
        "seq_len": str(seq_len),
        "pool_size": str(pool_size),
        "pool": str(len(pool)),
        "wrong": "fresh token s_{k+1}",
    }
    return generate_task("induction", tokenizer, sample, n_prompts=n_prompts, seed=seed, metadata=meta)
