"""ACDC: the speculative batched search equals the plain sequential algorithm exactly."""

from __future__ import annotations

import pytest
import torch

from circuits.experiment import Experiment
from circuits.methods import acdc as acdc_module
from circuits.methods.acdc import acdc
from circuits.metrics import make_metric
from graphs import runtime as rt
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task


def _experiment(name: str, metric: str = "kl", n: int = 4) -> Experiment:
    spec = build_spec(make_tiny(name))
    return Experiment(spec, random_task(n, 6, seed=5), make_metric(metric), batch_size=2)


def _naive_acdc(exp: Experiment, tau: float) -> torch.Tensor:
    """ACDC written as plainly as possible: one full forward pass per candidate edge."""
    g = exp.spec.graph

    def metric(removed: torch.Tensor) -> float:
        total = 0.0
        for b in exp.batches():
            logits = rt.run(exp.spec, b.clean_ids, mask=removed.float(), ablation=b.ablation,
                            read_positions=b.read_positions).logits
            total += float(b.score(logits).sum())
        return total / exp.n_prompts

    removed = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    current = metric(removed)
    for r in reversed(range(g.n_receivers)):
        node = g.receivers[r].node
        if node.kind.value != "logits":
            u = g.sender_index(node)
            if not (g.edge_mask[u] & ~removed[u]).any():
                removed[: g.n_upstream[r], r] = True
                continue
        for s in reversed(range(g.n_upstream[r])):
            removed[s, r] = True
            value = metric(removed)
            if current - value < tau:
                current = value
            else:
                removed[s, r] = False
    return g.edge_mask & ~removed


@pytest.mark.parametrize("name,tau", [("gpt2-mini", 0.01), ("neox-mini", 0.03), ("gpt2", 0.02)])
def test_speculative_equals_sequential_and_naive(name: str, tau: float) -> None:
    exp = _experiment(name)
    fast = acdc(exp, tau, speculation=4, max_speculation=32)
    sequential = acdc(exp, tau, speculation=1, max_speculation=1)
    assert torch.equal(fast.circuit.in_circuit, sequential.circuit.in_circuit)
    assert torch.allclose(fast.scores.values, sequential.scores.values, atol=1e-6)
    assert fast.passes < sequential.passes
    naive = _naive_acdc(exp, tau)
    assert torch.equal(fast.circuit.in_circuit, naive)
    g = exp.spec.graph
    assert 0 < fast.circuit.n_edges < g.n_edges  # the threshold prunes, but not everything


