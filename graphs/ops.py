"""The pieces of a decoder layer as pure functions of a ``ModelSpec`` and activations.

Attention takes *per-head, per-slot* inputs (``[B, T, H, d]`` for each of q, k, v), because in the
computation graph every head reads its own query, key and value input from the residual stream.
When all heads share one input (``[B, T, d]``) a fast path computes the same thing with the
model's fused projections.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from graphs.adapters.spec import AttentionSpec, LayerSpec, MLPSpec, NormSpec
from graphs.slot_gradients import shared_projections


def apply_norm(spec: NormSpec, x: Tensor) -> Tensor:
    """LayerNorm / RMSNorm over the last dimension, following the HF modules' arithmetic."""
    if spec.kind == "layernorm":
        d = x.shape[-1]
        return F.layer_norm(x, (d,), spec.weight, spec.bias, spec.eps)
    dtype = x.dtype
    # HF computes RMSNorm in float32; we compute in *at least* float32 (float64 stays float64,
    # which keeps finite-difference checks meaningful; fp32 results are identical to HF's).
    wide = torch.promote_types(dtype, torch.float32) if spec.upcast else dtype
    h = x.to(wide)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.eps)
    if spec.weight is None:
        return h.to(dtype)
    if spec.weight_offset:
        return (h * (spec.weight_offset + spec.weight.to(wide))).to(dtype)
    return spec.weight * h.to(dtype)


def post_norm_shares(spec: NormSpec, parts: Tensor, total: Tensor) -> Tensor:
    """Each part's share of ``apply_norm(spec, total)`` where ``total = parts.sum(-2)`` (Gemma's post-norms).

    RMSNorm is linear once its scale is fixed: ``norm(total) = w' * total / rms(total)`` with
    ``w' = offset + w``, so part ``i`` gets ``w' * parts[i] / rms(total)`` and the shares add up to
    ``norm(total)`` (to rounding). The scale is ``rms`` of the ``total`` given - the summed output of
    the current run - in at least float32, as ``apply_norm`` computes it. parts: [..., n, d];
    total: [..., d]. See docs/gemma.md."""
    if spec.kind != "rmsnorm":
        raise NotImplementedError("only an RMSNorm splits into per-part shares (a LayerNorm also centres)")
    dtype = parts.dtype
    wide = torch.promote_types(dtype, torch.float32) if spec.upcast else dtype
    t = total.to(wide)
    inv = torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + spec.eps)[..., None, :]  # [..., 1, 1]
    shares = parts.to(wide) * inv
    if spec.weight is None:
        return shares.to(dtype)
    return (shares * (spec.weight_offset + spec.weight.to(wide))).to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the leading ``cos.shape[-1]`` dims of every head. x: [B, T, H, d_head]; cos: [1|B, T, r]."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, keep = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, keep), dim=-1)


def _project(x: Tensor, W: Tensor, b: Tensor | None, head_of: Tensor | None) -> Tensor:
    """Per-head projection.

    x: [B, T, H, d] (one input per query head) or [B, T, d] (shared); W: [Hw, d_head, d] with
    ``head_of`` mapping each of the H query heads to a row of W (GQA). Returns [B, T, H, d_head].
    """
    if x.dim() == 3:
        Hw, dh, d = W.shape
        out = F.linear(x, W.reshape(Hw * dh, d), None if b is None else b.reshape(-1))
        out = out.view(*x.shape[:-1], Hw, dh)  # [B, T, Hw, d_head]
        return out if head_of is None else out[:, :, head_of]
    Wh = W if head_of is None else W[head_of]  # [H, d_head, d]
    out = torch.einsum("bthd,hed->bthe", x, Wh)
    if b is not None:
        out = out + (b if head_of is None else b[head_of])
    return out


def attention_mask(T: int, sliding_window: int | None, device: torch.device) -> Tensor:
    """[T, T] bool: True where query i may attend to key j (causal, optionally windowed)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    return allowed


def qkv(
    spec: AttentionSpec,
    norm: NormSpec,
    x_q: Tensor,
    x_k: Tensor,
    x_v: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    probe: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of every query head from (unnormalised) residual inputs.

    Each x is [B, T, H, d] or a shared [B, T, d]. Returns three [B, T, H, d_head] tensors, keys
    and values repeated for the query heads that share them. ``probe`` (with one shared ``x``, from
    ``graphs.slot_gradients.slot_probe``): computed once from the shared input, while the probe
    receives every q / k / v slot's own input gradient [B, T, 3H, d] in a backward pass.
    """
    head_of = spec.kv_head_of
    if probe is not None:
        if not (x_q is x_k is x_v) or x_q.dim() != 3:
            raise ValueError("a slot-gradient probe needs one shared [B, T, d] input for q, k and v")
        q, k, v = shared_projections(spec, norm, x_q, probe)
        if spec.b_Q is not None:
            q = q + spec.b_Q
        if spec.b_K is not None:
            k = k + (spec.b_K if head_of is None else spec.b_K[head_of])
        if spec.b_V is not None:
            v = v + (spec.b_V if head_of is None else spec.b_V[head_of])
    elif x_q is x_k is x_v:  # one shared input: normalise it once
        xn = apply_norm(norm, x_q)
        q = _project(xn, spec.W_Q, spec.b_Q, None)
        k = _project(xn, spec.W_K, spec.b_K, head_of)
        v = _project(xn, spec.W_V, spec.b_V, head_of)
    else:
        q = _project(apply_norm(norm, x_q), spec.W_Q, spec.b_Q, None)
        k = _project(apply_norm(norm, x_k), spec.W_K, spec.b_K, head_of)
        v = _project(apply_norm(norm, x_v), spec.W_V, spec.b_V, head_of)
    q, k = _finish_queries_and_keys(spec, q, k, rotary)
    return q, k, v


