"""Gemma 2 and Gemma 3 (text): the "hard case" of DESIGN.md section 3.

What differs from the Llama family, and where each piece lives:

* token embedding times ``sqrt(d)``, read from the model's own ``embed_scale`` buffer cast to the
  weights' dtype exactly as ``Gemma*TextScaledWordEmbedding`` does (``ModelSpec.embed_scale``);
* every RMSNorm multiplies by ``(1 + w)`` in float32 (``NormSpec.weight_offset = 1``);
* "sandwich" norms: ``post_attention_layernorm`` normalises the summed attention output and
  ``post_feedforward_layernorm`` the MLP output before they reach the residual stream
  (``LayerSpec.post_attn_norm`` / ``post_mlp_norm``; the MLP's pre-norm is
  ``pre_feedforward_layernorm``). How heads stay senders under a post-norm: docs/gemma.md;
* attention logit soft-capping (Gemma 2 only: HF's Gemma 3 attention never passes its config's
  ``attn_logit_softcapping`` to the kernel, so neither do we) and final logit soft-capping;
* sliding-window layers alternating with global ones (``config.layer_types``);
* query pre-scaling ``query_pre_attn_scalar ** -0.5`` instead of ``d_head ** -0.5``;
* QK-norm (Gemma 3): per-head RMSNorm of queries and keys before rotary;
* Gemma 3 rotates local and global layers with different bases (and possibly different rope
  scaling): each layer calls HF's own rotary module with its layer type (``AttentionSpec.rotary``);
* grouped-query attention and a ``gelu_pytorch_tanh``-gated MLP (as in the Llama family).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from graphs.adapters.common import rms_norm, rotary_from, split_projections
from graphs.adapters.spec import (
    AttentionSpec,
    LayerSpec,
    MLPSpec,
    ModelSpec,
    RotaryFn,
    UnsupportedArchitecture,
    detached,
)
from graphs.graph import ComputationGraph

FAMILY = "gemma"
MODEL_TYPES = ("gemma2", "gemma3_text")

_GEMMA = 1.0  # Gemma RMSNorms scale by (1 + weight)


def _layer_rotary(rotary_emb: torch.nn.Module, layer_type: str) -> RotaryFn:
    """Gemma 3's rotary module takes the layer type (local and global layers use different bases)."""

    def cos_sin(like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_emb(like, position_ids, layer_type)

    return cos_sin


def _rotary_dim(rotary: RotaryFn, like: torch.Tensor) -> int:
    return int(rotary(like, torch.zeros(1, 1, dtype=torch.long, device=like.device))[0].shape[-1])


def build(model: PreTrainedModel) -> ModelSpec:
    cfg = model.config
    gemma3 = cfg.model_type == "gemma3_text"
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture("Gemma with bidirectional attention (an encoder) is not a causal language model")
    base = model.model
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    d = cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // H
    like = base.embed_tokens.weight[:1, None, :].detach()
    shared = None if gemma3 else rotary_from(base.rotary_emb)
    own = {t: _layer_rotary(base.rotary_emb, t) for t in sorted(set(cfg.layer_types))} if gemma3 else {}
    layers = []
    for index, block in enumerate(base.layers):
        sa = block.self_attn
        if sa.o_proj.bias is not None:
            raise UnsupportedArchitecture(
                "Gemma with an attention output bias: b_O sits inside the post-attention norm, where it is "
                "not an additive constant of the graph (see docs/gemma.md)"
            )
        rotary = own[cfg.layer_types[index]] if gemma3 else shared
        assert rotary is not None
        attn = AttentionSpec(
            **split_projections(sa, H, H_kv, dh),
            b_O=None,
            scale=float(sa.scaling),
            rotary_dim=_rotary_dim(rotary, like),
            # HF's Gemma 3 attention does not pass attn_logit_softcapping to its kernel
            softcap=None if gemma3 else sa.attn_logit_softcapping,
            sliding_window=sa.sliding_window,
            q_norm=rms_norm(sa.q_norm, weight_offset=_GEMMA) if gemma3 else None,
            k_norm=rms_norm(sa.k_norm, weight_offset=_GEMMA) if gemma3 else None,
            rotary=rotary if gemma3 else None,
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
        layers.append(
            LayerSpec(
                attn_norm=rms_norm(block.input_layernorm, weight_offset=_GEMMA),
                attn=attn,
                mlp_norm=rms_norm(block.pre_feedforward_layernorm, weight_offset=_GEMMA),
                mlp=mlp,
                post_attn_norm=rms_norm(block.post_attention_layernorm, weight_offset=_GEMMA),
                post_mlp_norm=rms_norm(block.post_feedforward_layernorm, weight_offset=_GEMMA),
            )
        )
    emb = base.embed_tokens
    # HF multiplies by its float32 buffer cast to the weights' dtype (bf16 turns sqrt(3072) into 55.5)
    embed_scale = float(emb.embed_scale.to(emb.weight.dtype))
    head = model.get_output_embeddings()
    return ModelSpec(
        family=FAMILY,
        graph=ComputationGraph(L, H, parallel_residual=False),
        d_model=d,
        d_head=dh,
        n_kv_heads=H_kv,
        vocab_size=cfg.vocab_size,
        W_E=emb.weight.detach(),
        layers=tuple(layers),
        final_norm=rms_norm(base.norm, weight_offset=_GEMMA),
        W_U=head.weight.detach(),
        b_U=detached(getattr(head, "bias", None)),
        embed_scale=embed_scale,
        rotary=shared if shared is not None else _per_layer_only,
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )


def _per_layer_only(like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 3's model-level rotary: there is none (local and global layers differ), so code that
    still asks ``spec.rotary`` instead of ``spec.rotary_for(layer)`` fails loudly, never silently."""
    raise NotImplementedError(
        "Gemma 3 rotates each layer with its own rotary embedding: use spec.rotary_for(layer)"
    )