@pytest.mark.parametrize("name,tau", [("gpt2-mini", 0.01), ("neox-mini", 0.03)])
def test_predicted_keeps_save_passes_and_change_nothing(name: str, tau: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates that a wasted trial showed to matter are predicted kept, so they no longer end a
    batch: fewer passes, the same circuit and scores as without predictions."""
    exp = _experiment(name)
    predicted = acdc(exp, tau)
    monkeypatch.setattr(acdc_module, "_learn_from_wasted", lambda *args: None)
    plain = acdc(exp, tau)
    assert torch.equal(predicted.circuit.in_circuit, plain.circuit.in_circuit)
    assert torch.allclose(predicted.scores.values, plain.scores.values, atol=1e-6)
    assert predicted.passes < plain.passes


def test_acdc_decisions_follow_the_threshold() -> None:
    exp = _experiment("llama-mqa", metric="logit_diff")
    tau = 0.05
    result = acdc(exp, tau)
    kept = result.circuit.in_circuit
    removed = exp.spec.graph.edge_mask & ~kept
    drop = -result.scores.values
    assert (drop[kept] >= tau).all()  # every kept edge was tried and dropped the metric by >= tau
    assert (drop[removed] < tau).all()  # every removed edge dropped it by less
    assert result.metric == pytest.approx(exp.dataset_mean(result.circuit.ablation_mask().float()), abs=1e-5)
    assert result.full_metric == pytest.approx(exp.dataset_mean(None), abs=1e-6)


def test_huge_tau_removes_everything() -> None:
    exp = _experiment("gpt2-mini", metric="logit_diff", n=2)
    loose = acdc(exp, 1e9)
    assert loose.circuit.n_edges == 0
    with pytest.raises(ValueError):
        acdc(exp, -1.0)


@pytest.mark.parametrize("name", ["gpt2-mini", "llama-gqa", "neox-parallel", "mistral-window"])
def test_downstream_trials_equal_full_runs_at_every_pass(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ACDC's trials recompute only what the changed receiver reaches, from base runs it moves from
    receiver to receiver; at every pass of a whole search (two batches, every kind of receiver) the
    trials' metrics must equal those of full runs with the same masks."""
    exp = _experiment(name)
    checked = []
    downstream_trials = acdc_module._DownstreamEvaluator.trials
    plain = acdc_module._Evaluator(exp, 256)

    def compare(self, removed: torch.Tensor, receiver: int, columns: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        got = downstream_trials(self, removed, receiver, columns)
        want = plain.trials(removed, receiver, columns)
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (exp.spec.graph.receivers[receiver], got, want)
        checked.append(receiver)
        return got

    monkeypatch.setattr(acdc_module._DownstreamEvaluator, "trials", compare)
    result = acdc(exp, 0.01)
    assert result.full_metric == pytest.approx(plain.full(), abs=1e-6)
    assert len(set(checked)) > exp.spec.graph.n_layers  # receivers in every layer were tried
    assert 0 < result.circuit.n_edges


@pytest.mark.parametrize("name,cache_floats", [("gemma2", acdc_module.CACHE_FLOATS), ("gpt2-mini", 1)])
def test_full_run_trials_where_downstream_trials_do_not_apply(name: str, cache_floats: int, capsys) -> None:
    """Post-attention norms (a changed head changes its whole layer) and datasets that are not all
    cached use full runs per trial; the circuit is still the naive algorithm's."""
    exp = _experiment(name, n=2)
    evaluator = acdc_module._Evaluator(exp, 256, cache_floats)
    assert not acdc_module._DownstreamEvaluator.fits(exp, evaluator, cache_floats)
    why = acdc_module._DownstreamEvaluator.why_not(exp, evaluator, cache_floats)
    assert why is not None and ("post-attention norms" in why if name == "gemma2" else "GiB" in why)
    result = acdc(exp, 0.02, cache_floats=cache_floats, progress=True)
    assert torch.equal(result.circuit.in_circuit, _naive_acdc(exp, 0.02))
    assert why in capsys.readouterr().err  # the user is told that trials run the whole suffix, and why


def test_default_cache_is_a_quarter_of_the_memory_with_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = acdc_module.memory_limit_bytes()
    assert limit is None or limit > 2**20
    monkeypatch.setattr(acdc_module, "memory_limit_bytes", lambda: None)
    assert acdc_module.default_cache_floats() == acdc_module.CACHE_FLOATS
    monkeypatch.setattr(acdc_module, "memory_limit_bytes", lambda: 2**30)
    assert acdc_module.default_cache_floats() == acdc_module.CACHE_FLOATS
    monkeypatch.setattr(acdc_module, "memory_limit_bytes", lambda: 64 * 2**30)
    assert acdc_module.default_cache_floats() == 2**32  # 16 GiB of float32


def test_acdc_takes_its_default_cache_from_the_machine(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without ``cache_floats`` ACDC asks ``default_cache_floats``: a budget of one float forces the
    full-run trials, which it reports."""
    exp = _experiment("gpt2-mini", n=2)
    fast = acdc(exp, 0.02, progress=True)
    assert "every trial runs" not in capsys.readouterr().err
    monkeypatch.setattr(acdc_module, "default_cache_floats", lambda: 1)
    slow = acdc(exp, 0.02, progress=True)
    assert "every trial runs the model on" in capsys.readouterr().err
    assert torch.equal(slow.circuit.in_circuit, fast.circuit.in_circuit)
