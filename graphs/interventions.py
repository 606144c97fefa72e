"""Edge interventions for the runtime: ``sum_u M[u, r] (A_u - a_u)`` for every receiver ``r``.

Rows of a run form a grid of ``K`` groups x ``P`` prompts (row ``k * P + p``): group ``k`` uses mask
``k`` (or sparse edits name their rows directly), prompt ``p`` uses ablation values ``p``. A shared
mask is ``K = 1``; one mask per row is ``P = 1``; "K masks over the same P prompts" is the grid
used by evaluation curves and ACDC, without copying prompts' values K times.

Two ways to state which edges are ablated:

* ``DenseMixer``: a mask ``[S, R]`` or ``[K, S, R]`` (bool or fractional, differentiable). Per
  receiver block only senders with a nonzero mask entry are touched, and a mostly-ablated block is
  computed as ``sum_u D_u - sum_u (1 - M[u, r]) D_u`` from running prefix sums, so both sparse and
  nearly full masks cost little.
* ``SparseMixer``: a list of ``(row, sender, receiver, weight)`` entries - a handful of edges per
  row, as in edge patching (one edge per row); with ``positions``, each entry acts at one token
  position only (positional edge patching, docs/positions.md).
* ``PositionalDenseMixer``: a positional mask ``[S, R, T]`` or ``[K, S, R, T]``: entry
  ``M[u, r, t]`` ablates edge ``u@t -> r@t`` only, i.e. receiver ``r`` at token ``t`` reads
  ``in_r[:, t] + sum_u M[u, r, t] (A_u - a_u)[:, t]``. Same prefix-sum and sparsity tricks.

Both read sender deltas ``D_u = A_u - a_u`` from a ``SenderDeltas`` store that the run fills block
by block (input, each layer's heads, each layer's MLP) in topological order.

Every mixer's ``delta`` returns a tensor the caller owns (never a view of the store's sums), so the
runtime may add the residual into it in place when no gradient is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from graphs.graph import ComputationGraph


class InterventionError(ValueError):
    """An edge mask, edit list or ablation-value tensor does not fit the graph or the batch."""


@dataclass(frozen=True)
class SparseEdits:
    """Entry ``e`` ablates fraction ``weights[e]`` of edge ``senders[e] -> receivers[e]`` in row ``rows[e]``."""

    rows: Tensor  # [E] long
    senders: Tensor  # [E] long
    receivers: Tensor  # [E] long
    weights: Tensor  # [E] float
    positions: Tensor | None = None  # [E] long: the one token position each entry acts at (None: all)

    @staticmethod
    def one_edge_per_row(senders: Tensor, receivers: Tensor, prompts: int) -> SparseEdits:
        """Edge ``i`` ablated in rows ``i*prompts .. (i+1)*prompts - 1`` (the grid layout)."""
        n = senders.shape[0]
        rows = torch.arange(n * prompts)
        return SparseEdits(
            rows=rows,
            senders=senders.repeat_interleave(prompts),
            receivers=receivers.repeat_interleave(prompts),
            weights=torch.ones(n * prompts),
        )

    @staticmethod
    def one_positional_edge_per_row(senders: Tensor, receivers: Tensor, positions: Tensor, prompts: int) -> SparseEdits:
        """Edge ``i`` ablated at token ``positions[i]`` only, in rows ``i*prompts .. (i+1)*prompts - 1``."""
        edits = SparseEdits.one_edge_per_row(senders, receivers, prompts)
        return SparseEdits(edits.rows, edits.senders, edits.receivers, edits.weights, positions.repeat_interleave(prompts))


class SenderDeltas:
    """``D_u = A_u - a_u`` for every sender computed so far, in blocks, with running prefix sums.

    Blocks are 5-D ``[K|1, P, T|1, k, d]`` (``K|1``: blocks from a shared clean prefix do not depend
    on the mask group). ``cumulative(n)`` is ``sum_{u < n} D_u`` at every block boundary.
    """

    def __init__(self, values: Tensor, K: int, P: int) -> None:
        Va = values.shape[0]
        if Va == 1:
            self.values = values[None]  # [1, 1, Ta, S, d]
        elif Va == P:
            self.values = values[None]  # [1, P, Ta, S, d]
        elif Va == K * P:
            self.values = values.view(K, P, *values.shape[1:])
        else:
            raise InterventionError(f"ablation values have {Va} rows; expected 1, {P} (prompts) or {K * P} (rows)")
        self.K, self.P = K, P
        self.blocks: list[tuple[int, Tensor]] = []  # (first sender, D)
        self.ends: list[int] = [0]
        self.sums: list[Tensor | None] = [None]  # cumulative sums at self.ends

    def add(self, start: int, outputs: Tensor, shared: bool = False) -> None:
        """Register senders ``start..start+k`` with their outputs: [K*P, T, k, d], or [P, T, k, d] if ``shared``."""
        if start != self.ends[-1]:
            raise InterventionError("sender blocks must be added in topological order")
        k = outputs.shape[2]
        out5 = outputs[None] if shared else outputs.view(self.K, self.P, *outputs.shape[1:])
        D = self.values[:, :, :, start : start + k] - out5  # [K|1, P, T, k, d]
        self.blocks.append((start, D))
        prev = self.sums[-1]
        block_sum = D.sum(3)
        self.sums.append(block_sum if prev is None else prev + block_sum)
        self.ends.append(start + k)

    def cumulative(self, n: int) -> Tensor | None:
        """``sum_{u < n} D_u`` [K|1, P, T, d]; n must be a block boundary."""
        try:
            return self.sums[self.ends.index(n)]
        except ValueError:
            raise InterventionError(f"{n} is not a sender block boundary") from None

    def gather(self, senders: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Deltas of ``senders`` (sorted indices) grouped by block: [(positions in ``senders``, D [K|1,P,T,n,d])].

        A run of consecutive senders is a view of its block (no copy); senders the store has not
        computed are left out."""
        ids: list[int] = senders.tolist()
        groups: list[tuple[Tensor, Tensor]] = []
        j = 0
        for start, D in self.blocks:
            stop = start + D.shape[3]
            while j < len(ids) and ids[j] < start:
                j += 1
            first = j
            while j < len(ids) and ids[j] < stop:
                j += 1
            if j == first:
                continue
            local = ids[first:j]
            if local[-1] - local[0] + 1 == len(local):  # one run of consecutive senders
                part = D[:, :, :, local[0] - start : local[-1] - start + 1]
            else:
                part = D[:, :, :, [u - start for u in local]]
            groups.append((torch.arange(first, j, device=senders.device), part))
        return groups

    def entries(self, rows: Tensor, senders: Tensor) -> Tensor:
        """``D[row, :, sender]`` for each entry: [E, T, d] (rows index the K*P grid)."""
        k = torch.div(rows, self.P, rounding_mode="floor")
        p = rows % self.P
        out: Tensor | None = None
        for start, D in self.blocks:
            inside = (senders >= start) & (senders < start + D.shape[3])
            if not bool(inside.any()):
                continue
            idx = inside.nonzero().flatten()
            kk = k[idx] if D.shape[0] > 1 else torch.zeros_like(idx)
            part = D[kk, p[idx], :, senders[idx] - start]  # [n, T, d]
            if out is None:
                out = torch.empty(rows.shape[0], *part.shape[1:], dtype=D.dtype, device=D.device)
            out[idx] = part
        if out is None:
            raise InterventionError("edits name senders that the run has not computed")
        return out


