"""Build the hand-set model ``groundtruth/models/lookup-2l``: a key-value lookup whose edge set is
known exactly by construction.

Task. A prompt is 14 tokens: ``X k1 v1 k2 v2 ... k6 v6 =``. ``X`` is a *query letter* (``A``..``F``),
``k1..k6`` are the six *key letters* ``a``..``f`` in a random order, ``v1..v6`` the six *digits*
``0``..``5`` in a random order, ``=`` a fixed end marker. The answer is the successor (mod 6) of
the digit that follows the key letter matching ``X``: for ``C a3 b0 c5 d1 e4 f2 =`` it is ``0``
(``c`` -> ``5`` -> ``5 + 1 mod 6``).

Mechanism (GPT-2 shape: 2 layers x 4 heads, d_model 64, LayerNorms, GELU MLPs, learned positions):

* ``a0.h0`` *mover*: attends from every position to position 0 (its query is its bias alone, its
  key reads the position-0 embedding) and copies the query letter into a subspace ``M``.
* ``a0.h1`` *previous-token head*: attends from position t to t-1 (positional query and key) and
  copies key letters (only) into a subspace ``P``: at each digit position, the key letter before it.
* ``a1.h0`` *lookup*: its query reads ``M`` (Q-composition with ``a0.h0``), its keys read ``P``
  (K-composition with ``a0.h1``), so at the last position it attends to the digit whose key matches
  ``X``; its value reads the digit and writes it to a subspace ``R``.
* ``m1`` *successor*: reads ``R``, six GELU units (one per digit, thresholded so only the attended
  digit fires), writes the successor digit to a subspace ``O``.
* ``logits``: the (untied) unembedding reads ``O`` for the digits; every other token gets a large
  constant negative logit through an *anchor* direction.
* Every other head (``a0.h2``, ``a0.h3``, ``a1.h1..h3``) and ``m0`` has zero output weights and biases:
  it writes exactly zero. All attention output biases ``b_O`` are zero.

Ground-truth edge set (7 of the graph's 110 edges):

    input->a0.h0<v>   a0.h0->a1.h0<q>   input->a0.h1<v>   a0.h1->a1.h0<k>
    input->a1.h0<v>   a1.h0->m1         m1->logits

Why every other edge has *exactly* zero effect under edge patching with the task's corruption
(an independent prompt: another X, other permutations): every sender writes into its own subspace
(token, position, M, P, R, O and anchor directions are orthonormal columns of one random orthogonal
matrix, all orthogonal to the all-ones vector, so LayerNorm's mean subtraction is a no-op), and in
both the clean and the corrupted run each sender's output at each position has the *same norm* (it is
a unit vector of its subspace, or a permutation of a fixed vector: the six keys and six digits are
permutations, so the lookup's softmax leak and the MLP's units are permuted, never changed). Hence
every LayerNorm divides by the same scale in every single-edge-ablated run, and each receiver is a
fixed linear map of the subspaces it reads - which are exactly its ground-truth senders. Receivers
with zero-output owners cannot reach the logits; ``input`` into the last position's receivers is
the same ``=`` token in both runs. ``tests/test_groundtruth.py`` checks the edge patching result:
nonzero on exactly these 7 edges.

The anchor (norm ``ANCHOR``, part of every position embedding: a graph constant) keeps LayerNorm
scales dominated by a constant, so a norm-preserving swap of one sender's unit vector is nearly a
rotation to first order too. Exact methods do not need it (the swap preserves the norm exactly); it
keeps the *linear* estimate of LayerNorm (EAP, AtP*) from giving inert edges large scores - the
straight line between two orthogonal unit vectors passes through shorter vectors.

    python -m groundtruth.build_lookup     # writes groundtruth/models/lookup-2l
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from circuits.tasks.base import TokenizedTask

OUT = Path(__file__).resolve().parent / "models" / "lookup-2l"

N_KEYS = 6  # key letters a..f, query letters A..F, digits 0..5
KEY_IDS = tuple(range(N_KEYS))  # "a".."f"
QUERY_IDS = tuple(range(N_KEYS, 2 * N_KEYS))  # "A".."F"
DIGIT_IDS = tuple(range(2 * N_KEYS, 3 * N_KEYS))  # "0".."5"
END_ID = 3 * N_KEYS  # "="
VOCAB = 3 * N_KEYS + 1
TOKENS = (
    tuple("abcdef"[:N_KEYS]) + tuple("ABCDEF"[:N_KEYS]) + tuple(str(i) for i in range(N_KEYS)) + ("=",)
)  # token id -> text
SEQ_LEN = 2 + 2 * N_KEYS  # X, six pairs, "="
D_MODEL, N_HEADS, D_MLP = 64, 4, N_KEYS
D_HEAD = D_MODEL // N_HEADS
ANCHOR = 4.0  # norm of the constant anchor direction in every position embedding
BASIS_SEED = 0

# attention-score gaps (pre-softmax, after the 1/sqrt(d_head) scale)
MOVER_GAP = 40.0  # a0.h0: position 0 vs the rest (saturated: weight 1.0 in float32)
PREV_GAP = 40.0  # a0.h1: t-1 vs the rest (saturated)
LOOKUP_GAP = 6.0  # a1.h0: the matching digit vs the rest (soft: weight ~0.97, gradients flow)
MLP_ON, MLP_OFF = 4.0, -4.0  # m1 pre-activation of the attended digit's unit / of the others
LOGIT_SCALE = 2.5  # answer logit ~ LOGIT_SCALE * GELU(MLP_ON)
OTHER_LOGIT = -10.0  # logit of every non-digit token


def successor(digit: int) -> int:
    """The function the model computes on the retrieved digit."""
    return (digit + 1) % N_KEYS


@dataclass(frozen=True)
class Basis:
    """Named orthonormal directions of the residual stream (columns of one orthogonal matrix)."""

    tok: Tensor  # [VOCAB, d]
    pos: Tensor  # [SEQ_LEN, d]
    M: Tensor  # [N_KEYS, d] moved query letter
    P: Tensor  # [N_KEYS, d] previous key letter
    R: Tensor  # [N_KEYS, d] retrieved digit
    O: Tensor  # [N_KEYS, d] answer digit
    anchor: Tensor  # [d]

    @staticmethod
    def make(seed: int = BASIS_SEED) -> Basis:
        gen = torch.Generator().manual_seed(seed)
        d = D_MODEL
        raw = torch.cat([torch.ones(d, 1), torch.randn(d, d - 1, generator=gen, dtype=torch.float64)], dim=1)
        U, _ = torch.linalg.qr(raw)  # [d, d]; column 0 spans the all-ones vector
        cols = U[:, 1:].T  # [d-1, d]: unit rows orthogonal to ones and to each other
        sizes = [VOCAB, SEQ_LEN, N_KEYS, N_KEYS, N_KEYS, N_KEYS, 1]
        if sum(sizes) > d - 1:
            raise ValueError(f"{sum(sizes)} directions do not fit in d_model - 1 = {d - 1}")
        parts = torch.split(cols[: sum(sizes)], sizes)
        return Basis(*parts[:6], anchor=parts[6][0])


def layer_scales() -> dict[str, Tensor]:
    """LayerNorm divides its input by ``|x| / sqrt(d)`` (weights 1, biases 0, inputs mean-free):
    the norm of the residual at each position, known from the construction (every content
    vector has unit norm). Returns ``sqrt(d) / |x|`` per position for each norm's input: [SEQ_LEN]."""
    eps = 1e-5
    d = D_MODEL
    base = 1.0 + 1.0 + ANCHOR**2  # token + position + anchor
    digit_pos = torch.tensor([t >= 2 and t % 2 == 0 and t < SEQ_LEN - 1 for t in range(SEQ_LEN)])
    layer0 = torch.full((SEQ_LEN,), base, dtype=torch.float64)
    layer1 = layer0 + 1.0 + digit_pos.double()  # + M everywhere, + P at digit positions
    return {name: 1.0 / torch.sqrt(sq / d + eps) for name, sq in (("layer0", layer0), ("layer1", layer1))}


