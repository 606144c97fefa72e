"""Metrics: values, the sign convention (higher = more task behaviour), gradients and errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits.metrics import (
    Metric,
    MetricError,
    available_metrics,
    logits_at,
    make_metric,
    reference_logprobs,
)
from circuits.tasks import make_task

from tests.tasks_fixtures import digit_tokenizer

__all__ = ["digit_tokenizer"]  # fixture used by name

NAMES = ["logit_diff", "prob_diff", "logprob", "kl"]
V = 7


def example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=gen, dtype=torch.float64)  # [N, V]
    answers = torch.tensor([[0, -1], [1, 2], [3, -1]])  # [N, Ka]
    wrongs = torch.tensor([[4, 5, -1], [0, -1, -1], [6, 5, 4]])  # [N, Kw]
    return logits, answers, wrongs


def values(name: str, logits, answers, wrongs, ref=None) -> torch.Tensor:
    return make_metric(name).per_prompt(logits, answers, wrongs, ref)


def test_registry() -> None:
    assert list(available_metrics()) == NAMES
    for name in NAMES:
        m = make_metric(name)
        assert isinstance(m, Metric) and m.name == name
    with pytest.raises(MetricError) as e:
        make_metric("logitdiff")
    assert all(n in str(e.value) for n in NAMES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_metric("kl").name = "x"  # type: ignore[misc]
    assert make_metric("kl").needs_reference and not make_metric("logit_diff").needs_reference


def test_hand_computed_values() -> None:
    logits, answers, wrongs = example()
    p = logits.softmax(-1)
    ld = values("logit_diff", logits, answers, wrongs)
    assert torch.allclose(ld[0], logits[0, 0] - (logits[0, 4] + logits[0, 5]) / 2)
    assert torch.allclose(ld[1], (logits[1, 1] + logits[1, 2]) / 2 - logits[1, 0])
    assert torch.allclose(ld[2], logits[2, 3] - logits[2, [6, 5, 4]].mean())
    pd = values("prob_diff", logits, answers, wrongs)
    assert torch.allclose(pd[1], p[1, 1] + p[1, 2] - p[1, 0])
    lp = values("logprob", logits, answers, wrongs)
    assert torch.allclose(lp[1], torch.log(p[1, 1] + p[1, 2]))
    assert torch.allclose(lp[0], torch.log(p[0, 0]))


def test_kl_is_negative_kl_to_reference() -> None:
    logits, _, _ = example()
    ref_logits = logits + torch.randn(3, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reference_logprobs(ref_logits)
    kl = make_metric("kl").per_prompt(logits, None, None, ref)
    expected = F.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, -expected)
    assert (kl < 0).all()
    # the full model itself scores 0 (the maximum); logits are accepted as the reference too
    assert torch.allclose(
        make_metric("kl").per_prompt(ref_logits, None, None, ref), torch.zeros(3, dtype=torch.float64), atol=1e-12
    )
    assert torch.allclose(make_metric("kl").per_prompt(logits, None, None, ref_logits), kl)


def test_kl_with_zero_probability_reference_tokens() -> None:
    logits = torch.randn(2, V, dtype=torch.float64, requires_grad=True)
    ref = torch.full((2, V), -math.inf, dtype=torch.float64)
    ref[:, :2] = math.log(0.5)
    value = make_metric("kl").mean(logits, None, None, ref)
    expected = -(0.5 * (math.log(0.5) - logits.log_softmax(-1)[:, :2])).sum(-1).mean()
    assert torch.allclose(value, expected)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_more_answer_logit_means_higher_metric(name: str) -> None:
    """The sign convention: pushing the answer up (and the wrong answers down) raises every metric."""
    logits, answers, wrongs = example()
    ref = reference_logprobs(logits + 5 * F.one_hot(answers[:, 0], V))  # the "full model" likes the answers
    boosted = logits + 2 * F.one_hot(answers[:, 0], V) - 2 * F.one_hot(wrongs[:, 0], V)
    before = values(name, logits, answers, wrongs, ref)
    after = values(name, boosted, answers, wrongs, ref)
    assert (after > before).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients(name: str) -> None:
    logits, answers, wrongs = example()
    ref = reference_logprobs(torch.randn(3, V, dtype=torch.float64))
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: make_metric(name)(t, answers, wrongs, ref), (x,))
    assert torch.autograd.gradcheck(lambda t: make_metric(name).per_prompt(t, answers, wrongs, ref), (x,))


@pytest.mark.parametrize("name", NAMES)
def test_leading_batch_dims(name: str) -> None:
    logits, answers, wrongs = example()
    ref = reference_logprobs(torch.randn(3, V, dtype=torch.float64))
    stacked = torch.stack([logits, 2 * logits, logits.flip(-1)])  # [M, N, V]
    out = make_metric(name).per_prompt(stacked, answers, wrongs, ref)
    assert out.shape == (3, 3)
    for m in range(3):
        assert torch.allclose(out[m], values(name, stacked[m], answers, wrongs, ref))
    assert torch.allclose(make_metric(name)(stacked, answers, wrongs, ref), out.mean(-1))


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs(name: str) -> None:
    logits, answers, wrongs = example()
    ref = reference_logprobs(logits + 1)
    out = make_metric(name).per_prompt(logits.to(torch.bfloat16), answers, wrongs, ref)
    assert out.dtype == torch.float32
    assert torch.allclose(
        out.double(), values(name, logits.to(torch.bfloat16).double(), answers, wrongs, ref), atol=1e-4
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_name_the_prompt(name: str, bad: float) -> None:
    logits, answers, wrongs = example()
    ref = reference_logprobs(logits)
    logits = logits.clone()
    logits[1, :] = bad  # every logit of prompt 1
    with pytest.raises(MetricError, match=rf"metric '{name}' is .* for prompt 1\b"):
        values(name, logits, answers, wrongs, ref)
    stacked = torch.stack([example()[0], logits])
    with pytest.raises(MetricError, match=r"prompt 1 \(batch index \(1,\)\)"):
        values(name, stacked, answers, wrongs, ref)


def test_bad_inputs() -> None:
    logits, answers, wrongs = example()
    m = make_metric("logit_diff")
    with pytest.raises(MetricError, match="floating tensor"):
        m(torch.ones(3, V, dtype=torch.long), answers, wrongs)
    with pytest.raises(MetricError, match="floating tensor"):
        m(torch.ones(V), answers, wrongs)
    with pytest.raises(MetricError, match=r"answers must be integer ids \[N=3"):
        m(logits, answers[:2], wrongs)
    with pytest.raises(MetricError, match="outside"):
        m(logits, answers + V, wrongs)
    with pytest.raises(MetricError, match="prompt 2 has no wrongs"):
        m(logits, answers, torch.tensor([[4], [5], [-1]]))
    with pytest.raises(MetricError, match="needs wrongs"):
        m(logits, answers, None)
    with pytest.raises(MetricError, match="needs reference_logprobs"):
        make_metric("kl")(logits, answers, wrongs)
    with pytest.raises(MetricError, match="do not match"):
        make_metric("kl")(logits, answers, wrongs, torch.zeros(2, V))
    # logprob does not use wrong answers, kl uses neither
    make_metric("logprob")(logits, answers, None)
    make_metric("kl")(logits, None, None, logits)


def test_logits_at_reads_one_position_per_prompt() -> None:
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # [N, T, V]
    out = logits_at(logits, torch.tensor([3, 1]))
    assert torch.equal(out, torch.stack([logits[0, 3], logits[1, 1]]))
    with pytest.raises(MetricError):
        logits_at(logits[0], torch.tensor([1]))


def test_metrics_on_a_task(digit_tokenizer) -> None:
    task = make_task("greater-than", digit_tokenizer, n_prompts=6)
    V_tok = len(digit_tokenizer)
    logits = torch.zeros(len(task), task.max_length, V_tok)  # [N, T, V]
    read = logits_at(logits, task.read_positions)
    assert torch.allclose(make_metric("logit_diff")(read, task.answers, task.wrongs), torch.tensor(0.0))
    # putting all the mass on the answer set gives prob_diff 1 and logprob 0
    rows = torch.arange(len(task))
    read = read.clone()
    read[rows[:, None], task.answers.clamp(min=0)] = torch.where(task.answers >= 0, 50.0, 0.0)
    assert torch.allclose(make_metric("prob_diff")(read, task.answers, task.wrongs), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(make_metric("logprob")(read, task.answers, task.wrongs), torch.tensor(0.0), atol=1e-5)


_logits = st.integers(1, 4).flatmap(
    lambda n: st.lists(st.floats(-20, 20), min_size=n * V, max_size=n * V).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(n, V)
    )
)


@settings(max_examples=50, deadline=None)
@given(logits=_logits, ref_logits=_logits, data=st.data())
def test_metric_ranges(logits: torch.Tensor, ref_logits: torch.Tensor, data: st.DataObject) -> None:
    n = logits.shape[0]
    perms = [data.draw(st.permutations(range(V))) for _ in range(n)]
    k = data.draw(st.integers(1, 3))
    answers = torch.tensor([p[:k] for p in perms])
    wrongs = torch.tensor([p[k : k + 2] for p in perms])
    ref = reference_logprobs(ref_logits[:1].expand(n, V))
    ld = values("logit_diff", logits, answers, wrongs)
    assert torch.allclose(values("logit_diff", logits, wrongs, answers), -ld)  # antisymmetric
    pd = values("prob_diff", logits, answers, wrongs)
    assert (pd.abs() <= 1 + 1e-9).all()
    assert torch.allclose(values("prob_diff", logits, wrongs, answers), -pd)
    assert (values("logprob", logits, answers, wrongs) <= 1e-9).all()
    assert (values("kl", logits, answers, wrongs, ref) <= 1e-9).all()
