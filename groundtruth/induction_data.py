"""Data of the induction model: chains of repeated random segments, and the induction task.

Kept in its own small module so the training script, the analysis and ``groundtruth.known`` draw
from the same distribution (the task's prompts look like the training data).

A training sequence is a chain of episodes ``f_1 .. f_F r_1 .. r_L r_1 .. r_L`` (a few filler tokens,
a random segment, its repeat), cut at 40 tokens, with every token distinct except the repeats.
Segment lengths and offsets vary, so the distance back to a token's previous occurrence varies and
no purely positional head can predict the repeats: they must be found by content (induction).
History (groundtruth/README.md): with one fixed-period repeat a layer-0 head learnt "copy the
token 19 positions back" from positions alone; with one long repeat of varying length the model
used layer-0 heads that attend 3 and 4 positions back instead of a previous-token head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.tasks.base import TokenizedTask

VOCAB = 64  # token ids 0..63; no special tokens
N_CTX = 40  # learned positions
MIN_SEGMENT, MAX_SEGMENT = 2, 8  # training segment lengths L


def distinct_rows(n: int, length: int, gen: torch.Generator, vocab: int = VOCAB) -> Tensor:
    """``n`` rows of ``length`` distinct random tokens each: [n, length] long."""
    return torch.rand(n, vocab, generator=gen).argsort(dim=1)[:, :length]


def training_batch(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` training / held-out sequences and the positions whose next token is induced.

    A sequence is a chain of *episodes* cut at ``N_CTX`` tokens: ``f_1 .. f_F r_1 .. r_L r_1 .. r_L``
    with ``F`` filler tokens (uniform in [0, 3]) and a segment of ``L`` tokens (uniform in
    [MIN_SEGMENT, MAX_SEGMENT]); every token is distinct except the repeats. Returns ids
    [n, N_CTX] and ``induced`` [n, N_CTX] bool: True at positions inside a repeat whose next token
    is the next token of that repeat.

    Why episodes with short segments: an induction circuit can find the previous occurrence
    through a layer-0 head that attends ``k`` positions back for any ``k`` (keys carry the token
    ``k`` back, values the token ``k - 1`` back); only repeats shorter than ``k`` tell ``k = 1``
    apart. With one long repeat per sequence a first model settled on ``k = 3`` and ``k = 4``
    heads; with frequent short repeats (L in [2, 8]) only ``k = 1`` solves the task - though
    training still needs a previous-token start to find it (train_induction.py)."""
    ids = distinct_rows(n, N_CTX, gen)  # [n, 40]: fresh tokens, repeats are copied in below
    induced = torch.zeros(n, N_CTX, dtype=torch.bool)
    fillers = torch.randint(0, 4, (n, N_CTX), generator=gen)
    lengths = torch.randint(MIN_SEGMENT, MAX_SEGMENT + 1, (n, N_CTX), generator=gen)
    for i in range(n):
        t, e = 0, 0  # position, episode
        while t < N_CTX:
            t += int(fillers[i, e])
            L = int(lengths[i, e])
            e += 1
            start = t + L  # first position of the repeat
            for j in range(start, min(start + L, N_CTX)):
                ids[i, j] = ids[i, j - L]
                if j < start + L - 1 and j < N_CTX - 1:
                    induced[i, j] = True
            t = start + L
    return ids, induced


def induction_task(n_prompts: int = 32, seed: int = 0) -> TokenizedTask:
    """Clean / corrupted induction prompts for circuit discovery, deterministic in ``seed``.

    Clean: ``p_1 .. p_P r_1 .. r_L r_1 .. r_k`` with ``L`` in [4, 8], ``P`` in [0, 16], ``k`` in
    [L // 2, L - 1] (all uniform) and every token distinct but the repeat; answer ``r_{k+1}``.
    Corrupted: ``q_1 .. q_P s_1 .. s_L s_1 .. s_k``: the same structure, with fresh tokens disjoint
    from the clean prompt's; wrong answer ``s_{k+1}``, what the corrupted prompt induces.

    Why this corruption: every position differs between clean and corrupted, so each edge of the
    induction circuit carries a different value in the corrupted run (the query token, the
    previous-token information in the keys, the copied values). Corrupting only the second half
    would leave the first half - where the keys and values of the attended positions live -
    identical, and the K-composition and value edges would show zero effect under edge patching.
    The corrupted prompt is itself an induction prompt, so the full model is confident in both
    directions (logit difference strongly positive on clean, strongly negative on corrupted)."""
    gen = torch.Generator().manual_seed(seed)
    L = torch.randint(MIN_SEGMENT + 2, MAX_SEGMENT + 1, (n_prompts,), generator=gen)
    P = torch.randint(0, 17, (n_prompts,), generator=gen)
    k = (L // 2 + (torch.rand(n_prompts, generator=gen) * (L - L // 2)).floor().long()).clamp(max=L - 1)
    tokens = distinct_rows(n_prompts, 2 * 24, gen)  # [N, 48]: clean 24, corrupted 24, disjoint
    lengths = P + L + k
    T = int(lengths.max())
    clean = torch.zeros(n_prompts, T, dtype=torch.long)
    corrupted = torch.zeros(n_prompts, T, dtype=torch.long)
    answers = torch.zeros(n_prompts, 1, dtype=torch.long)
    wrongs = torch.zeros(n_prompts, 1, dtype=torch.long)
    for i in range(n_prompts):
        p, l, kk = int(P[i]), int(L[i]), int(k[i])
        for row, toks, ans in ((clean, tokens[i, :24], answers), (corrupted, tokens[i, 24:], wrongs)):
            prefix, seg = toks[:p], toks[p : p + l]
            row[i, : p + l + kk] = torch.cat([prefix, seg, seg[:kk]])
            ans[i, 0] = seg[kk]
    return TokenizedTask(
        name="groundtruth-induction",
        clean_ids=clean,
        corrupted_ids=corrupted,
        lengths=lengths,
        answers=answers,
        wrongs=wrongs,
        read_positions=lengths - 1,
        seed=seed,
        metadata={"corrupted": "fresh disjoint tokens, same structure", "wrong": "s_{k+1}"},
    )
