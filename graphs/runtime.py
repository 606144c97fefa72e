"""Run a model as its computation DAG, with per-edge interventions and receiver gradients.

Interventions use the delta form of DESIGN.md section 4. With ``M[u, r]`` the ablated fraction of
edge ``u -> r`` (1 = fully ablated, 0 = kept; bool or fractional, shared ``[S, R]`` or one mask per
batch row ``[B, S, R]``; positional masks ``[S, R, T]`` / ``[K, S, R, T]`` ablate an edge at single
token positions, docs/positions.md) and ``A_u`` the ablation value of sender ``u``, every receiver reads

    in_r = (current residual at r) + sum_u M[u, r] * (A_u - a_u)

where ``a_u`` is sender ``u``'s output *in this intervened run*. Everything else (norms, attention,
MLPs) is recomputed on the patched inputs. Ablation values are any ``[1|B, 1|T, S, d]`` tensor:
a corrupted run's cache (``corrupted_values``), means over a reference set, zeros - or, for path
patching, senders recorded from another intervened run.

Post-norms (Gemma): a head's sender output is its share ``(1 + w) * (z_h W_O[h]) / rms(sum of the
layer's heads in this run)`` of the normed attention output, an MLP's is its post-normed output;
the scale is recomputed in every run (docs/gemma.md).

The HF model is never called, hooked or modified: the runtime reads detached views of its weights
through the ``ModelSpec`` built by an adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from graphs import ops
from graphs.adapters.spec import LayerSpec, ModelSpec
from graphs.interventions import (
    DenseMixer,
    PositionalDenseMixer,
    ReceiverShifts,
    SenderDeltas,
    ShiftMixer,
    SparseEdits,
    SparseMixer,
)
from graphs.slot_gradients import slot_probe

__all__ = ["AblationValues", "Checkpoint", "CleanRun", "ReceiverShifts", "RunOutput", "SparseEdits", "run"]


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
    resid: Tensor | None = None  # [L+1, B, T, d] each layer's incoming residual, then the final one


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


FEW_ROWS = 16  # up to this many rows the unembedding is a product W_U @ x^T (see ``unembed``)


def unembed(spec: ModelSpec, resid: Tensor) -> Tensor:
    """Final norm, unembedding and (Gemma 2) logit soft-capping of a final residual [..., d].

    A few rows (ACDC's and edge patching's small passes) are computed as ``W_U @ x^T``: CPU BLAS
    streams the [V, d] matrix about twice as fast that way round as through ``x @ W_U^T``
    (docs/scale.md); more rows use the usual product."""
    x = ops.apply_norm(spec.final_norm, resid)
    rows = x.numel() // x.shape[-1]
    if 0 < rows <= FEW_ROWS and not (x.requires_grad or spec.W_U.requires_grad):
        flat = x.reshape(rows, x.shape[-1])
        logits = torch.mm(spec.W_U, flat.T).T.reshape(*x.shape[:-1], -1)  # [..., V]
        if spec.b_U is not None:
            logits = logits + spec.b_U
    else:
        logits = F.linear(x, spec.W_U, spec.b_U)
    if spec.final_softcap is not None:
        logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
    return logits


def _groups(B: int, mask_k: int | None, start: Checkpoint | None, value_rows: int) -> tuple[int, int]:
    """(K row groups, P prompts per group) of a batch of B rows (row = k * P + p).

    ``mask_k``: the K of a mask [K, S, R] or [K, S, R, T] (None for a shared mask or no mask).
    Masks [K, S, R] fix K; a checkpoint of P prompts fixes P; otherwise ablation values with one
    entry per prompt (1 < rows < B) fix P, so K groups of edits share the prompts' values."""
    if start is not None:
        P = start.resid.shape[0]
        if B % P:
            raise RuntimeInputError(f"{B} rows do not tile the checkpoint's {P} prompts")
        K = B // P
        if mask_k is not None and mask_k != K:
            raise RuntimeInputError(f"with a checkpoint of {P} prompts and {B} rows, masks must be [{K}, S, R]")
        return K, P
    if mask_k is not None:
        K = mask_k
        if K == 0 or B % K:
            raise RuntimeInputError(f"{K} masks do not divide {B} rows (rows are K groups of P prompts)")
        return K, B // K
    if 1 < value_rows < B and B % value_rows == 0:
        return B // value_rows, value_rows
    return 1, B


