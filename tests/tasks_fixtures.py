"""Shared fixtures for the task and metric tests: small tokenizers built offline, the real model.

``make_bpe_tokenizer`` trains a byte-level BPE (GPT-2-like: words carry their leading space, "Ġ")
on the built-in word lists and template words, in a few milliseconds, so every built-in task can
be generated without any download. A few names are deliberately left out of the training corpus
(``HELD_OUT_NAMES``): they split into several tokens and must be filtered out by the IOI builder.

``digits="single"`` splits numbers into single digits (SmolLM2 / Llama-3 style); ``digits="pairs"``
into two-digit tokens (GPT-2's "17" "32" behaviour for years).

``make_spm_tokenizer`` mimics Llama-2 / Mistral's SentencePiece BPE: a dummy "▁" prefix, spaces as
"▁", single digits, a BOS added by default, and the notorious ``" Mary"`` -> ``["▁", "▁Mary"]``
when a word with a leading space is encoded alone.
"""

from __future__ import annotations

from itertools import product

import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from circuits.tasks import country_capital, docstring, greater_than, ioi, subject_verb
from circuits.tasks.words import load_pairs, load_words

HELD_OUT_NAMES: tuple[str, ...] = ("Christopher", "Elizabeth", "Jennifer", "Victoria")

_TEMPLATE_TEXT = "\n".join(
    [
        *ioi.TEMPLATES,
        greater_than.TEMPLATE,
        subject_verb.TEMPLATE,
        *subject_verb.PREPOSITIONS,
        *country_capital.TEMPLATES,
        docstring.render("f", ["a", "b"], ["a"], ["x"], [["y", "z"]]),
        "Hello world",
    ]
)


def _corpus() -> list[str]:
    words: list[str] = [w for w in load_words("names.txt") if w not in HELD_OUT_NAMES]
    for f in ("places.txt", "objects.txt", "gt_nouns.txt", "code_words.txt"):
        words += load_words(f)
    for f in ("sv_nouns.txt", "sv_attractors.txt", "countries.txt"):
        for a, b in load_pairs(f):
            words += [a, b]
    words += ["is", "are", "was", "were", "has", "have", "self", "def", "param", "year", "the", "The"]
    words += [f"w{a}{b}" for a, b in product("abcdefghij", repeat=2)]  # filler words for induction
    lines = [" ".join(" " + w for w in words)] * 3
    lines += [_TEMPLATE_TEXT] * 3
    lines += [" ".join(f"{a}{b}" for a, b in product("0123456789", repeat=2))] * 3
    lines += [" ".join(str(i) for i in range(1000, 2000))]
    return lines


def make_bpe_tokenizer(
    *, digits: str = "single", bos: bool = False, pad: bool = True, eos: bool = True
) -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE tokenizer trained on the task vocabulary (no download)."""
    if digits == "single":
        number_split = pre_tokenizers.Digits(individual_digits=True)
    elif digits == "pairs":
        number_split = pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")
    else:
        raise ValueError(digits)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [number_split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=30000,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    kwargs: dict[str, str] = {}
    if eos:
        kwargs["eos_token"] = "<|endoftext|>"
    if pad:
        kwargs["pad_token"] = "<|pad|>"
    if bos:
        kwargs["bos_token"] = "<s>"
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def make_spm_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like SentencePiece-style BPE tokenizer (no download); adds BOS by default."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=30000, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def spm_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style (Llama-2-like): dummy prefix, BOS by default, no pad token."""
    return make_spm_tokenizer()


@pytest.fixture(scope="session")
def digit_tokenizer() -> PreTrainedTokenizerFast:
    """Single-digit numbers, no BOS, a pad token."""
    return make_bpe_tokenizer(digits="single")


@pytest.fixture(scope="session")
def pair_tokenizer() -> PreTrainedTokenizerFast:
    """Two-digit number tokens (GPT-2-like years), no BOS, a pad token."""
    return make_bpe_tokenizer(digits="pairs")


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Adds a BOS token by default; no pad token (pads with EOS)."""
    return make_bpe_tokenizer(digits="single", bos=True, pad=False)