def _mix(D: Tensor, W: Tensor) -> Tensor:
    """sum_s D[k, p, t, s, :] W[k, s, r] -> [K|1, P, T, R, d], without copying broadcast groups
    (K = 1 when neither the deltas nor the weights differ between groups).

    One small product ``W^T [R, s] @ D [s, d]`` per group and token, batched: the output comes out
    in its final layout (an einsum here permuted D and the result, three passes over memory)."""
    if W.shape[0] > 1 and not W.requires_grad and bool((W == W[:1]).all()):
        W = W[:1]  # the same mask in every group (e.g. ACDC away from the tried receiver)
    Kd, P, T, s, d = D.shape
    K = max(Kd, W.shape[0])
    Wt = W.transpose(1, 2)  # [K|1, R, s]
    if Kd == 1 or W.shape[0] == 1:  # one side shared: fold the groups into the batch of the other
        if W.shape[0] == 1:
            out = torch.matmul(Wt[0], D.reshape(Kd * P * T, s, d))  # [Kd*P*T, R, d]
        else:
            out = torch.matmul(Wt[:, None], D.reshape(1, P * T, s, d))  # [K, P*T, R, d]
    else:
        out = torch.matmul(Wt[:, None], D.reshape(Kd, P * T, s, d))  # [K, P*T, R, d]
    return out.view(K, P, T, -1, d)


