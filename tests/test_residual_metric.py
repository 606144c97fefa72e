"""Metrics from the final residual, streamed over vocabulary chunks, must equal the metrics of the
full logits (``circuits.metrics`` on ``runtime.unembed``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from circuits import residual_metric
from circuits.experiment import Experiment
from circuits.metrics import Metric, make_metric
from circuits.residual_metric import ResidualScorer
from graphs import runtime as rt
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task


def _variants(name: str):  # type: ignore[no-untyped-def]
    spec = build_spec(make_tiny(name))
    V = spec.W_U.shape[0]
    yield "plain", spec
    yield "bias", dataclasses.replace(spec, b_U=torch.randn(V, generator=torch.Generator().manual_seed(1)))
    yield "soft-capped", dataclasses.replace(spec, final_softcap=3.0)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gemma2"])
@pytest.mark.parametrize("metric", sorted(residual_metric.SUPPORTED))
@pytest.mark.parametrize("few_rows", [0, 16])
def test_streamed_metrics_equal_the_metrics_of_the_logits(
    name: str, metric: str, few_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several vocabulary chunks (the chunk size is shrunk below the tiny vocabulary) or, for a few
    rows, one product; answer sets with padding and duplicates, an output bias and soft-capping."""
    monkeypatch.setattr(residual_metric, "CHUNK_BYTES", 1)  # chunks of 16 tokens
    monkeypatch.setattr(residual_metric, "FEW_ROWS", few_rows)  # the 12 rows below: chunks, or one product
    for variant, spec in _variants(name):
        exp = Experiment(spec, random_task(4, 6, seed=7), make_metric(metric), batch_size=4)
        batch = next(iter(exp.batches()))
        answers = torch.cat([batch.answers, torch.tensor([[-1], [3], [3], [-1]])], dim=1)  # padding, a duplicate
        batch = dataclasses.replace(batch, answers=answers)
        scorer = ResidualScorer.for_batch(spec, batch)
        assert scorer is not None
        final = 3 * torch.randn(3, batch.size, spec.d_model, generator=torch.Generator().manual_seed(2))  # [K, P, d]
        want = batch.score(rt.unembed(spec, final))  # [K, P]
        got = scorer(final)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (variant, got, want)


def test_other_metrics_have_no_scorer() -> None:
    spec = build_spec(make_tiny("gpt2"))
    custom = Metric("first_logit", "the logit of token 0", lambda x, a, w, r: x[..., 0], False, False)
    exp = Experiment(spec, random_task(2, 5), custom, batch_size=2)
    assert ResidualScorer.for_batch(spec, next(iter(exp.batches()))) is None
