"""Subject-verb agreement across an attractor: "The keys to the cabinet" -> " are" vs " is".

Prompts are ``"The {subject} {preposition} the {attractor}"``; the subject is singular or plural
(seeded coin), the attractor's number is drawn independently (so half the prompts have a
mismatching attractor, the hard case). The verb pair is one of is/are, was/were, has/have; the
answer is the form agreeing with the subject, the wrong answer the other form.

Corrupted: the subject's number is flipped ("The key to the cabinet"); everything else, and the
answers, stay as in the clean prompt, so a model that agrees prefers the *wrong* verb there.
A noun pair is used only if its singular and plural have the same token count (with a leading
space) so the pair stays aligned; both verb forms must be single tokens.
"""

from __future__ import annotations

from random import Random

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import PromptPair, generate_task, single_token_id
from .words import load_pairs

TEMPLATE = "The {subject} {preposition} the {attractor}"
PREPOSITIONS: tuple[str, ...] = ("to", "of", "near", "on", "behind", "next to", "from", "in")
VERBS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"), ("has", "have"))
DESCRIPTION = "subject-verb agreement: 'The keys to the cabinet' -> ' are' vs ' is'; corrupted flips the subject number"


def _same_length_pairs(tokenizer: PreTrainedTokenizerBase, pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    def n(w: str) -> int:
        return len(tokenizer.encode(" " + w, add_special_tokens=False))

    return [(sg, pl) for sg, pl in pairs if n(sg) == n(pl)]


def make_subject_verb(tokenizer: PreTrainedTokenizerBase, n_prompts: int = 100, seed: int = 0) -> TokenizedTask:
    """``n_prompts`` agreement pairs, deterministic in ``seed`` (see the module docstring)."""
    subjects = _same_length_pairs(tokenizer, load_pairs("sv_nouns.txt"))
    attractors = list(load_pairs("sv_attractors.txt"))
    verbs = [v for v in VERBS if all(single_token_id(tokenizer, " " + f) is not None for f in v)]
    if not subjects or not verbs:
        raise TaskError("subject-verb: no usable noun pairs or verb pairs for this tokenizer")

    def sample(rng: Random) -> PromptPair:
        sg, pl = rng.choice(subjects)
        plural = rng.random() < 0.5
        attractor = rng.choice(attractors)[rng.randint(0, 1)]
        prep = rng.choice(PREPOSITIONS)
        v_sg, v_pl = rng.choice(verbs)
        clean = TEMPLATE.format(subject=pl if plural else sg, preposition=prep, attractor=attractor)
        corrupted = TEMPLATE.format(subject=sg if plural else pl, preposition=prep, attractor=attractor)
        right, wrong = (v_pl, v_sg) if plural else (v_sg, v_pl)
        return PromptPair(clean, corrupted, answers=(" " + right,), wrongs=(" " + wrong,))

    meta = {"corruption": "subject number flipped", "n_subjects": str(len(subjects))}
    return generate_task("subject-verb", tokenizer, sample, n_prompts=n_prompts, seed=seed, metadata=meta)
