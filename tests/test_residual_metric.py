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
from graphs import ops
from graphs import runtime as rt
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task


def _variants(name: str, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    spec = build_spec(make_tiny(name, dtype=dtype))
    V = spec.W_U.shape[0]
    yield "plain", spec
    yield "bias", dataclasses.replace(spec, b_U=torch.randn(V, generator=torch.Generator().manual_seed(1)).to(dtype))
    yield "soft-capped", dataclasses.replace(spec, final_softcap=3.0)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gemma2"])
@pytest.mark.parametrize("metric", sorted(residual_metric.SUPPORTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_metrics_equal_the_metrics_of_the_logits(
    name: str, metric: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several vocabulary chunks (the chunk size is shrunk below the tiny vocabulary), answer sets
    with padding and duplicates, an output bias and soft-capping; float32 and float64."""
    monkeypatch.setattr(residual_metric, "CHUNK_BYTES", 1)  # chunks of 16 tokens
    for variant, spec in _variants(name, dtype):
        exp = Experiment(spec, random_task(4, 6, seed=7), make_metric(metric), batch_size=4)
        batch = next(iter(exp.batches()))
        answers = torch.cat([batch.answers, torch.tensor([[-1], [3], [3], [-1]])], dim=1)  # padding, a duplicate
        batch = dataclasses.replace(batch, answers=answers)
        scorer = ResidualScorer.for_batch(spec, batch)
        assert scorer is not None
        final = 3 * torch.randn(3, batch.size, spec.d_model, generator=torch.Generator().manual_seed(2)).to(dtype)  # [K, P, d]
        want = batch.score(rt.unembed(spec, final))  # [K, P]
        got = scorer(final)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (variant, got, want)


def test_other_metrics_have_no_scorer() -> None:
    spec = build_spec(make_tiny("gpt2"))
    custom = Metric("first_logit", "the logit of token 0", lambda x, a, w, r: x[..., 0], False, False)
    exp = Experiment(spec, random_task(2, 5), custom, batch_size=2)
    assert ResidualScorer.for_batch(spec, next(iter(exp.batches()))) is None


def test_half_precision_products_stay_in_torch() -> None:
    """numpy has no bfloat16: such products run in torch, with the same values."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    W = torch.randn(8, 40, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(residual_metric._product(x, W), x @ W, atol=1e-5)
    half = residual_metric._product(x.bfloat16(), W.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), (x.bfloat16() @ W.bfloat16()).float())


@pytest.mark.parametrize("metric", sorted(residual_metric.SUPPORTED))
def test_half_precision_models_are_scored_in_float32(metric: str) -> None:
    """A bfloat16 model's residuals are normed in its own precision, then unembedded and scored in
    float32 (as ``circuits.metrics`` scores half-precision logits in float32): the full model's own
    clean residual scores -KL = 0, never above."""
    spec = build_spec(make_tiny("gpt2", dtype=torch.bfloat16))
    exp = Experiment(spec, random_task(4, 6, seed=8), make_metric(metric), batch_size=4)
    batch = next(iter(exp.batches()))
    scorer = ResidualScorer.for_batch(spec, batch)
    assert scorer is not None
    final = (3 * torch.randn(2, batch.size, spec.d_model, generator=torch.Generator().manual_seed(5))).bfloat16()
    got = scorer(final)
    assert got.dtype == torch.float32
    normed = ops.apply_norm(spec.final_norm, final).float()
    want = batch.score(torch.nn.functional.linear(normed, spec.W_U.float()))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got, want)
    if metric == "kl":
        with torch.no_grad():
            clean = rt.run(spec, batch.clean_ids, keep_resid=True)
        assert clean.resid is not None
        own = clean.resid[-1][torch.arange(batch.size), batch.read_positions]  # [P, d]
        value = scorer(own[None])
        assert float(value.abs().max()) < 1e-3 and float(value.max()) < 1e-6


def test_numpy_blas_follows_torch_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk products run in numpy's BLAS with torch's thread count, whatever BLAS's own default."""
    from threadpoolctl import threadpool_info

    seen: list[int] = []
    product = residual_metric._product

    def spy(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        seen.extend(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
        return product(x, W)

    monkeypatch.setattr(residual_metric, "_product", spy)
    spec = build_spec(make_tiny("gpt2"))
    exp = Experiment(spec, random_task(2, 5, seed=9), make_metric("kl"), batch_size=2)
    scorer = ResidualScorer.for_batch(spec, next(iter(exp.batches())))
    assert scorer is not None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        scorer(torch.randn(3, 2, spec.d_model))
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