def _check_mask(spec: ModelSpec, mask: Tensor, T: int) -> tuple[Tensor, bool, int | None]:
    """(mask as a float tensor, whether it is positional, its K groups or None when shared).

    Accepted: [S, R], [K, S, R] (per edge) and [S, R, T], [K, S, R, T] (per edge and token position).
    The two 3-D forms cannot be confused: S != R in every graph."""
    S, R = spec.graph.n_senders, spec.graph.n_receivers
    shape = tuple(mask.shape)
    if mask.dim() in (2, 3) and shape[-2:] == (S, R):
        positional, k = False, (shape[0] if mask.dim() == 3 else None)
    elif mask.dim() in (3, 4) and shape[-3:-1] == (S, R):
        if shape[-1] != T:
            raise RuntimeInputError(
                f"positional edge mask must have the prompts' {T} token positions last, got {shape}"
            )
        positional, k = True, (shape[0] if mask.dim() == 4 else None)
    else:
        raise RuntimeInputError(
            f"edge mask must be [{S}, {R}] or [K, {S}, {R}] (senders x receivers), or positional "
            f"[{S}, {R}, {T}] / [K, {S}, {R}, {T}], got {shape}"
        )
    return (mask.to(spec.dtype) if mask.dtype == torch.bool else mask), positional, k


def _check_values(spec: ModelSpec, values: AblationValues, K: int, P: int, T: int) -> Tensor:
    v = values.values
    S, d = spec.graph.n_senders, spec.d_model
    if v.dim() != 4 or v.shape[2:] != (S, d) or v.shape[0] not in (1, P, K * P) or v.shape[1] not in (1, T):
        raise RuntimeInputError(
            f"ablation values must be [1|{P}|{K * P}, 1|{T}, {S}, {d}], got {tuple(v.shape)}"
            " (corrupted prompts must have the clean prompts' token length)"
        )
    return v


@dataclass(frozen=True)
class Checkpoint:
    """A clean run's state just before ``layer``'s attention, to run only the rest of the network.

    Edge interventions whose receivers all lie at or after ``layer`` leave everything before it
    clean, so their runs can start here (edge patching and ACDC spend most passes this way)."""

    layer: int
    resid: Tensor  # [P, T, d] residual stream before layer ``layer``
    senders: Tensor  # [P, T, S_up, d] outputs of the senders upstream of that layer


@dataclass(frozen=True)
class CleanRun:
    """Every layer's incoming residual and every sender's output of one clean run (for checkpoints)."""

    resid: Tensor  # [L+1, P, T, d]: before each layer's attention, then the final residual
    senders: Tensor  # [P, T, S, d]
    logits: Tensor

    def at(self, spec: ModelSpec, layer: int) -> Checkpoint:
        n = spec.graph.attention_upstream(layer) if layer < spec.n_layers else spec.graph.n_senders
        return Checkpoint(layer, self.resid[layer], self.senders[:, :, :n])