def build() -> GPT2LMHeadModel:
    """The model with every weight set by hand (see the module docstring)."""
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=D_MODEL,
        n_layer=2,
        n_head=N_HEADS,
        n_inner=D_MLP,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=END_ID,
        eos_token_id=END_ID,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    b = Basis.make()
    s = layer_scales()
    d, dh = D_MODEL, D_HEAD
    W: dict[str, Tensor] = {}  # float64 work copies, written into the model at the end
    W["wte"] = b.tok.clone()  # [V, d]: every token a unit vector
    W["wpe"] = b.pos + ANCHOR * b.anchor  # [T, d]
    attn_w = [torch.zeros(d, 3 * d, dtype=torch.float64) for _ in range(2)]  # Conv1D: x @ W
    attn_b = [torch.zeros(3 * d, dtype=torch.float64) for _ in range(2)]
    proj_w = [torch.zeros(d, d, dtype=torch.float64) for _ in range(2)]  # rows: head h's dims
    root = math.sqrt(dh)

    def q_cols(h: int) -> slice:
        return slice(h * dh, (h + 1) * dh)

    def k_cols(h: int) -> slice:
        return slice(d + h * dh, d + (h + 1) * dh)

    def v_cols(h: int) -> slice:
        return slice(2 * d + h * dh, 2 * d + (h + 1) * dh)

    # ---- a0.h0 mover: query = bias (constant), key reads position 0; score gap MOVER_GAP at j = 0
    sc0 = float(s["layer0"][0])  # LN scale at layer 0 (the same at every position)
    attn_b[0][q_cols(0).start] = MOVER_GAP * root / sc0
    attn_w[0][:, k_cols(0).start] = b.pos[0]  # k_j[0] = sc0 * [j == 0]
    for a in range(N_KEYS):  # value: query letter a -> head dim a -> M_a (unit output)
        attn_w[0][:, v_cols(0).start + a] = b.tok[QUERY_IDS[a]]
        proj_w[0][0 * dh + a] = b.M[a] / sc0
    # ---- a0.h1 previous token: q_t = e_t, k_j = e_{j+1} (positional); gap PREV_GAP at j = t - 1
    w = math.sqrt(PREV_GAP * root) / sc0
    for t in range(SEQ_LEN):
        attn_w[0][:, q_cols(1).start + t] = w * b.pos[t]
        if t + 1 < dh:
            attn_w[0][:, k_cols(1).start + t + 1] = w * b.pos[t]
    for a in range(N_KEYS):  # value: key letter a -> head dim a -> P_a
        attn_w[0][:, v_cols(1).start + a] = b.tok[KEY_IDS[a]]
        proj_w[0][1 * dh + a] = b.P[a] / sc0
    # ---- a1.h0 lookup: query reads M, key reads P (matching letters), value reads digits -> R
    last = SEQ_LEN - 1
    sq, sk = float(s["layer1"][last]), float(s["layer1"][2])  # query position / digit positions
    for a in range(N_KEYS):
        attn_w[1][:, q_cols(0).start + a] = b.M[a] * (LOOKUP_GAP * root / (sq * sk))
        attn_w[1][:, k_cols(0).start + a] = b.P[a]
        attn_w[1][:, v_cols(0).start + a] = b.tok[DIGIT_IDS[a]]
        proj_w[1][0 * dh + a] = b.R[a] / sk  # a fully attended digit writes R_digit (unit)
    # ---- m0: zero. m1 successor: unit c reads R_c, fires for the attended digit only, writes O_{c+1}
    attn_weight = math.exp(LOOKUP_GAP) / (math.exp(LOOKUP_GAP) + SEQ_LEN - 1)  # weight on the match
    leak = 1.0 / (math.exp(LOOKUP_GAP) + SEQ_LEN - 1)  # weight on every other position
    r_norm_sq = attn_weight**2 + (N_KEYS - 1) * leak**2
    s_mlp = 1.0 / math.sqrt((1.0 + 1.0 + ANCHOR**2 + 1.0 + r_norm_sq) / d + 1e-5)  # ln_2 scale at the last position
    gain = (MLP_ON - MLP_OFF) / (s_mlp * (attn_weight - leak))
    fc_w = torch.zeros(d, D_MLP, dtype=torch.float64)
    fc_b = torch.full((D_MLP,), MLP_ON - gain * s_mlp * attn_weight, dtype=torch.float64)
    mlp_proj = torch.zeros(D_MLP, d, dtype=torch.float64)
    for c in range(N_KEYS):
        fc_w[:, c] = gain * b.R[c]
        mlp_proj[c] = b.O[successor(c)]
    # ---- unembedding: digits read O; every other token reads the anchor (a constant negative logit)
    gelu_on = float(torch.nn.functional.gelu(torch.tensor(MLP_ON), approximate="tanh"))
    s_final = 1.0 / math.sqrt((1.0 + 1.0 + ANCHOR**2 + 1.0 + r_norm_sq + gelu_on**2) / d + 1e-5)
    lm = torch.zeros(VOCAB, d, dtype=torch.float64)
    for c in range(N_KEYS):
        lm[DIGIT_IDS[c]] = b.O[c] * (LOGIT_SCALE / s_final)
    for t in (*KEY_IDS, *QUERY_IDS, END_ID):
        lm[t] = b.anchor * (OTHER_LOGIT / (s_final * ANCHOR))

    with torch.no_grad():
        tr = model.transformer
        tr.wte.weight.copy_(W["wte"])
        tr.wpe.weight.copy_(W["wpe"])
        for layer, block in enumerate(tr.h):
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            block.attn.c_attn.weight.copy_(attn_w[layer])
            block.attn.c_attn.bias.copy_(attn_b[layer])
            block.attn.c_proj.weight.copy_(proj_w[layer])
            block.attn.c_proj.bias.zero_()
            block.mlp.c_fc.weight.copy_(fc_w if layer == 1 else torch.zeros_like(fc_w))
            block.mlp.c_fc.bias.copy_(fc_b if layer == 1 else torch.zeros_like(fc_b))
            block.mlp.c_proj.weight.copy_(mlp_proj if layer == 1 else torch.zeros_like(mlp_proj))
            block.mlp.c_proj.bias.zero_()
        tr.ln_f.weight.fill_(1.0)
        tr.ln_f.bias.zero_()
        model.lm_head.weight.copy_(lm)
    return model


