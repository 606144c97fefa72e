"""K variants of one intervened run that differ only in the edges into one receiver.

ACDC tries, for one receiver ``r`` at a time, ablating some of its incoming edges on top of the
current circuit. A trial can change only ``r``'s node and the nodes reachable from it through edges
the circuit keeps; every other node has the value it has in the current circuit's own run (the
*base run*). So a trial recomputes just those nodes, each from its base input plus what its kept
edges from changed senders bring (the delta form of DESIGN.md section 4):

    in_r(trial) = in_r(base) + sum_u (M_trial[u, r] - M_base[u, r]) (A_u - a_u(base))
    in_n(trial) = in_n(base) + sum_{s changed, s -> n kept} (a_s(trial) - a_s(base))    (n != r)

(``r``'s senders lie upstream of ``r``, so the trial leaves their outputs as in the base run.)
ACDC circuits keep a few percent of the edges, so a trial usually recomputes a handful of heads and
MLPs instead of every layer from ``r`` on. A head whose value input alone changed keeps the base
run's attention pattern (no queries, keys or softmax), and a head or MLP whose kept edges reach the
logits only through MLPs and queries is computed at the read positions only (``BaseRun.narrow``).
The values are ``runtime.run``'s with the trial's mask, up to float rounding
(tests/test_downstream.py).

Rows are the grid of ``runtime``: row ``k * P + p`` is trial ``k`` on prompt ``p``. Models whose
heads' sender outputs depend on the other heads of their layer (a post-attention norm, Gemma) are
not supported (``supports``): there a changed head changes its whole layer.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from graphs import ops
from graphs import runtime as rt
from graphs.adapters.spec import AttentionSpec, ModelSpec
from graphs.graph import ComputationGraph

__all__ = ["BaseRun", "Memo", "base_run", "column_finals", "column_trials", "supports", "with_column"]


def supports(spec: ModelSpec) -> bool:
    """Whether ``column_trials`` can run this model (no post-attention norms)."""
    return all(layer.post_attn_norm is None for layer in spec.layers)


@dataclass(frozen=True)
class BaseRun:
    """One intervened run of P prompts, with what every node read and wrote."""

    mask: Tensor  # [S, R] bool: the ablated edges
    senders: Tensor  # [P, T, S, d] every sender's output
    inputs: Tensor  # [P, T, R, d] every receiver's input
    read_positions: Tensor  # [P]: where the logits are read
    readers: tuple[tuple[int, ...], ...]  # per sender, the receivers its kept edges reach
    patterns: Tensor  # [L, P, H, T, T] every head's attention pattern

    def narrow(self, graph: ComputationGraph) -> frozenset[int]:
        """The senders whose outputs the kept edges need at the read positions only."""
        return _narrow_senders(graph, self.readers)


@torch.no_grad()
def base_run(
    spec: ModelSpec, input_ids: Tensor, mask: Tensor, ablation: rt.AblationValues, read_positions: Tensor
) -> BaseRun:
    """Run ``input_ids`` [P, T] with the bool edge mask [S, R], keeping every sender and receiver."""
    read = torch.zeros_like(read_positions)  # the logits are not kept: read one position
    patterns: list[Tensor] = []

    def keep_pattern(layer: int, name: str, tensor: Tensor) -> None:
        if name == "pattern":
            patterns.append(tensor)  # [P, H, T, T]

    out = rt.run(
        spec, input_ids, mask=mask, ablation=ablation, read_positions=read, keep_senders=True, keep_receivers=True,
        observe=keep_pattern,
    )
    assert out.senders is not None and out.receivers is not None
    inputs = rt.ReceiverInputs.dense(out.receivers.as_list())  # [P, T, R, d]
    return BaseRun(
        mask.clone(), out.senders.contiguous(), inputs, read_positions, _readers(spec.graph, mask), torch.stack(patterns)
    )


def _readers(graph: ComputationGraph, mask: Tensor) -> tuple[tuple[int, ...], ...]:
    """Per sender, the receivers its kept (not ablated) edges reach, ascending."""
    out: list[list[int]] = [[] for _ in range(graph.n_senders)]
    for s, r in (graph.edge_mask & ~mask).nonzero().tolist():
        out[s].append(r)
    return tuple(tuple(rs) for rs in out)


def _narrow_senders(graph: ComputationGraph, readers: tuple[tuple[int, ...], ...]) -> frozenset[int]:
    """The senders (heads and MLPs) whose outputs the kept edges need at the read positions only.

    The logits read the read positions; an MLP works position by position and a head's query at a
    position reads its own position only, so a sender whose every kept reader is the logits, the
    MLP of a narrow MLP or the query of a narrow head is narrow too. Keys and values are read at
    every position: a sender they read is needed everywhere."""
    owner: dict[int, int] = {graph.logits_receiver: -1}
    for layer in range(graph.n_layers):
        owner[graph.mlp_receiver(layer)] = graph.mlp_sender(layer)
        for h in range(graph.n_heads):
            owner[graph.slot_receiver(layer, h, "q")] = graph.head_sender(layer, h)
    narrow: set[int] = {-1}
    for s in reversed(range(1, graph.n_senders)):  # readers' owners come after their senders
        if all(owner.get(r) in narrow for r in readers[s]):
            narrow.add(s)
    return frozenset(narrow - {-1})


class _Changes:
    """The senders a trial changed so far and their deltas ``a_s(trial) - a_s(base)``: [K*P, T, d],
    or [K*P, d] at the read positions for the narrow senders (``_narrow_senders``)."""

    def __init__(self, readers: tuple[tuple[int, ...], ...], rows: Tensor, read: Tensor) -> None:
        self.readers = readers  # per sender, the receivers that read its value in this run
        self.rows, self.read = rows, read  # [K*P] each: row and read position of every trial row
        self.senders: list[int] = []
        self.deltas: list[Tensor] = []
        self.narrow: list[bool] = []
        self._at_read: dict[int, Tensor] = {}

    def add(self, sender: int, delta: Tensor, narrow: bool = False) -> None:
        self.senders.append(sender)
        self.deltas.append(delta)
        self.narrow.append(narrow)

    def _reaching(self, lo: int, hi: int):  # type: ignore[no-untyped-def]
        for i, s in enumerate(self.senders):
            readers = self.readers[s]
            for r in readers[bisect.bisect_left(readers, lo) : bisect.bisect_left(readers, hi)]:
                yield i, r

    def into(self, lo: int, hi: int, like: Tensor) -> dict[int, Tensor]:
        """Input deltas [K*P, T, d] of the receivers ``lo .. hi-1`` that kept edges from changed
        senders reach (the tensors are shared with the store: do not change them in place). A
        narrow sender's delta is known at the read positions only and is zero elsewhere in them:
        only readers that are narrow themselves (a narrow head's query) may take it."""
        out: dict[int, Tensor] = {}
        for i, r in self._reaching(lo, hi):
            delta = self.deltas[i]
            if self.narrow[i]:
                wide = torch.zeros_like(like)  # [K*P, T, d]
                wide[self.rows, self.read] = delta
                delta = wide
            out[r] = delta if r not in out else out[r] + delta
        return out

    def at_read(self, receiver: int) -> Tensor | None:
        """The input delta [K*P, d] of ``receiver`` at the read positions, or None if unchanged."""
        out: Tensor | None = None
        for i, _ in self._reaching(receiver, receiver + 1):
            delta = self.deltas[i] if self.narrow[i] else self._sliced(i)
            out = delta if out is None else out + delta
        return out

    def _sliced(self, i: int) -> Tensor:
        if i not in self._at_read:
            self._at_read[i] = self.deltas[i][self.rows, self.read]  # [K*P, d]
        return self._at_read[i]


def _minus_base(new: Tensor, base: Tensor, K: int) -> Tensor:
    """``new`` [K*P, ...] minus ``base`` [P, ...] for every group."""
    return (new.view(K, *base.shape) - base).view(new.shape)


class Memo:
    """What the trials of one search can reuse: attention layers restricted to sets of heads and
    rotary tables (one per layer and prompt length). Owned by the caller, one per search."""

    MAX_HEAD_SETS = 256  # restricted layers kept (each a copy of its heads' weights), least recently used dropped

    def __init__(self) -> None:
        self._heads: OrderedDict[tuple[int, tuple[int, ...]], AttentionSpec] = OrderedDict()
        self._rotary: dict[tuple[int, int], tuple[Tensor, Tensor] | None] = {}

    def heads(self, spec: ModelSpec, layer: int, which: list[int]) -> AttentionSpec:
        key = (layer, tuple(which))
        if key in self._heads:
            self._heads.move_to_end(key)
        else:
            self._heads[key] = spec.layers[layer].attn.only_heads(torch.tensor(which, dtype=torch.long))
            if len(self._heads) > self.MAX_HEAD_SETS:
                self._heads.popitem(last=False)
        return self._heads[key]

    def rotary(self, spec: ModelSpec, layer: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """cos / sin of ``layer``'s rotary embedding for inputs shaped like ``like`` [P, T, d]."""
        key = (layer, like.shape[1])
        if key not in self._rotary:
            fn = spec.rotary_for(layer)
            self._rotary[key] = None if fn is None else fn(like, rt.positions_for(spec, like.shape[1]))
        return self._rotary[key]


@dataclass
class _Trials:
    """What K trials changed: sender deltas and the logits receiver's input at the read positions."""

    changes: _Changes
    inputs: dict[int, Tensor]  # receiver -> input delta [K*P, T, d] (receivers whose input changed)
    final: Tensor  # [K*P, d] the logits receiver's input at the read positions
    patterns: dict[tuple[int, int], Tensor]  # (layer, head) -> changed attention pattern [K*P, T, T]


def _propagate(
    spec: ModelSpec,
    base: BaseRun,
    receiver: int,
    column: Tensor,
    ablation: rt.AblationValues,
    full_positions: bool,
    memo: Memo | None,
    at_read_positions: bool = True,
) -> _Trials:
    """Recompute the nodes K trials change (see the module docstring). ``full_positions``: compute
    every node at every position and keep the new patterns (to update the base run);
    ``at_read_positions``: compute the narrow senders (``_narrow_senders``) at the read positions
    only."""
    g = spec.graph
    P, T, _, d = base.senders.shape
    K, n = column.shape
    if n != g.n_upstream[receiver]:
        raise rt.RuntimeInputError(f"receiver {receiver} has {g.n_upstream[receiver]} senders, column has {n}")
    dtype = base.senders.dtype
    change = column.to(dtype) - base.mask[:n, receiver].to(dtype)  # [K, n]: +1 newly ablated, -1 restored
    touched = change.abs().sum(0).nonzero().flatten()
    rows = torch.arange(K * P, device=change.device)
    read = base.read_positions.repeat(K)  # [K*P]
    lr = g.logits_receiver
    if touched.numel() == 0:  # every trial is the base run
        return _Trials(_Changes(base.readers, rows, read), {}, base.inputs[:, :, lr][rows % P, read], {})
    D = ablation.values[:, :, touched] - base.senders[:, :, touched]  # [P, T, c, d]
    delta_r = torch.einsum("kc,ptcd->kptd", change[:, touched], D.expand(P, T, -1, -1)).reshape(K * P, T, d)
    inputs = {receiver: delta_r}

    changes = _Changes(base.readers, rows, read)
    narrow = base.narrow(g) if at_read_positions and not full_positions else frozenset()
    patterns: dict[tuple[int, int], Tensor] = {}  # (layer, head) -> new pattern [K*P, T, T] (full_positions only)
    memo = Memo() if memo is None else memo
    L, H = g.n_layers, g.n_heads
    first = L if receiver == g.logits_receiver else int(g.receivers[receiver].node.layer)  # type: ignore[arg-type]
    for layer in range(first, L):
        lay = spec.layers[layer]
        qkv = g.qkv_receivers(layer)
        slot_delta = changes.into(qkv.start, qkv.stop, delta_r)
        if qkv.start <= receiver < qkv.stop:
            slot_delta[receiver] = delta_r
        inputs.update(slot_delta)
        # heads whose queries or keys changed are recomputed whole; heads whose values alone changed
        # keep the base run's attention pattern
        patterned = sorted({(r - qkv.start) % H for r in slot_delta if r - qkv.start < 2 * H})
        valued = sorted({(r - qkv.start) % H for r in slot_delta} - set(patterned))
        if patterned:
            slots = [qkv.start + s * H + h for s in range(3) for h in patterned]  # q slots, k slots, v slots
            x = rt.groups_of(base.inputs[:, :, slots], K)  # [K*P, T, 3m, d]
            for i, r in enumerate(slots):
                if r in slot_delta:
                    x[:, :, i] += slot_delta[r]
            rotary = memo.rotary(spec, layer, base.inputs[:, :, 0])
            sub = memo.heads(spec, layer, patterned)
            if full_positions:  # the new patterns update the base run
                q, k, v = ops.slot_qkv(sub, lay.attn_norm, x, rotary)
                pattern = ops.attention_pattern(sub, q, k)  # [K*P, m, T, T]
                new = ops.head_outputs(sub, torch.einsum("bhqk,bkhe->bqhe", pattern, v))
                for i, h in enumerate(patterned):
                    patterns[(layer, h)] = pattern[:, i]
            else:
                new = ops.attention_heads_of_slots(sub, lay.attn_norm, x, rotary)  # [K*P, T, m, d]
            for i, h in enumerate(patterned):
                s = g.head_sender(layer, h)
                if s in narrow:  # its query may be right at the read positions only
                    changes.add(s, new[rows, read, i] - base.senders[rows % P, read, s], narrow=True)
                else:
                    changes.add(s, _minus_base(new[:, :, i], base.senders[:, :, s], K))
        for group in ([h for h in valued if g.head_sender(layer, h) not in narrow],
                      [h for h in valued if g.head_sender(layer, h) in narrow]):
            if not group:
                continue
            slots = [qkv.start + 2 * H + h for h in group]
            x = rt.groups_of(base.inputs[:, :, slots], K)  # [K*P, T, m, d]
            for i, r in enumerate(slots):
                x[:, :, i] += slot_delta[r]
            sub = memo.heads(spec, layer, group)
            if g.head_sender(layer, group[0]) in narrow:  # the pattern's rows at the read positions
                pattern = base.patterns[layer][:, group][torch.arange(P), :, base.read_positions]  # [P, m, T]
                new = ops.heads_from_pattern(sub, lay.attn_norm, x, rt.groups_of(pattern[:, :, None], K))
                for i, h in enumerate(group):  # new: [K*P, 1, m, d]
                    s = g.head_sender(layer, h)
                    changes.add(s, new[:, 0, i] - base.senders[rows % P, read, s], narrow=True)
                continue
            pattern = rt.groups_of(base.patterns[layer][:, group], K)  # [K*P, m, T, T]
            new = ops.heads_from_pattern(sub, lay.attn_norm, x, pattern)  # [K*P, T, m, d]
            for i, h in enumerate(group):
                s = g.head_sender(layer, h)
                changes.add(s, _minus_base(new[:, :, i], base.senders[:, :, s], K))
        m, s = g.mlp_receiver(layer), g.mlp_sender(layer)
        if s in narrow:  # read at the read positions only, through MLPs and the logits
            x_delta = delta_r[rows, read] if m == receiver else changes.at_read(m)
            if x_delta is None:
                continue
            x = base.inputs[:, :, m][rows % P, read] + x_delta  # [K*P, d]
            changes.add(s, ops.mlp_sender(lay, x) - base.senders[rows % P, read, s], narrow=True)
            continue
        inputs.update(changes.into(m, m + 1, delta_r))
        if m not in inputs:
            continue
        x = rt.groups_of(base.inputs[:, :, m], K)
        x += inputs[m]
        changes.add(s, _minus_base(ops.mlp_sender(lay, x), base.senders[:, :, s], K))

    if full_positions and receiver != lr:
        inputs.update(changes.into(lr, lr + 1, delta_r))
    final = base.inputs[:, :, lr][rows % P, read]  # [K*P, d]
    part = delta_r[rows, read] if receiver == lr else changes.at_read(lr)
    if part is not None:
        final = final + part
    return _Trials(changes, inputs, final, patterns)


@torch.no_grad()
def column_finals(
    spec: ModelSpec,
    base: BaseRun,
    receiver: int,
    column: Tensor,
    ablation: rt.AblationValues,
    memo: Memo | None = None,
    at_read_positions: bool = True,
) -> Tensor:
    """Final residuals [K*P, d] (the logits receiver's input) at the read positions of K trials:
    trial ``k`` is the base run with receiver ``receiver``'s incoming edges ablated as ``column[k]``
    [K, n_upstream] (bool) says. ``memo``: reuse restricted layers across calls;
    ``at_read_positions=False``: compute every node at every position (a check, and a baseline)."""
    return _propagate(spec, base, receiver, column, ablation, False, memo, at_read_positions).final


def column_trials(
    spec: ModelSpec, base: BaseRun, receiver: int, column: Tensor, ablation: rt.AblationValues
) -> Tensor:
    """Logits [K*P, V] at the read positions of the trials of ``column_finals``."""
    return rt.unembed(spec, column_finals(spec, base, receiver, column, ablation))


@torch.no_grad()
def with_column(
    spec: ModelSpec, base: BaseRun, receiver: int, column: Tensor, ablation: rt.AblationValues, memo: Memo | None = None,
    reuse: bool = False,
) -> BaseRun:
    """The base run with receiver ``receiver``'s incoming edges ablated as ``column`` [n_upstream]
    (bool) says, updated in the nodes that changes: ACDC's next base run once a receiver is decided.

    ``reuse``: write the changes into ``base``'s sender outputs, receiver inputs and attention
    patterns instead of into copies, and share them with the result; ``base`` must not be used
    afterwards. Those two tensors
    are nearly all of a base run (1.5 GiB for SmolLM2 with 16 prompts of 37 tokens), and ACDC, which
    replaces its base run by the result, copied them once per decided receiver."""
    trial = _propagate(spec, base, receiver, column[None], ablation, True, memo)
    senders, inputs = (base.senders, base.inputs) if reuse else (base.senders.clone(), base.inputs.clone())
    for s, delta in zip(trial.changes.senders, trial.changes.deltas, strict=True):
        senders[:, :, s] += delta
    for r, delta in trial.inputs.items():
        inputs[:, :, r] += delta
    patterns = base.patterns if reuse else base.patterns.clone()
    for (layer, h), pattern in trial.patterns.items():
        patterns[layer, :, h] = pattern
    mask = base.mask.clone()
    mask[: column.shape[0], receiver] = column
    return BaseRun(mask, senders, inputs, base.read_positions, _readers(spec.graph, mask), patterns)