def run(
    spec: ModelSpec,
    input_ids: Tensor,
    *,
    mask: Tensor | None = None,
    edits: SparseEdits | None = None,
    ablation: AblationValues | None = None,
    shifts: ReceiverShifts | None = None,
    read_positions: Tensor | None = None,
    input_embeddings: Tensor | None = None,
    start: Checkpoint | None = None,
    keep_senders: bool = False,
    keep_receivers: bool = False,
    keep_resid: bool = False,
    observe: Callable[[int, str, Tensor], None] | None = None,
    on_senders: Callable[[int, Tensor], None] | None = None,
) -> RunOutput:
    """Run the DAG on ``input_ids`` [B, T] (right-padded; causal attention makes padding inert).

    ``mask`` [S, R] (shared) or [K, S, R] (rows are K groups of B/K prompts), or positional
    [S, R, T] / [K, S, R, T] (entry [u, r, t] ablates edge ``u@t -> r@t`` only), with ``ablation``
    values [1|P|B, 1|T, S, d]: edge interventions (see the module docstring); or ``edits``: a few
    edges per row. ``shifts``: add given tensors to given receivers' inputs (path patching's second
    run), on top of any ablation. ``read_positions`` [B]: compute logits only there. ``input_embeddings``
    [B, T, d]: replaces the ``input`` sender's output (integrated gradients). ``start``: resume from
    a clean ``Checkpoint`` of P prompts (rows are K groups of those P prompts; ``input_ids`` only
    give the shape). ``keep_senders``: every sender's output [B, T, S, d] (detached);
    ``on_senders(first, block)``: called with each block of senders' outputs as it is made (detached,
    [B, T, k, d], senders ``first .. first+k-1``: the input, each layer's heads, each MLP) - e.g. to
    keep only what a method needs of them; ``keep_receivers``: the
    tensors each receiver read, as separate autograd nodes (for gradients); ``keep_resid``: each
    layer's incoming residual. ``observe(layer, name, tensor)``: sees each layer's q, k, v,
    attention pattern (computed explicitly when observed), per-head outputs and MLP output - e.g.
    to register gradient hooks on them; it must not modify them.

    Two shortcuts leave every returned value as it would be without them: a resumed run of K mask
    groups (no gradient, ablation values per prompt or shared) is computed once for its P prompts
    up to the first receiver whose mask differs between groups (``_layer_while_shared``), and when
    only the logits at ``read_positions`` are asked for, the last MLP runs at those positions only.
    """
    g = spec.graph
    H, d = g.n_heads, spec.d_model
    B, T = input_ids.shape
    if mask is not None and edits is not None:
        raise RuntimeInputError("give either a dense mask or sparse edits, not both")
    positional, mask_k = False, None
    if mask is not None:
        mask, positional, mask_k = _check_mask(spec, mask, T)
    K, P = _groups(B, mask_k, start, 0 if ablation is None else ablation.values.shape[0])
    store: SenderDeltas | None = None
    mixer: DenseMixer | PositionalDenseMixer | SparseMixer | ShiftMixer | _Both | None = None
    if mask is not None or edits is not None:
        if ablation is None:
            raise RuntimeInputError("an edge intervention needs ablation values (what ablated edges carry)")
        store = SenderDeltas(_check_values(spec, ablation, K, P, T), K, P)
        if mask is not None:
            mixer = PositionalDenseMixer(g, mask, store, T) if positional else DenseMixer(g, mask, store, T)
        else:
            assert edits is not None
            mixer = SparseMixer(g, edits, store, B, T)
    if shifts is not None:
        shift_mixer = ShiftMixer(g, shifts, B, T)
        mixer = shift_mixer if mixer is None else _Both(mixer, shift_mixer)
    first = 0 if start is None else start.layer
    if start is not None and (keep_senders or keep_receivers or input_embeddings is not None):
        raise RuntimeInputError("a run resumed from a checkpoint cannot keep senders/receivers or replace inputs")
    if start is not None:
        _check_nothing_before(spec, mask if not positional else mask.movedim(-1, 0), edits, shifts, first)

    # A resumed run of K mask groups is computed once for its P prompts up to the first receiver
    # whose mask differs between the groups (ACDC's groups differ in one receiver only)
    shared = (
        start is not None
        and K > 1
        and isinstance(mixer, DenseMixer)
        and not mixer.differentiable
        and store is not None
        and store.values.shape[0] == 1
        and observe is None
        and on_senders is None
        and not keep_resid
    )
    # Only the logits at ``read_positions`` are wanted and nothing else is kept: the last MLP,
    # read by the logits alone, is needed at those positions only
    last_mlp_rows = (
        read_positions
        if read_positions is not None
        and not (keep_senders or keep_receivers or keep_resid)
        and observe is None
        and on_senders is None
        else None
    )
    positions = positions_for(spec, T)
    kept: list[Tensor] = []  # the [B, T, S, d] buffer of keep_senders (allocated at the first block)

    def emit(first_sender: int, block: Tensor) -> None:  # block [B, T, k, d]
        if not (keep_senders or on_senders):
            return
        block = block.detach()
        if keep_senders:
            if not kept:  # sender-major storage seen as [B, T, S, d]: per-sender rows stay contiguous
                kept.append(torch.empty(g.n_senders, B, T, d, dtype=block.dtype, device=block.device).permute(1, 2, 0, 3))
            kept[0][:, :, first_sender : first_sender + block.shape[2]] = block
        if on_senders is not None:
            on_senders(first_sender, block)

    resids: list[Tensor] = []
    if start is None:
        x_in = embed(spec, input_ids) if input_embeddings is None else input_embeddings  # [B, T, d]
        if x_in.shape != (B, T, d):
            raise RuntimeInputError(f"input embeddings must be [{B}, {T}, {d}], got {tuple(x_in.shape)}")
        if keep_receivers and torch.is_grad_enabled() and not x_in.requires_grad:
            x_in = x_in.detach().requires_grad_(True)  # a leaf so autograd tracks the run (weights are detached)
        resid = x_in if spec.W_pos is None else x_in + spec.W_pos[:T]  # [B, T, d]
        emit(0, x_in[:, :, None, :])
        if store is not None:
            store.add(0, x_in[:, :, None, :])
        like = x_in
    else:
        if not shared:
            resid = start.resid.expand(K, *start.resid.shape).reshape(B, T, d)  # [B, T, d]
        else:
            resid = start.resid  # [P, T, d]: the groups agree until a receiver's mask differs
        if store is not None:
            _register_prefix(spec, store, start.senders, first)
        like = start.resid
    rotaries: dict[int, tuple[Tensor, Tensor]] = {}  # cos/sin per rotary function (Gemma 3 has two)

    def rotary_at(layer: int) -> tuple[Tensor, Tensor] | None:
        fn = spec.rotary_for(layer)
        if fn is None:
            return None
        if id(fn) not in rotaries:
            rotaries[id(fn)] = fn(like, positions)
        return rotaries[id(fn)]

    qkv_inputs: list[Tensor] = []
    mlp_inputs: list[Tensor] = []
    for layer in range(first, g.n_layers):
        if shared:
            assert isinstance(mixer, DenseMixer) and store is not None
            resid, shared = _layer_while_shared(
                spec, layer, resid, mixer, store, K, rotary_at(layer), last_mlp_rows if layer == g.n_layers - 1 else None
            )
            continue
        lay = spec.layers[layer]
        if keep_resid:
            resids.append(resid)
        # ---- attention: every head reads its own q, k, v input
        delta = None if mixer is None else mixer.delta(g.attention_upstream(layer), g.qkv_receivers(layer))
        probe = None
        if delta is not None:
            x = _read(resid, delta)  # [B, T, 3H, d]
        elif keep_receivers and torch.is_grad_enabled():
            # every slot reads the same residual: compute once, per-slot gradients reach the probe
            x, probe = None, slot_probe(resid, 3 * H)  # probe [B, T, 3H, d]
        elif keep_receivers:
            x = resid[:, :, None, :].expand(B, T, 3 * H, d)
        else:
            x = None
        seen = None if observe is None else functools.partial(observe, layer)
        rotary = rotary_at(layer)
        if probe is not None:
            qkv_inputs.append(probe)
            heads = ops.attention_heads(lay.attn, lay.attn_norm, resid, resid, resid, rotary, seen, probe)
        elif x is None:
            heads = ops.attention_heads(lay.attn, lay.attn_norm, resid, resid, resid, rotary, seen)
        else:
            qkv_inputs.append(x)
            heads = ops.attention_heads_of_slots(lay.attn, lay.attn_norm, x, rotary, seen)  # [B, T, H, d]
        if seen is not None:
            seen("heads", heads)
        # the heads' sender outputs and what the attention adds to the residual: their sum plus b_O,
        # or with a post-attention norm (Gemma) the normed sum and each head's share of it
        heads, attn_out = ops.head_senders(lay, heads)
        first_head = g.head_sender(layer, 0)

        # ---- MLP: sees this layer's heads unless the block is parallel
        if g.parallel_residual:
            base = resid
        else:
            base = resid + attn_out
            if store is not None:
                store.add(first_head, heads)
        mlp_slice = slice(g.mlp_receiver(layer), g.mlp_receiver(layer) + 1)
        delta = None if mixer is None else mixer.delta(g.mlp_upstream(layer), mlp_slice)
        mlp_in = base.view_as(base) if delta is None else base + delta[:, :, 0]
        if keep_receivers:
            mlp_inputs.append(mlp_in)
        if last_mlp_rows is not None and layer == g.n_layers - 1:
            mlp_out = _mlp_at(lay, mlp_in, last_mlp_rows)  # [B, T, d], zero away from the read positions
        else:
            mlp_out = ops.mlp(lay.mlp, lay.mlp_norm, mlp_in)  # [B, T, d]
        if seen is not None:
            seen("mlp_out", mlp_out)
        if lay.post_mlp_norm is not None:  # Gemma: the MLP sender is the normed output
            mlp_out = ops.apply_norm(lay.post_mlp_norm, mlp_out)
        if store is not None:
            if g.parallel_residual:
                store.add(first_head, heads)
            store.add(first_head + H, mlp_out[:, :, None])
        resid = (resid + attn_out + mlp_out) if g.parallel_residual else (base + mlp_out)
        emit(first_head, heads)
        emit(first_head + H, mlp_out[:, :, None])

    if keep_resid:
        resids.append(resid)
    logits_slice = slice(g.logits_receiver, g.logits_receiver + 1)
    if shared:
        assert isinstance(mixer, DenseMixer)
        final = _final_while_shared(spec, resid, mixer, K)  # [B, T, d]
    else:
        delta = None if mixer is None else mixer.delta(g.n_senders, logits_slice)
        final = resid.view_as(resid) if delta is None else resid + delta[:, :, 0]  # [B, T, d]
    if read_positions is not None:
        logits = unembed(spec, final[torch.arange(B, device=final.device), read_positions])  # [B, V]
    else:
        logits = unembed(spec, final)  # [B, T, V]
    return RunOutput(
        logits=logits,
        senders=kept[0] if keep_senders else None,
        receivers=ReceiverInputs(tuple(qkv_inputs), tuple(mlp_inputs), final) if keep_receivers else None,
        resid=torch.stack(resids) if keep_resid else None,
    )


