"""Attention inputs read from one shared residual, with each q / k / v slot's own input gradient.

In the computation graph every head reads its own query, key and value input ("slot"), so a
gradient method (EAP, EAP-IG, AtP*) needs ``dm/d in_r`` for each of the ``3H`` slots of a layer.
Giving every slot its own copy of the residual and letting autograd differentiate the copies
costs ``3H`` normalisations and per-head projections forward and backward. When no edge is
intervened on, every slot reads the same residual, so this module computes the forward pass once
(one norm, the model's fused projections) and forms the per-slot input gradients directly in the
backward pass from the per-head output gradients:

    dm/d in_r = J_norm(x)^T  W_r^T  dm/d proj_r          (r = a q, k or v slot of one head)

``J_norm(x)`` is the Jacobian of the layer's input norm at the shared residual, the same for every
slot; the norm's weight and scale fold into the projections (``slot_input_gradients``). The
per-slot gradients reach a *probe*: a tensor ``[B, T, 3H, d]`` whose value is the shared residual (what every slot read) and whose gradient is the per-slot gradient, so
gradient hooks and ``torch.autograd.grad`` see the same receiver tensor as with separate copies.
The residual itself gets the sum over slots, as the model's own backward would give it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from graphs.adapters.spec import AttentionSpec, NormSpec


def slot_probe(resid: Tensor, n_slots: int) -> Tensor:
    """A ``[B, T, n_slots, d]`` view of ``resid`` [B, T, d] (detached) that takes part in autograd:
    pass it to ``shared_projections`` and hook or differentiate it for the per-slot gradients."""
    leaf = resid.detach().requires_grad_(True)
    B, T, d = resid.shape
    return leaf[:, :, None, :].expand(B, T, n_slots, d)


def _slot_weights(spec: AttentionSpec) -> Tensor:
    """Every slot's projection [3H, d_head, d]: q heads, then k and v (repeated per query head for GQA)."""
    head_of = spec.kv_head_of
    if head_of is None:
        return torch.cat((spec.W_Q, spec.W_K, spec.W_V), dim=0)
    return torch.cat((spec.W_Q, spec.W_K[head_of], spec.W_V[head_of]), dim=0)


def _project(x: Tensor, W: Tensor) -> Tensor:
    """``x`` [B, T, d] through the heads' projections W [Hw, d_head, d] -> [B, T, Hw, d_head] (no bias)."""
    Hw, dh, d = W.shape
    return F.linear(x, W.reshape(Hw * dh, d)).view(*x.shape[:-1], Hw, dh)


