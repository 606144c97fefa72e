"""Faithfulness (against a hand-written oracle), batched evaluation, curves, random baselines, ROC."""

from __future__ import annotations

import itertools

import pytest
import torch

from circuits import evaluate as ev
from circuits.evaluate import (
    Baseline,
    Curve,
    EvaluationError,
    faithfulness,
    reference_metrics,
)
from circuits.experiment import Experiment
from circuits.metrics import make_metric, reference_logprobs
from circuits.prune import greedy, top_n
from graphs import runtime as rt
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import parse_edge
from graphs.scores import EdgeScores
from tests.tiny_tasks import experiment, random_scores, random_task, tiny_spec


@pytest.fixture(scope="module")
def spec():
    return tiny_spec("gpt2")


@pytest.fixture(scope="module")
def ex(spec) -> Experiment:
    return experiment(spec, n=8, batch_size=3)


@pytest.fixture(scope="module")
def base(ex: Experiment) -> Baseline:
    return reference_metrics(ex)


def random_circuit(graph: ComputationGraph, density: float, seed: int) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    return Circuit(graph, (torch.rand(graph.n_senders, graph.n_receivers, generator=gen) < density) & graph.edge_mask)


# --------------------------------------------------------------------------- faithfulness


@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
@pytest.mark.parametrize("ablation", ["corrupted", "mean"])
def test_full_is_one_and_empty_is_zero(spec, metric: str, ablation: str) -> None:
    e = experiment(spec, metric, ablation, n=6, batch_size=4)
    b = reference_metrics(e)
    full = faithfulness(e, Circuit.full(spec.graph), b)
    empty = faithfulness(e, Circuit.empty(spec.graph), b)
    assert full.value == pytest.approx(1.0, abs=1e-5)
    assert empty.value == pytest.approx(0.0, abs=1e-5)
    assert (full.n_edges, empty.n_edges) == (spec.graph.n_edges, 0)
    if metric == "kl":
        assert abs(b.m_full) < 1e-5 and b.m_empty < 0  # -KL: 0 for the model, below for ablations
    # the batched path (several masks per pass) agrees
    masks = torch.stack([torch.zeros_like(spec.graph.edge_mask), spec.graph.edge_mask])
    means = ev.masks_metric(e, masks)
    assert [b.normalise(float(m)) for m in means] == pytest.approx([1.0, 0.0], abs=1e-5)


def _oracle(spec, task, metric_name: str, ablation: str, ablate: torch.Tensor | None) -> float:
    """Dataset-mean metric by hand: one run of the whole (padded) task with runtime.run."""
    metric = make_metric(metric_name)
    if ablation == "corrupted":
        values = rt.corrupted_values(spec, task.corrupted_ids)
    else:
        values = rt.mean_values(spec, task.clean_ids, task.lengths)
    with torch.no_grad():
        clean = rt.run(spec, task.clean_ids, read_positions=task.read_positions).logits
        logits = rt.run(
            spec,
            task.clean_ids,
            mask=ablate,
            ablation=None if ablate is None else values,
            read_positions=task.read_positions,
        ).logits  # [N, V]
    ref = reference_logprobs(clean) if metric.needs_reference else None
    return float(metric.per_prompt(logits, task.answers, task.wrongs, ref).double().mean())


@pytest.mark.parametrize(("metric", "ablation"), [("logit_diff", "corrupted"), ("kl", "mean"), ("prob_diff", "corrupted")])
def test_faithfulness_equals_hand_computation(spec, metric: str, ablation: str) -> None:
    task = random_task(7, 7, seed=4)
    e = Experiment(spec, task, metric, ablation=ablation, batch_size=3)  # 3 + 3 + 1: trimmed batches
    circuit = random_circuit(spec.graph, 0.4, seed=2)
    got = faithfulness(e, circuit)
    m_full = _oracle(spec, task, metric, ablation, None)
    m_empty = _oracle(spec, task, metric, ablation, spec.graph.edge_mask)
    m_c = _oracle(spec, task, metric, ablation, circuit.ablation_mask())
    assert got.m_full == pytest.approx(m_full, abs=1e-5)
    assert got.m_empty == pytest.approx(m_empty, abs=1e-5)
    assert got.m_circuit == pytest.approx(m_c, abs=1e-5)
    assert got.value == pytest.approx((m_c - m_empty) / (m_full - m_empty), abs=1e-4)
    assert got.n_edges == circuit.n_edges


