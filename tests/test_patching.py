"""Exact patching methods against oracles: hand-written hooks, direct masked runs, explicit path
patching with the general runtime, and a hand-built model where one path carries the answer."""

from __future__ import annotations

import pytest
import torch

from circuits.experiment import Experiment
from circuits.metrics import make_metric
from circuits.methods.patching import edge_patching, node_patching, path_patching
from graphs import runtime as rt
from graphs.adapters import build_spec
from graphs.ids import NodeId, parse_edge
from tests.conftest import make_tiny, random_task
from tests.hook_oracle import single_edge_logits


def _experiment(name: str = "gpt2", n: int = 5, length: int = 7, metric: str = "logit_diff", **kw) -> Experiment:
    spec = build_spec(make_tiny(name))
    return Experiment(spec, random_task(n, length, seed=3), make_metric(metric), batch_size=kw.pop("batch_size", 2), **kw)


def _mean_metric(exp: Experiment, logits_fn) -> float:
    """Mean over prompts of metric(logits_fn(batch)) computed batch by batch."""
    total = 0.0
    for batch in exp.batches():
        logits = logits_fn(batch)
        total += float(batch.score(logits[torch.arange(batch.size), batch.read_positions]).sum())
    return total / exp.n_prompts


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "gemma3"])
def test_edge_patching_matches_hooks_and_masks(name: str) -> None:
    exp = _experiment(name, metric="logit_diff")
    scores = edge_patching(exp, max_rows=64)
    g = exp.spec.graph
    model = make_tiny(name)
    clean = _mean_metric(exp, lambda b: rt.run(exp.spec, b.clean_ids).logits)
    for text in ("input->a1.h2<k>", "a0.h1->m1" if not g.parallel_residual else "a0.h1->m2", "m1->logits",
                 "a1.h0->a2.h3<q>", "input->m0"):
        edge = parse_edge(text)
        s, r = g.edge_index(edge)
        mask = torch.zeros(g.n_senders, g.n_receivers)
        mask[s, r] = 1
        via_mask = _mean_metric(exp, lambda b: rt.run(exp.spec, b.clean_ids, mask=mask, ablation=b.ablation).logits)
        via_hooks = _mean_metric(exp, lambda b: single_edge_logits(model, b.clean_ids, b.corrupted_ids, edge))
        assert scores[edge] == pytest.approx(via_mask - clean, abs=2e-5)
        assert scores[edge] == pytest.approx(via_hooks - clean, abs=2e-5)
    assert scores.values.abs().max() > 1e-3


def test_edge_patching_with_kl_and_mean_ablation() -> None:
    exp = _experiment("qwen2-bias", metric="kl", ablation="mean")
    scores = edge_patching(exp, max_rows=40)
    g = exp.spec.graph
    assert (scores.values[g.edge_mask] <= 1e-6).all()  # -KL can only drop below the full model's 0
    edge = parse_edge("a0.h2->a2.h5<v>")
    s, r = g.edge_index(edge)
    mask = torch.zeros(g.n_senders, g.n_receivers)
    mask[s, r] = 1
    assert scores[edge] == pytest.approx(exp.dataset_mean(mask) - exp.dataset_mean(None), abs=1e-6)


@pytest.mark.parametrize("mode", ["noising", "denoising"])
def test_node_patching_equals_direct_runs(mode: str) -> None:
    exp = _experiment("llama-mqa")
    g = exp.spec.graph
    scores = node_patching(exp, mode=mode, max_rows=8)
    for node in (NodeId.input(), NodeId.attention_head(0, 3), NodeId.mlp(0), NodeId.attention_head(1, 1)):
        u = g.sender_index(node)
        mask = torch.zeros(g.n_senders, g.n_receivers)
        mask[u] = g.edge_mask[u].float()
        if mode == "noising":
            base = _mean_metric(exp, lambda b: rt.run(exp.spec, b.clean_ids).logits)
            hit = _mean_metric(exp, lambda b: rt.run(exp.spec, b.clean_ids, mask=mask, ablation=b.ablation).logits)
        else:
            base = _mean_metric(exp, lambda b: rt.run(exp.spec, b.corrupted_ids).logits)
            hit = _mean_metric(exp, lambda b: rt.run(
                exp.spec, b.corrupted_ids, mask=mask,
                ablation=rt.AblationValues("clean", rt.sender_outputs(exp.spec, b.clean_ids))).logits)
        assert scores[node] == pytest.approx(hit - base, abs=2e-5)


