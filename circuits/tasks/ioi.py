"""Indirect object identification (Wang et al. 2022) with ABC corruption.

Clean: "When Mary and John went to the store, John gave a drink to" -> answer " Mary" (the
indirect object, IO), wrong " John" (the subject, S). Templates come in both name orders: ABBA
(IO first: "Mary and John ..., John ...") and BABA (S first: "John and Mary ..., John ...").

Corrupted (ABC): the same template, place and object with the three name slots filled by three
further distinct names, none of them the clean IO or S ("When Ann and Bob went ..., Carl gave a
drink to"), so no name repeats and the prompt carries no information about which clean name is
the answer. The metric on the corrupted prompt still compares the clean IO against the clean S.

Names are kept only if the name with a leading space is a single token for the given tokenizer.
"""

from __future__ import annotations

from random import Random

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import PromptPair, generate_task, single_token_words
from .words import load_words

# {n1} and {n2} are the first two mentions, {s2} the repeated subject. ABBA: n1 = IO, n2 = S;
# BABA: n1 = S, n2 = IO. Every name follows a space, so its token is the " Name" token.
TEMPLATES: tuple[str, ...] = (
    "When {n1} and {n2} went to the {place}, {s2} gave a {object} to",
    "Then, {n1} and {n2} went to the {place}. {s2} gave a {object} to",
    "Then, {n1} and {n2} had a lot of fun at the {place}. {s2} gave a {object} to",
    "Then, {n1} and {n2} were working at the {place}. {s2} decided to give a {object} to",
    "Then, {n1} and {n2} were thinking about going to the {place}. {s2} wanted to give a {object} to",
    "Then, {n1} and {n2} had a long argument, and afterwards {s2} said to",
    "After {n1} and {n2} went to the {place}, {s2} gave a {object} to",
    "When {n1} and {n2} got a {object} at the {place}, {s2} decided to give it to",
    "While {n1} and {n2} were working at the {place}, {s2} gave a {object} to",
    "While {n1} and {n2} were commuting to the {place}, {s2} gave a {object} to",
    "After the lunch, {n1} and {n2} went to the {place}. {s2} gave a {object} to",
    "Afterwards, {n1} and {n2} went to the {place}. {s2} gave a {object} to",
    "Friends {n1} and {n2} found a {object} at the {place}. {s2} gave it to",
)

DESCRIPTION = "indirect object identification: '..., John gave a drink to' -> ' Mary' vs ' John'; ABC corruption"


def ioi_names(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The built-in names that are one token with a leading space for ``tokenizer``."""
    return tuple(single_token_words(tokenizer, load_words("names.txt")))


def make_ioi(tokenizer: PreTrainedTokenizerBase, n_prompts: int = 100, seed: int = 0) -> TokenizedTask:
    """``n_prompts`` IOI pairs (half ABBA, half BABA in expectation), deterministic in ``seed``."""
    names = ioi_names(tokenizer)
    if len(names) < 5:
        raise TaskError(f"ioi needs at least 5 single-token names for this tokenizer, found {len(names)}")
    places = load_words("places.txt")
    objects = load_words("objects.txt")

    def sample(rng: Random) -> PromptPair:
        template = rng.choice(TEMPLATES)
        io, s, x, y, z = rng.sample(names, 5)
        order = rng.choice(("ABBA", "BABA"))
        place, obj = rng.choice(places), rng.choice(objects)
        n1, n2 = (io, s) if order == "ABBA" else (s, io)
        clean = template.format(n1=n1, n2=n2, s2=s, place=place, object=obj)
        corrupted = template.format(n1=x, n2=y, s2=z, place=place, object=obj)
        return PromptPair(clean, corrupted, answers=(" " + io,), wrongs=(" " + s,))

    meta = {"corruption": "ABC", "n_names": str(len(names)), "templates": str(len(TEMPLATES))}
    return generate_task("ioi", tokenizer, sample, n_prompts=n_prompts, seed=seed, metadata=meta)