def test_masked_metrics_equal_separate_runs(spec, ex: Experiment) -> None:
    g = spec.graph
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(4, g.n_senders, g.n_receivers, generator=gen) < 0.3  # [K, S, R]
    batch = next(ex.batches())
    together = ex.masked_metrics(batch, masks)  # [K, B]
    separate = torch.stack([ex.masked_metric(batch, m) for m in masks])
    assert together.shape == (4, batch.size)
    assert torch.allclose(together, separate, atol=1e-5)
    # dataset means, chunked into one mask per pass, equal the experiment's own dataset means
    means = ev.masks_metric(ex, masks, max_floats=1)
    assert means.tolist() == pytest.approx([ex.dataset_mean(m) for m in masks], abs=1e-5)


def test_baseline_reuse_and_checks(spec, ex: Experiment, base: Baseline) -> None:
    c = random_circuit(spec.graph, 0.5, seed=1)
    assert faithfulness(ex, c, base) == faithfulness(ex, c)
    other = experiment(spec, "kl", n=8)
    with pytest.raises(EvaluationError, match="baseline was computed for"):
        faithfulness(other, c, base)
    with pytest.raises(EvaluationError, match="different graph|graph of"):
        faithfulness(ex, Circuit.full(ComputationGraph(1, 1)), base)


def test_degenerate_task_is_refused(spec) -> None:
    task = random_task(4, 7, seed=0)
    same = Experiment(
        spec,
        type(task)(task.name, task.clean_ids, task.clean_ids, task.lengths, task.answers, task.wrongs, task.read_positions),
        "logit_diff",
    )  # corrupted == clean: ablating with corrupted values changes nothing
    with pytest.raises(EvaluationError, match="does not separate clean and ablated behaviour"):
        reference_metrics(same)


# --------------------------------------------------------------------------- curves


def test_cpr_and_cmd_are_trapezoids() -> None:
    c = Curve((0.1, 0.5, 1.0), (1, 5, 10), (0.2, 1.3, 1.0), graph_edges=10)
    assert c.cpr == pytest.approx(0.4 * (0.2 + 1.3) / 2 + 0.5 * (1.3 + 1.0) / 2)
    assert c.cmd == pytest.approx(0.4 * (0.8 + 0.3) / 2 + 0.5 * (0.3 + 0.0) / 2)
    assert c.x_range == pytest.approx(0.9)
    assert c.cpr_normalised == pytest.approx(c.cpr / 0.9)
    assert c.cmd_normalised == pytest.approx(c.cmd / 0.9)
    perfect = Curve((0.25, 1.0), (1, 4), (1.0, 1.0), graph_edges=4)
    assert (perfect.cpr, perfect.cmd, perfect.cpr_normalised) == (0.75, 0.0, 1.0)


@pytest.mark.parametrize("selection", ["top-n", "greedy"])
def test_faithfulness_curve_matches_single_circuits(spec, ex: Experiment, base: Baseline, selection: str) -> None:
    scores = random_scores(spec.graph, 7)
    fractions = (0.005, 0.01, 0.05, 0.3, 1.0)
    curve = ev.faithfulness_curve(ex, scores, fractions, selection=selection, baseline=base)
    E = spec.graph.n_edges
    ns = [max(1, round(f * E)) for f in fractions]
    assert curve.n_edges == tuple(ns) and curve.graph_edges == E and curve.fractions == fractions
    assert curve.values[-1] == pytest.approx(1.0, abs=1e-6)  # fraction 1.0 is the full graph
    pick = top_n if selection == "top-n" else greedy
    for n, value in zip(ns, curve.values, strict=True):
        assert value == pytest.approx(faithfulness(ex, pick(scores, n), base).value, abs=1e-4)


def test_curve_fractions_are_checked(spec, ex: Experiment, base: Baseline) -> None:
    s = random_scores(spec.graph)
    for bad in ((0.5,), (0.5, 0.2), (0.0, 1.0), (0.5, 1.5)):
        with pytest.raises(EvaluationError, match="fraction"):
            ev.faithfulness_curve(ex, s, bad, baseline=base)


def test_default_fractions() -> None:
    assert ev.EDGE_FRACTIONS == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert ev.edge_counts(ev.EDGE_FRACTIONS, 370) == [1, 1, 2, 4, 7, 18, 37, 74, 185, 370]


# --------------------------------------------------------------------------- random baselines


def test_random_baseline_is_seeded_and_matches_single_evaluations(spec, ex: Experiment, base: Baseline) -> None:
    rb = ev.random_baseline(ex, 50, samples=3, seed=11, baseline=base)
    assert len(rb.values) == 3 and rb.n_edges == 50
    assert rb.mean == pytest.approx(sum(rb.values) / 3)
    assert rb.std == pytest.approx(float(torch.tensor(rb.values).std()))
    assert ev.random_baseline(ex, 50, samples=3, seed=11, baseline=base).values == rb.values
    # the same draws, made by hand, evaluated one at a time
    order = ev._random_orders(spec.graph, 3, 11)
    for o, value in zip(order, rb.values, strict=True):
        c = Circuit(spec.graph, ev._prefix_mask(spec.graph, o, 50))
        assert c.n_edges == 50
        assert value == pytest.approx(faithfulness(ex, c, base).value, abs=1e-4)
    assert ev.random_baseline(ex, spec.graph.n_edges, samples=2, baseline=base).values == (1.0, 1.0)
    with pytest.raises(EvaluationError, match="samples"):
        ev.random_baseline(ex, 5, samples=0, baseline=base)
    with pytest.raises(EvaluationError, match="n_edges"):
        ev.random_baseline(ex, spec.graph.n_edges + 1, baseline=base)


def test_random_curve(ex: Experiment, base: Baseline) -> None:
    rc = ev.random_curve(ex, (0.1, 0.5, 1.0), samples=2, seed=3, baseline=base)
    assert len(rc.curves) == 2 and rc.fractions == (0.1, 0.5, 1.0)
    assert rc.mean[-1] == 1.0 and rc.std[-1] == 0.0
    assert rc.cpr[0] == pytest.approx(sum(c.cpr for c in rc.curves) / 2)
    assert rc.cmd[0] == pytest.approx(sum(c.cmd for c in rc.curves) / 2)
    # nested: each sample's circuits are prefixes of one random ordering
    first = ev.random_baseline(ex, rc.curves[0].n_edges[0], samples=1, seed=3, baseline=base)
    assert first.values[0] == pytest.approx(rc.curves[0].values[0], abs=1e-4)


# --------------------------------------------------------------------------- ROC / AUC

SMALL = ComputationGraph(1, 1)  # 8 edges


def _scores(graph: ComputationGraph, flat: list[float]) -> EdgeScores:
    """Scores from a list in graph edge order."""
    values = torch.zeros(graph.n_senders, graph.n_receivers)
    for edge, x in zip(graph.edges(), flat, strict=True):
        values[graph.edge_index(edge)] = x
    return EdgeScores(graph, values)