class _Both:
    """Sum of two mixers' deltas (an edge ablation plus receiver shifts)."""

    def __init__(self, first: DenseMixer | PositionalDenseMixer | SparseMixer, second: ShiftMixer) -> None:
        self.first, self.second = first, second

    def delta(self, n_upstream: int, receivers: slice) -> Tensor | None:
        a = self.first.delta(n_upstream, receivers)
        b = self.second.delta(n_upstream, receivers)
        if a is None:
            return b
        return a if b is None else a + b


def _read(resid: Tensor, delta: Tensor) -> Tensor:
    """What a block of receivers reads: ``resid`` [B, T, d] plus their deltas [B, T, R, d]. Mixers
    hand out deltas the caller owns, so without gradients the sum is taken in place."""
    if delta.requires_grad or resid.requires_grad or not delta.is_contiguous():
        return resid[:, :, None, :] + delta
    return delta.add_(resid[:, :, None, :])


def groups_of(t: Tensor, K: int) -> Tensor:
    """[P, ...] -> [K*P, ...]: the same rows for each of K groups (row k * P + p), a fresh copy."""
    return t.repeat(K, *([1] * (t.dim() - 1)))


def _layer_while_shared(
    spec: ModelSpec,
    layer: int,
    resid: Tensor,
    mixer: DenseMixer,
    store: SenderDeltas,
    K: int,
    rotary: tuple[Tensor, Tensor] | None,
    mlp_rows: Tensor | None = None,
) -> tuple[Tensor, bool]:
    """One layer of a resumed run whose K mask groups have agreed on every receiver so far.

    Everything is computed once for the P prompts except the heads whose q / k / v inputs differ
    between the groups (computed per group, alone) and, once anything differs, the MLP. Returns the
    outgoing residual - [P, T, d] while the groups still agree, else [K*P, T, d] - and whether they
    still agree. ``mlp_rows`` [K*P]: compute the MLP at these positions only (``_mlp_at``). Same
    values as the plain loop in ``run`` (tests/test_runtime.py)."""
    g = spec.graph
    lay = spec.layers[layer]
    H = g.n_heads
    qkv_block = g.qkv_receivers(layer)
    common, differs = mixer.split(g.attention_upstream(layer), qkv_block)
    if common is None:
        heads = ops.attention_heads(lay.attn, lay.attn_norm, resid, resid, resid, rotary)  # [P, T, H, d]
    else:
        x = _read(resid, common)  # [P, T, 3H, d]
        heads = ops.attention_heads_of_slots(lay.attn, lay.attn_norm, x, rotary)
    agree = differs.numel() == 0
    if not agree:
        which = torch.unique(differs % H)  # the heads with a slot that differs between groups
        slots = torch.cat([which, which + H, which + 2 * H])  # their q, k and v slots
        resid = groups_of(resid, K)  # [K*P, T, d]
        x = _read(resid, mixer.columns(g.attention_upstream(layer), qkv_block, slots))  # [K*P, T, 3n, d]
        own = ops.attention_heads_of_slots(lay.attn.only_heads(which), lay.attn_norm, x, rotary)  # [K*P, T, n, d]
        heads = groups_of(heads, K)
        heads[:, :, which] = own
    heads, attn_out = ops.head_senders(lay, heads)
    first_head = g.head_sender(layer, 0)
    heads_shared = agree

    if g.parallel_residual:
        base = resid
    else:
        base = resid + attn_out
        store.add(first_head, heads, shared=heads_shared)
    mlp_block = slice(g.mlp_receiver(layer), g.mlp_receiver(layer) + 1)
    if agree:
        common, differs = mixer.split(g.mlp_upstream(layer), mlp_block)
        if differs.numel() == 0:
            mlp_in = base if common is None else base + common[:, :, 0]
        else:
            agree = False
            base, resid, attn_out = groups_of(base, K), groups_of(resid, K), groups_of(attn_out, K)
            mlp_in = base + mixer.columns(g.mlp_upstream(layer), mlp_block, differs)[:, :, 0]
    else:
        delta = mixer.delta(g.mlp_upstream(layer), mlp_block)
        mlp_in = base if delta is None else base + delta[:, :, 0]
    if mlp_rows is None:
        mlp_out = ops.mlp(lay.mlp, lay.mlp_norm, mlp_in)  # [P | K*P, T, d]
    elif mlp_in.shape[0] == mlp_rows.shape[0]:
        mlp_out = _mlp_at(lay, mlp_in, mlp_rows)
    elif bool((mlp_rows.view(K, -1) == mlp_rows[: mlp_in.shape[0]]).all()):  # the groups read the same positions
        mlp_out = _mlp_at(lay, mlp_in, mlp_rows[: mlp_in.shape[0]])
    else:
        mlp_out = ops.mlp(lay.mlp, lay.mlp_norm, mlp_in)
    if lay.post_mlp_norm is not None:
        mlp_out = ops.apply_norm(lay.post_mlp_norm, mlp_out)
    if g.parallel_residual:
        store.add(first_head, heads, shared=heads_shared)
    store.add(first_head + H, mlp_out[:, :, None], shared=agree)
    resid = (resid + attn_out + mlp_out) if g.parallel_residual else (base + mlp_out)
    return resid, agree


