"""GPT-NeoX / Pythia: parallel residual (or not), LayerNorm, partial rotary, interleaved fused q/k/v."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from graphs.adapters.common import layer_norm, output_heads, rotary_from
from graphs.adapters.spec import (
    AttentionSpec,
    LayerSpec,
    MLPSpec,
    ModelSpec,
    detached,
    fused_activation,
)
from graphs.graph import ComputationGraph

FAMILY = "gpt_neox"
MODEL_TYPES = ("gpt_neox",)


def build(model: PreTrainedModel) -> ModelSpec:
    cfg = model.config
    base = model.gpt_neox
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    dh = d // H
    rotary = rotary_from(base.rotary_emb)
    like = base.embed_in.weight[:1, None, :].detach()
    rotary_dim = int(rotary(like, torch.zeros(1, 1, dtype=torch.long, device=like.device))[0].shape[-1])
    layers = []
    for block in base.layers:
        at = block.attention
        w = at.query_key_value.weight.detach().view(H, 3, dh, d)  # per head: [q | k | v]
        b = at.query_key_value.bias
        b = None if b is None else b.detach().view(H, 3, dh)
        attn = AttentionSpec(
            W_Q=w[:, 0],
            W_K=w[:, 1],
            W_V=w[:, 2],
            b_Q=None if b is None else b[:, 0],
            b_K=None if b is None else b[:, 1],
            b_V=None if b is None else b[:, 2],
            W_O=output_heads(at.dense.weight, H, dh),
            b_O=detached(at.dense.bias),
            scale=float(at.scaling),
            rotary_dim=rotary_dim,
        )
        mlp = MLPSpec(
            W_in=block.mlp.dense_h_to_4h.weight.detach(),
            b_in=detached(block.mlp.dense_h_to_4h.bias),
            W_out=block.mlp.dense_4h_to_h.weight.detach(),
            b_out=detached(block.mlp.dense_4h_to_h.bias),
            act=fused_activation(block.mlp.act),
        )
        layers.append(
            LayerSpec(layer_norm(block.input_layernorm), attn, layer_norm(block.post_attention_layernorm), mlp)
        )
    return ModelSpec(
        family=FAMILY,
        graph=ComputationGraph(L, H, parallel_residual=bool(cfg.use_parallel_residual)),
        d_model=d,
        d_head=dh,
        n_kv_heads=H,
        vocab_size=cfg.vocab_size,
        W_E=base.embed_in.weight.detach(),
        layers=tuple(layers),
        final_norm=layer_norm(base.final_layer_norm),
        W_U=model.get_output_embeddings().weight.detach(),
        rotary=rotary,
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )
