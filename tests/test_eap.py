"""Attribution methods against oracles: exact edge patching in the first-order regime, autograd
through the edge mask, completeness of integrated gradients, a saturated attention head, GradDrop
against a frozen-layer run."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel

import circuits.methods.eap as eap_module
from circuits.experiment import Experiment
from circuits.methods.eap import (
    AttributionError,
    alphas,
    atp_estimates,
    atp_star,
    eap,
    eap_ig,
)
from circuits.methods.patching import edge_patching
from circuits.metrics import make_metric
from circuits.tasks.base import TokenizedTask
from graphs import runtime as rt
from graphs.adapters import build_spec
from tests.conftest import make_tiny, random_task


def _experiment(name: str = "gpt2", metric: str = "logit_diff", n: int = 6, **kw) -> Experiment:
    return Experiment(build_spec(make_tiny(name, **kw)), random_task(n, 7, seed=2), make_metric(metric), batch_size=3)


class _NearClean(Experiment):
    """Ablation values within ``eps`` (relative) of the clean activations: the first-order regime."""

    eps = 1e-2

    def ablation_for(self, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor) -> rt.AblationValues:
        C = rt.sender_outputs(self.spec, clean_ids)
        noise = torch.randn(C.shape, generator=torch.Generator().manual_seed(int(clean_ids.sum())))
        return rt.AblationValues("near-clean", C + self.eps * C.std() * noise)


def _near_clean(eps: float, name: str) -> Experiment:
    exp = _experiment(name, dtype=torch.float64)
    near = _NearClean(exp.spec, exp.task, exp.metric, batch_size=3)
    object.__setattr__(near, "eps", eps)
    return near


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel"])
def test_eap_is_the_first_order_term_of_edge_patching(name: str) -> None:
    """With ablation values close to the clean ones every edge effect is linear to O(eps):
    EAP matches exact edge patching to ~eps relative, and the error shrinks with eps."""
    errors = []
    for eps in (1e-2, 1e-3):
        exp = _near_clean(eps, name)
        exact = edge_patching(exp, max_rows=256).values.double()
        approx = eap(exp).values.double()
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors[1] < 2e-3
    assert errors[1] < errors[0] / 5


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel"])
def test_eap_rank_agreement_on_random_models(name: str) -> None:
    exp = _experiment(name)
    mask = exp.spec.graph.edge_mask
    exact = edge_patching(exp, max_rows=256).values[mask]
    rho = spearmanr(eap(exp).values[mask], exact).statistic
    rho_star = spearmanr(atp_star(exp).values[mask].abs(), exact.abs()).statistic
    print(f"{name}: Spearman(EAP, edge patching) = {rho:.3f}; |AtP*| vs |exact| = {rho_star:.3f}")
    assert rho > 0.75 and rho_star > 0.8


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "gemma2", "gemma3"])
def test_qk_fix_reduces_to_eap_near_the_clean_point(name: str) -> None:
    """The QK fix recomputes each layer's pattern from the patched query or key with that layer's own
    norm and rotary (Gemma 3: local and global bases). Near the clean point it must agree with the
    linear estimate to O(eps); a pattern recomputed with the wrong rotary would differ at O(1)."""
    exp = _near_clean(1e-4, name)
    linear = eap(exp).values
    fixed = atp_star(exp, qk_fix=True, grad_drop=False).values
    assert float((fixed - linear).norm() / linear.norm()) < 1e-3
    assert not torch.equal(fixed, linear)


@pytest.mark.parametrize("fused", [1, 5, 10_000])
def test_eap_equals_autograd_through_the_mask(fused: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever number of receiver gradients are gathered into one product (one block at a time,
    blocks split across layers, all at once), EAP is the gradient through the edge mask."""
    monkeypatch.setattr(eap_module, "FUSED_RECEIVERS", fused)
    exp = _experiment("qwen2-bias", dtype=torch.float64)
    g = exp.spec.graph
    mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, requires_grad=True)
    total = 0.0
    for b in exp.batches():
        logits = rt.run(exp.spec, b.clean_ids, mask=mask, ablation=b.ablation, read_positions=b.read_positions).logits
        total = total + b.score(logits).sum() / exp.n_prompts
    (through_mask,) = torch.autograd.grad(total, mask)
    assert torch.allclose(eap(exp).values.double(), through_mask * g.edge_mask, atol=1e-6)


def _metric_gap(exp: Experiment) -> float:
    """m(everything ablated) - m(clean) as dataset means."""
    return exp.dataset_mean(exp.spec.graph.edge_mask.float()) - exp.dataset_mean(None)


@pytest.mark.parametrize("variant", ["inputs", "activations"])
def test_eap_ig_completeness_improves_with_steps(variant: str) -> None:
    """Inputs: the input node's edges sum to m(corrupted) - m(clean) (its path is linear in the
    embedding). Activations: all edges sum to m(all ablated) - m(clean) (the mask gradient)."""
    exp = _experiment("gpt2", dtype=torch.float64)
    g = exp.spec.graph
    target = _metric_gap(exp)
    errors = []
    for steps in (1, 4, 16):
        scores = eap_ig(exp, steps=steps, variant=variant).values.double()
        total = scores[0].sum() if variant == "inputs" else scores[g.edge_mask].sum()
        errors.append(abs(float(total) - target))
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.01 * abs(target)