def test_denoising_needs_resample_ablation() -> None:
    with pytest.raises(ValueError, match="corrupted"):
        node_patching(_experiment(ablation="zero"), mode="denoising")


def _explicit_path_patching(exp: Experiment, sender: int, receivers: list[int]) -> float:
    """Wang et al.'s two runs written with the general runtime: run 1 freezes every other head to
    its clean value (mask rows of all heads, values = clean cache with s's column replaced), records
    the receivers' inputs; run 2 shifts only those receivers to the recorded inputs."""
    spec, g = exp.spec, exp.spec.graph
    heads = [g.head_sender(l, h) for l in range(g.n_layers) for h in range(g.n_heads)]
    total = 0.0
    for b in exp.batches():
        C = rt.sender_outputs(spec, b.clean_ids)
        values = C.clone()
        values[:, :, sender] = (b.ablation.values.expand_as(C))[:, :, sender]
        mask = torch.zeros(g.n_senders, g.n_receivers)
        for u in set(heads) | {sender}:
            mask[u] = g.edge_mask[u].float()
        run1 = rt.run(spec, b.clean_ids, mask=mask, ablation=rt.AblationValues("pp", values), keep_receivers=True)
        clean = rt.run(spec, b.clean_ids, keep_receivers=True)
        got = rt.ReceiverInputs.dense([t.detach() for t in run1.receivers.as_list()])
        ref = rt.ReceiverInputs.dense([t.detach() for t in clean.receivers.as_list()])
        shift = (got - ref)[:, :, receivers]
        run2 = rt.run(spec, b.clean_ids, shifts=rt.ReceiverShifts(torch.tensor(receivers), shift),
                      read_positions=b.read_positions)
        base = b.score(clean.logits[torch.arange(b.size), b.read_positions].detach())
        total += float((b.score(run2.logits) - base).sum())
    return total / exp.n_prompts


@pytest.mark.parametrize("name", ["gpt2", "neox-parallel", "gemma2"])
def test_path_patching_equals_explicit_two_runs(name: str) -> None:
    exp = _experiment(name)
    g = exp.spec.graph
    to_logits = path_patching(exp, max_rows=64)
    q_set = [g.slot_receiver(2, 1, s) for s in (parse_edge("m0->a2.h1<q>").receiver.slot,)] + [g.mlp_receiver(2)]
    to_set = path_patching(exp, receivers=[g.receivers[r] for r in q_set], max_rows=64)
    for node in (NodeId.attention_head(0, 2), NodeId.attention_head(1, 4), NodeId.attention_head(2, 0)):
        s = g.sender_index(node)
        assert to_logits[node] == pytest.approx(_explicit_path_patching(exp, s, [g.logits_receiver]), abs=2e-5)
        assert to_set[node] == pytest.approx(_explicit_path_patching(exp, s, q_set), abs=2e-5)


def test_path_patching_differs_from_edge_patching_through_mlps() -> None:
    exp = _experiment("gpt2")
    edges = edge_patching(exp, max_rows=64)
    paths = path_patching(exp, senders=["m2", "a2.h1"], max_rows=64)
    # an MLP feeding the logits directly has no MLP in between: path = edge
    assert paths["m2"] == pytest.approx(edges["m2->logits"], abs=2e-5)
    # a head of the last layer also reaches the logits through m2: path != edge
    assert abs(paths["a2.h1"] - edges["a2.h1->logits"]) > 1e-4


def test_edge_patching_of_a_subset_equals_the_full_run_there() -> None:
    exp = _experiment("gpt2")
    g = exp.spec.graph
    full = edge_patching(exp, max_rows=64)
    subset = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0)) < 0.2
    part = edge_patching(exp, max_rows=64, edges=subset)
    chosen = subset & g.edge_mask
    assert torch.allclose(part.values[chosen], full.values[chosen], atol=1e-6)
    assert (part.values[~chosen] == 0).all()
