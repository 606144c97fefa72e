"""The computation DAG of a pre-norm decoder in its residual-stream rewrite.

Every receiver reads ``in_r = c_r + sum_{u upstream of r} a_u`` (DESIGN.md section 3). Senders
are listed in topological order, so the upstream set of every receiver is a *prefix* of the sender
list: ``mask[s, r] = s < n_upstream[r]``. The runtime and every method rely on that.

Dense layout (fixed, part of the file formats):

* sender index: ``input`` 0, head (l, h) ``1 + l(H+1) + h``, MLP l ``1 + l(H+1) + H``;
* receiver index: layer l occupies ``l(3H+1) ... l(3H+1)+3H``: first the H query slots, then the H
  key slots, then the H value slots, then the MLP; ``logits`` is last, at ``L(3H+1)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from graphs.ids import EdgeId, IdError, NodeId, NodeKind, ReceiverId, Slot

SLOTS: tuple[Slot, ...] = (Slot.Q, Slot.K, Slot.V)


def count_edges(n_layers: int, n_heads: int, parallel_residual: bool = False) -> int:
    """Closed-form edge count (DESIGN.md section 3) for sequential or parallel-residual blocks."""
    L, H = n_layers, n_heads
    total = 0
    for layer in range(L):
        upstream = 1 + layer * (H + 1)
        total += 3 * H * upstream + upstream + (0 if parallel_residual else H)
    return total + 1 + L * (H + 1)


@dataclass(frozen=True)
class ComputationGraph:
    """Senders, receivers, index maps and the real-edge mask of one model's DAG (immutable)."""

    n_layers: int
    n_heads: int
    parallel_residual: bool = False

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(f"a graph needs at least one layer and one head, got {self}")

    # ----------------------------------------------------------------- sizes and blocks
    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    @property
    def n_edges(self) -> int:
        return count_edges(self.n_layers, self.n_heads, self.parallel_residual)

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def attention_senders(self, layer: int) -> slice:
        """Sender indices of the heads of ``layer`` (contiguous)."""
        start = self.head_sender(layer, 0)
        return slice(start, start + self.n_heads)

    def qkv_receivers(self, layer: int) -> slice:
        """Receiver indices of all q, k, v slots of ``layer``: [q_0..q_H-1, k_0.., v_0..]."""
        start = layer * (3 * self.n_heads + 1)
        return slice(start, start + 3 * self.n_heads)

    def slot_receiver(self, layer: int, head: int, slot: Slot) -> int:
        return layer * (3 * self.n_heads + 1) + SLOTS.index(slot) * self.n_heads + head

    def mlp_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1)

    def attention_upstream(self, layer: int) -> int:
        """Number of senders feeding the q/k/v slots of ``layer``: input and all earlier layers."""
        return 1 + layer * (self.n_heads + 1)

    def mlp_upstream(self, layer: int) -> int:
        """Number of senders feeding MLP ``layer`` (its own heads too, unless parallel residual)."""
        return self.attention_upstream(layer) + (0 if self.parallel_residual else self.n_heads)

    # ----------------------------------------------------------------- ids
    @cached_property
    def senders(self) -> tuple[NodeId, ...]:
        nodes = [NodeId.input()]
        for layer in range(self.n_layers):
            nodes.extend(NodeId.attention_head(layer, h) for h in range(self.n_heads))
            nodes.append(NodeId.mlp(layer))
        return tuple(nodes)

    @cached_property
    def receivers(self) -> tuple[ReceiverId, ...]:
        out: list[ReceiverId] = []
        for layer in range(self.n_layers):
            for slot in SLOTS:
                out.extend(ReceiverId(NodeId.attention_head(layer, h), slot) for h in range(self.n_heads))
            out.append(ReceiverId(NodeId.mlp(layer)))
        out.append(ReceiverId(NodeId.logits()))
        return tuple(out)

    @cached_property
    def nodes(self) -> tuple[NodeId, ...]:
        """Every node once, in topological order: input, a0.h0.., m0, ..., logits."""
        return self.senders + (NodeId.logits(),)

    @cached_property
    def _sender_index(self) -> dict[NodeId, int]:
        return {node: i for i, node in enumerate(self.senders)}

    @cached_property
    def _receiver_index(self) -> dict[ReceiverId, int]:
        return {rec: i for i, rec in enumerate(self.receivers)}

    def sender_index(self, node: NodeId) -> int:
        try:
            return self._sender_index[node]
        except KeyError:
            where = "not in this graph" if node.kind in (NodeKind.HEAD, NodeKind.MLP) else "not a sender"
            raise IdError(f"{node} is {where} ({self.describe()})") from None

    def receiver_index(self, receiver: ReceiverId) -> int:
        try:
            return self._receiver_index[receiver]
        except KeyError:
            raise IdError(f"{receiver} is not in this graph ({self.describe()})") from None

    @cached_property
    def n_upstream(self) -> tuple[int, ...]:
        """For every receiver, how many senders (a prefix of the sender list) feed it."""
        counts: list[int] = []
        for layer in range(self.n_layers):
            counts.extend([self.attention_upstream(layer)] * (3 * self.n_heads))
            counts.append(self.mlp_upstream(layer))
        counts.append(self.n_senders)
        return tuple(counts)

    @property
    def edge_mask(self) -> torch.Tensor:
        """``[n_senders, n_receivers]`` bool: True where the pair is a real edge (a fresh tensor)."""
        upstream = torch.tensor(self.n_upstream)
        return torch.arange(self.n_senders)[:, None] < upstream[None, :]

    def is_edge(self, sender: int, receiver: int) -> bool:
        return 0 <= sender < self.n_upstream[receiver]

    def edge_index(self, edge: EdgeId) -> tuple[int, int]:
        """(sender index, receiver index) of a real edge; IdError if the pair is not an edge."""
        s = self.sender_index(edge.sender)
        r = self.receiver_index(edge.receiver)
        if not self.is_edge(s, r):
            raise IdError(f"{edge} is not an edge: {edge.sender} is not upstream of {edge.receiver}")
        return s, r

    def edge_id(self, sender: int, receiver: int) -> EdgeId:
        if not self.is_edge(sender, receiver):
            raise IdError(f"({sender}, {receiver}) is not an edge of this graph")
        return EdgeId(self.senders[sender], self.receivers[receiver])

    def edges(self) -> Iterator[EdgeId]:
        """Every real edge, receiver-major in receiver order, senders in topological order."""
        for r, receiver in enumerate(self.receivers):
            for s in range(self.n_upstream[r]):
                yield EdgeId(self.senders[s], receiver)

    def node_layer(self, node: NodeId) -> float:
        """Rank of a node for layouts: input -1, heads l, MLPs l + 0.5, logits L."""
        if node.kind is NodeKind.INPUT:
            return -1.0
        if node.kind is NodeKind.LOGITS:
            return float(self.n_layers)
        assert node.layer is not None
        return node.layer + (0.5 if node.kind is NodeKind.MLP else 0.0)

    def describe(self) -> str:
        kind = "parallel" if self.parallel_residual else "sequential"
        return f"{self.n_layers} layers x {self.n_heads} heads, {kind} blocks"

    def summary(self) -> dict[str, int | bool]:
        """Counts by type, for ``circuits graph``."""
        L, H = self.n_layers, self.n_heads
        return {
            "layers": L,
            "heads": H,
            "parallel_residual": self.parallel_residual,
            "senders": self.n_senders,
            "receivers": self.n_receivers,
            "edges": self.n_edges,
            "head_nodes": L * H,
            "mlp_nodes": L,
            "qkv_receivers": 3 * L * H,
        }
