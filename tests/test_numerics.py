"""Numerical hygiene: half-precision models give float32 scores close to float32 ones, and a NaN
or infinity (in the logits or in a gradient) stops every method with an error naming the prompt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from circuits.distributed import Shard, ShardedExperiment
from circuits.experiment import Experiment
from circuits.methods import eap as eap_module
from circuits.methods.acdc import acdc
from circuits.methods.eap import atp_star, eap, eap_ig
from circuits.methods.patching import edge_patching, node_patching, path_patching
from circuits.metrics import MetricError
from circuits.numerics import NumericalError, wide
from graphs import ops
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task


# ----------------------------------------------------------------------------- half precision
def _pair(method: Callable[[Experiment], Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    task = random_task(6, 7, seed=2)
    half = method(Experiment(build_spec(make_tiny("gpt2", dtype=torch.bfloat16)), task, "logit_diff", batch_size=3))
    full = method(Experiment(build_spec(make_tiny("gpt2")), task, "logit_diff", batch_size=3))
    mask = full.graph.edge_mask
    return half.values, full.values, mask


@pytest.mark.parametrize("name,method,tolerance", [
    ("eap", eap, 0.05),  # measured ~1 % relative error
    ("edge-patching", lambda e: edge_patching(e, max_rows=128), 0.25),  # differences of metrics: ~8 %
])
def test_bfloat16_scores_are_float32_and_close_to_float32_ones(name: str, method: Any, tolerance: float) -> None:
    half, full, mask = _pair(method)
    assert half.dtype == torch.float32 and full.dtype == torch.float32
    err = float((half - full)[mask].norm() / full[mask].norm())
    r = float(torch.corrcoef(torch.stack((half[mask], full[mask])))[0, 1])
    print(f"{name}: bf16 vs fp32 relative error {err:.3f}, correlation {r:.4f}")
    assert err < tolerance and r > 0.97


def test_half_products_are_accumulated_in_float32() -> None:
    rows = torch.randn(5, 2 * 3 * 8).bfloat16()
    grad = torch.randn(2, 3, 4, 8).bfloat16()
    block = eap_module._block_scores(wide(rows), grad, 5)
    assert block.dtype == torch.float32
    exact = wide(rows).double() @ grad.double().permute(0, 1, 3, 2).reshape(-1, 4)
    assert torch.allclose(block.double(), exact, rtol=1e-5, atol=1e-5)
    assert wide(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
    assert wide(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    rows_out = torch.zeros(3, 2 * 5 * 4, dtype=wide(torch.zeros(1, dtype=torch.bfloat16)).dtype)
    eap_module._fill_rows(rows_out, torch.zeros(1, 1, 3, 4, dtype=torch.bfloat16), 1, torch.ones(2, 5, 2, 4).bfloat16())
    assert rows_out.dtype == torch.float32
    assert torch.equal(rows_out[0], torch.zeros(40)) and torch.equal(rows_out[1:], -torch.ones(2, 40))


# ----------------------------------------------------------------------------- NaN logits
BAD_PROMPT = 4  # in the second batch of three: its name must count from the task's start


def _poisoned_experiment(metric: str = "logit_diff") -> Experiment:
    """A Llama (untied embeddings) whose embedding of one token is NaN; only prompt BAD_PROMPT's
    clean prompt holds that token, so only its logits are NaN."""
    task = random_task(6, 7, seed=11)
    length = int(task.lengths[BAD_PROMPT])
    others = torch.cat([task.clean_ids[i] for i in range(6) if i != BAD_PROMPT] + [task.corrupted_ids.flatten()])
    token = next(int(t) for t in task.clean_ids[BAD_PROMPT, :length] if int(t) not in set(others.tolist()))
    model = make_tiny("llama-gqa")
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    return Experiment(build_spec(model), task, metric, batch_size=3)


POISONED: dict[str, Callable[[Experiment], Any]] = {
    "eap": eap,
    "eap-ig": lambda e: eap_ig(e, steps=2),
    "atp*": atp_star,
    "edge-patching": edge_patching,
    "node-patching": node_patching,
    "path-patching": path_patching,
}


@pytest.mark.parametrize("name", sorted(POISONED))
def test_nan_logits_stop_every_method_naming_the_prompt(name: str) -> None:
    with pytest.raises(MetricError, match=rf"not finite .*prompt {BAD_PROMPT} of task 'random'"):
        POISONED[name](_poisoned_experiment())


def test_nan_logits_stop_acdc_with_kl() -> None:
    with pytest.raises(MetricError, match=rf"prompt {BAD_PROMPT} of task"):
        acdc(_poisoned_experiment("kl"), tau=0.01)


def test_a_shard_names_prompts_by_their_index_in_the_whole_task() -> None:
    exp = _poisoned_experiment()
    shard = ShardedExperiment(exp.spec, exp.task.subset(slice(3, 6)), exp.metric, batch_size=3,
                              shard=Shard(rank=0, world_size=1, start=3, stop=6, total_prompts=6))
    with pytest.raises(MetricError, match=rf"prompt {BAD_PROMPT} of task"):
        eap(shard)


# ----------------------------------------------------------------------------- NaN gradients
BAD_ROW = 1  # in the first batch: prompt 1


class _NaNGradient(torch.autograd.Function):
    """Identity forward; the backward pass puts NaN into row BAD_ROW of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[BAD_ROW] = float("nan")
        return grad


@pytest.fixture
def nan_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    mlp = ops.mlp

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = mlp(*args, **kwargs)
        return _NaNGradient.apply(out) if torch.is_grad_enabled() and out.requires_grad else out

    monkeypatch.setattr(ops, "mlp", poisoned)


@pytest.mark.parametrize("name", ["eap", "eap-ig", "atp*"])
def test_a_nan_gradient_stops_gradient_methods_naming_the_prompt(name: str, nan_gradient: None) -> None:
    exp = Experiment(build_spec(make_tiny("gpt2")), random_task(6, 7, seed=2), "logit_diff", batch_size=3)
    run = {"eap": eap, "eap-ig": lambda e: eap_ig(e, steps=2), "atp*": atp_star}[name]
    with pytest.raises(NumericalError, match=rf"not finite.*gradient of prompt {BAD_ROW} of task 'random'"):
        run(exp)
