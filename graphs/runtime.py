"""Run a model as its computation DAG, with per-edge interventions and receiver gradients.

Interventions use the delta form of DESIGN.md section 4. With ``M[u, r]`` the ablated fraction of
edge ``u -> r`` (1 = fully ablated, 0 = kept; bool or fractional, shared ``[S, R]`` or one mask per
batch row ``[B, S, R]``) and ``A_u`` the ablation value of sender ``u``, every receiver reads

    in_r = (current residual at r) + sum_u M[u, r] * (A_u - a_u)

where ``a_u`` is sender ``u``'s output *in this intervened run*. Everything else (norms, attention,
MLPs) is recomputed on the patched inputs. Ablation values are any ``[1|B, 1|T, S, d]`` tensor:
a corrupted run's cache (``corrupted_values``), means over a reference set, zeros - or, for path
patching, senders recorded from another intervened run.

The HF model is never called, hooked or modified: the runtime reads detached views of its weights
through the ``ModelSpec`` built by an adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from graphs import ops
from graphs.adapters.spec import ModelSpec


class RuntimeInputError(ValueError):
    """Inputs to the runtime have the wrong shape, dtype or length."""


@dataclass(frozen=True)
class AblationValues:
    """The value ``A_u`` an ablated edge carries from each sender: ``values`` is [1|B, 1|T, S, d]."""

    kind: str  # "corrupted", "mean", "positional-mean", "zero" or "custom"
    values: Tensor

    def for_batch(self, rows: Tensor | slice) -> AblationValues:
        """The values for a subset of batch rows (a no-op for values shared across the batch)."""
        if self.values.shape[0] == 1:
            return self
        return AblationValues(self.kind, self.values[rows])


@dataclass(frozen=True)
class ReceiverInputs:
    """The tensors every receiver read in one run (for gradients): per layer q/k/v and MLP, then logits."""

    qkv: tuple[Tensor, ...]  # per layer [B, T, 3H, d]: q slots of heads 0..H-1, then k, then v
    mlp: tuple[Tensor, ...]  # per layer [B, T, d]
    logits: Tensor  # [B, T, d], the final residual before the final norm

    def as_list(self) -> list[Tensor]:
        out: list[Tensor] = []
        for qkv, mlp in zip(self.qkv, self.mlp, strict=True):
            out.extend((qkv, mlp))
        out.append(self.logits)
        return out

    @staticmethod
    def dense(per_receiver_block: Sequence[Tensor]) -> Tensor:
        """Stack tensors shaped like ``as_list()`` into one [B, T, R, d] tensor in receiver order."""
        parts = [t if t.dim() == 4 else t[:, :, None, :] for t in per_receiver_block]
        return torch.cat(parts, dim=2)


@dataclass(frozen=True)
class RunOutput:
    logits: Tensor  # [B, T, V], or [B, V] at ``read_positions``
    senders: Tensor | None = None  # [B, T, S, d] every sender's output in this run
    receivers: ReceiverInputs | None = None


def positions_for(spec: ModelSpec, T: int) -> Tensor:
    if spec.max_positions is not None and T > spec.max_positions:
        raise RuntimeInputError(f"sequence length {T} exceeds the model's {spec.max_positions} positions")
    return torch.arange(T, device=spec.device)[None, :]


def embed(spec: ModelSpec, input_ids: Tensor) -> Tensor:
    """The ``input`` sender: token embedding times the embedding scale. [B, T, d]"""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise RuntimeInputError(f"input_ids must be a [batch, pos] integer tensor, got {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= spec.W_E.shape[0]):
        raise RuntimeInputError(f"token ids must lie in [0, {spec.W_E.shape[0]})")
    x = F.embedding(input_ids, spec.W_E)
    if spec.embed_scale is not None:
        x = x * torch.tensor(spec.embed_scale, dtype=x.dtype)
    return x


def unembed(spec: ModelSpec, resid: Tensor) -> Tensor:
    """Final norm, unembedding and (Gemma 2) logit soft-capping of a final residual [..., d]."""
    logits = F.linear(ops.apply_norm(spec.final_norm, resid), spec.W_U, spec.b_U)
    if spec.final_softcap is not None:
        logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
    return logits


def _check_mask(spec: ModelSpec, mask: Tensor, B: int) -> Tensor:
    S, R = spec.graph.n_senders, spec.graph.n_receivers
    if mask.shape[-2:] != (S, R) or mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != B):
        raise RuntimeInputError(
            f"edge mask must be [{S}, {R}] or [{B}, {S}, {R}] (senders x receivers), got {tuple(mask.shape)}"
        )
    return mask.to(spec.dtype) if mask.dtype == torch.bool else mask


def _check_values(spec: ModelSpec, values: AblationValues, B: int, T: int) -> Tensor:
    v = values.values
    S, d = spec.graph.n_senders, spec.d_model
    if v.dim() != 4 or v.shape[2:] != (S, d) or v.shape[0] not in (1, B) or v.shape[1] not in (1, T):
        raise RuntimeInputError(
            f"ablation values must be [1|{B}, 1|{T}, {S}, {d}], got {tuple(v.shape)}"
            " (corrupted prompts must have the clean prompts' token length)"
        )
    return v


class _DeltaMixer:
    """Accumulates ``sum_u M[u, r] (A_u - a_u)`` for the receivers of each layer, block by block.

    Sender blocks are the input, then each layer's heads and MLP, in topological order; each block
    holds ``D = A - a`` for its senders. Blocks whose mask entries are all zero are skipped unless
    the mask itself needs a gradient.
    """

    def __init__(self, mask: Tensor, values: Tensor) -> None:
        self.mask = mask
        self.values = values
        self.skip_zeros = not mask.requires_grad  # a zero block still matters for d/d mask
        self.blocks: list[tuple[int, Tensor]] = []  # (first sender index, D [B, T, k, d])

    def add(self, start: int, outputs: Tensor) -> None:
        """Register senders ``start .. start+k`` with their outputs [B, T, k, d] in this run."""
        k = outputs.shape[2]
        self.blocks.append((start, self.values[:, :, start : start + k] - outputs))

    def delta(self, n_upstream: int, receivers: slice) -> Tensor | None:
        """[B, T, R_block, d] for the receivers ``receivers``, whose upstream is senders < n_upstream."""
        total: Tensor | None = None
        for start, D in self.blocks:
            stop = min(start + D.shape[2], n_upstream)
            if stop <= start:
                continue
            if self.mask.dim() == 2:
                m = self.mask[start:stop, receivers]  # [k, R_block]
                if self.skip_zeros and not bool(m.any()):
                    continue
                part = torch.einsum("btsd,sr->btrd", D[:, :, : stop - start], m)
            else:
                m = self.mask[:, start:stop, receivers]  # [B, k, R_block]
                if self.skip_zeros and not bool(m.any()):
                    continue
                part = torch.einsum("btsd,bsr->btrd", D[:, :, : stop - start], m)
            total = part if total is None else total + part
        return total


def run(
    spec: ModelSpec,
    input_ids: Tensor,
    *,
    mask: Tensor | None = None,
    ablation: AblationValues | None = None,
    read_positions: Tensor | None = None,
    input_embeddings: Tensor | None = None,
    keep_senders: bool = False,
    keep_receivers: bool = False,
) -> RunOutput:
    """Run the DAG on ``input_ids`` [B, T] (right-padded; causal attention makes padding inert).

    ``mask``/``ablation``: edge interventions (see the module docstring). ``read_positions`` [B]:
    compute logits only there. ``input_embeddings`` [B, T, d]: replaces the ``input`` sender's output
    (e.g. for integrated gradients). ``keep_senders``: return every sender's output [B, T, S, d].
    ``keep_receivers``: return the tensors each receiver read, as distinct autograd nodes, so
    ``torch.autograd.grad`` gives the gradient with respect to each receiver's input separately.
    """
    g = spec.graph
    H, d = g.n_heads, spec.d_model
    B, T = input_ids.shape
    mixer: _DeltaMixer | None = None
    if mask is not None:
        if ablation is None:
            raise RuntimeInputError("an edge mask needs ablation values (what ablated edges carry)")
        mixer = _DeltaMixer(_check_mask(spec, mask, B), _check_values(spec, ablation, B, T))

    x_in = embed(spec, input_ids) if input_embeddings is None else input_embeddings  # [B, T, d]
    if x_in.shape != (B, T, d):
        raise RuntimeInputError(f"input embeddings must be [{B}, {T}, {d}], got {tuple(x_in.shape)}")
    if keep_receivers and torch.is_grad_enabled() and not x_in.requires_grad:
        x_in = x_in.detach().requires_grad_(True)  # a leaf so autograd tracks the run (weights are detached)
    positions = positions_for(spec, T)
    resid = x_in if spec.W_pos is None else x_in + spec.W_pos[:T]  # [B, T, d]
    rotary = spec.rotary(x_in, positions) if spec.rotary is not None else None

    sender_blocks: list[Tensor] = [x_in[:, :, None, :]]
    if mixer is not None:
        mixer.add(0, x_in[:, :, None, :])
    qkv_inputs: list[Tensor] = []
    mlp_inputs: list[Tensor] = []

    for layer, lay in enumerate(spec.layers):
        # ---- attention: every head reads its own q, k, v input
        delta = None if mixer is None else mixer.delta(g.attention_upstream(layer), g.qkv_receivers(layer))
        if delta is not None:
            x = resid[:, :, None, :] + delta  # [B, T, 3H, d]
        elif keep_receivers:
            x = resid[:, :, None, :].expand(B, T, 3 * H, d)
        else:
            x = None
        if x is None:
            heads = ops.attention_heads(lay.attn, lay.attn_norm, resid, resid, resid, rotary)
        else:
            qkv_inputs.append(x)
            heads = ops.attention_heads(
                lay.attn, lay.attn_norm, x[:, :, :H], x[:, :, H : 2 * H], x[:, :, 2 * H :], rotary
            )  # [B, T, H, d]
        attn_out = heads.sum(dim=2)
        if lay.post_attn_norm is not None:
            raise NotImplementedError("post-attention norms are handled by the Gemma runtime path")
        if lay.attn.b_O is not None:
            attn_out = attn_out + lay.attn.b_O
        start = g.head_sender(layer, 0)

        # ---- MLP: sees this layer's heads unless the block is parallel
        if g.parallel_residual:
            base = resid
        else:
            base = resid + attn_out
            if mixer is not None:
                mixer.add(start, heads)
        delta = None if mixer is None else mixer.delta(g.mlp_upstream(layer), slice(g.mlp_receiver(layer), g.mlp_receiver(layer) + 1))
        mlp_in = base.view_as(base) if delta is None else base + delta[:, :, 0]
        if keep_receivers:
            mlp_inputs.append(mlp_in)
        mlp_out = ops.mlp(lay.mlp, lay.mlp_norm, mlp_in)  # [B, T, d]
        if mixer is not None:
            if g.parallel_residual:
                mixer.add(start, torch.cat((heads, mlp_out[:, :, None]), dim=2))
            else:
                mixer.add(start + H, mlp_out[:, :, None])
        resid = (resid + attn_out + mlp_out) if g.parallel_residual else (base + mlp_out)
        if keep_senders:
            sender_blocks.append(torch.cat((heads, mlp_out[:, :, None]), dim=2))

    delta = None if mixer is None else mixer.delta(g.n_senders, slice(g.logits_receiver, g.logits_receiver + 1))
    final = resid.view_as(resid) if delta is None else resid + delta[:, :, 0]  # [B, T, d]
    if read_positions is not None:
        logits = unembed(spec, final[torch.arange(B, device=final.device), read_positions])  # [B, V]
    else:
        logits = unembed(spec, final)  # [B, T, V]
    return RunOutput(
        logits=logits,
        senders=torch.cat(sender_blocks, dim=2) if keep_senders else None,
        receivers=ReceiverInputs(tuple(qkv_inputs), tuple(mlp_inputs), final) if keep_receivers else None,
    )


# --------------------------------------------------------------------------- conveniences


@torch.no_grad()
def sender_outputs(spec: ModelSpec, input_ids: Tensor) -> Tensor:
    """Every sender's output on ``input_ids``: [B, T, S, d] (the cache of a corrupted run)."""
    out = run(spec, input_ids, keep_senders=True)
    assert out.senders is not None
    return out.senders


