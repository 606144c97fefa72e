"""A tiny model built by hand so that exactly one path carries the answer: every exact method
must return that path.

GPT-2 shape, 2 layers x 2 heads. Queries and keys are zero, so every head attends uniformly and
no q/k edge can matter; every output projection is zero except head a0.h0's; every MLP writes
zero. Clean and corrupted prompts differ only before the last position, so the token at the read
position (and the direct input->logits edge there) is the same. The only way the differing tokens
reach the logits is input -> a0.h0<v> -> (attention mixes positions) -> a0.h0 -> logits.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from circuits.experiment import Experiment
from circuits.metrics import make_metric
from circuits.methods.acdc import acdc
from circuits.methods.patching import edge_patching, path_patching
from circuits.tasks.base import TokenizedTask
from graphs.adapters import build_spec
from graphs.ids import NodeId, parse_edge

TRUE_PATH = {"input->a0.h0<v>", "a0.h0->logits"}


def _one_path_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, initializer_range=0.5)
    model = GPT2LMHeadModel(cfg).eval()
    d, dh = 16, 8
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            block.attn.c_attn.weight[:, : 2 * d] = 0  # queries and keys: uniform attention
            block.attn.c_attn.bias[: 2 * d] = 0
            block.attn.c_proj.bias.zero_()
            if layer == 0:
                block.attn.c_proj.weight[dh:, :] = 0  # only head 0 writes
            else:
                block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    return model


def _task() -> TokenizedTask:
    gen = torch.Generator().manual_seed(1)
    n, T = 6, 5
    clean = torch.randint(0, 50, (n, T), generator=gen)
    corrupted = clean.clone()
    corrupted[:, : T - 1] = torch.randint(0, 50, (n, T - 1), generator=gen)  # same last token
    return TokenizedTask(
        name="one-path",
        clean_ids=clean,
        corrupted_ids=corrupted,
        lengths=torch.full((n,), T),
        answers=torch.full((n, 1), 3),
        wrongs=torch.full((n, 1), 7),
        read_positions=torch.full((n,), T - 1),
    )


def _experiment(metric: str) -> Experiment:
    return Experiment(build_spec(_one_path_model()), _task(), make_metric(metric), batch_size=3)


def test_edge_patching_finds_only_the_path() -> None:
    scores = edge_patching(_experiment("logit_diff"))
    g = scores.graph
    found = {str(e) for e, s in scores.items() if abs(s) > 1e-5}
    assert found == TRUE_PATH
    assert all(abs(scores[e]) > 1e-2 for e in TRUE_PATH)
    assert g.n_edges == 46  # the other 44 edges are all exactly inert


def test_path_patching_finds_only_the_head() -> None:
    scores = path_patching(_experiment("logit_diff"))
    heads = {str(n) for n, s in scores.items() if abs(s) > 1e-5}
    assert heads == {"a0.h0"}
    assert abs(scores[NodeId.attention_head(0, 0)]) > 1e-2


def test_acdc_keeps_only_the_path() -> None:
    result = acdc(_experiment("kl"), tau=1e-4)
    assert {str(e) for e in result.circuit.edges()} == TRUE_PATH
    assert result.circuit.in_circuit[result.circuit.graph.edge_index(parse_edge("a0.h0->logits"))]
