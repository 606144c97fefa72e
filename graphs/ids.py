"""Node, receiver-slot and edge ids: the only place they are parsed and formatted.

The textual forms follow the MIB / EAP-IG convention so circuits can be exchanged with that
ecosystem:

    input            the token embedding (times the embedding scale, where a model has one)
    a3.h7            attention head 7 of layer 3 (a sender)
    m5               the MLP of layer 5
    logits           the final residual stream, before the final norm (a receiver)
    a3.h7<q>         the query input slot of head a3.h7 (also <k>, <v>)
    a0.h1->a3.h2<q>  an edge: sender -> receiver slot

Token-position graphs append ``@t`` to a node: ``a3.h7@12``, ``a3.h7@12<q>``, ``m2@4->logits@4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class IdError(ValueError):
    """A string is not a valid node, receiver or edge id."""


class NodeKind(str, Enum):
    INPUT = "input"
    HEAD = "head"
    MLP = "mlp"
    LOGITS = "logits"


class Slot(str, Enum):
    """The three inputs of an attention head; MLPs and logits have a single unnamed input."""

    Q = "q"
    K = "k"
    V = "v"


@dataclass(frozen=True, order=True)
class NodeId:
    """A component of the computation graph: input, head, MLP or logits (optionally at a position)."""

    kind: NodeKind
    layer: int | None = None
    head: int | None = None
    position: int | None = None

    def __post_init__(self) -> None:
        if self.kind is NodeKind.HEAD:
            ok = self.layer is not None and self.head is not None and self.layer >= 0 and self.head >= 0
        elif self.kind is NodeKind.MLP:
            ok = self.layer is not None and self.layer >= 0 and self.head is None
        else:
            ok = self.layer is None and self.head is None
        if not ok or (self.position is not None and self.position < 0):
            raise IdError(f"inconsistent node fields: {self!r}")

    @staticmethod
    def input(position: int | None = None) -> NodeId:
        return NodeId(NodeKind.INPUT, position=position)

    @staticmethod
    def attention_head(layer: int, head: int, position: int | None = None) -> NodeId:
        return NodeId(NodeKind.HEAD, layer, head, position)

    @staticmethod
    def mlp(layer: int, position: int | None = None) -> NodeId:
        return NodeId(NodeKind.MLP, layer, position=position)

    @staticmethod
    def logits(position: int | None = None) -> NodeId:
        return NodeId(NodeKind.LOGITS, position=position)

    def at(self, position: int | None) -> NodeId:
        """The same component at another position (``None`` drops the position)."""
        return NodeId(self.kind, self.layer, self.head, position)

    def __str__(self) -> str:
        if self.kind is NodeKind.INPUT:
            base = "input"
        elif self.kind is NodeKind.LOGITS:
            base = "logits"
        elif self.kind is NodeKind.HEAD:
            base = f"a{self.layer}.h{self.head}"
        else:
            base = f"m{self.layer}"
        return base if self.position is None else f"{base}@{self.position}"


@dataclass(frozen=True, order=True)
class ReceiverId:
    """An input slot of a node: ``<q>/<k>/<v>`` of a head, or the single input of an MLP / logits."""

    node: NodeId
    slot: Slot | None = None

    def __post_init__(self) -> None:
        if self.node.kind is NodeKind.INPUT:
            raise IdError("'input' is not a receiver")
        if (self.node.kind is NodeKind.HEAD) != (self.slot is not None):
            raise IdError(f"heads need a slot <q>/<k>/<v> and other nodes none: {self!r}")

    def at(self, position: int | None) -> ReceiverId:
        """The same slot of the same component at another position (``None`` drops the position)."""
        return ReceiverId(self.node.at(position), self.slot)

    def __str__(self) -> str:
        return str(self.node) if self.slot is None else f"{self.node}<{self.slot.value}>"


@dataclass(frozen=True, order=True)
class EdgeId:
    """A residual-stream edge from a sender node to a receiver slot."""

    sender: NodeId
    receiver: ReceiverId

    def __post_init__(self) -> None:
        if self.sender.kind is NodeKind.LOGITS:
            raise IdError("'logits' is not a sender")

    def at(self, position: int | None) -> EdgeId:
        """The same edge at token ``position`` on both ends (``None``: the non-positional edge)."""
        return EdgeId(self.sender.at(position), self.receiver.at(position))

    @property
    def position(self) -> int | None:
        """The token position of a positional edge, ``None`` for a non-positional one.

        Residual edges only connect equal positions: an edge whose two ends name different
        positions, or a position on one end only, raises IdError."""
        mine, theirs = self.sender.position, self.receiver.node.position
        if mine != theirs:
            raise IdError(
                f"not a residual edge: {self} connects position {mine} to position {theirs} "
                "(positional edges join equal positions; cross-position flow happens inside heads)"
            )
        return mine

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver}"


_NODE_RE = re.compile(r"^(?:(input)|(logits)|a(\d+)\.h(\d+)|m(\d+))(?:@(\d+))?$")
_RECEIVER_RE = re.compile(r"^(?P<node>[^<>]+?)(?:<(?P<slot>[qkv])>)?$")


def parse_node(text: str) -> NodeId:
    """Parse ``input``, ``logits``, ``a3.h7``, ``m5`` (optionally ``@position``)."""
    if not isinstance(text, str):
        raise IdError(f"node id must be a string, got {type(text).__name__}")
    match = _NODE_RE.match(text.strip())
    if match is None:
        raise IdError(f"not a node id: {text!r} (expected input, logits, a<layer>.h<head> or m<layer>)")
    inp, logits, layer, head, mlp_layer, pos = match.groups()
    position = None if pos is None else int(pos)
    if inp:
        return NodeId.input(position)
    if logits:
        return NodeId.logits(position)
    if layer is not None:
        return NodeId.attention_head(int(layer), int(head), position)
    return NodeId.mlp(int(mlp_layer), position)


def parse_receiver(text: str) -> ReceiverId:
    """Parse ``a3.h7<q>``, ``m5``, ``logits`` (optionally with ``@position`` before the slot)."""
    if not isinstance(text, str):
        raise IdError(f"receiver id must be a string, got {type(text).__name__}")
    match = _RECEIVER_RE.match(text.strip())
    if match is None:
        raise IdError(f"not a receiver id: {text!r}")
    node = parse_node(match.group("node"))
    slot = None if match.group("slot") is None else Slot(match.group("slot"))
    try:
        return ReceiverId(node, slot)
    except IdError as err:
        raise IdError(f"not a receiver id: {text!r} ({err})") from None


def parse_edge(text: str) -> EdgeId:
    """Parse ``sender->receiver``, e.g. ``a0.h1->a3.h2<q>`` or ``m2->logits``."""
    if not isinstance(text, str):
        raise IdError(f"edge id must be a string, got {type(text).__name__}")
    parts = text.split("->")
    if len(parts) != 2:
        raise IdError(f"not an edge id: {text!r} (expected 'sender->receiver')")
    sender = parse_node(parts[0])
    receiver = parse_receiver(parts[1])
    try:
        return EdgeId(sender, receiver)
    except IdError as err:
        raise IdError(f"not an edge id: {text!r} ({err})") from None


def parse_positional_edge(text: str) -> tuple[EdgeId, int]:
    """Parse a positional edge ``a0.h1@3->a3.h2@3<q>``: (the non-positional edge, its position).

    Both ends must carry the same ``@t`` (IdError otherwise, naming the text)."""
    edge = parse_edge(text)
    try:
        position = edge.position
    except IdError as err:
        raise IdError(f"{text!r}: {err}") from None
    if position is None:
        raise IdError(f"not a positional edge: {text!r} (expected e.g. 'a0.h1@3->a3.h2@3<q>')")
    return edge.at(None), position


def parse_positional_node(text: str) -> tuple[NodeId, int | None]:
    """Parse ``a3.h7@12`` (or ``a3.h7``): (the non-positional node, its position or None)."""
    node = parse_node(text)
    return node.at(None), node.position


def receiver_of(node: NodeId, slot: Slot | str | None = None) -> ReceiverId:
    """The receiver id of ``node`` (with ``slot`` for heads)."""
    return ReceiverId(node, None if slot is None else Slot(slot))