def _mlp_at(lay: LayerSpec, mlp_in: Tensor, positions: Tensor) -> Tensor:
    """The MLP's output [N, T, d] from its input [N, T, d] computed at one position per row
    (``positions`` [N]) and zero elsewhere: for the last layer's MLP, whose only reader is the
    logits receiver, when only the logits at those positions are wanted."""
    rows = torch.arange(mlp_in.shape[0], device=mlp_in.device)
    out = torch.zeros_like(mlp_in)
    out[rows, positions] = ops.mlp(lay.mlp, lay.mlp_norm, mlp_in[rows, positions])  # [N, d]
    return out  # a post-MLP norm (Gemma) keeps the zeros zero


def _final_while_shared(spec: ModelSpec, resid: Tensor, mixer: DenseMixer, K: int) -> Tensor:
    """The logits receiver's input [K*P, T, d] of a run whose K groups agreed up to it."""
    g = spec.graph
    block = slice(g.logits_receiver, g.logits_receiver + 1)
    common, differs = mixer.split(g.n_senders, block)
    if differs.numel():
        return groups_of(resid, K) + mixer.columns(g.n_senders, block, differs)[:, :, 0]
    return groups_of(resid if common is None else resid + common[:, :, 0], K)


def _register_prefix(spec: ModelSpec, store: SenderDeltas, senders: Tensor, layer: int) -> None:
    """Add a checkpoint's clean sender outputs [P, T, S_up, d] to the store, block by block."""
    g = spec.graph
    store.add(0, senders[:, :, :1], shared=True)
    for l in range(layer):
        heads = g.attention_senders(l)
        store.add(heads.start, senders[:, :, heads], shared=True)
        store.add(g.mlp_sender(l), senders[:, :, g.mlp_sender(l) : g.mlp_sender(l) + 1], shared=True)