def test_schedules() -> None:
    assert alphas(4, "midpoint") == [0.125, 0.375, 0.625, 0.875]
    assert alphas(2, "left") == [0.0, 0.5] and alphas(2, "right") == [0.5, 1.0]
    with pytest.raises(AttributionError):
        alphas(0)
    with pytest.raises(AttributionError):
        alphas(3, "trapezoid")


def test_kl_is_refused_for_plain_gradients_but_not_ig() -> None:
    exp = _experiment("gpt2", metric="kl")
    with pytest.raises(AttributionError, match="zero"):
        eap(exp)
    with pytest.raises(AttributionError, match="zero"):
        atp_star(exp)
    assert eap_ig(exp, steps=2).values.abs().max() > 0


# ----------------------------------------------------------------------------- AtP*


def _saturated_model(gain: float) -> GPT2LMHeadModel:
    """One head whose only key feature is token 1's direction u: on clean prompts (token 1 first) the
    head attends almost only to position 0, where the softmax is saturated; the corrupted prompts
    replace that token, and attention spreads over every position."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=12, n_positions=8, initializer_range=0.5)
    model = GPT2LMHeadModel(cfg).eval()
    d = 8
    u = torch.zeros(d)
    u[0], u[1] = 2**-0.5, -(2**-0.5)  # orthogonal to the all-ones direction LayerNorm removes
    with torch.no_grad():
        block = model.transformer.h[0]
        model.transformer.wpe.weight.zero_()
        E = model.transformer.wte.weight
        E -= torch.outer(E @ u, u)
        E[1] += 3.0 * u
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        W[:, : 2 * d] = 0
        b[: 2 * d] = 0
        b[0] = 1.0  # constant query e_0
        W[:, d] = gain * u  # key_0 = gain * (LN(x) . u)
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
    return model


def _saturated_task() -> TokenizedTask:
    clean = torch.tensor([[1, 3, 4, 5, 6], [1, 7, 8, 3, 9], [1, 4, 6, 8, 10]])
    corrupted = clean.clone()
    corrupted[:, 0] = 2
    n = 3
    return TokenizedTask("saturated", clean, corrupted, torch.full((n,), 5), torch.full((n, 1), 3),
                         torch.full((n, 1), 5), torch.full((n,), 4))


def test_atp_star_recovers_a_saturated_key_effect() -> None:
    exp = Experiment(build_spec(_saturated_model(10.0)), _saturated_task(), make_metric("logit_diff"))
    edge = "input->a0.h0<k>"
    exact = edge_patching(exp)[edge]
    plain = eap(exp)[edge]
    fixed = atp_star(exp, grad_drop=False)[edge]
    assert abs(exact) > 1.0  # the key matters a lot...
    assert abs(plain) < 0.01 * abs(exact)  # ...but the saturated softmax hides it from the gradient
    assert fixed * exact > 0 and abs(fixed - exact) < 0.5 * abs(exact)  # the QK fix recovers it


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_grad_drop_passes_share_the_qk_fix_in_any_grouping(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The QK fix recomputes each pattern once for a group of GradDrop passes; every grouping (one
    pass at a time - the plain algorithm -, pairs, all at once) gives the same estimates."""
    exp = _experiment(name)
    g = exp.spec.graph
    T = exp.task.max_length
    per_drop = g.n_layers * 3 * g.n_heads * T * T  # pattern gradients of one pass (3 prompts per batch)
    results = []
    for floats in (1, 2 * per_drop, 10**12):
        monkeypatch.setattr(eap_module, "QK_FIX_FLOATS", floats)
        results.append(atp_estimates(exp).double())
    assert results[0].shape[0] == 1 + g.n_layers
    scale = results[0].abs().max()
    for other in results[1:]:
        assert float((other - results[0]).abs().max() / scale) < 1e-5


def test_qk_fix_is_exact_when_the_rest_is_linear_in_the_pattern() -> None:
    """Unsaturated, low gain: the QK-fixed estimate tracks the exact effect closely."""
    exp = Experiment(build_spec(_saturated_model(1.0)), _saturated_task(), make_metric("logit_diff"))
    edge = "input->a0.h0<k>"
    assert atp_star(exp, grad_drop=False)[edge] == pytest.approx(edge_patching(exp)[edge], rel=0.05)


def test_grad_drop_equals_a_run_with_the_layer_frozen() -> None:
    """Dropping layer l from the backward pass = freezing layer l's senders to constants (ablating all
    their outgoing edges with their own clean values) and differentiating that run."""
    exp = _experiment("gpt2", dtype=torch.float64)
    g, spec = exp.spec.graph, exp.spec
    estimates = atp_estimates(exp, qk_fix=False, grad_drop=True)
    for layer in range(g.n_layers):
        frozen = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
        rows = list(range(g.attention_senders(layer).start, g.mlp_sender(layer) + 1))
        frozen[rows] = g.edge_mask[rows].double()
        expected = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
        for b in exp.batches():
            clean = rt.AblationValues("frozen", rt.sender_outputs(spec, b.clean_ids))
            _, grads = rt.receiver_gradients(spec, b.clean_ids, lambda lo, b=b: b.score(lo).sum(), mask=frozen,
                                             ablation=clean, read_positions=b.read_positions)
            deltas = b.ablation.values - clean.values
            expected += torch.einsum("btsd,btrd->sr", deltas, grads) / exp.n_prompts
        assert torch.allclose(estimates[1 + layer], expected * g.edge_mask, atol=1e-8)
    assert not torch.allclose(estimates[1], estimates[0])