def slot_input_gradients(
    norm: NormSpec, x: Tensor, grads: Tensor, weights: Tensor, projections: Tensor | None = None
) -> Tensor:
    """``J_norm(x)^T W_r^T g_r`` for every slot r: [R, B, T, d].

    ``x`` [B, T, d] the shared (unnormalised) input; ``grads`` [B, T, R, d_head] the gradient of each
    slot's projection output; ``weights`` [R, d_head, d] each slot's projection; ``projections``
    (optional) [B, T, R, d_head] the forward pass's ``W_r norm(x)`` without bias, which makes the
    Jacobian's rank-one correction nearly free.

    The norm's weight ``w`` and per-token scale ``s`` fold into the projection,
    ``Y_r = s (W_r^T g_r) * w`` (one matmul per slot), and the Jacobian adds one pass over the result:
    RMSNorm (``s = rsqrt(mean(x^2) + eps)``): ``Y_r - c_r (x s)`` with
    ``c_r = (Y_r . x s) / d = s (g_r . W_r norm(x)) / d``; LayerNorm (``x^ = (x - mean) s``):
    ``Y_r - mean(Y_r) - c_r x^`` with ``c_r = (Y_r . x^) / d = s (g_r . W_r (norm(x) - b)) / d`` and
    ``mean(Y_r) = s (g_r . W_r w) / d``. Computed in the norm's own precision (at least float32 where
    the model upcasts); a test checks it against autograd."""
    dtype = grads.dtype
    wide = torch.promote_types(dtype, torch.float32) if (norm.kind == "layernorm" or norm.upcast) else dtype
    h, W, g = x.to(wide), weights.to(wide), grads.to(wide)
    d = h.shape[-1]
    B, T, R, e = grads.shape
    w = None if norm.weight is None else norm.weight.to(wide) + norm.weight_offset  # [d]
    Ww = W if w is None else W * w  # [R, e, d]
    if norm.kind == "layernorm":
        centred = h - h.mean(-1, keepdim=True)
        s = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)  # [B, T, 1]
        along = centred * s  # x^ [B, T, d]
    else:
        s = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)  # [B, T, 1]
        along = h * s  # [B, T, d]
    scaled = g * s[..., None]  # [B, T, R, e]
    Y = torch.empty(R, B, T, d, dtype=wide, device=x.device)
    rows = scaled.permute(2, 0, 1, 3).reshape(R, B * T, e)  # slot-major
    for r in range(R):  # one matmul per slot: about twice as fast as a batched matmul on CPU BLAS
        torch.mm(rows[r], Ww[r], out=Y[r].view(B * T, d))
    if projections is None:
        coef = torch.einsum("rbtd,btd->rbt", Y, along) / d  # [R, B, T]
    else:
        proj = projections.to(wide)
        if norm.kind == "layernorm" and norm.bias is not None:
            proj = proj - torch.einsum("red,d->re", W, norm.bias.to(wide))  # W_r (norm(x) - b)
        coef = (scaled * proj).sum(-1).permute(2, 0, 1) / d  # [R, B, T]
    if norm.kind == "layernorm":
        ones = torch.ones(d, dtype=wide, device=x.device) if w is None else w
        mean = (scaled * torch.einsum("red,d->re", W, ones)).sum(-1).permute(2, 0, 1) / d  # [R, B, T]
        Y.sub_(mean[..., None])
    return Y.addcmul_(coef[..., None], along, value=-1.0).to(dtype)


class _SharedProjections(torch.autograd.Function):
    """(q, k, v) without biases [B, T, H, d_head] each (k and v repeated per query head), from
    ``norm(resid)``; the backward gives ``resid`` the summed gradient and ``probe`` the per-slot one."""

    @staticmethod
    def forward(resid: Tensor, probe: Tensor, spec: AttentionSpec, norm: NormSpec) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        from graphs.ops import apply_norm

        head_of = spec.kv_head_of
        xn = apply_norm(norm, resid)  # [B, T, d]
        q = _project(xn, spec.W_Q)  # [B, T, H, dh]
        k = _project(xn, spec.W_K)
        v = _project(xn, spec.W_V)
        if head_of is not None:  # repeat the shared key/value heads per query head
            k, v = k[:, :, head_of], v[:, :, head_of]
        return q, k, v


    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        resid, _probe, spec, norm = inputs
        ctx.save_for_backward(resid, *output)
        ctx.spec, ctx.norm = spec, norm

    @staticmethod
    def backward(ctx: Any, dq: Tensor, dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        resid, q, k, v = ctx.saved_tensors
        g = torch.cat((dq, dk, dv), dim=2)  # [B, T, 3H, dh]
        proj = torch.cat((q, k, v), dim=2)  # [B, T, 3H, dh]
        slots = slot_input_gradients(ctx.norm, resid, g, _slot_weights(ctx.spec), proj)  # [3H, B, T, d]
        return slots.sum(0), slots.permute(1, 2, 0, 3), None, None


def shared_projections(spec: AttentionSpec, norm: NormSpec, resid: Tensor, probe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values *before* biases, per-head norms and rotary: [B, T, H, d_head] each
    (keys and values repeated for the query heads that share them), with ``probe``
    (``slot_probe(resid, 3H)``) receiving every slot's input gradient in the backward pass."""
    return _SharedProjections.apply(resid, probe, spec, norm)  # type: ignore[no-any-return]
