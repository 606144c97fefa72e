"""The exactness contract on the real SmolLM2-135M (installed offline from PyPI). Slow; CI runs it."""

from __future__ import annotations

import pytest
import torch

from graphs import runtime as rt
from graphs.adapters import build_spec
from graphs.ids import parse_edge
from tests.hook_oracle import single_edge_logits

pytestmark = pytest.mark.slow

CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Sarah went to the park, Sarah handed a ball to",
]
CORRUPTED = [
    "When Alice and Bob went to the store, Kate gave a drink to",
    "When Mike and Lisa went to the park, Anna handed a ball to",
]


def _ids(tokenizer, texts: list[str]) -> torch.Tensor:
    rows = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) == 1
    return torch.tensor(rows)


def test_smollm2_shape(smollm2) -> None:
    spec = build_spec(smollm2.model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_model) == (30, 9, 3, 576)
    assert spec.graph.n_edges == 123_211


def test_smollm2_exactness(smollm2) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    spec = build_spec(model)
    clean, corrupted = _ids(tok, CLEAN), _ids(tok, CORRUPTED)
    assert clean.shape == corrupted.shape
    with torch.no_grad():
        hf_clean, hf_corrupted = model(clean).logits, model(corrupted).logits
        ours = rt.run(spec, clean).logits
        values = rt.corrupted_values(spec, corrupted)
        ablated = rt.run(spec, clean, mask=spec.graph.edge_mask, ablation=values).logits
    assert (ours - hf_clean).abs().max().item() <= 1e-4
    assert (ablated - hf_corrupted).abs().max().item() <= 1e-4
    g = spec.graph
    for text in ("a3.h4->a20.h7<k>", "m0->m1", "a29.h8->logits", "input->a12.h2<v>", "a9.h5->a11.h0<q>"):
        s, r = g.edge_index(parse_edge(text))
        mask = torch.zeros(g.n_senders, g.n_receivers)
        mask[s, r] = 1.0
        with torch.no_grad():
            one = rt.run(spec, clean, mask=mask, ablation=values).logits
        hooked = single_edge_logits(model, clean, corrupted, parse_edge(text))
        assert (one - hooked).abs().max().item() <= 1e-4, text
