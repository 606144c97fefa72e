"""Ids: formatting and parsing round-trip, and bad ids give IdError (never another exception)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphs.ids import EdgeId, IdError, NodeId, NodeKind, ReceiverId, Slot, parse_edge, parse_node, parse_receiver

positions = st.none() | st.integers(0, 4096)
layers = st.integers(0, 200)
heads = st.integers(0, 200)

senders = st.one_of(
    st.builds(NodeId.input, positions),
    st.builds(NodeId.attention_head, layers, heads, positions),
    st.builds(NodeId.mlp, layers, positions),
)
receivers = st.one_of(
    st.builds(lambda l, h, s, p: ReceiverId(NodeId.attention_head(l, h, p), s), layers, heads, st.sampled_from(Slot), positions),
    st.builds(lambda l, p: ReceiverId(NodeId.mlp(l, p)), layers, positions),
    st.builds(lambda p: ReceiverId(NodeId.logits(p)), positions),
)


@given(senders)
def test_node_round_trip(node: NodeId) -> None:
    assert parse_node(str(node)) == node


@given(receivers)
def test_receiver_round_trip(rec: ReceiverId) -> None:
    assert parse_receiver(str(rec)) == rec


@given(senders, receivers)
def test_edge_round_trip(s: NodeId, r: ReceiverId) -> None:
    edge = EdgeId(s, r)
    assert parse_edge(str(edge)) == edge


@pytest.mark.parametrize(
    "text,expected",
    [
        ("input", NodeId(NodeKind.INPUT)),
        ("a3.h7", NodeId(NodeKind.HEAD, 3, 7)),
        ("m5", NodeId(NodeKind.MLP, 5)),
        ("logits", NodeId(NodeKind.LOGITS)),
        ("a3.h7@12", NodeId(NodeKind.HEAD, 3, 7, 12)),
    ],
)
def test_known_node_ids(text: str, expected: NodeId) -> None:
    assert parse_node(text) == expected
    assert str(expected) == text


def test_mib_style_edges() -> None:
    e = parse_edge("a0.h1->a3.h2<q>")
    assert e.sender == NodeId.attention_head(0, 1)
    assert e.receiver == ReceiverId(NodeId.attention_head(3, 2), Slot.Q)
    assert str(parse_edge("m2->logits")) == "m2->logits"
    assert str(parse_edge("input->m0")) == "input->m0"


@pytest.mark.parametrize(
    "bad",
    ["", "a3", "h3", "a3.h", "m", "mx", "a-1.h2", "logits<q>", "a3.h7<x>", "m2<q>", "input->", "->m0",
     "logits->m0", "a0.h1->input", "a0.h1->a2.h3", "m1->m2->m3", "a0.h1 ->m1 x", "a1.h1@-3"],
)
def test_bad_ids_raise_id_error(bad: str) -> None:
    for parse in (parse_node, parse_receiver, parse_edge):
        with pytest.raises(IdError):
            parse(bad)


@given(st.text(max_size=40))
def test_arbitrary_text_never_crashes(text: str) -> None:
    for parse in (parse_node, parse_receiver, parse_edge):
        try:
            parse(text)
        except IdError:
            pass


@pytest.mark.parametrize("value", [None, 3, 2.5, b"m0", ["m0"]])
def test_non_strings_raise_id_error(value: object) -> None:
    for parse in (parse_node, parse_receiver, parse_edge):
        with pytest.raises(IdError):
            parse(value)  # type: ignore[arg-type]