def sample_prompt(gen: torch.Generator) -> tuple[Tensor, int]:
    """One random prompt [SEQ_LEN] and its answer token id."""
    x = int(torch.randint(N_KEYS, (1,), generator=gen))
    keys = torch.randperm(N_KEYS, generator=gen)
    digits = torch.randperm(N_KEYS, generator=gen)
    ids = torch.empty(SEQ_LEN, dtype=torch.long)
    ids[0] = QUERY_IDS[x]
    ids[1:-1:2] = torch.tensor(KEY_IDS)[keys]
    ids[2:-1:2] = torch.tensor(DIGIT_IDS)[digits]
    ids[-1] = END_ID
    retrieved = int(digits[int((keys == x).nonzero())])
    return ids, DIGIT_IDS[successor(retrieved)]


def lookup_task(n_prompts: int = 24, seed: int = 0) -> TokenizedTask:
    """Clean / corrupted lookup prompts, deterministic in ``seed``.

    Clean and corrupted prompts are independent samples (another query letter, other key and
    digit permutations), redrawn until the query letters and the answers differ; the wrong answer
    is the corrupted prompt's answer. Every position except the final ``=`` differs, so each
    ground-truth edge carries a different value in the corrupted run: the mover sees another letter,
    the previous-token head other keys, the lookup's values other digits."""
    gen = torch.Generator().manual_seed(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    while len(clean) < n_prompts:
        c_ids, c_ans = sample_prompt(gen)
        x_ids, x_ans = sample_prompt(gen)
        if int(c_ids[0]) == int(x_ids[0]) or c_ans == x_ans:
            continue
        clean.append(c_ids)
        corrupted.append(x_ids)
        answers.append(c_ans)
        wrongs.append(x_ans)
    N = n_prompts
    return TokenizedTask(
        name="groundtruth-lookup",
        clean_ids=torch.stack(clean),
        corrupted_ids=torch.stack(corrupted),
        lengths=torch.full((N,), SEQ_LEN),
        answers=torch.tensor(answers)[:, None],
        wrongs=torch.tensor(wrongs)[:, None],
        read_positions=torch.full((N,), SEQ_LEN - 1),
        clean_texts=tuple(render(c) for c in clean),
        corrupted_texts=tuple(render(c) for c in corrupted),
        seed=seed,
        metadata={"corrupted": "independent prompt, other query letter and answer", "wrong": "the corrupted answer"},
    )


def render(ids: list[int] | Tensor) -> str:
    """A prompt as text: ``C a3 b0 c5 d1 e4 f2 =``."""
    toks = [TOKENS[int(i)] for i in ids]
    pairs = " ".join(toks[i] + toks[i + 1] for i in range(1, len(toks) - 1, 2))
    return f"{toks[0]} {pairs} {toks[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model = build()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