def corrupted_values(spec: ModelSpec, corrupted_ids: Tensor) -> AblationValues:
    """Resample ablation: ablated edges carry the senders' outputs on the corrupted prompts."""
    return AblationValues("corrupted", sender_outputs(spec, corrupted_ids))


def _token_mask(lengths: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device)[None, :] < lengths[:, None]  # [B, T]


@torch.no_grad()
def mean_values(
    spec: ModelSpec,
    reference_ids: Tensor,
    lengths: Tensor | None = None,
    *,
    positional: bool = False,
    chunk_size: int = 32,
) -> AblationValues:
    """Mean ablation over the real (unpadded) tokens of a reference set.

    Per-node mean: one vector per sender, [1, 1, S, d]. ``positional``: one per sender and position
    (over the prompts long enough to have that position), [1, T, S, d]."""
    N, T = reference_ids.shape
    if N == 0:
        raise RuntimeInputError("mean ablation needs a non-empty reference set")
    S, d = spec.graph.n_senders, spec.d_model
    total = torch.zeros(T if positional else 1, S, d, dtype=torch.float64, device=spec.device)
    count = torch.zeros(T if positional else 1, dtype=torch.float64, device=spec.device)
    for lo in range(0, N, chunk_size):
        ids = reference_ids[lo : lo + chunk_size]
        keep = _token_mask(None if lengths is None else lengths[lo : lo + chunk_size], ids.shape[0], T, spec.device)
        acts = sender_outputs(spec, ids).double() * keep[:, :, None, None]  # [b, T, S, d]
        if positional:
            total += acts.sum(0)
            count += keep.sum(0)
        else:
            total += acts.sum((0, 1))[None]
            count += keep.sum()
    if bool((count == 0).any()):
        count = count.clamp(min=1)  # positions no prompt reaches get zeros
    mean = (total / count[:, None, None]).to(spec.dtype)[None]  # [1, T|1, S, d]
    return AblationValues("positional-mean" if positional else "mean", mean)


