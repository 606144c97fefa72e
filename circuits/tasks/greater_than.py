"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17".

Prompts are ``"The {noun} lasted from the year {XX}{YY} to the year {XX}"`` with a century ``XX``
in 11..17. What the model predicts next depends on how the tokenizer writes numbers, detected by
tokenizing a probe year (``"...to the year 17" + "32"``; tokens are always taken in context, as
they follow the prompt):

- ``two-digit`` (GPT-2 and other tokenizers with a token for each two-digit string): the next
  token is the year's last two digits. As in the paper, ``YY`` is drawn from 02..98, the answer set
  is every ``yy > YY`` and the wrong set every ``yy <= YY`` (the paper's probability difference).
- ``one-digit`` (SmolLM2, Llama-3 and other tokenizers that split numbers into single digits):
  the next token is the decade digit ``D`` of the end year. ``YY`` is drawn from 10..89 so that
  ``D = YY // 10`` is in 1..8. The answer set is every digit ``d > D`` (the end year is greater
  whatever digit follows), the wrong set every digit ``d < D`` (the end year is smaller whatever
  follows); ``d == D`` is in neither set because the year's order then depends on the next digit.

Corruption (both modes, as in the paper): the start year becomes ``{XX}01``, for which every
continuation is greater, so the prompt carries no threshold. ``"01"`` has the same token length
as any ``YY`` in both modes, which the builder checks per pair.
"""

from __future__ import annotations

from random import Random

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import (
    EncodedPair,
    continuation,
    encode_prompt,
    generate_task,
    single_token_id,
    special_prefix,
    token_pieces,
)
from .words import load_words

TEMPLATE = "The {noun} lasted from the year {xx}{yy} to the year {xx}"
CENTURIES: tuple[int, ...] = tuple(range(11, 18))
CORRUPT_YY = "01"
DESCRIPTION = "greater-than: 'The war lasted from the year 1732 to the year 17' -> years > 32; corrupted start 1701"


_PROBE = TEMPLATE.format(noun="war", xx=17, yy=32)  # "... from the year 1732 to the year 17"


def number_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Token id of every "0".."9" and "00".."99" that is one token where a year continues.

    Each string is tokenized after the probe prompt ("... to the year 17"), falling back to the
    string alone when it merges with the "17" before it; strings that are no single token are left
    out. In context matters for SentencePiece tokenizers ("3" alone is "▁", "3").
    """
    out: dict[str, int] = {}
    for s in [str(v) for v in range(10)] + [f"{v:02d}" for v in range(100)]:
        tid = single_token_id(tokenizer, s, context=_PROBE)
        if tid is None:
            alone = tokenizer.encode(s, add_special_tokens=False)
            tid = int(alone[0]) if len(alone) == 1 else None
        if tid is not None:
            out[s] = tid
    return out


def year_mode(tokenizer: PreTrainedTokenizerBase, ids: dict[str, int] | None = None) -> str:
    """``"two-digit"`` or ``"one-digit"``: how the tokenizer continues '... the year 17' with '32'.

    Raises ``TaskError`` for tokenizers that write years any other way.
    """
    ids = number_ids(tokenizer) if ids is None else ids
    tail = continuation(tokenizer, _PROBE, "32")
    if tail is not None and all(f"{v:02d}" in ids for v in range(100)) and tail == (ids["32"],):
        return "two-digit"
    if tail is not None and all(str(v) in ids for v in range(10)) and tail == (ids["3"], ids["2"]):
        return "one-digit"
    pieces = token_pieces(tokenizer, tail) if tail is not None else "tokens merged with '17'"
    raise TaskError(
        "greater-than needs a tokenizer that continues '... the year 17' with the year's last two "
        "digits as one token (GPT-2 style) or with single digit tokens (SmolLM2 style); this one "
        f"continues it with {pieces!r}"
    )


def answer_sets(mode: str, yy: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (greater, not-greater) continuation strings for start year ``..YY`` in ``mode``."""
    if mode == "two-digit":
        return tuple(f"{v:02d}" for v in range(yy + 1, 100)), tuple(f"{v:02d}" for v in range(yy + 1))
    decade = yy // 10
    return tuple(str(d) for d in range(decade + 1, 10)), tuple(str(d) for d in range(decade))


def make_greater_than(tokenizer: PreTrainedTokenizerBase, n_prompts: int = 100, seed: int = 0) -> TokenizedTask:
    """``n_prompts`` greater-than pairs, deterministic in ``seed`` (see the module docstring)."""
    ids = number_ids(tokenizer)
    mode = year_mode(tokenizer, ids)
    nouns = load_words("gt_nouns.txt")
    prefix = special_prefix(tokenizer)
    lo, hi = (2, 98) if mode == "two-digit" else (10, 89)

    def sample(rng: Random) -> EncodedPair | None:
        noun, xx, yy = rng.choice(nouns), rng.choice(CENTURIES), rng.randint(lo, hi)
        clean = TEMPLATE.format(noun=noun, xx=xx, yy=f"{yy:02d}")
        corrupted = TEMPLATE.format(noun=noun, xx=xx, yy=CORRUPT_YY)
        clean_ids = encode_prompt(tokenizer, clean, prefix)
        # The true continuation must tokenize as prompt + answer token(s), else the answer sets
        # would not be what the model reads next: reject the pair (counted in metadata["rejected"]).
        cont = f"{yy:02d}"
        expect = [ids[cont]] if mode == "two-digit" else [ids[cont[0]], ids[cont[1]]]
        if list(encode_prompt(tokenizer, clean + cont, prefix)) != list(clean_ids) + expect:
            return None
        greater, smaller = answer_sets(mode, yy)
        return EncodedPair(
            clean_ids=clean_ids,
            corrupted_ids=encode_prompt(tokenizer, corrupted, prefix),
            answer_ids=tuple(ids[s] for s in greater),
            wrong_ids=tuple(ids[s] for s in smaller),
            clean_text=clean,
            corrupted_text=corrupted,
        )

    meta = {"mode": mode, "corruption": f"start year XX{CORRUPT_YY}"}
    return generate_task("greater-than", tokenizer, sample, n_prompts=n_prompts, seed=seed, metadata=meta)