def slot_qkv(
    spec: AttentionSpec, norm: NormSpec, x: Tensor, rotary: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv`` for per-slot inputs held in one tensor x [B, T, 3H, d] (every head's q slot, then
    its k slot, then its v slot): one norm over all slots, and each slot's projection read in
    place from x (a batched product over strided views) instead of copying q, k and v apart."""
    B, T, _, d = x.shape
    H = spec.n_heads
    head_of = spec.kv_head_of
    xn = apply_norm(norm, x).reshape(B * T, 3 * H, d)  # [B*T, 3H, d]

    def project(i: int, W: Tensor, b: Tensor | None, rows: Tensor | None) -> Tensor:
        Wh = W if rows is None else W[rows]  # [H, d_head, d]
        out = torch.bmm(xn[:, i * H : (i + 1) * H].transpose(0, 1), Wh.transpose(1, 2))  # [H, B*T, d_head]
        out = out.view(H, B, T, -1).permute(1, 2, 0, 3)  # [B, T, H, d_head]
        if b is not None:
            out = out + (b if rows is None else b[rows])
        return out

    q = project(0, spec.W_Q, spec.b_Q, None)
    k = project(1, spec.W_K, spec.b_K, head_of)
    v = project(2, spec.W_V, spec.b_V, head_of)
    q, k = _finish_queries_and_keys(spec, q, k, rotary)
    return q, k, v


def queries_and_keys(spec: AttentionSpec, norm: NormSpec, x: Tensor, rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """``qkv``'s queries and keys from one shared residual ``x`` [B, T, d], without the values:
    [B, T, H, d_head] each (keys repeated for the query heads that share them). For methods that
    recompute attention patterns only (AtP*'s QK fix)."""
    head_of = spec.kv_head_of
    xn = apply_norm(norm, x)
    q = _project(xn, spec.W_Q, spec.b_Q, None)
    k = _project(xn, spec.W_K, spec.b_K, head_of)
    return _finish_queries_and_keys(spec, q, k, rotary)


def _finish_queries_and_keys(
    spec: AttentionSpec, q: Tensor, k: Tensor, rotary: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """Per-head q / k norms (Gemma 3) and rotary embeddings, after the projections."""
    if spec.q_norm is not None:
        q = apply_norm(spec.q_norm, q)
    if spec.k_norm is not None:
        k = apply_norm(spec.k_norm, k)
    if rotary is not None and spec.rotary_dim > 0:
        cos, sin = rotary
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
    return q, k


def attention_scores(spec: AttentionSpec, q: Tensor, k: Tensor) -> Tensor:
    """Masked pre-softmax scores [B, H, T, T] (scaled, soft-capped, -inf where not allowed)."""
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * spec.scale
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    allowed = attention_mask(q.shape[1], spec.sliding_window, q.device)
    return scores.masked_fill(~allowed, float("-inf"))


def attention_pattern(spec: AttentionSpec, q: Tensor, k: Tensor) -> Tensor:
    """Softmax attention pattern [B, H, T_q, T_k] (computed in float32 like HF, then cast).

    Like ``apply_norm``, in *at least* float32: float64 stays float64 (finite differences)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    return torch.softmax(attention_scores(spec, q, k), dim=-1, dtype=wide).to(q.dtype)


def attend(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Mixed values z [B, T, H, d_head]."""
    if spec.softcap is None:
        T = q.shape[1]
        window = spec.sliding_window is not None and T > spec.sliding_window
        mask = attention_mask(T, spec.sliding_window, q.device) if window else None
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=spec.scale,
        )  # [B, H, T, d_head]
        return z.transpose(1, 2)
    pattern = attention_pattern(spec, q, k)  # [B, H, T, T]
    return torch.einsum("bhqk,bkhe->bqhe", pattern, v)


def head_outputs(spec: AttentionSpec, z: Tensor) -> Tensor:
    """What each head writes to the residual stream: z_h @ W_O[h], [B, T, H, d] (no b_O).

    One matmul per head into a head-major buffer (returned as a [B, T, H, d] view): about twice as
    fast as a batched matmul on CPU BLAS, and the sum over heads reads contiguous memory."""
    *lead, H, e = z.shape
    d = spec.W_O.shape[-1]
    flat = z.reshape(-1, H, e)  # [N, H, e]
    if torch.is_grad_enabled() and (z.requires_grad or spec.W_O.requires_grad):
        out = torch.stack([flat[:, h] @ spec.W_O[h] for h in range(H)])  # [H, N, d] (autograd: no out=)
    else:
        out = torch.empty(H, flat.shape[0], d, dtype=z.dtype, device=z.device)
        for h in range(H):
            torch.mm(flat[:, h], spec.W_O[h], out=out[h])
    return out.view(H, *lead, d).movedim(0, -2)


Observer = Callable[[str, Tensor], None]
"""Called with intermediate tensors of a layer: ``q``, ``k``, ``v`` [B, T, H, d_head] and
``pattern`` [B, H, T_q, T_k] (attention), ``heads`` [B, T, H, d], ``mlp_out`` [B, T, d].
``heads`` and ``mlp_out`` are the raw outputs ``z_h @ W_O[h]`` and ``W_out(...)``, before any
post-norm (Gemma): every path from the layer to the residual stream runs through them."""


def attention_heads(
    spec: AttentionSpec,
    norm: NormSpec,
    x_q: Tensor,
    x_k: Tensor,
    x_v: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    observe: Observer | None = None,
    probe: Tensor | None = None,
) -> Tensor:
    """Per-head residual contributions [B, T, H, d] of one attention layer.

    With an observer the pattern is computed explicitly (no fused kernel) so it can be seen and
    differentiated. ``probe``: see ``qkv``."""
    q, k, v = qkv(spec, norm, x_q, x_k, x_v, rotary, probe)
    return _heads(spec, q, k, v, observe)


def attention_heads_of_slots(
    spec: AttentionSpec,
    norm: NormSpec,
    x: Tensor,
    rotary: tuple[Tensor, Tensor] | None,
    observe: Observer | None = None,
) -> Tensor:
    """``attention_heads`` with every head's q, k and v input in one tensor x [B, T, 3H, d]
    (see ``slot_qkv``): [B, T, H, d]."""
    q, k, v = slot_qkv(spec, norm, x, rotary)
    return _heads(spec, q, k, v, observe)


def heads_from_pattern(spec: AttentionSpec, norm: NormSpec, x_v: Tensor, pattern: Tensor) -> Tensor:
    """Per-head outputs [B, T, H, d] of heads whose attention pattern [B, H, T, T] is known, from
    their (unnormalised) value inputs x_v [B, T, H, d]: when only the values' inputs changed, the
    queries, keys and softmax need not be recomputed."""
    v = _project(apply_norm(norm, x_v), spec.W_V, spec.b_V, spec.kv_head_of)  # [B, T, H, d_head]
    return head_outputs(spec, torch.einsum("bhqk,bkhe->bqhe", pattern, v))


def _heads(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, observe: Observer | None) -> Tensor:
    if observe is None:
        return head_outputs(spec, attend(spec, q, k, v))
    pattern = attention_pattern(spec, q, k)  # [B, H, T, T]
    for name, tensor in (("q", q), ("k", k), ("v", v), ("pattern", pattern)):
        observe(name, tensor)
    return head_outputs(spec, torch.einsum("bhqk,bkhe->bqhe", pattern, v))


def mlp(spec: MLPSpec, norm: NormSpec, x: Tensor) -> Tensor:
    """MLP output [B, T, d] from its (unnormalised) residual input [B, T, d]."""
    h = apply_norm(norm, x)
    pre = F.linear(h, spec.W_in, spec.b_in)
    act = spec.act(pre)
    if spec.W_up is not None:
        act = act * F.linear(h, spec.W_up, spec.b_up)
    return F.linear(act, spec.W_out, spec.b_out)


def mlp_sender(layer: LayerSpec, x: Tensor) -> Tensor:
    """What the MLP sender of ``layer`` adds to the residual stream [B, T, d]: its output, through the
    post-MLP norm where the model has one (Gemma)."""
    out = mlp(layer.mlp, layer.mlp_norm, x)
    return out if layer.post_mlp_norm is None else apply_norm(layer.post_mlp_norm, out)


def head_senders(layer: LayerSpec, heads: Tensor) -> tuple[Tensor, Tensor]:
    """(per-head sender outputs [B, T, H, d], what the attention adds to the residual [B, T, d])
    from the raw per-head outputs ``z_h @ W_O[h]`` [B, T, H, d].

    Without a post-attention norm the senders are the raw outputs and the residual gets their sum
    plus ``b_O``. With one (Gemma) the residual gets ``post_norm(sum_h heads)`` exactly as HF
    computes it and each head's sender output is its share of that (``post_norm_shares``)."""
    total = heads.sum(dim=2)
    post = layer.post_attn_norm
    if post is None:
        return heads, total if layer.attn.b_O is None else total + layer.attn.b_O
    if layer.attn.b_O is not None:
        raise NotImplementedError(
            "an attention output bias inside a post-attention norm is not a constant of the graph"
        )
    return post_norm_shares(post, heads, total), apply_norm(post, total)


def default_scale(d_head: int) -> float:
    return 1.0 / math.sqrt(d_head)
