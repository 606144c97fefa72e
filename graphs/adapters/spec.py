"""A family-independent description of a pre-norm decoder, read off a Hugging Face model.

Adapters turn an HF model into a ``ModelSpec``: every weight the residual-stream rewrite needs,
as *views* of the model's own parameters (detached, never written to), in one fixed orientation.
The runtime (``graphs.runtime``) and contextual decomposition both run from a ``ModelSpec``, so
an architecture family is supported by writing one small adapter and nothing else.

Orientation: linear maps are stored like ``nn.Linear`` weights, ``[out, in]``; per-head projections
are ``W_Q/W_K/W_V: [heads, d_head, d_model]`` and ``W_O: [heads, d_head, d_model]`` (head ``h``
writes ``z_h @ W_O[h]`` to the residual stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from graphs.graph import ComputationGraph

RotaryFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(like, position_ids [1|B, T]) -> (cos, sin)``, each ``[1|B, T, rotary_dim]``."""


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no adapter, or uses a variant of it that the graph cannot express."""


@dataclass(frozen=True)
class NormSpec:
    """LayerNorm or RMSNorm over the last dimension, exactly as the HF module computes it."""

    kind: Literal["layernorm", "rmsnorm"]
    weight: Tensor | None  # [d]
    bias: Tensor | None  # [d]
    eps: float
    weight_offset: float = 0.0  # Gemma multiplies by (offset + weight)
    upcast: bool = True  # RMSNorm in float32 then back to the input dtype (Llama, Gemma)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention layer; key/value heads are shared by ``kv_group`` consecutive query heads."""

    W_Q: Tensor  # [H, d_head, d]
    W_K: Tensor  # [H_kv, d_head, d]
    W_V: Tensor  # [H_kv, d_head, d]
    b_Q: Tensor | None  # [H, d_head]
    b_K: Tensor | None  # [H_kv, d_head]
    b_V: Tensor | None  # [H_kv, d_head]
    W_O: Tensor  # [H, d_head, d]
    b_O: Tensor | None  # [d], added once per layer (a constant of the graph, never patched)
    scale: float
    rotary_dim: int = 0  # leading dims of each head that rotary rotates (0: no rotary)
    softcap: float | None = None  # attention logit soft-capping (Gemma 2)
    sliding_window: int | None = None  # keys at most this far back (Mistral, Gemma)
    q_norm: NormSpec | None = None  # per-head norm of queries / keys (Gemma 3)
    k_norm: NormSpec | None = None
    rotary: RotaryFn | None = None  # this layer's own rotary (Gemma 3: local / global bases); see ModelSpec.rotary_for

    @property
    def n_heads(self) -> int:
        return int(self.W_Q.shape[0])

    @property
    def n_kv_heads(self) -> int:
        return int(self.W_K.shape[0])

    @property
    def kv_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def d_head(self) -> int:
        return int(self.W_Q.shape[1])

    @property
    def kv_head_of(self) -> Tensor | None:
        """The key/value head each query head reads [H] (grouped-query attention); None when every
        query head has its own."""
        if self.kv_group == 1:
            return None
        return torch.arange(self.n_heads, device=self.W_Q.device) // self.kv_group

    def only_heads(self, heads: Tensor) -> AttentionSpec:
        """The same layer restricted to the query heads ``heads`` [n] (long), each with its own copy
        of the key/value head it reads: computing these heads alone gives what they compute in the
        full layer (heads interact only through the residual stream)."""
        kv = heads if self.kv_group == 1 else torch.div(heads, self.kv_group, rounding_mode="floor")
        return replace(
            self,
            W_Q=self.W_Q[heads],
            W_K=self.W_K[kv],
            W_V=self.W_V[kv],
            b_Q=None if self.b_Q is None else self.b_Q[heads],
            b_K=None if self.b_K is None else self.b_K[kv],
            b_V=None if self.b_V is None else self.b_V[kv],
            W_O=self.W_O[heads],
        )


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation as one kernel."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def fused_activation(act: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The HF activation module ``act``, or one kernel computing the same formula: transformers'
    ``NewGELUActivation`` (GPT-2's ``gelu_new``) spells ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x^3)))`` as six element-wise passes; ``F.gelu(approximate="tanh")`` is that formula in one
    (equal to rounding)."""
    from transformers.activations import NewGELUActivation

    return gelu_tanh if isinstance(act, NewGELUActivation) else act


@dataclass(frozen=True)
class MLPSpec:
    """``W_out(act(W_in x + b_in) [* (W_up x + b_up)]) + b_out``; gated when ``W_up`` is given.

    For gated MLPs (Llama ``down(act(gate(x)) * up(x))``) ``W_in`` is the gate projection."""

    W_in: Tensor  # [d_mlp, d]
    b_in: Tensor | None
    W_out: Tensor  # [d, d_mlp]
    b_out: Tensor | None
    act: Callable[[Tensor], Tensor]
    W_up: Tensor | None = None  # [d_mlp, d]
    b_up: Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.W_up is not None


@dataclass(frozen=True)
class LayerSpec:
    attn_norm: NormSpec
    attn: AttentionSpec
    mlp_norm: NormSpec
    mlp: MLPSpec
    post_attn_norm: NormSpec | None = None  # Gemma: norm of the summed attention output
    post_mlp_norm: NormSpec | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the DAG runtime needs to run one model exactly like its HF implementation."""

    family: str
    graph: ComputationGraph
    d_model: int
    d_head: int
    n_kv_heads: int
    vocab_size: int
    W_E: Tensor  # [V, d]
    layers: tuple[LayerSpec, ...]
    final_norm: NormSpec
    W_U: Tensor  # [V, d]
    b_U: Tensor | None = None
    embed_scale: float | None = None  # multiplies the token embedding (Gemma: sqrt(d))
    W_pos: Tensor | None = None  # [n_ctx, d] learned absolute positions (GPT-2): a constant
    rotary: RotaryFn | None = None
    final_softcap: float | None = None
    max_positions: int | None = None

    def rotary_for(self, layer: int) -> RotaryFn | None:
        """The rotary embedding of ``layer``: its own (``AttentionSpec.rotary``) if it has one, else the
        model's. Use this, not ``rotary``, wherever a layer's queries and keys are computed."""
        own = self.layers[layer].attn.rotary
        return own if own is not None else self.rotary

    @property
    def n_layers(self) -> int:
        return self.graph.n_layers

    @property
    def n_heads(self) -> int:
        return self.graph.n_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        return self.W_E.device


def detached(t: Tensor | None) -> Tensor | None:
    """A view of a parameter that autograd does not track (no weight gradients, no copies)."""
    return None if t is None else t.detach()
