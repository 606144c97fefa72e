"""ComputationGraph: counts (a test of DESIGN.md section 3), index maps, mask and ids agree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig

from graphs.adapters import build_spec
from graphs.graph import ComputationGraph, count_edges
from graphs.ids import IdError, NodeId, parse_edge


def test_gpt2_small_counts() -> None:
    g = ComputationGraph(12, 12)
    assert (g.n_senders, g.n_receivers, g.n_edges) == (157, 445, 32_491)
    assert int(g.edge_mask.sum()) == 32_491


def test_gpt2_small_counts_from_config() -> None:
    cfg = GPT2Config()  # the GPT-2 small config; a meta-device model keeps this cheap
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    g = build_spec(model).graph
    assert (g.n_senders, g.n_receivers, g.n_edges) == (157, 445, 32_491)


def test_parallel_neox_counts() -> None:
    cfg = GPTNeoXConfig(num_hidden_layers=12, num_attention_heads=12, hidden_size=768)
    g = ComputationGraph(cfg.num_hidden_layers, cfg.num_attention_heads, parallel_residual=cfg.use_parallel_residual)
    assert cfg.use_parallel_residual
    assert g.n_edges == 32_347 == int(g.edge_mask.sum())


def test_smollm2_shape_counts() -> None:
    assert ComputationGraph(30, 9).n_edges == 123_211


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.booleans())
def test_closed_form_matches_built_graph(L: int, H: int, parallel: bool) -> None:
    g = ComputationGraph(L, H, parallel)
    formula = sum(3 * H * (1 + l * (H + 1)) + 1 + l * (H + 1) + (0 if parallel else H) for l in range(L)) + 1 + L * (H + 1)
    assert g.n_edges == formula == count_edges(L, H, parallel) == int(g.edge_mask.sum())
    assert sum(1 for _ in g.edges()) == g.n_edges


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.booleans())
def test_indices_and_ids_agree(L: int, H: int, parallel: bool) -> None:
    g = ComputationGraph(L, H, parallel)
    for i, node in enumerate(g.senders):
        assert g.sender_index(node) == i
    for layer in range(L):
        for h in range(H):
            assert g.senders[g.head_sender(layer, h)] == NodeId.attention_head(layer, h)
        assert g.senders[g.mlp_sender(layer)] == NodeId.mlp(layer)
    for j, rec in enumerate(g.receivers):
        assert g.receiver_index(rec) == j
    mask = g.edge_mask
    for edge in g.edges():
        s, r = g.edge_index(edge)
        assert mask[s, r]
        assert parse_edge(str(edge)) == edge
        assert g.edge_id(s, r) == edge


def test_upstream_rules() -> None:
    seq, par = ComputationGraph(3, 2, False), ComputationGraph(3, 2, True)
    for g in (seq, par):
        with pytest.raises(IdError):
            g.edge_index(parse_edge("a1.h0->a1.h1<q>"))  # same layer: not upstream of a query
        with pytest.raises(IdError):
            g.edge_index(parse_edge("m1->a1.h0<k>"))
        with pytest.raises(IdError):
            g.edge_index(parse_edge("a5.h0->logits"))  # not in the graph
        g.edge_index(parse_edge("m2->logits"))
        g.edge_index(parse_edge("m0->a1.h1<v>"))
    seq.edge_index(parse_edge("a1.h0->m1"))
    with pytest.raises(IdError):
        par.edge_index(parse_edge("a1.h0->m1"))


def test_graph_is_immutable() -> None:
    g = ComputationGraph(2, 2)
    with pytest.raises(AttributeError):
        g.n_layers = 3  # type: ignore[misc]
    g.edge_mask[0, 0] = False
    assert bool(g.edge_mask[0, 0])