def zero_values(spec: ModelSpec) -> AblationValues:
    S, d = spec.graph.n_senders, spec.d_model
    return AblationValues("zero", torch.zeros(1, 1, S, d, dtype=spec.dtype, device=spec.device))


def receiver_gradients(
    spec: ModelSpec,
    input_ids: Tensor,
    metric: Callable[[Tensor], Tensor],
    *,
    mask: Tensor | None = None,
    ablation: AblationValues | None = None,
    read_positions: Tensor | None = None,
    input_embeddings: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradient of a scalar ``metric(logits)`` with respect to every receiver's input.

    Returns ``(metric value, grads [B, T, R, d])`` in receiver order (q, k, v slots and MLP per
    layer, then logits). Each slot gets its own gradient even when all slots read the same value."""
    with torch.enable_grad():
        out = run(
            spec,
            input_ids,
            mask=mask,
            ablation=ablation,
            read_positions=read_positions,
            input_embeddings=input_embeddings,
            keep_receivers=True,
        )
        assert out.receivers is not None
        value = metric(out.logits)
        if value.dim() != 0:
            raise RuntimeInputError("the metric must reduce to a scalar for gradients")
        inputs = out.receivers.as_list()
        grads = torch.autograd.grad(value, inputs, allow_unused=True)
    filled = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
    return value.detach(), ReceiverInputs.dense(filled)
