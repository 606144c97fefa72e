"""Ground truth: every method must recover the known circuits of the models in ``groundtruth/``.

Two shipped GPT-2-shaped models whose edge-level circuits are known (groundtruth/README.md):

* ``induction-2l``: a trained 2-layer attention-only induction model; ground truth (17 of 110 edges)
  established from attention patterns, head ablations and exact edge patching.
* ``lookup-2l``: a hand-built key-value lookup with Q- and K-composition and an MLP; ground truth
  (7 of 110 edges) known by construction and checked here to be exactly the nonzero set of edge
  patching.

For every method the edge-level ROC AUC of its scores against the ground truth is printed as a
table (``pytest -s``) and held to a bar set from the measured values (see ``BARS``), so a regression
in a method - or in the runtime under it - shows up as a failing bar.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from circuits.evaluate import Baseline, faithfulness, reference_metrics, roc_auc
from circuits.experiment import Experiment
from circuits.methods.acdc import ACDCResult, acdc
from circuits.methods.eap import atp_star, eap, eap_ig
from circuits.methods.patching import edge_patching
from graphs.circuit import Circuit
from graphs.scores import EdgeScores
from groundtruth.build_lookup import build as build_lookup
from groundtruth.establish_induction import (
    THRESHOLD_PERCENT,
    ablated_accuracy,
    attention_scores,
    held_out,
)
from groundtruth.known import (
    INDUCTION,
    INDUCTION_HEADS,
    KNOWN,
    LOOKUP,
    PREVIOUS_TOKEN_HEAD,
)

try:  # CD-T lives in its own package; test it when it is there
    from circuits.methods.cdt import cdt_edge_scores

    HAVE_CDT = True
except ImportError:  # pragma: no cover - depends on the checkout
    HAVE_CDT = False

MODELS = ("induction-2l", "lookup-2l")

METHODS: dict[str, Callable[[Experiment], EdgeScores]] = {
    "edge-patching": edge_patching,
    "eap": eap,
    "eap-ig-inputs": lambda e: eap_ig(e, steps=5, variant="inputs"),
    "eap-ig-activations": lambda e: eap_ig(e, steps=5, variant="activations"),
    "atp*": atp_star,
}
if HAVE_CDT:
    METHODS["cdt"] = lambda e: cdt_edge_scores(e, mode="projected")
    METHODS["cdt-exact"] = lambda e: cdt_edge_scores(e, mode="exact")

# Minimum edge-level AUC per model and method, set from the measured values (groundtruth/README.md
# has the table) with a small margin. Exact methods must rank every true edge above every other
# edge (AUC 1). The gradient methods linearise the attention softmax: on the trained induction model
# the induction heads' attention is saturated, so EAP and EAP-IG (inputs) score the query and key
# edges of those heads near zero (measured 0.887 and 0.920); AtP*'s QK fix recovers them (0.982).
BARS: dict[str, dict[str, float]] = {
    "induction-2l": {
        "edge-patching": 0.999,
        "eap": 0.85,
        "eap-ig-inputs": 0.88,
        "eap-ig-activations": 0.98,
        "atp*": 0.95,
        "cdt": 0.98,
        "cdt-exact": 0.98,
        "acdc": 0.999,
    },
    "lookup-2l": {
        "edge-patching": 0.999,
        "eap": 0.98,
        "eap-ig-inputs": 0.99,
        "eap-ig-activations": 0.99,
        "atp*": 0.98,
        "cdt": 0.99,
        "cdt-exact": 0.99,
        "acdc": 0.999,
    },
}

# ACDC runs on the task's logit difference (the metric every other method scores) with tau = 0.3 %
# of m(full) - m(empty): on induction-2l that is ~0.10 logits, between the smallest true edge's
# exact effect (~0.37) and the largest other edge's (~0.13). ACDC's default KL metric saturates on
# this very confident model: at tau = 1e-4 it drops the weakest of the four redundant induction heads
# (README); the lookup model is also checked with KL at a tau far below its true edges' effects.
ACDC_TAU_FRACTION = 0.003
ACDC_KL_TAU = 1e-3


@functools.cache
def _setup(name: str) -> tuple[Experiment, Circuit, Baseline]:
    known = KNOWN[name]
    experiment = known.experiment()
    return experiment, known.circuit(experiment.spec.graph), reference_metrics(experiment)


@functools.cache
def _scores(name: str, method: str) -> EdgeScores:
    return METHODS[method](_setup(name)[0])


@functools.cache
def _acdc(name: str, metric: str = "logit_diff") -> ACDCResult:
    experiment, _, base = _setup(name)
    if metric == "kl":
        return acdc(KNOWN[name].experiment(metric="kl"), tau=ACDC_KL_TAU)
    return acdc(experiment, tau=ACDC_TAU_FRACTION * base.span)


# --------------------------------------------------------------------------- the models themselves


def test_lookup_shipped_weights_are_the_construction() -> None:
    shipped = LOOKUP.load().state_dict()
    built = build_lookup().state_dict()
    assert shipped.keys() == built.keys()
    for key in shipped:
        assert torch.equal(shipped[key], built[key]), key


def test_lookup_edge_patching_is_nonzero_exactly_on_the_truth() -> None:
    scores = _scores("lookup-2l", "edge-patching")
    nonzero = {str(e) for e, s in scores.items() if abs(s) > 1e-4}
    assert nonzero == set(LOOKUP.edges)
    assert min(abs(scores[e]) for e in LOOKUP.edges) > 5.0  # logits; the task's span is ~20
    assert max(abs(s) for e, s in scores.items() if str(e) not in LOOKUP.edges) < 1e-5


def test_induction_model_is_attention_only_and_its_heads_do_induction() -> None:
    model = INDUCTION.load()
    for block in model.transformer.h:
        assert all(bool((p == 0).all()) for p in block.mlp.parameters())
    spec = _setup("induction-2l")[0].spec
    ids, induced = held_out(256)
    scores = attention_scores(spec, ids, induced)
    assert scores[f"a0.h{PREVIOUS_TOKEN_HEAD}"][0] > 0.9  # attends to t-1
    assert all(scores[f"a1.h{h}"][1] > 0.9 for h in INDUCTION_HEADS)  # attend to the token after the match
    assert ablated_accuracy(spec, ids, induced, []) > 0.99
    assert ablated_accuracy(spec, ids, induced, [f"a0.h{PREVIOUS_TOKEN_HEAD}"]) < 0.3
    assert ablated_accuracy(spec, ids, induced, [f"a1.h{h}" for h in INDUCTION_HEADS]) < 0.05
    others = [f"a0.h{h}" for h in range(spec.n_heads) if h != PREVIOUS_TOKEN_HEAD]
    assert ablated_accuracy(spec, ids, induced, others) > 0.98


def test_induction_truth_is_the_thresholded_edge_patching() -> None:
    """The ground truth is the edge set whose exact effect is >= 0.6 % of the full effect, with room."""
    scores = _scores("induction-2l", "edge-patching")
    span = _setup("induction-2l")[2].span
    percent = {str(e): 100 * abs(s) / span for e, s in scores.items()}
    assert {e for e, p in percent.items() if p >= THRESHOLD_PERCENT} == set(INDUCTION.edges)
    inside = min(percent[e] for e in INDUCTION.edges)
    outside = max(p for e, p in percent.items() if e not in INDUCTION.edges)
    assert inside > 1.5 * THRESHOLD_PERCENT and outside < THRESHOLD_PERCENT / 1.5, (inside, outside)


@pytest.mark.parametrize("name", MODELS)
def test_truth_is_faithful_and_its_complement_is_not(name: str) -> None:
    experiment, truth, base = _setup(name)
    complement = Circuit(truth.graph, truth.graph.edge_mask & ~truth.in_circuit)
    assert faithfulness(experiment, truth, base).value > 0.98
    assert abs(faithfulness(experiment, complement, base).value) < 0.02


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("name", MODELS)
def test_every_method_recovers_the_truth(name: str) -> None:
    _, truth, _ = _setup(name)
    aucs = {method: roc_auc(_scores(name, method), truth) for method in METHODS}
    aucs["acdc"] = roc_auc(_acdc(name).scores, truth)
    g = truth.graph
    print(f"\n{name}: edge-level ROC AUC against the ground truth ({truth.n_edges} of {g.n_edges} edges)")
    print(f"  {'method':20s} {'AUC':>7s} {'bar':>7s}")
    for method, auc in aucs.items():
        print(f"  {method:20s} {auc:7.4f} {BARS[name][method]:7.3f}")
    failed = {m: round(a, 4) for m, a in aucs.items() if a < BARS[name][m]}
    assert not failed, f"below the bar on {name}: {failed}"


@pytest.mark.parametrize("name", MODELS)
def test_acdc_keeps_the_truth(name: str) -> None:
    result = _acdc(name)
    kept = {str(e) for e in result.circuit.edges()}
    assert set(KNOWN[name].edges) <= kept, sorted(set(KNOWN[name].edges) - kept)
    assert len(kept) <= len(KNOWN[name].edges) + 3  # and little else


def test_acdc_with_kl_keeps_the_lookup_truth() -> None:
    kept = {str(e) for e in _acdc("lookup-2l", "kl").circuit.edges()}
    assert kept == set(LOOKUP.edges)


@pytest.mark.parametrize("name", MODELS)
def test_the_bars_reject_uninformative_scores(name: str) -> None:
    """The bars can fail: the exact scores shuffled over the edges (seeded) rank far below every bar."""
    _, truth, _ = _setup(name)
    exact = _scores(name, "edge-patching")
    real = exact.graph.edge_mask
    values = exact.values.clone()
    flat = values[real]
    values[real] = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))]
    assert roc_auc(exact.with_values(values), truth) < min(BARS[name].values()) - 0.1
