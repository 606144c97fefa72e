"""Llama family (Llama, SmolLM2, Mistral, Qwen2): RMSNorm, rotary, grouped-query attention, SiLU-gated MLP."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from graphs.adapters.common import rms_norm, rotary_from, split_projections
from graphs.adapters.spec import AttentionSpec, LayerSpec, MLPSpec, ModelSpec, detached
from graphs.graph import ComputationGraph

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2")


def _sliding_window(cfg, attn, index: int) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if window is not None and layer_types is not None and layer_types[index] != "sliding_attention":
        return None
    return window


def build(model: PreTrainedModel) -> ModelSpec:
    cfg = model.config
    base = model.model
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    d = cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // H
    rotary = rotary_from(base.rotary_emb)
    like = base.embed_tokens.weight[:1, None, :].detach()
    rotary_dim = int(rotary(like, torch.zeros(1, 1, dtype=torch.long, device=like.device))[0].shape[-1])
    layers = []
    for index, block in enumerate(base.layers):
        sa = block.self_attn
        attn = AttentionSpec(
            **split_projections(sa, H, H_kv, dh),
            b_O=detached(sa.o_proj.bias),
            scale=float(sa.scaling),
            rotary_dim=rotary_dim,
            sliding_window=_sliding_window(cfg, sa, index),
        )
        mlp = MLPSpec(
            W_in=block.mlp.gate_proj.weight.detach(),
            b_in=detached(block.mlp.gate_proj.bias),
            W_up=block.mlp.up_proj.weight.detach(),
            b_up=detached(block.mlp.up_proj.bias),
            W_out=block.mlp.down_proj.weight.detach(),
            b_out=detached(block.mlp.down_proj.bias),
            act=block.mlp.act_fn,
        )
        layers.append(LayerSpec(rms_norm(block.input_layernorm), attn, rms_norm(block.post_attention_layernorm), mlp))
    return ModelSpec(
        family=FAMILY,
        graph=ComputationGraph(L, H, parallel_residual=False),
        d_model=d,
        d_head=dh,
        n_kv_heads=H_kv,
        vocab_size=cfg.vocab_size,
        W_E=base.embed_tokens.weight.detach(),
        layers=tuple(layers),
        final_norm=rms_norm(base.norm),
        W_U=model.get_output_embeddings().weight.detach(),
        b_U=detached(getattr(model.get_output_embeddings(), "bias", None)),
        rotary=rotary,
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )

