"""GPT-2: learned absolute positions, LayerNorm, fused Conv1D q/k/v, GELU MLP."""

from __future__ import annotations

from transformers import PreTrainedModel

from graphs.adapters.common import layer_norm
from graphs.adapters.spec import (
    AttentionSpec,
    LayerSpec,
    MLPSpec,
    ModelSpec,
    UnsupportedArchitecture,
    detached,
    fused_activation,
)
from graphs.graph import ComputationGraph

FAMILY = "gpt2"
MODEL_TYPES = ("gpt2",)


def build(model: PreTrainedModel) -> ModelSpec:
    cfg = model.config
    tr = model.transformer
    L, H, d = cfg.n_layer, cfg.n_head, cfg.n_embd
    dh = d // H
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedArchitecture("GPT-2 with cross-attention is not a decoder-only language model")
    layers = []
    for index, block in enumerate(tr.h):
        w = block.attn.c_attn.weight.detach()  # Conv1D: [d, 3d], y = x @ w + b
        b = block.attn.c_attn.bias.detach()

        def part(i: int):  # [H, d_head, d] view of the i-th third, out-major
            return w[:, i * d : (i + 1) * d].T.reshape(H, dh, d)

        scale = dh**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        attn = AttentionSpec(
            W_Q=part(0),
            W_K=part(1),
            W_V=part(2),
            b_Q=b[:d].view(H, dh),
            b_K=b[d : 2 * d].view(H, dh),
            b_V=b[2 * d :].view(H, dh),
            W_O=block.attn.c_proj.weight.detach().view(H, dh, d),
            b_O=detached(block.attn.c_proj.bias),
            scale=scale,
        )
        mlp = MLPSpec(
            W_in=block.mlp.c_fc.weight.detach().T,
            b_in=detached(block.mlp.c_fc.bias),
            W_out=block.mlp.c_proj.weight.detach().T,
            b_out=detached(block.mlp.c_proj.bias),
            act=fused_activation(block.mlp.act),
        )
        layers.append(LayerSpec(layer_norm(block.ln_1), attn, layer_norm(block.ln_2), mlp))
    return ModelSpec(
        family=FAMILY,
        graph=ComputationGraph(L, H, parallel_residual=False),
        d_model=d,
        d_head=dh,
        n_kv_heads=H,
        vocab_size=cfg.vocab_size,
        W_E=tr.wte.weight.detach(),
        W_pos=tr.wpe.weight.detach(),
        layers=tuple(layers),
        final_norm=layer_norm(tr.ln_f),
        W_U=model.get_output_embeddings().weight.detach(),
        max_positions=cfg.n_positions,
    )
