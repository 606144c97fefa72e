"""Decomposed attention and MLP layers from a ``ModelSpec``'s ``AttentionSpec`` / ``MLPSpec``.

Inputs are the total residual ``total`` [P, T, d] (P prompts, T positions) and relevant parts
``beta`` [S, P, T, d] (S source sets), or ``None`` for "nothing relevant" (exactly zero, skipped).
Totals are computed with the same arithmetic as ``graphs.ops``; relevant parts with
``circuits.methods.cdt.rules``.

Attention rule (``CDTConfig.attention``):

* ``"decomposed"`` (default). Queries, keys and values are decomposed per part (norm, projection
  with the bias split, rotary as a linear map, GQA sharing). The pattern of the irrelevant parts is
  ``A_gamma = softmax(q_gamma k_gamma^T)`` (same scale, soft-cap and causal / sliding-window mask as
  the model); the relevant part of the pattern is ``A_beta = A - A_gamma`` where ``A`` is the real
  pattern (from the total q and k): the change in where the head attends that the relevant queries
  and keys cause. The head's mixed values split as
  ``z_gamma = A_gamma v_gamma`` and ``z_beta = A v - A_gamma v_gamma = A v_beta + A_beta v_gamma``:
  relevant values moved by the real pattern, plus irrelevant values moved by the relevant part of
  the pattern. This is the element-wise rule ``f(total) - f(gamma)`` applied to the head as a
  function of its (q, k, v) inputs.
* ``"frozen"`` (the reference notebooks): the pattern is the real one, a constant;
  ``z_beta = A v_beta``. Relevance through queries and keys is dropped (q / k edges score 0).

Per-head outputs are ``z_h W_O[h]``; ``b_O`` is a constant of the graph and always irrelevant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.methods.cdt import rules
from circuits.methods.cdt.rules import CDTConfig
from graphs import ops
from graphs.adapters.spec import AttentionSpec, MLPSpec, NormSpec


@dataclass(frozen=True)
class SlotBetas:
    """Relevant parts of the residual each slot of a layer's heads reads: [S, P, T, d] or None.

    In a plain decomposed pass all three are the same tensor; edge scoring puts relevance into one
    slot at a time."""

    q: Tensor | None
    k: Tensor | None
    v: Tensor | None

    @staticmethod
    def same(beta: Tensor | None) -> SlotBetas:
        return SlotBetas(beta, beta, beta)

    @property
    def empty(self) -> bool:
        return self.q is None and self.k is None and self.v is None


def _project(x: Tensor, W: Tensor) -> Tensor:
    """``x`` [..., d] times every head's projection ``W`` [Hw, d_head, d] -> [..., Hw, d_head] (no bias)."""
    Hw, dh, d = W.shape
    return rules.matmul_rows(x, W.reshape(Hw * dh, d)).view(*x.shape[:-1], Hw, dh)


