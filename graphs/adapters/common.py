"""Helpers shared by the adapters: reading norms, rotary embeddings and linear layers."""

from __future__ import annotations

from torch import Tensor, nn

from graphs.adapters.spec import NormSpec, RotaryFn, detached


def layer_norm(module: nn.LayerNorm) -> NormSpec:
    return NormSpec("layernorm", detached(module.weight), detached(module.bias), float(module.eps))


def rms_norm(module: nn.Module, *, weight_offset: float = 0.0) -> NormSpec:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps")
    return NormSpec("rmsnorm", detached(getattr(module, "weight", None)), None, float(eps), weight_offset)


def rotary_from(module: nn.Module) -> RotaryFn:
    """Wrap an HF rotary-embedding module (it handles every rope scaling type) as a pure function."""

    def cos_sin(like: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return module(like, position_ids)

    return cos_sin


def out_major(weight: Tensor, n_heads: int, d_head: int) -> Tensor:
    """``nn.Linear`` weight [H*d_head, d] as [H, d_head, d] (a view)."""
    return weight.detach().view(n_heads, d_head, weight.shape[-1])


def output_heads(weight: Tensor, n_heads: int, d_head: int) -> Tensor:
    """``nn.Linear`` output projection [d, H*d_head] as W_O [H, d_head, d] (a view)."""
    d = weight.shape[0]
    return weight.detach().view(d, n_heads, d_head).permute(1, 2, 0)


def head_bias(bias: Tensor | None, n_heads: int, d_head: int) -> Tensor | None:
    return None if bias is None else bias.detach().view(n_heads, d_head)


def split_projections(attn: nn.Module, n_heads: int, n_kv_heads: int, d_head: int) -> dict[str, Tensor | None]:
    """``W_Q/W_K/W_V`` ([heads, d_head, d]), their biases and ``W_O`` per head, from an HF attention
    module with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` linears (Llama, Gemma):
    keyword arguments for ``AttentionSpec`` (views, not copies)."""
    return {
        "W_Q": out_major(attn.q_proj.weight, n_heads, d_head),
        "W_K": out_major(attn.k_proj.weight, n_kv_heads, d_head),
        "W_V": out_major(attn.v_proj.weight, n_kv_heads, d_head),
        "b_Q": head_bias(attn.q_proj.bias, n_heads, d_head),
        "b_K": head_bias(attn.k_proj.bias, n_kv_heads, d_head),
        "b_V": head_bias(attn.v_proj.bias, n_kv_heads, d_head),
        "W_O": output_heads(attn.o_proj.weight, n_heads, d_head),
    }