def _covers(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` broadcasts to ``a``'s shape (same number of dimensions)."""
    return all(m == n or n == 1 for m, n in zip(a.shape, b.shape, strict=True))


def _add(a: Tensor, b: Tensor) -> Tensor:
    """a + b for two partial sums made by this module (no gradient): into the larger one in place."""
    if not _covers(a, b):
        a, b = b, a
    return a.add_(b) if _covers(a, b) else a + b


def _full_shape(delta: Tensor, K: int, P: int, T: int) -> Tensor:
    """[K|1, P|1, T|1, R, d] -> [K*P, T, R, d]."""
    delta = delta.expand(K, P, T, *delta.shape[3:])
    return delta.reshape(K * P, T, *delta.shape[3:])


def _merged(groups: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """``SenderDeltas.gather``'s per-block groups joined along the sender axis wherever their shapes
    allow (blocks shared by every mask group, then per-group blocks): one mixing product per kind
    instead of one per block, and fewer full-size partial deltas to add up."""
    kinds: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}
    for where, D in groups:
        kinds.setdefault((*D.shape[:3], D.shape[4]), []).append((where, D))
    return [
        parts[0] if len(parts) == 1 else (torch.cat([w for w, _ in parts]), torch.cat([D for _, D in parts], dim=3))
        for parts in kinds.values()
    ]


class _MaskMixer:
    """The shared ``delta`` of ``DenseMixer`` and ``PositionalDenseMixer``: a differentiable sum over
    the store's blocks, or (no gradient) a sum over the active senders only, taken as ``sum_u D_u -
    sum_u (1 - M) D_u`` from prefix sums when most entries are set. Subclasses say how one block mixes."""

    mask: Tensor  # [K|1, S, R] or [K|1, S, R, T]
    store: SenderDeltas
    T: int
    differentiable: bool

    def _mix_block(self, D: Tensor, W: Tensor) -> Tensor:
        """sum_s D[k, p, t, s, :] W[k, s, r(, t)] -> [K, P, T|1, R, d]."""
        raise NotImplementedError

    def _complement_positions(self, total: Tensor) -> int:
        """The position count a complement-computed delta ``[K|1, P|1, T|1, 1|R, d]`` is expanded to."""
        raise NotImplementedError

    def delta(self, n_upstream: int, receivers: slice) -> Tensor | None:
        """[K*P, T, R_block, d] for ``receivers`` (their upstream: senders < ``n_upstream``)."""
        M = self.mask[:, :n_upstream, receivers]  # [K|1, n, Rb(, T)]
        store = self.store
        if self.differentiable:
            total: Tensor | None = None
            for start, D in store.blocks:
                stop = min(start + D.shape[3], n_upstream)
                if stop > start:
                    part = self._mix_block(D[:, :, :, : stop - start], M[:, start:stop])
                    total = part if total is None else total + part
            return None if total is None else _full_shape(total, store.K, store.P, self.T)

        total = self._sum(M, n_upstream)
        return None if total is None else _full_shape(total, store.K, store.P, self.T)

    def _sum(self, M: Tensor, n_upstream: int) -> Tensor | None:
        """``sum_u M[k, u, r] D_u`` [K|1, P, T|1, R, d] for a mask slice M [K|1, n, R(, T)], over the
        active senders only (no gradient)."""
        store = self.store
        complement = float(M.sum()) > 0.5 * M.numel()
        W = 1.0 - M if complement else M
        active = (W != 0).flatten(2).any(dim=2).any(dim=0).nonzero().flatten()  # senders with any entry
        total = None
        for where, D in _merged(store.gather(active)):
            part = self._mix_block(D, W[:, active[where]])
            total = part if total is None else _add(total, part)
        if complement:
            base = store.cumulative(n_upstream)
            assert base is not None
            base = base[:, :, :, None, :]  # broadcast over receivers
            if total is None:
                total = base.clone()  # never hand out the store's own sums
            elif _covers(total, base):
                total = total.neg_().add_(base)  # total is this call's own tensor
            else:
                total = base - total
            R = M.shape[2]
            total = total.expand(*total.shape[:2], self._complement_positions(total), R, total.shape[4])
        return total

    def split(self, n_upstream: int, receivers: slice) -> tuple[Tensor | None, Tensor]:
        """For a run whose senders so far are all shared by its mask groups (``SenderDeltas.add``
        with ``shared=True``): (group 0's delta [P, T, R_block, d] or None, the block-local indices
        of the receivers whose mask differs between groups). Only those need a per-group input."""
        if self.differentiable or any(D.shape[0] != 1 for _, D in self.store.blocks):
            raise InterventionError("split deltas need a non-differentiable mask and shared senders only")
        M = self.mask[:, :n_upstream, receivers]  # [K, n, Rb(, T)]
        differs = (M != M[:1]).transpose(0, 2).flatten(1).any(dim=1).nonzero().flatten()  # [n_differ]
        total = self._sum(M[:1], n_upstream)
        return (None if total is None else _full_shape(total, 1, self.store.P, self.T)), differs

    def columns(self, n_upstream: int, receivers: slice, which: Tensor) -> Tensor:
        """Every group's delta [K*P, T, len(which), d] of the block-local receivers ``which`` (shared
        senders only, as for ``split``)."""
        store = self.store
        M = self.mask[:, :n_upstream, receivers][:, :, which]  # [K, n, n_which(, T)]
        total = self._sum(M, n_upstream)
        if total is None:
            values = store.values
            return torch.zeros(store.K * store.P, self.T, which.numel(), values.shape[-1], dtype=values.dtype, device=values.device)
        return _full_shape(total, store.K, store.P, self.T)


class DenseMixer(_MaskMixer):
    """Deltas for dense masks ``[S, R]`` (shared) or ``[K, S, R]`` (one per row group)."""

    def __init__(self, graph: ComputationGraph, mask: Tensor, store: SenderDeltas, T: int) -> None:
        self.mask = mask if mask.dim() == 3 else mask[None]  # [K|1, S, R]
        self.store = store
        self.T = T
        self.differentiable = mask.requires_grad

    def _mix_block(self, D: Tensor, W: Tensor) -> Tensor:
        return _mix(D, W)

    def _complement_positions(self, total: Tensor) -> int:
        return total.shape[2]  # T or 1: ``_full_shape`` broadcasts it


def _mix_positional(D: Tensor, W: Tensor) -> Tensor:
    """sum_s D[k, p, t, s, :] W[k, s, r, t] -> [K, P, T, R, d] (each position mixes its own senders)."""
    if D.shape[0] == 1 and W.shape[0] > 1:
        return torch.einsum("ptsd,ksrt->kptrd", D[0], W)
    if W.shape[0] == 1:
        return torch.einsum("kptsd,srt->kptrd", D, W[0])
    return torch.einsum("kptsd,ksrt->kptrd", D, W)


class PositionalDenseMixer(_MaskMixer):
    """Deltas for positional masks ``[S, R, T]`` (shared) or ``[K, S, R, T]`` (one per row group).

    Like ``DenseMixer`` but each token position has its own mask column: the delta of receiver ``r``
    at token ``t`` mixes only the senders' deltas at ``t`` (residual edges join equal positions)."""

    def __init__(self, graph: ComputationGraph, mask: Tensor, store: SenderDeltas, T: int) -> None:
        self.mask = mask if mask.dim() == 4 else mask[None]  # [K|1, S, R, T]
        if self.mask.shape[-1] != T:
            raise InterventionError(f"a positional mask must have the run's {T} positions, got {self.mask.shape[-1]}")
        self.store = store
        self.T = T
        self.differentiable = mask.requires_grad

    def _mix_block(self, D: Tensor, W: Tensor) -> Tensor:
        Dx = D.expand(-1, -1, self.T, -1, -1)  # [K|1, P, T, k, d]: ablation values may be shared over positions
        return _mix_positional(Dx, W)

    def _complement_positions(self, total: Tensor) -> int:
        return self.T


class SparseMixer:
    """Deltas for a few edges per row (``SparseEdits``)."""

    def __init__(self, graph: ComputationGraph, edits: SparseEdits, store: SenderDeltas, B: int, T: int) -> None:
        upstream = torch.tensor(graph.n_upstream)
        if edits.positions is not None:
            if edits.positions.shape != edits.rows.shape:
                raise InterventionError("edit positions must have one entry per edit")
            if edits.positions.numel() and (int(edits.positions.min()) < 0 or int(edits.positions.max()) >= T):
                raise InterventionError(f"edit positions must lie in [0, {T})")
        if edits.rows.numel():
            if int(edits.rows.min()) < 0 or int(edits.rows.max()) >= B:
                raise InterventionError(f"edit rows must lie in [0, {B})")
            if int(edits.receivers.min()) < 0 or int(edits.receivers.max()) >= graph.n_receivers:
                raise InterventionError("edit receivers out of range")
            if bool((edits.senders < 0).any()) or bool((edits.senders >= upstream[edits.receivers]).any()):
                raise InterventionError("an edit names a (sender, receiver) pair that is not an edge")
        self.edits = edits
        self.store = store
        self.B, self.T = B, T

    def delta(self, n_upstream: int, receivers: slice) -> Tensor | None:
        e = self.edits
        pick = ((e.receivers >= receivers.start) & (e.receivers < receivers.stop)).nonzero().flatten()
        if pick.numel() == 0:
            return None
        rows, senders = e.rows[pick], e.senders[pick]
        D = self.store.entries(rows, senders)  # [E, T|1, d]
        D = D * e.weights[pick].to(D.dtype)[:, None, None]
        Rb = receivers.stop - receivers.start
        out = torch.zeros(self.B, self.T, Rb, D.shape[-1], dtype=D.dtype, device=D.device)
        if e.positions is not None:  # one token per entry: D[e, t_e] into (row_e, t_e, receiver_e)
            pos = e.positions[pick].to(D.device)
            idx = torch.arange(pos.shape[0], device=D.device)
            Dt = D[idx, pos] if D.shape[1] > 1 else D[:, 0]  # [E, d]
            out.index_put_((rows, pos, e.receivers[pick] - receivers.start), Dt, accumulate=True)
            return out
        t = torch.arange(self.T, device=D.device)
        out.index_put_(
            (rows[:, None], t[None, :], (e.receivers[pick] - receivers.start)[:, None]),
            D.expand(-1, self.T, -1),
            accumulate=True,
        )
        return out


@dataclass(frozen=True)
class ReceiverShifts:
    """Add ``values[:, :, j]`` to the input of receiver ``receivers[j]`` (on top of any edge ablation).

    Path patching's second run uses it: the receivers read exactly what they read in the first run."""

    receivers: Tensor  # [n] long, receiver indices
    values: Tensor  # [B, T, n, d]


class ShiftMixer:
    def __init__(self, graph: ComputationGraph, shifts: ReceiverShifts, B: int, T: int) -> None:
        n = shifts.receivers.numel()
        if shifts.values.dim() != 4 or tuple(shifts.values.shape[:3]) != (B, T, n):
            raise InterventionError(f"receiver shifts must be [{B}, {T}, {n}, d], got {tuple(shifts.values.shape)}")
        if n and (int(shifts.receivers.min()) < 0 or int(shifts.receivers.max()) >= graph.n_receivers):
            raise InterventionError("receiver shift names a receiver outside the graph")
        if shifts.receivers.unique().numel() != n:
            raise InterventionError("receiver shifts name a receiver twice")
        self.shifts = shifts
        self.B, self.T = B, T

    def delta(self, n_upstream: int, receivers: slice) -> Tensor | None:
        rec = self.shifts.receivers
        pick = ((rec >= receivers.start) & (rec < receivers.stop)).nonzero().flatten()
        if pick.numel() == 0:
            return None
        v = self.shifts.values
        out = torch.zeros(self.B, self.T, receivers.stop - receivers.start, v.shape[-1], dtype=v.dtype, device=v.device)
        out[:, :, rec[pick] - receivers.start] = v[:, :, pick]
        return out