def _check_nothing_before(
    spec: ModelSpec, mask: Tensor | None, edits: SparseEdits | None, shifts: ReceiverShifts | None, layer: int
) -> None:
    """A resumed run cannot intervene on receivers before its start layer: refuse, never drop."""
    first_receiver = spec.graph.qkv_receivers(layer).start if layer < spec.n_layers else spec.graph.logits_receiver
    if mask is not None and bool((mask[..., :first_receiver] != 0).any()):
        raise RuntimeInputError(f"the mask ablates edges into layers before the checkpoint's layer {layer}")
    if edits is not None and edits.receivers.numel() and int(edits.receivers.min()) < first_receiver:
        raise RuntimeInputError(f"edits ablate edges into layers before the checkpoint's layer {layer}")
    if shifts is not None and shifts.receivers.numel() and int(shifts.receivers.min()) < first_receiver:
        raise RuntimeInputError(f"shifts change receivers before the checkpoint's layer {layer}")


@torch.no_grad()
def clean_run(spec: ModelSpec, input_ids: Tensor, read_positions: Tensor | None = None) -> CleanRun:
    """A clean run that keeps what checkpoints need: every layer's residual and every sender."""
    out = run(spec, input_ids, read_positions=read_positions, keep_senders=True, keep_resid=True)
    assert out.senders is not None and out.resid is not None
    return CleanRun(out.resid, out.senders, out.logits)


# --------------------------------------------------------------------------- conveniences


@torch.no_grad()
def sender_outputs(spec: ModelSpec, input_ids: Tensor) -> Tensor:
    """Every sender's output on ``input_ids``: [B, T, S, d] (the cache of a corrupted run)."""
    read = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)  # logits unused: one position
    out = run(spec, input_ids, keep_senders=True, read_positions=read)
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
