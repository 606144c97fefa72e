"""The decomposed forward pass: carry ``(beta, total)`` through the layers of a ``ModelSpec``.

A pass decomposes S source sets side by side (the leading dimension of ``beta``) over P prompts.
It starts where the earliest source enters (everything before is exactly irrelevant), recomputes
the totals layer by layer from the clean residual at that point, and applies the rules of
``rules`` / ``layers`` to the relevant parts. It stops at a receiver's input (``stop``) or at the
final residual (the ``logits`` receiver).

A source node's output is *set* in the pass: wherever the source covers a node (and position), the
node's relevant output is ``a - A`` (its clean activation minus the ablation value, e.g. the mean;
the ablation value is its irrelevant part), replacing whatever relevance reached the node from
earlier sources. Nodes that are not sources pass on the relevance that reaches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from circuits.methods.cdt import rules
from circuits.methods.cdt.layers import SlotBetas, decompose_attention, decompose_mlp
from circuits.methods.cdt.rules import CDTConfig, CDTError
from graphs import ops
from graphs import runtime as rt
from graphs.adapters.spec import AttentionSpec, ModelSpec, NormSpec, RotaryFn

Stage = Literal["attn", "mlp"]


@dataclass(frozen=True, order=True)
class Point:
    """A place in the residual stream: before ``layer``'s attention (``"attn"``) or before its MLP
    (``"mlp"``: after the attention). ``Point(L, "attn")`` is the final residual (the logits' input)."""

    layer: int
    stage: Stage = "attn"

    def __post_init__(self) -> None:
        if self.stage not in ("attn", "mlp"):
            raise CDTError(f"stage must be 'attn' or 'mlp', got {self.stage!r}")


@dataclass(frozen=True)
class BatchState:
    """What every decomposed pass over one batch of prompts shares: the clean run (residual before
    every layer, every sender's output) and the ablation values (the irrelevant part of a source).

    ``rows`` / ``length`` select a subset of the prompts and positions (``subset``) without copying
    the large per-sender tensors: ``delta`` slices them on demand."""

    spec: ModelSpec
    resid: Tensor  # [L+1, P, T, d] clean residual before each layer's attention, then the final one
    senders: Tensor  # [P0, T0, S_all, d] clean sender outputs (of the whole batch)
    ablation: Tensor  # [1|P0, 1|T0, S_all, d] ablation values A_u
    rotary: tuple[tuple[Tensor, Tensor] | None, ...]  # per layer: cos, sin [1, T, rotary_dim] (or None)
    rows: Tensor | None = None  # prompts of the batch in this state (None: all)

    @staticmethod
    @torch.no_grad()
    def build(spec: ModelSpec, input_ids: Tensor, ablation: rt.AblationValues) -> BatchState:
        P, T = input_ids.shape
        clean = rt.clean_run(spec, input_ids, read_positions=torch.zeros(P, dtype=torch.long))
        values = ablation.values
        if values.shape[1] not in (1, T) or values.shape[0] not in (1, P):
            raise CDTError(f"ablation values {tuple(values.shape)} do not fit a batch of {P} prompts of length {T}")
        positions = rt.positions_for(spec, T)
        cache: dict[int, tuple[Tensor, Tensor]] = {}  # one cos/sin per rotary function (Gemma 3 has two)
        rotary: list[tuple[Tensor, Tensor] | None] = []
        for layer in range(spec.n_layers):
            fn = rotary_of(spec, layer)
            if fn is not None and id(fn) not in cache:
                cache[id(fn)] = fn(clean.resid[0], positions)
            rotary.append(None if fn is None else cache[id(fn)])
        return BatchState(spec, clean.resid, clean.senders, values, tuple(rotary))

    @property
    def prompts(self) -> int:
        return int(self.resid.shape[1])

    @property
    def length(self) -> int:
        return int(self.resid.shape[2])

    def outputs(self, index: slice | int) -> Tensor:
        """Clean outputs ``a_u`` of senders ``index``: [P, T, k, d] (or [P, T, d] for an int)."""
        a = self.senders[:, : self.length, index]
        return a if self.rows is None else a[self.rows]

    def delta(self, index: slice | int) -> Tensor:
        """Relevant outputs ``a_u - A_u`` of senders ``index``: [P, T, k, d] (or [P, T, d] for an int)."""
        A = self.ablation[:, : min(self.length, self.ablation.shape[1]), index]
        if self.rows is not None and A.shape[0] > 1:
            A = A[self.rows]
        return self.outputs(index) - A

    def subset(self, rows: Tensor, length: int) -> BatchState:
        """Prompts ``rows`` (of this state's batch) trimmed to their first ``length`` positions."""
        if self.rows is not None:
            raise CDTError("subset of a subset is not supported")
        rotary = tuple(None if r is None else (r[0][:, :length], r[1][:, :length]) for r in self.rotary)
        return BatchState(self.spec, self.resid[:, rows, :length], self.senders, self.ablation, rotary, rows)


@dataclass(frozen=True)
class PassPlan:
    """One decomposed pass of ``size`` source sets.

    ``start``: where the pass begins; ``resid``: the relevant part [S, P, T, d] of the residual
    before ``start.layer``'s attention (None: zero); ``attn``: for a start at ``"mlp"``, the relevant
    part of ``start.layer``'s attention output (it is not recomputed). ``heads[l]`` [S, T, H] and
    ``mlps[l]`` [S, T]: 1 where a source sets the node's output (at that position) to ``a - A``."""

    size: int
    start: Point
    resid: Tensor | None = None
    attn: Tensor | None = None
    heads: Mapping[int, Tensor] = field(default_factory=dict)
    mlps: Mapping[int, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    """The relevant part (None: exactly zero) and the total of the residual at the stop point, and
    (with ``trace``) every intermediate ``(beta, total)`` keyed ``resid.l``, ``heads.l`` (per head),
    ``attn.l`` (sum of heads; the total includes ``b_O``), ``mlp_in.l``, ``mlp.l`` and ``final``."""

    beta: Tensor | None  # [S, P, T', d]
    total: Tensor  # [P, T', d]
    trace: dict[str, tuple[Tensor | None, Tensor]] | None = None


def _add(*parts: Tensor | None) -> Tensor | None:
    out = None
    for p in parts:
        if p is not None:
            out = p if out is None else out + p
    return out


def head_sum(spec: AttentionSpec, z: Tensor) -> Tensor:
    """sum_h z_h W_O[h]: [..., H, dh] -> [..., d] in one matmul."""
    H, dh, d = spec.W_O.shape
    return z.flatten(-2) @ spec.W_O.reshape(H * dh, d)


def rotary_of(spec: ModelSpec, layer: int) -> RotaryFn | None:
    """The rotary embedding of ``layer`` (Gemma 3 rotates local and global layers differently)."""
    per_layer = getattr(spec, "rotary_for", None)
    return per_layer(layer) if per_layer is not None else spec.rotary


def post_factor(norm: NormSpec | None, raw_total: Tensor) -> Tensor | None:
    """The elementwise factor [P, T, d] of a post-norm (Gemma) with the total's scale, or None."""
    return None if norm is None else rules.rms_factor(norm, raw_total)


def _set_heads(
    spec: AttentionSpec, z_b: Tensor | None, mask: Tensor | None, delta: Tensor | None, factor: Tensor | None
) -> Tensor | None:
    """Relevant attention output [S, P, Tq, d]: propagated heads (through the post-norm ``factor``),
    except source heads, which are set to their relevant sender output ``delta``.

    z_b [S, P, Tq, H, dh]; mask [S, Tq, H]; delta [P, Tq, H, d]; factor [P, Tq, d]."""
    out = None
    if z_b is not None:
        if mask is not None:
            z_b = z_b * (1 - mask)[:, None, :, :, None]
        out = head_sum(spec, z_b)
        if factor is not None:
            out = out * factor
    if mask is not None:
        assert delta is not None
        out = _add(out, torch.einsum("sth,bthd->sbtd", mask, delta))
    return out


def _per_head(
    spec: AttentionSpec, z_b: Tensor | None, mask: Tensor | None, delta: Tensor, factor: Tensor | None, S: int
) -> Tensor:
    """Per-head relevant sender outputs [S, P, Tq, H, d] (for traces)."""
    out = torch.zeros(S, *delta.shape, dtype=delta.dtype, device=delta.device)
    if z_b is not None:
        keep = z_b if mask is None else z_b * (1 - mask)[:, None, :, :, None]
        heads = torch.einsum("sbthe,hed->sbthd", keep, spec.W_O)
        out = out + (heads if factor is None else heads * factor[:, :, None, :])
    if mask is not None:
        out = out + mask[:, None, :, :, None] * delta
    return out


@torch.no_grad()
def propagate(
    state: BatchState,
    plan: PassPlan,
    config: CDTConfig,
    *,
    stop: Point | None = None,
    last_query_only: bool = False,
    trace: bool = False,
) -> PassResult:
    """Run one decomposed pass from ``plan.start`` to ``stop`` (default: the final residual).

    ``last_query_only``: the last layer computes only the last position (enough for a metric read
    there: later positions cannot reach it, and the last layer's other positions reach no logit)."""
    spec, g = state.spec, state.spec.graph
    L, S = g.n_layers, plan.size
    end = stop if stop is not None else Point(L)
    records: dict[str, tuple[Tensor | None, Tensor]] | None = {} if trace else None
    start, beta = plan.start, plan.resid
    if end < start:  # every source enters after the stop point: nothing relevant there (run totals only)
        start, beta = Point(end.layer), None
    total = state.resid[start.layer]  # [P, T, d]
    for layer in range(start.layer, L):
        lay = spec.layers[layer]
        if end == Point(layer, "attn"):
            return PassResult(beta, total, records)
        if records is not None:
            records[f"resid.{layer}"] = (beta, total)
        queries = 1 if last_query_only and layer == L - 1 and end == Point(L) else None
        resumed = layer == start.layer and start.stage == "mlp"
        # ---- attention
        z_b, z_t = decompose_attention(
            lay.attn, lay.attn_norm, total, SlotBetas.same(None if resumed else beta), state.rotary[layer], config, queries
        )
        Tq = z_t.shape[1]
        heads = g.attention_senders(layer)
        mask = plan.heads.get(layer)
        mask = None if mask is None else mask[:, -Tq:]
        delta_heads = state.delta(heads)[:, -Tq:] if mask is not None or records is not None else None
        attn_raw = head_sum(lay.attn, z_t)  # sum of z_h W_O[h], before any post-norm
        factor = post_factor(lay.post_attn_norm, attn_raw)
        if factor is None:
            attn_t = attn_raw if lay.attn.b_O is None else attn_raw + lay.attn.b_O
        else:  # Gemma: the residual gets post_norm(sum of heads); b_O is absent there
            attn_t = ops.apply_norm(lay.post_attn_norm, attn_raw)  # type: ignore[arg-type]
        if resumed:
            attn_b = None if plan.attn is None else plan.attn[:, :, -Tq:]
        else:
            attn_b = _set_heads(lay.attn, z_b, mask, delta_heads, factor)
        if records is not None:
            heads_t = ops.head_outputs(lay.attn, z_t)
            heads_t = heads_t if factor is None else heads_t * factor[:, :, None, :]
            heads_b = None if resumed else _per_head(lay.attn, z_b, mask, delta_heads, factor, S)  # type: ignore[arg-type]
            records[f"heads.{layer}"] = (heads_b, heads_t)
            records[f"attn.{layer}"] = (attn_b, attn_t)
        if Tq != total.shape[1]:
            total = total[:, -Tq:]
            beta = None if beta is None else beta[:, :, -Tq:]
        # ---- MLP: reads this layer's heads unless the block is parallel
        if g.parallel_residual:
            mlp_in_b, mlp_in_t = beta, total
        else:
            mlp_in_b, mlp_in_t = _add(beta, attn_b), total + attn_t
        if end == Point(layer, "mlp"):
            return PassResult(mlp_in_b, mlp_in_t, records)
        if records is not None:
            records[f"mlp_in.{layer}"] = (mlp_in_b, mlp_in_t)
        mlp_b, mlp_t = decompose_mlp(lay.mlp, lay.mlp_norm, mlp_in_t, mlp_in_b, config)
        if lay.post_mlp_norm is not None:  # Gemma: the MLP sender is the post-normed output
            mlp_factor = rules.rms_factor(lay.post_mlp_norm, mlp_t)
            mlp_b = None if mlp_b is None else mlp_b * mlp_factor
            mlp_t = ops.apply_norm(lay.post_mlp_norm, mlp_t)
        m = plan.mlps.get(layer)
        if m is not None:
            m = m[:, -Tq:, None]  # [S, Tq, 1]
            set_to = m[:, None] * state.delta(g.mlp_sender(layer))[:, -Tq:]
            mlp_b = set_to if mlp_b is None else mlp_b * (1 - m[:, None]) + set_to
        if records is not None:
            records[f"mlp.{layer}"] = (mlp_b, mlp_t)
        beta = _add(beta, attn_b, mlp_b)
        total = total + attn_t + mlp_t
        if beta is not None:
            beta = config.residual_fix(beta, total)
    if records is not None:
        records["final"] = (beta, total)
    return PassResult(beta, total, records)
