"""Factual recall of capitals: "The capital of France is" -> " Paris".

Several templates end right before the capital. Corrupted: the same template with another country
(whose capital differs); the answer stays the clean capital and the wrong answer is the corrupted
country's capital, so the logit difference flips sign between a clean and a corrupted prompt.
Only countries whose capital is one token with a leading space are used, and the corrupted country
must give the same prompt length (checked per pair; misaligned draws are skipped).
"""

from __future__ import annotations

from random import Random

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import PromptPair, generate_task, single_token_words
from .words import load_pairs

TEMPLATES: tuple[str, ...] = (
    "The capital of {country} is",
    "The capital city of {country} is",
    "The country of {country} has its capital in",
    "Q: What is the capital of {country}?\nA:",
)
DESCRIPTION = "country-capital: 'The capital of France is' -> ' Paris'; corrupted country, wrong = its capital"


def usable_countries(tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """(country, capital) pairs whose capital is one token with a leading space."""
    pairs = load_pairs("countries.txt")
    ok = single_token_words(tokenizer, [cap for _, cap in pairs])
    return [(c, cap) for c, cap in pairs if cap in ok]


def make_country_capital(tokenizer: PreTrainedTokenizerBase, n_prompts: int = 100, seed: int = 0) -> TokenizedTask:
    """``n_prompts`` country-capital pairs, deterministic in ``seed``."""
    countries = usable_countries(tokenizer)
    if len(countries) < 2:
        raise TaskError(
            f"country-capital needs at least 2 countries with single-token capitals, found {len(countries)}"
        )

    # Corrupt with a country of the same token count, so nearly every draw is aligned.
    def n_tokens(country: str) -> int:
        return len(tokenizer.encode(" " + country, add_special_tokens=False))

    groups: dict[int, list[tuple[str, str]]] = {}
    for pair in countries:
        groups.setdefault(n_tokens(pair[0]), []).append(pair)
    usable = [g for g in groups.values() if len(g) >= 2]
    if not usable:
        raise TaskError("country-capital: no two usable countries have the same token count for this tokenizer")
    weighted = [pair for g in usable for pair in g]

    def sample(rng: Random) -> PromptPair:
        country, capital = rng.choice(weighted)
        group = groups[n_tokens(country)]
        other, other_capital = rng.choice([p for p in group if p[0] != country])
        template = rng.choice(TEMPLATES)
        return PromptPair(
            template.format(country=country),
            template.format(country=other),
            answers=(" " + capital,),
            wrongs=(" " + other_capital,),
        )

    meta = {"corruption": "another country", "n_countries": str(len(countries))}
    return generate_task("country-capital", tokenizer, sample, n_prompts=n_prompts, seed=seed, metadata=meta)
