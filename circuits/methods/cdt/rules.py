"""The decomposition rules of CD-T: how one operation splits its output into a relevant part
``beta`` and an irrelevant part ``gamma``, given the split of its input.

Representation. A decomposed activation is the pair ``(beta, total)``: ``beta`` carries a leading
*source* dimension ``S`` (one decomposition per source set, computed side by side), ``total`` is
the real activation (no ``S`` dimension: it does not depend on the sources). The irrelevant part
is ``gamma = total - beta``; it is never stored, so ``beta + gamma == total`` holds by construction
and each rule below is fully specified by its formula for ``beta'`` (the formula for ``gamma'`` is
what ``total' - beta'`` equals, written out in every docstring). Storing the total instead of gamma
halves the work of linear maps (``W gamma = W total - W beta`` reuses the shared ``W total``).

Rules (x = beta + gamma):

* linear ``W x + b``: ``beta' = W beta + b * s``, ``gamma' = W gamma + b * (1 - s)`` with the bias
  share ``s = |W beta| / (|W beta| + |W gamma|)`` elementwise, and ``s = 0`` where both vanish (0/0:
  the bias is irrelevant, so a pass with no relevant input keeps ``beta == 0`` exactly). With
  ``bias="irrelevant"`` every bias goes to gamma (``s = 0``), which makes CD-T exactly linear on a
  linear network.
* element-wise ``f``: ``gamma' = f(gamma)``, ``beta' = f(beta + gamma) - f(gamma)``.
* product of two decomposed factors ``a * u`` (the gated MLP ``act(gate(x)) * up(x)``):
  ``gamma' = a_gamma * u_gamma``, ``beta' = a_total * u_total - a_gamma * u_gamma``.
* LayerNorm: both parts are centred by their own mean and divided by the *total's* scale
  ``sqrt(var(total) + eps)``; the weight multiplies both; the bias is split like a linear bias, by
  the magnitudes of the two normalised, weighted parts.
* RMSNorm: both parts are divided by the total's ``sqrt(mean(total^2) + eps)`` and multiplied by the
  weight (``offset + weight`` for Gemma); no bias.

Normalisation (``CDTConfig.normalize``). Conservation alone does not keep the two parts sensible:
a relevant part can grow with an irrelevant part of opposite sign cancelling it, and the rules then
evaluate the nonlinearities far outside the real activations - the gated product rule squares the
drift layer after layer (SmolLM2-135M overflows to inf by layer 8 with no normalisation). Each step
below moves relevance to gamma only (the sum is unchanged) and is a no-op while ``beta`` stays within
the activation it is part of:

* ``"bound"`` (default): the MLP pre-activations' relevant parts are clipped elementwise to
  ``[-|total|, |total|]`` (so ``gamma`` stays within twice the real pre-activation), and after every
  layer the residual stream's relevant part is scaled down, per position, to at most the total's
  Euclidean norm.
* ``"sign"`` (the reference code's ``normalize_rel_irrel``): at the MLP pre-activations, the MLP
  output and the residual stream after every layer, wherever ``beta`` and ``gamma`` have opposite
  signs, the larger takes the whole total and the other becomes 0. This also erases every relevant
  contribution that opposes the total's sign (a source that lowers an activation gets 0).
* ``"none"``: the raw rules. Only with it is CD-T exactly linear on a linear network (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from graphs.adapters.spec import NormSpec

BiasRule = Literal["split", "irrelevant"]
AttentionRule = Literal["decomposed", "frozen"]
NormalizeRule = Literal["bound", "sign", "none"]


class CDTError(ValueError):
    """CD-T was asked for something it cannot compute (bad sources, targets or settings)."""


@dataclass(frozen=True)
class CDTConfig:
    """How CD-T decomposes a model.

    ``bias``: ``"split"`` (the design's rule: in proportion to the parts' magnitudes) or
    ``"irrelevant"`` (every bias is irrelevant). ``attention``: ``"decomposed"`` (the pattern's
    change due to relevant queries and keys is relevant, see ``layers.decompose_attention``) or
    ``"frozen"`` (the reference notebooks' rule: the pattern is a constant computed from the total,
    only values carry relevance). ``normalize``: ``"bound"``, ``"sign"`` or ``"none"`` (see the module
    docstring). ``max_floats``: memory budget of one decomposed pass, in floats;
    it sets how many sources share a pass."""

    bias: BiasRule = "split"
    attention: AttentionRule = "decomposed"
    normalize: NormalizeRule = "bound"
    max_floats: int = 2**27

    def __post_init__(self) -> None:
        if self.bias not in ("split", "irrelevant"):
            raise CDTError(f"bias rule must be 'split' or 'irrelevant', got {self.bias!r}")
        if self.attention not in ("decomposed", "frozen"):
            raise CDTError(f"attention rule must be 'decomposed' or 'frozen', got {self.attention!r}")
        if self.normalize not in ("bound", "sign", "none"):
            raise CDTError(f"normalize must be 'bound', 'sign' or 'none', got {self.normalize!r}")
        if self.max_floats < 1:
            raise CDTError("max_floats must be positive")

    def settings(self) -> dict[str, object]:
        return {"bias": self.bias, "attention": self.attention, "normalize": self.normalize}

    @property
    def input_fix(self) -> Callable[[Tensor, Tensor], Tensor]:
        """Normalisation of the MLP pre-activations (the nonlinearity's inputs)."""
        return normalizers(self.normalize)[0]

    @property
    def output_fix(self) -> Callable[[Tensor, Tensor], Tensor]:
        """Normalisation of the MLP output."""
        return normalizers(self.normalize)[1]

    @property
    def residual_fix(self) -> Callable[[Tensor, Tensor], Tensor]:
        """Normalisation of the residual stream after every layer."""
        return normalizers(self.normalize)[2]


def bias_share(lin_beta: Tensor, lin_total: Tensor, bias: Tensor | None, rule: BiasRule) -> Tensor:
    """Relevant part of ``W x + b`` from ``W beta`` [S, ..., n] and ``W total`` [..., n] (no bias).

    ``beta' = W beta + b * |W beta| / (|W beta| + |W gamma|)``, 0/0 -> 0 (``W gamma = W total - W beta``)."""
    if bias is None or rule == "irrelevant":
        return lin_beta
    rel = lin_beta.abs()
    denominator = rel + (lin_total - lin_beta).abs()
    share = torch.where(denominator > 0, rel / denominator.clamp_min(torch.finfo(rel.dtype).tiny), 0.0)
    return lin_beta + bias * share


def matmul_rows(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias) for ``x`` of any rank, as *one* matrix product over all
    leading dimensions with a contiguous result. ``F.linear`` on a non-contiguous input of rank > 2
    (the trimmed, per-source parts of a pass) falls back to a batched product with the weight
    broadcast per row block: several times slower, with a strided result that slows every
    element-wise rule after it."""
    flat = x.reshape(-1, x.shape[-1])  # copies only when x is not contiguous
    return F.linear(flat, weight).view(*x.shape[:-1], weight.shape[0])


def linear(beta: Tensor, weight: Tensor, bias: Tensor | None, lin_total: Tensor, rule: BiasRule) -> Tensor:
    """Relevant part of ``F.linear(x, weight, bias)``; ``lin_total = F.linear(total, weight)`` (no bias)."""
    return bias_share(matmul_rows(beta, weight), lin_total, bias, rule)


def normalize_signs(beta: Tensor, total: Tensor) -> Tensor:
    """Where ``beta`` and ``gamma = total - beta`` have opposite signs, give the whole total to the
    larger of the two (the other becomes 0); elsewhere leave them. The sum is unchanged."""
    gamma = total - beta
    opposite = beta * gamma < 0
    winner = torch.where(beta.abs() >= gamma.abs(), total.expand_as(beta), torch.zeros((), dtype=beta.dtype))
    return torch.where(opposite, winner, beta)


def clip_to_total(beta: Tensor, total: Tensor) -> Tensor:
    """``beta`` clipped elementwise to ``[-|total|, |total|]`` (gamma takes the rest, so the sum is
    unchanged): a no-op wherever the relevant part does not overshoot the activation it is part of."""
    bound = total.abs()
    return torch.clamp(beta, -bound, bound)


def bound_norm(beta: Tensor, total: Tensor) -> Tensor:
    """``beta`` [S, ..., d] scaled down, per position, so that ``|beta| <= |total|`` (Euclidean norm over
    the last dimension; gamma takes the rest): a no-op wherever the relevant part is no larger than
    the activation it is part of."""
    nb = beta.norm(dim=-1, keepdim=True)
    nt = total.norm(dim=-1, keepdim=True)
    return beta * torch.where(nb > nt, nt / nb.clamp_min(torch.finfo(nb.dtype).tiny), 1.0)


def _identity(beta: Tensor, _total: Tensor) -> Tensor:
    return beta


def normalizers(rule: NormalizeRule) -> tuple[Callable[[Tensor, Tensor], Tensor], ...]:
    """``(nonlinearity inputs, MLP output, residual stream)`` normalisation steps ``(beta, total) -> beta``."""
    if rule == "bound":
        return clip_to_total, _identity, bound_norm
    if rule == "sign":
        return normalize_signs, normalize_signs, normalize_signs
    return _identity, _identity, _identity


def elementwise(f: Callable[[Tensor], Tensor], beta: Tensor, total_in: Tensor, total_out: Tensor) -> Tensor:
    """Relevant part of ``f(x)``: ``beta' = f(total) - f(gamma)`` (``total_out = f(total_in)``)."""
    return total_out - f(total_in - beta)


def product(a_beta: Tensor, a_total: Tensor, u_beta: Tensor, u_total: Tensor) -> Tensor:
    """Relevant part of ``a * u``: ``beta' = a_total * u_total - a_gamma * u_gamma``."""
    return a_total * u_total - (a_total - a_beta) * (u_total - u_beta)


def rms_factor(spec: NormSpec, total: Tensor) -> Tensor:
    """The elementwise factor [..., d] by which an RMSNorm with the total's scale multiplies every
    part: ``(offset + w) / sqrt(mean(total^2) + eps)`` (the norm is this linear map once its scale is
    fixed; used for Gemma's post-norms)."""
    if spec.kind != "rmsnorm":
        raise CDTError("only an RMSNorm is a fixed elementwise factor (a LayerNorm also centres)")
    wide = torch.promote_types(total.dtype, torch.float32) if spec.upcast else total.dtype
    inv = torch.rsqrt(total.to(wide).pow(2).mean(-1, keepdim=True) + spec.eps)
    if spec.weight is None:
        return inv.to(total.dtype)
    return (inv * (spec.weight_offset + spec.weight.to(wide))).to(total.dtype)


def norm(spec: NormSpec, beta: Tensor, total: Tensor, rule: BiasRule) -> Tensor:
    """Relevant part of LayerNorm / RMSNorm over the last dimension, scaled by the total's statistics.

    ``beta`` [S, ..., d] (or any shape broadcasting against ``total`` [..., d])."""
    if spec.kind == "layernorm":
        centred_total = total - total.mean(-1, keepdim=True)
        inv = torch.rsqrt(centred_total.pow(2).mean(-1, keepdim=True) + spec.eps)  # the total's 1 / scale
        out = (beta - beta.mean(-1, keepdim=True)) * inv
        lin_total = centred_total * inv
        if spec.weight is not None:
            out = out * spec.weight
            lin_total = lin_total * spec.weight
        return bias_share(out, lin_total, spec.bias, rule)
    dtype = beta.dtype
    wide = torch.promote_types(dtype, torch.float32) if spec.upcast else dtype
    inv = torch.rsqrt(total.to(wide).pow(2).mean(-1, keepdim=True) + spec.eps)
    h = beta.to(wide) * inv
    if spec.weight is None:
        return h.to(dtype)
    if spec.weight_offset:
        return (h * (spec.weight_offset + spec.weight.to(wide))).to(dtype)
    return spec.weight * h.to(dtype)