def _pair_auc(keys: list[float], labels: list[bool]) -> float:
    pos = [k for k, y in zip(keys, labels, strict=True) if y]
    neg = [k for k, y in zip(keys, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_perfect_reversed_and_hand_example() -> None:
    edges = list(SMALL.edges())
    ref = Circuit.from_edges(SMALL, [edges[1], edges[4], edges[6]])
    labels = [i in (1, 4, 6) for i in range(8)]
    perfect = _scores(SMALL, [float(y) for y in labels])
    assert ev.roc_auc(perfect, ref) == 1.0
    assert ev.roc_auc(_scores(SMALL, [-float(y) + 2 for y in labels]), ref) == 0.0
    # ties and signs: |score| ranks by default
    flat = [0.5, -2.0, 0.5, 0.1, 0.5, 3.0, -0.1, 0.0]
    s = _scores(SMALL, flat)
    assert ev.roc_auc(s, ref) == pytest.approx(_pair_auc([abs(x) for x in flat], labels))
    assert ev.roc_auc(s, ref, absolute=False) == pytest.approx(_pair_auc(flat, labels))
    # by hand: positives |.| = 2.0, 0.5, 0.1 ; negatives 0.5, 0.5, 0.1, 3.0, 0.0
    assert ev.roc_auc(s, ref) == pytest.approx((3 + 0.5 + 2 + 1 + 0.5 + 0.5 + 1) / 15)


def test_auc_of_random_scores_is_the_pair_count() -> None:
    g = ComputationGraph(2, 3)
    s = random_scores(g, 9)
    ref = random_circuit(g, 0.3, seed=9)
    keys = s.values.abs().T[g.edge_mask.T].tolist()
    labels = ref.in_circuit.T[g.edge_mask.T].tolist()
    auc = ev.roc_auc(s, ref)
    assert auc == pytest.approx(_pair_auc(keys, labels), abs=1e-12)
    assert 0.35 < auc < 0.65
    roc = ev.roc_curve(s, ref)
    area = sum((roc.fpr[i + 1] - roc.fpr[i]) * (roc.tpr[i + 1] + roc.tpr[i]) / 2 for i in range(len(roc.fpr) - 1))
    assert area == pytest.approx(auc, abs=1e-12) and roc.auc == auc
    assert (roc.fpr[0], roc.tpr[0], roc.fpr[-1], roc.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert roc.n_positive == sum(labels) and roc.n_negative == len(labels) - sum(labels)


def test_roc_curve_with_ties_steps_diagonally() -> None:
    edges = list(SMALL.edges())
    ref = Circuit.from_edges(SMALL, [edges[0], edges[1]])
    s = _scores(SMALL, [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    roc = ev.roc_curve(s, ref)
    assert roc.thresholds == (float("inf"), 1.0, 0.5, 0.0)
    assert roc.tpr == (0.0, 0.5, 1.0, 1.0)
    assert roc.fpr == pytest.approx((0.0, 0.0, 1 / 6, 1.0))
    assert roc.auc == pytest.approx(1 - 0.5 * (1 / 6) * 0.5)


def test_node_level_auc_uses_max_outgoing_score() -> None:
    g = ComputationGraph(2, 1)  # senders: input, a0.h0, m0, a1.h0, m1
    values = torch.zeros(g.n_senders, g.n_receivers)
    for edge, x in {"a0.h0->logits": 0.2, "a0.h0->m1": -0.9, "m0->logits": 0.5, "input->m0": 0.1, "m1->logits": 0.05}.items():
        values[g.edge_index(parse_edge(edge))] = x
    s = EdgeScores(g, values)
    ref = Circuit.from_edges(g, ["a0.h0->m1", "m1->logits"])  # nodes a0.h0, m1 (and logits, not ranked)
    # node keys: input 0.1, a0.h0 0.9, m0 0.5, a1.h0 0, m1 0.05 ; positives a0.h0, m1
    assert ev.roc_auc(s, ref, level="node") == pytest.approx(_pair_auc([0.1, 0.9, 0.5, 0.0, 0.05], [False, True, False, False, True]))
    assert ev.roc_auc(s, ref, level="node", absolute=False) == pytest.approx(
        _pair_auc([0.1, 0.2, 0.5, 0.0, 0.05], [False, True, False, False, True])
    )


def test_roc_needs_both_classes() -> None:
    s = random_scores(SMALL)
    with pytest.raises(EvaluationError, match="no positives"):
        ev.roc_auc(s, Circuit.empty(SMALL))
    with pytest.raises(EvaluationError, match="no negatives"):
        ev.roc_auc(s, Circuit.full(SMALL))
    with pytest.raises(EvaluationError, match="no negatives"):
        ev.roc_auc(s, Circuit.full(SMALL), level="node")
    with pytest.raises(EvaluationError, match="level"):
        ev.roc_auc(s, Circuit.full(SMALL), level="head")