def _flat(x: Tensor) -> Tensor:
    """[S, P, T, ...] -> [S*P, T, ...] (for functions written for one batch dimension)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _rotate(x: Tensor, rotary: tuple[Tensor, Tensor] | None, spec: AttentionSpec, first: int) -> Tensor:
    """Rotary embedding of q or k parts [P, Tq, H, dh] or [S, P, Tq, H, dh] at positions first.. ."""
    if rotary is None or spec.rotary_dim <= 0:
        return x
    cos, sin = rotary[0][:, first : first + x.shape[-3]], rotary[1][:, first : first + x.shape[-3]]
    if x.dim() == 5:
        return ops.apply_rotary(_flat(x), cos, sin).view_as(x)
    return ops.apply_rotary(x, cos, sin)


def pattern(spec: AttentionSpec, q: Tensor, k: Tensor) -> Tensor:
    """Softmax pattern [..., H, Tq, T] of queries q [..., Tq, H, dh] (the *last* Tq positions) over
    keys k [..., T, H, dh]; the same arithmetic as ``graphs.ops.attention_pattern``."""
    Tq, T = q.shape[-3], k.shape[-3]
    scores = torch.einsum("...qhe,...khe->...hqk", q, k) * spec.scale
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    allowed = ops.attention_mask(T, spec.sliding_window, q.device)[T - Tq :]  # [Tq, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def _qk_part(
    spec: AttentionSpec,
    x_beta: Tensor,
    W: Tensor,
    b: Tensor | None,
    lin_total: Tensor,
    head_norm: NormSpec | None,
    pre_norm_total: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    first: int,
    rule: rules.BiasRule,
) -> Tensor:
    """Relevant part of a query or key projection: linear (bias split), per-head norm, rotary."""
    part = rules.bias_share(_project(x_beta, W), lin_total, b, rule)
    if head_norm is not None:
        part = rules.norm(head_norm, part, pre_norm_total, rule)
    return _rotate(part, rotary, spec, first)


@dataclass(frozen=True)
class _Totals:
    """The real (total) quantities of one attention layer, shared by every source of a pass."""

    first: int  # first query position computed
    head_of: Tensor | None  # GQA: key/value head of every query head
    q_lin: Tensor  # [P, Tq, H, dh] query projection without bias
    k_lin: Tensor  # [P, T, Hkv, dh]
    v_lin: Tensor
    q_pre: Tensor  # with bias, before the per-head norm and rotary
    k_pre: Tensor
    q: Tensor  # [P, Tq, H, dh] final queries
    k: Tensor  # [P, T, H, dh] final keys (repeated for GQA)
    v: Tensor  # [P, T, H, dh]
    A: Tensor  # [P, H, Tq, T] the real pattern
    z: Tensor  # [P, Tq, H, dh] mixed values


def _totals(spec: AttentionSpec, norm: NormSpec, total: Tensor, rotary: tuple[Tensor, Tensor] | None, queries: int | None) -> _Totals:
    T = total.shape[1]
    first = T - (T if queries is None else queries)
    head_of = spec.kv_head_of
    xn = ops.apply_norm(norm, total)  # [P, T, d]
    q_lin = _project(xn[:, first:], spec.W_Q)
    k_lin = _project(xn, spec.W_K)
    v_lin = _project(xn, spec.W_V)
    q_pre = q_lin if spec.b_Q is None else q_lin + spec.b_Q
    k_pre = k_lin if spec.b_K is None else k_lin + spec.b_K
    v = v_lin if spec.b_V is None else v_lin + spec.b_V
    q = _rotate(q_pre if spec.q_norm is None else ops.apply_norm(spec.q_norm, q_pre), rotary, spec, first)
    k = _rotate(k_pre if spec.k_norm is None else ops.apply_norm(spec.k_norm, k_pre), rotary, spec, 0)
    if head_of is not None:
        k, v = k[:, :, head_of], v[:, :, head_of]
    A = pattern(spec, q, k)
    z = torch.einsum("bhqk,bkhe->bqhe", A, v)
    return _Totals(first, head_of, q_lin, k_lin, v_lin, q_pre, k_pre, q, k, v, A, z)


def _query_part(spec: AttentionSpec, t: _Totals, xn_b: Tensor, rotary: tuple[Tensor, Tensor] | None, rule: rules.BiasRule) -> Tensor:
    """Relevant queries [S, P, Tq, H, dh] from the relevant normalised input [S, P, T, d]."""
    return _qk_part(spec, xn_b[:, :, t.first :], spec.W_Q, spec.b_Q, t.q_lin, spec.q_norm, t.q_pre, rotary, t.first, rule)


def _key_part(spec: AttentionSpec, t: _Totals, xn_b: Tensor, rotary: tuple[Tensor, Tensor] | None, rule: rules.BiasRule) -> Tensor:
    k_b = _qk_part(spec, xn_b, spec.W_K, spec.b_K, t.k_lin, spec.k_norm, t.k_pre, rotary, 0, rule)
    return k_b if t.head_of is None else k_b[:, :, :, t.head_of]


def _value_part(spec: AttentionSpec, t: _Totals, xn_b: Tensor, rule: rules.BiasRule) -> Tensor:
    v_b = rules.bias_share(_project(xn_b, spec.W_V), t.v_lin, spec.b_V, rule)
    return v_b if t.head_of is None else v_b[:, :, :, t.head_of]  # [S, P, T, H, dh]


def _mix(spec: AttentionSpec, t: _Totals, q_b: Tensor | None, k_b: Tensor | None, v_b: Tensor | None) -> Tensor | None:
    """z_beta = A v_beta + (A - A_gamma) v_gamma (the second term only when q or k carry relevance)."""
    z_b = None if v_b is None else torch.einsum("bhqk,sbkhe->sbqhe", t.A, v_b)
    if q_b is None and k_b is None:
        return z_b
    S = (q_b if q_b is not None else k_b).shape[0]  # type: ignore[union-attr]
    q_g = (t.q - q_b) if q_b is not None else t.q.expand(S, *t.q.shape)
    k_g = (t.k - k_b) if k_b is not None else t.k.expand(S, *t.k.shape)
    A_g = pattern(spec, q_g, k_g)  # [S, P, H, Tq, T]
    v_g = (t.v - v_b) if v_b is not None else t.v.expand(S, *t.v.shape)
    moved = torch.einsum("sbhqk,sbkhe->sbqhe", t.A - A_g, v_g)  # irrelevant values, relevant pattern
    return moved if z_b is None else z_b + moved


def decompose_attention(
    spec: AttentionSpec,
    norm: NormSpec,
    total: Tensor,
    beta: SlotBetas,
    rotary: tuple[Tensor, Tensor] | None,
    config: CDTConfig,
    queries: int | None = None,
) -> tuple[Tensor | None, Tensor]:
    """Mixed values of every head, decomposed: ``(z_beta [S, P, Tq, H, dh] or None, z_total [P, Tq, H, dh])``.

    ``total`` [P, T, d] is the residual every slot reads; ``queries``: compute only the last
    ``queries`` query positions (the rest of the sequence still serves as keys and values)."""
    t = _totals(spec, norm, total, rotary, queries)
    if beta.empty:
        return None, t.z
    rule = config.bias
    normed: dict[int, Tensor] = {}

    def norm_of(x: Tensor) -> Tensor:  # the three slots usually share one input: normalise once
        if id(x) not in normed:
            normed[id(x)] = rules.norm(norm, x, total, rule)
        return normed[id(x)]

    use_qk = config.attention == "decomposed"
    q_b = _query_part(spec, t, norm_of(beta.q), rotary, rule) if use_qk and beta.q is not None else None
    k_b = _key_part(spec, t, norm_of(beta.k), rotary, rule) if use_qk and beta.k is not None else None
    v_b = _value_part(spec, t, norm_of(beta.v), rule) if beta.v is not None else None
    return _mix(spec, t, q_b, k_b, v_b), t.z


def decompose_attention_slots(
    spec: AttentionSpec,
    norm: NormSpec,
    total: Tensor,
    beta: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    config: CDTConfig,
) -> dict[str, Tensor | None]:
    """The same as ``decompose_attention`` with ``beta`` [S, P, T, d] in *one* slot at a time:
    ``{"q": z_beta, "k": z_beta, "v": z_beta, "total": z_total}`` (each [S, P, T, H, dh]; None for q /
    k under the frozen rule; the total [P, T, H, dh]). Totals, normalisation and projections are
    computed once."""
    t = _totals(spec, norm, total, rotary, None)
    rule = config.bias
    xn_b = rules.norm(norm, beta, total, rule)
    out: dict[str, Tensor | None] = {"q": None, "k": None}
    if config.attention == "decomposed":
        out["q"] = _mix(spec, t, _query_part(spec, t, xn_b, rotary, rule), None, None)
        out["k"] = _mix(spec, t, None, _key_part(spec, t, xn_b, rotary, rule), None)
    out["v"] = _mix(spec, t, None, None, _value_part(spec, t, xn_b, rule))
    out["total"] = t.z
    return out


def decompose_attention_slot_prefixes(
    spec: AttentionSpec,
    norm: NormSpec,
    total: Tensor,
    beta: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    config: CDTConfig,
    ends: Sequence[int],
) -> dict[str, Tensor | None]:
    """``decompose_attention_slots`` with the relevance ``beta`` [S, P, T, d] restricted to the
    positions ``<= e`` for every prefix end ``e`` in ``ends`` (E of them), one slot at a time:
    ``{"q" | "k" | "v": z_beta [S*E, P, T, H, dh] (source-major: row s*E + i is source s, prefix
    ends[i]) or None, "total": z_total [P, T, H, dh]}``.

    Used by positional CD-T edge scores, which split an edge's contribution over token positions by
    prefixes (``circuits.methods.cdt.positional``). Why it is cheap: the relevant q / k / v of a
    position depend only on ``beta`` at that position (norm, projection with the bias split - zero
    relevance gives a zero share - per-head norm and rotary all act per position), so they are
    computed once and masked. A query at position t only moves row t of the head's output, so the
    q slot's prefix outputs are the full output with later rows zeroed; values enter linearly
    (``A v_beta``); only keys need one softmax per prefix."""
    t = _totals(spec, norm, total, rotary, None)
    rule = config.bias
    T = total.shape[1]
    xn_b = rules.norm(norm, beta, total, rule)
    ends_t = torch.as_tensor(list(ends), device=total.device)
    keep = (torch.arange(T, device=total.device)[None, :] <= ends_t[:, None]).to(total.dtype)  # [E, T]

    def prefixes(part: Tensor) -> Tensor:  # [S, P, T, H, dh] -> [S*E, P, T, H, dh], positions > end zeroed
        return (part[:, None] * keep[None, :, None, :, None, None]).flatten(0, 1)

    out: dict[str, Tensor | None] = {"q": None, "k": None}
    if config.attention == "decomposed":
        out["q"] = prefixes(_mix(spec, t, _query_part(spec, t, xn_b, rotary, rule), None, None))  # type: ignore[arg-type]
        out["k"] = _mix(spec, t, None, prefixes(_key_part(spec, t, xn_b, rotary, rule)), None)
    out["v"] = _mix(spec, t, None, None, prefixes(_value_part(spec, t, xn_b, rule)))
    out["total"] = t.z
    return out


def decompose_mlp(
    spec: MLPSpec, norm: NormSpec, total: Tensor, beta: Tensor | None, config: CDTConfig
) -> tuple[Tensor | None, Tensor]:
    """MLP output decomposed: ``(beta [S, P, T, d] or None, total [P, T, d])`` from its input parts."""
    rule = config.bias
    xn = ops.apply_norm(norm, total)
    pre_lin = rules.matmul_rows(xn, spec.W_in)
    pre = pre_lin if spec.b_in is None else pre_lin + spec.b_in
    act = spec.act(pre)
    if spec.W_up is not None:
        up_lin = rules.matmul_rows(xn, spec.W_up)
        up = up_lin if spec.b_up is None else up_lin + spec.b_up
        hidden = act * up
    else:
        hidden = act
    out_lin = rules.matmul_rows(hidden, spec.W_out)
    out = out_lin if spec.b_out is None else out_lin + spec.b_out
    if beta is None:
        return None, out
    fix = config.input_fix  # normalisation of the nonlinearity's inputs
    xn_b = rules.norm(norm, beta, total, rule)
    pre_b = fix(rules.linear(xn_b, spec.W_in, spec.b_in, pre_lin, rule), pre)
    if spec.W_up is not None:
        up_b = fix(rules.linear(xn_b, spec.W_up, spec.b_up, up_lin, rule), up)
        # rules.product with act(gamma) inline: hidden - act(pre - pre_b) * (up - up_b), in place on
        # the fresh [S, P, T, d_mlp] temporaries (they dominate the memory traffic of a pass)
        gamma_act = spec.act(pre_b.neg_().add_(pre))
        hidden_b = torch.sub(hidden, gamma_act.mul_(up_b.neg_().add_(up)))
    else:
        hidden_b = rules.elementwise(spec.act, pre_b, pre, act)
    out_b = rules.linear(hidden_b, spec.W_out, spec.b_out, out_lin, rule)
    return config.output_fix(out_b, out), out
