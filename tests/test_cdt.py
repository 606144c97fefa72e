"""CD-T oracles: conservation against the runtime for every family, the all / none relevant limits,
exactness against patching on linear models, batching invariance, and circuit search."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from circuits.evaluate import faithfulness
from circuits.experiment import Experiment
from circuits.methods.cdt import (
    CDTConfig,
    CDTError,
    Point,
    Source,
    cdt_circuit,
    cdt_contributions,
    cdt_edge_contributions,
    cdt_edge_scores,
    cdt_node_scores,
    decompose,
    rules,
)
from circuits.methods.cdt.readout import (
    Readout,
    decomposed_logits,
    metric_contributions,
)
from graphs import ops
from graphs import runtime as rt
from graphs.adapters import build_spec
from graphs.adapters.spec import ModelSpec, NormSpec
from graphs.ids import parse_receiver
from tests.conftest import TINY_MODELS, make_tiny, random_ids, random_task
from tests.test_known_path import TRUE_PATH
from tests.test_known_path import _experiment as known_path_experiment

FAMILIES = sorted(TINY_MODELS)
LINEAR = CDTConfig(normalize="none")  # CD-T's own normalisation is its one nonlinearity


# --------------------------------------------------------------------------- model helpers


def _randomise_biases(spec: ModelSpec, seed: int = 0, scale: float = 0.3) -> ModelSpec:
    """The same model with every bias the spec has (zero in HF's init) set to random values, so the
    bias-split rule is exercised. The HF model is untouched (new tensors, not its parameters)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(t: Tensor | None) -> Tensor | None:
        return None if t is None else (torch.randn(t.shape, generator=gen) * scale).to(t.dtype)

    def norm(n: NormSpec) -> NormSpec:
        return dataclasses.replace(n, bias=rnd(n.bias))

    layers = []
    for lay in spec.layers:
        a, m = lay.attn, lay.mlp
        attn = dataclasses.replace(a, b_Q=rnd(a.b_Q), b_K=rnd(a.b_K), b_V=rnd(a.b_V), b_O=rnd(a.b_O))
        mlp = dataclasses.replace(m, b_in=rnd(m.b_in), b_out=rnd(m.b_out), b_up=rnd(m.b_up))
        layers.append(dataclasses.replace(lay, attn=attn, mlp=mlp, attn_norm=norm(lay.attn_norm), mlp_norm=norm(lay.mlp_norm)))
    return dataclasses.replace(spec, layers=tuple(layers), final_norm=norm(spec.final_norm), b_U=rnd(spec.b_U))


def _without_constants(spec: ModelSpec) -> ModelSpec:
    """No learned positions, attention output biases or unembedding bias: the residual stream is
    exactly the sum of the senders' outputs."""
    layers = tuple(dataclasses.replace(lay, attn=dataclasses.replace(lay.attn, b_O=None)) for lay in spec.layers)
    return dataclasses.replace(spec, layers=layers, W_pos=None, b_U=None)


def _linearise(spec: ModelSpec, keep_bias: bool = False) -> ModelSpec:
    """Every nonlinearity removed: identity activations, q = k = 0 (uniform causal attention, so
    patterns do not depend on the input), gated MLPs with ``up(x) = 1``, norms (post-norms too) whose
    scale is a constant (eps = 1e12 swamps mean(x^2) in floating point; the weight 1e6 undoes the
    1/sqrt(eps)), no final soft-cap. Biases are dropped unless ``keep_bias`` (then they are random)."""
    src = _randomise_biases(spec, seed=1) if keep_bias else spec

    def bias(t: Tensor | None) -> Tensor | None:
        return t if keep_bias else None

    def norm(n: NormSpec) -> NormSpec:
        weight = None if n.weight is None else torch.full_like(n.weight, 1e6)
        return dataclasses.replace(n, eps=1e12, weight=weight, bias=bias(n.bias))

    layers = []
    for lay in src.layers:
        a, m = lay.attn, lay.mlp
        attn = dataclasses.replace(
            a, W_Q=torch.zeros_like(a.W_Q), W_K=torch.zeros_like(a.W_K), b_Q=None, b_K=None, b_V=bias(a.b_V), b_O=bias(a.b_O)
        )
        changes: dict[str, object] = {"act": lambda x: x, "b_in": bias(m.b_in), "b_out": bias(m.b_out)}
        if m.W_up is not None:
            changes.update(W_up=torch.zeros_like(m.W_up), b_up=torch.ones(m.W_up.shape[0], dtype=m.W_up.dtype))
        layers.append(
            dataclasses.replace(
                lay,
                attn=attn,
                mlp=dataclasses.replace(m, **changes),
                attn_norm=norm(lay.attn_norm),
                mlp_norm=norm(lay.mlp_norm),
                post_attn_norm=None if lay.post_attn_norm is None else norm(lay.post_attn_norm),
                post_mlp_norm=None if lay.post_mlp_norm is None else norm(lay.post_mlp_norm),
            )
        )
    return dataclasses.replace(
        src, layers=tuple(layers), final_norm=norm(src.final_norm), b_U=bias(src.b_U), final_softcap=None
    )


def _tiny_spec(name: str, dtype: torch.dtype = torch.float32) -> ModelSpec:
    return build_spec(make_tiny(name, dtype=dtype))


def _exp(spec: ModelSpec, ablation: str = "corrupted", n: int = 5, length: int = 6, batch_size: int = 2, metric: str = "logit_diff") -> Experiment:
    return Experiment(spec, random_task(n, length, seed=2), metric, ablation=ablation, batch_size=batch_size)


# --------------------------------------------------------------------------- rules


def test_bias_split_conserves_and_keeps_zero_relevance_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 4, generator=gen)
    b = torch.randn(5, generator=gen)
    beta = torch.randn(3, 2, 4, generator=gen)
    beta[0] = 0  # no relevance: the bias must go entirely to gamma (0/0 and 0/x rules)
    total = torch.randn(2, 4, generator=gen)
    gamma = total - beta
    lin_t = total @ W.T
    out_b = rules.linear(beta, W, b, lin_t, "split")
    # the explicit two-part formula: gamma' = W gamma + b * |W gamma| / (|W beta| + |W gamma|)
    wb, wg = beta @ W.T, gamma @ W.T
    out_g = wg + b * wg.abs() / (wb.abs() + wg.abs())
    torch.testing.assert_close(out_b + out_g, (lin_t + b).expand_as(out_b))
    torch.testing.assert_close(out_b, wb + b * wb.abs() / (wb.abs() + wg.abs()))
    assert bool((out_b[0] == 0).all())
    torch.testing.assert_close(rules.linear(beta, W, b, lin_t, "irrelevant"), wb)


def test_gated_product_and_elementwise_rules() -> None:
    gen = torch.Generator().manual_seed(1)
    a_t, u_t = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    a_b, u_b = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    out = rules.product(a_b, a_t, u_b, u_t)
    torch.testing.assert_close(out + (a_t - a_b) * (u_t - u_b), (a_t * u_t).expand_as(out))  # beta + gamma = total
    x_t, x_b = torch.randn(6, generator=gen), torch.randn(2, 6, generator=gen)
    f = torch.nn.functional.gelu
    torch.testing.assert_close(rules.elementwise(f, x_b, x_t, f(x_t)), f(x_t) - f(x_t - x_b))


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_rule_divides_both_parts_by_the_totals_scale(kind: str) -> None:
    gen = torch.Generator().manual_seed(2)
    d, eps = 8, 1e-5
    weight = torch.randn(d, generator=gen)
    bias = torch.randn(d, generator=gen) if kind == "layernorm" else None
    spec = NormSpec(kind, weight, bias, eps)  # type: ignore[arg-type]
    total = torch.randn(3, d, generator=gen)
    beta = torch.randn(2, 3, d, generator=gen)
    gamma = total - beta
    out_b = rules.norm(spec, beta, total, "split")
    if kind == "layernorm":
        scale = (total.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        lin_b = weight * (beta - beta.mean(-1, keepdim=True)) / scale
        lin_g = weight * (gamma - gamma.mean(-1, keepdim=True)) / scale
        expected_b = lin_b + bias * lin_b.abs() / (lin_b.abs() + lin_g.abs())
        expected_g = lin_g + bias * lin_g.abs() / (lin_b.abs() + lin_g.abs())
    else:
        scale = (total.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        expected_b, expected_g = weight * beta / scale, weight * gamma / scale
    torch.testing.assert_close(out_b, expected_b)
    torch.testing.assert_close(expected_b + expected_g, ops.apply_norm(spec, total).expand_as(out_b))


# --------------------------------------------------------------------------- conservation


def _trace(spec: ModelSpec, ids: Tensor, sources: list, ablation: rt.AblationValues, config: CDTConfig | None = None):
    return decompose(spec, ids, sources, ablation, config=config, trace=True)


SOURCES = ["input", "a0.h1", "m1", ["a1.h0", "m0"], "a1.h2@4", Source(("a0.h0", "m1"), positions=(2, 5))]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    "config",
    [CDTConfig(), CDTConfig(attention="frozen", normalize="none"), CDTConfig(normalize="sign", bias="irrelevant")],
    ids=["default", "frozen-raw", "sign"],
)
def test_beta_plus_gamma_is_the_real_activation_everywhere(name: str, config: CDTConfig) -> None:
    """beta + gamma equals the runtime's activation at every layer's residual, every head's and MLP's
    output, the final residual and the logits (1e-4, fp32), for every family."""
    spec = _randomise_biases(_tiny_spec(name))
    ids, corrupted = random_ids(3, 9), random_ids(3, 9, seed=5)
    res = _trace(spec, ids, SOURCES, rt.corrupted_values(spec, corrupted), config)
    assert res.trace is not None
    real = rt.run(spec, ids, keep_senders=True, keep_resid=True)
    g = spec.graph
    tol = {"atol": 1e-4, "rtol": 1e-4}

    def check(key: str, reference: Tensor) -> None:
        beta, total = res.trace[key]  # type: ignore[index]
        assert beta is not None and torch.isfinite(beta).all()
        gamma = total - beta  # the irrelevant part, as the rules define it
        torch.testing.assert_close(beta + gamma, reference.expand_as(beta), **tol)
        torch.testing.assert_close(total, reference, **tol)

    for layer in range(g.n_layers):
        if layer > 0:
            check(f"resid.{layer}", real.resid[layer])
        check(f"heads.{layer}", real.senders[:, :, g.attention_senders(layer)])
        check(f"mlp.{layer}", real.senders[:, :, g.mlp_sender(layer)])
    check("final", real.resid[g.n_layers])
    beta, total = res.trace["final"]
    logits_b, logits_t = decomposed_logits(spec, beta, total, CDTConfig())
    torch.testing.assert_close(logits_t, real.logits, **tol)
    torch.testing.assert_close(logits_b + (logits_t - logits_b), real.logits.expand_as(logits_b), **tol)
    assert float(beta.abs().max()) > 1e-3  # the sources do carry relevance
    if config.normalize == "bound":  # after every layer the relevant part is no larger than the total
        for layer in range(1, g.n_layers):
            beta, total = res.trace[f"resid.{layer}"]  # type: ignore[index]
            assert bool((beta.norm(dim=-1) <= total.norm(dim=-1) * (1 + 1e-5)).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_every_node_relevant_is_the_full_output_and_none_is_zero(name: str) -> None:
    """Zero ablation ('activation' sources): with every sender relevant, gamma at every receiver is
    the graph's constants only, so on a model without constants beta is the full output (to the
    logits, also with the sign normalisation, which never moves beta == total); with mean ablation
    gamma is the sum of the means; a source equal to its own ablation value (nothing relevant)
    gives beta == 0 (to float rounding)."""
    spec = _randomise_biases(_tiny_spec(name))
    g = spec.graph
    ids = random_ids(2, 7)
    every = [list(g.senders)]
    res = _trace(spec, ids, every, rt.zero_values(spec), LINEAR)  # the sign normalisation may move constants
    real = rt.run(spec, ids, keep_resid=True)
    constants = torch.zeros_like(real.resid[0]) + (0 if spec.W_pos is None else spec.W_pos[: ids.shape[1]])
    for layer in range(g.n_layers):
        beta, total = res.trace[f"resid.{layer}"]  # type: ignore[index]
        if layer > 0:
            torch.testing.assert_close(total - beta[0], constants, atol=1e-5, rtol=1e-5)
        if spec.layers[layer].attn.b_O is not None:
            constants = constants + spec.layers[layer].attn.b_O
    beta, total = res.trace["final"]  # type: ignore[index]
    torch.testing.assert_close(total - beta[0], constants, atol=1e-5, rtol=1e-5)

    bare = _without_constants(spec)
    res = _trace(bare, ids, every, rt.zero_values(bare))
    beta, total = res.trace["final"]  # type: ignore[index]
    torch.testing.assert_close(beta[0], total, atol=1e-5, rtol=1e-5)
    logits_b, _ = decomposed_logits(bare, beta, total, CDTConfig())
    torch.testing.assert_close(logits_b[0], rt.run(bare, ids).logits, atol=1e-4, rtol=1e-4)

    # 'activation minus mean' sources: gamma of the final residual is the sum of the senders' means
    means = rt.mean_values(bare, random_ids(4, 7, seed=9))
    res = decompose(bare, ids, every, means, config=LINEAR)
    torch.testing.assert_close(res.total - res.beta[0], means.values[0, 0].sum(0).expand_as(res.total), atol=1e-5, rtol=1e-5)  # type: ignore[index]

    # nothing relevant: ablation values equal to the clean activations make a - A == 0
    clean = rt.AblationValues("custom", rt.sender_outputs(spec, ids))
    res = _trace(spec, ids, every + ["a0.h0", "m0", "input"], clean)
    for key, (beta, total) in res.trace.items():  # type: ignore[union-attr]
        # exactly 0 up to float rounding (A_gamma is the same softmax evaluated with other shapes)
        assert beta is None or float(beta.abs().max()) <= 1e-6 * max(1.0, float(total.abs().max())), key


def test_sources_at_a_position_leave_earlier_positions_irrelevant() -> None:
    spec = _tiny_spec("llama-gqa")
    ids = random_ids(2, 8)
    res = _trace(spec, ids, ["a0.h2@5", "input@3"], rt.corrupted_values(spec, random_ids(2, 8, seed=4)))
    beta, _ = res.trace["final"]  # type: ignore[index]
    assert bool((beta[0, :, :5] == 0).all()) and float(beta[0, :, 5:].abs().max()) > 0
    assert bool((beta[1, :, :3] == 0).all()) and float(beta[1, :, 3:].abs().max()) > 0


# --------------------------------------------------------------------------- exactness on linear models


def _node_ablation_effects(exp: Experiment) -> Tensor:
    """m(every out-edge of u ablated) - m(clean) per sender, dataset means (bool masks: any dtype)."""
    g = exp.spec.graph
    out = torch.zeros(g.n_senders, dtype=torch.float64)
    batches = list(exp.batches())
    clean = [exp.masked_metric(b, None) for b in batches]
    for u in range(g.n_senders):
        mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
        mask[u] = g.edge_mask[u]
        out[u] = sum(float((exp.masked_metric(b, mask) - c).sum()) for b, c in zip(batches, clean, strict=True))
    return out / exp.n_prompts


@pytest.mark.parametrize("name", FAMILIES)
def test_linear_model_contributions_equal_node_ablations(name: str) -> None:
    spec = _linearise(_tiny_spec(name, torch.float64))
    for ablation in ("corrupted", "mean"):
        exp = _exp(spec, ablation, n=4, batch_size=4)
        expected = _node_ablation_effects(exp)
        scores = cdt_node_scores(exp, config=LINEAR)
        assert float(expected.abs().max()) > 1e-3
        torch.testing.assert_close(scores.values.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "qwen2-bias", "neox-parallel"])
def test_linear_model_with_biases_is_exact_when_biases_are_irrelevant(name: str) -> None:
    spec = _linearise(_tiny_spec(name, torch.float64), keep_bias=True)
    exp = _exp(spec, "corrupted")
    expected = _node_ablation_effects(exp)
    exact = cdt_node_scores(exp, config=CDTConfig(bias="irrelevant", normalize="none"))
    torch.testing.assert_close(exact.values.double(), expected, atol=1e-5, rtol=0)
    split = cdt_node_scores(exp, config=LINEAR)  # the design's magnitude split is not linear: it must differ here
    assert float((split.values.double() - expected).abs().max()) > 1e-4


@pytest.mark.parametrize("name", ["gpt2-mini", "neox-mini", "llama-mqa", "gemma3"])
def test_linear_model_exact_edge_scores_equal_edge_patching(name: str) -> None:
    spec = _linearise(_tiny_spec(name))
    exp = _exp(spec, "corrupted", n=4, batch_size=4)
    cdt = cdt_edge_scores(exp, "exact", config=LINEAR)
    g = spec.graph
    pairs = g.edge_mask.nonzero()  # [E, 2]
    masks = torch.zeros(len(pairs), g.n_senders, g.n_receivers, dtype=torch.bool)
    masks[torch.arange(len(pairs)), pairs[:, 0], pairs[:, 1]] = True  # one ablated edge per mask
    effect = torch.zeros(len(pairs), dtype=torch.float64)
    for batch in exp.batches():  # edge patching, computed directly with the runtime's masks
        effect += (exp.masked_metrics(batch, masks.float()) - exp.masked_metric(batch, None)).double().sum(1)
    effect /= exp.n_prompts
    assert float(effect.abs().max()) > 1e-2
    torch.testing.assert_close(cdt.values[pairs[:, 0], pairs[:, 1]].double(), effect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "neox-parallel"])
def test_linear_model_receiver_contributions_equal_the_change_of_the_receiver_input(name: str) -> None:
    spec = _linearise(_tiny_spec(name, torch.float64))
    exp = _exp(spec, "corrupted", n=3, batch_size=3)
    g = spec.graph
    batch = next(exp.batches())
    for target in ("a2.h1<k>", "m1", "logits"):
        r = g.receiver_index(parse_receiver(target))
        got = cdt_contributions(exp, ["input", "a0.h2", "m0"], target, config=LINEAR)  # [3, N, T, d]
        for i, node in enumerate(("input", "a0.h2", "m0")):
            u = g.senders.index(next(s for s in g.senders if str(s) == node))
            mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
            mask[u] = g.edge_mask[u]
            with torch.no_grad():
                ablated = rt.run(spec, batch.clean_ids, mask=mask, ablation=batch.ablation, keep_receivers=True)
                clean = rt.run(spec, batch.clean_ids, keep_receivers=True)
            a = rt.ReceiverInputs.dense(ablated.receivers.as_list())[:, :, r]  # type: ignore[union-attr]
            c = rt.ReceiverInputs.dense(clean.receivers.as_list())[:, :, r]  # type: ignore[union-attr]
            real = (torch.arange(c.shape[1])[None, :] < exp.task.lengths[:, None])[:, :, None]  # padding reads 0
            torch.testing.assert_close(got[i, :, : c.shape[1]], (c - a) * real, atol=1e-8, rtol=0)
            assert float((c - a).abs().max()) > 1e-3 or target == "logits" and node == "m0"


# --------------------------------------------------------------------------- batching


def test_many_sources_and_prompts_per_pass_equal_one_at_a_time() -> None:
    spec = _randomise_biases(_tiny_spec("qwen2-bias"))
    sources = ["input", "a0.h1", "m0", "a1.h3", ["a0.h2", "m1"], "a2.h0@3", "m2"]
    big = cdt_contributions(_exp(spec, n=6, batch_size=6), sources)
    small = cdt_contributions(_exp(spec, n=6, batch_size=1), sources, config=CDTConfig(max_floats=1))
    single = torch.cat([cdt_contributions(_exp(spec, n=6, batch_size=4), [s]) for s in sources])
    torch.testing.assert_close(big, small, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(big, single, atol=1e-5, rtol=1e-4)
    receiver_big = cdt_contributions(_exp(spec, n=4, batch_size=4), sources[:4], "a2.h1<v>")
    receiver_small = cdt_contributions(_exp(spec, n=4, batch_size=1), sources[:4], "a2.h1<v>", config=CDTConfig(max_floats=1))
    torch.testing.assert_close(receiver_big, receiver_small, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("metric", ["prob_diff", "kl"])
def test_nonlinear_metrics_use_total_minus_gamma(metric: str) -> None:
    """kappa = m(logits) - m(gamma logits): on the linear model with every node relevant and zero
    ablation (no constants), gamma logits are 0, so kappa = m(logits) - m(0)."""
    spec = _without_constants(_linearise(_tiny_spec("llama-gqa", torch.float64)))
    exp = _exp(spec, "zero", n=3, batch_size=3, metric=metric)
    kappa = cdt_contributions(exp, [list(spec.graph.senders)], config=LINEAR)[0]
    batch = next(exp.batches())
    logits = rt.run(spec, batch.clean_ids, read_positions=batch.read_positions).logits
    expected = batch.score(logits) - batch.score(torch.zeros_like(logits))
    torch.testing.assert_close(kappa, expected, atol=1e-8, rtol=1e-6)


def test_restricted_unembedding_equals_the_full_readout() -> None:
    """logit_diff reads only the answer / wrong columns: the same kappa as the full vocabulary, and
    the same as the general rule m(total) - m(gamma)."""
    spec = _randomise_biases(_tiny_spec("gpt2"))
    exp = _exp(spec, n=4, batch_size=4)
    batch = next(exp.batches())
    restricted = Readout.of(batch)
    assert restricted.columns is not None and restricted.columns.numel() <= 8
    full = dataclasses.replace(restricted, answers=batch.answers, wrongs=batch.wrongs, columns=None)
    gen = torch.Generator().manual_seed(0)
    beta = torch.randn(3, 4, spec.d_model, generator=gen)
    total = torch.randn(4, spec.d_model, generator=gen)
    a = metric_contributions(spec, restricted, beta, total, CDTConfig())
    b = metric_contributions(spec, full, beta, total, CDTConfig())
    logits_b, logits_t = decomposed_logits(spec, beta, total, CDTConfig())
    c = batch.score(logits_t) - batch.score(logits_t - logits_b)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("mode", ["projected", "exact"])
def test_one_path_model_ranks_the_true_path_first(mode: str) -> None:
    exp = known_path_experiment("logit_diff")
    scores = cdt_edge_scores(exp, mode)
    top = {str(scores.graph.edge_id(int(s), int(r))) for s, r in scores.top_n_mask(2).nonzero()}
    assert top == TRUE_PATH
    assert all(abs(scores[e]) > 1e-2 for e in TRUE_PATH)
    result = cdt_circuit(exp, k=2, scores=scores)
    assert {str(e) for e in result.circuit.edges()} == TRUE_PATH
    assert faithfulness(exp, result.circuit).value == pytest.approx(1.0, abs=1e-4)


def test_circuit_search_on_a_tiny_model() -> None:
    exp = _exp(_tiny_spec("gpt2"), n=6, batch_size=3)
    result = cdt_circuit(exp, k=3)
    g = exp.spec.graph
    assert result.rounds[0].targets[0].kind.value == "logits"
    assert 1 <= len(result.rounds[0].chosen) <= 3
    assert result.circuit.n_edges > 0
    assert bool((result.circuit.in_circuit <= result.found.in_circuit).all())
    assert result.circuit.provenance["method"] == "cdt/projected"
    f = faithfulness(exp, result.circuit)
    assert -10 < f.value < 10
    # every kept edge is connected to the logits, and the scores cover every edge
    assert result.circuit.in_circuit[:, g.logits_receiver].any()
    assert result.scores.values.shape == (g.n_senders, g.n_receivers)
    targeted = cdt_circuit(exp, k=3, scores=result.scores, target_faithfulness=0.5)
    assert targeted.faithfulness is not None and targeted.circuit.n_edges <= result.circuit.n_edges


def test_edge_contributions_logits_column_is_the_direct_readout() -> None:
    """kappa(u -> logits) is the same in both modes, and the projected scores are finite."""
    exp = _exp(_randomise_biases(_tiny_spec("neox-sequential")), n=4)
    projected = cdt_edge_contributions(exp, "projected")
    exact = cdt_edge_contributions(exp, "exact")
    g = exp.spec.graph
    torch.testing.assert_close(projected.kappa[:, g.logits_receiver], exact.kappa[:, g.logits_receiver])
    torch.testing.assert_close(projected.node_kappa, exact.node_kappa)
    assert bool(torch.isfinite(projected.kappa).all())
    # a source's edge into logits differs from its total contribution (indirect paths exist)
    assert float((projected.kappa[:, g.logits_receiver] - projected.node_kappa).abs().max()) > 1e-4


def test_bad_requests_are_refused() -> None:
    exp = _exp(_tiny_spec("gpt2"), n=2)
    with pytest.raises(CDTError):
        cdt_contributions(exp, ["logits"])
    with pytest.raises(CDTError):
        cdt_contributions(exp, [])
    with pytest.raises(ValueError):
        cdt_contributions(exp, ["a9.h0"])
    with pytest.raises(CDTError):
        cdt_circuit(exp, k=0)
    with pytest.raises(CDTError):
        CDTConfig(attention="soft")  # type: ignore[arg-type]
    with pytest.raises(CDTError):
        Point(0, "logits")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- positional edge scores


def _aligned_exp(spec: ModelSpec, n: int = 4, length: int = 6, batch_size: int = 2, ablation: str = "corrupted") -> Experiment:
    from tests.test_positional import aligned_task

    return Experiment(spec, aligned_task(n=n, length=length), "logit_diff", ablation=ablation, batch_size=batch_size)


def _relative(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gemma2", "neox-parallel"])
@pytest.mark.parametrize("mode", ["projected", "exact"])
def test_positional_edge_scores_sum_to_the_edge_scores(name: str, mode: str) -> None:
    """Summed over positions, positional CD-T is the non-positional CD-T (both modes, default
    'bound' normalisation, random biases split): the prefix split telescopes."""
    from circuits.methods.cdt import positional_cdt_edge_scores

    spec = _randomise_biases(_tiny_spec(name))
    exp = _aligned_exp(spec)
    pos = positional_cdt_edge_scores(exp, mode)
    plain = cdt_edge_scores(exp, mode)
    assert pos.values.shape == (*plain.values.shape, 6) and pos.method == f"cdt/{mode}"
    assert pos.settings["positional"] is True and pos.settings["read_position"] == 5
    assert _relative(pos.summed().values, plain.values) < 1e-5
    assert float(pos.values[:, :, :5].abs().max()) > 1e-4  # earlier tokens carry part of it
    g = spec.graph
    assert bool((pos.values[:, g.logits_receiver, :5] == 0).all())  # logits are read at the last token only


def test_positional_edge_scores_leave_positions_after_the_read_position_at_zero() -> None:
    from circuits.methods.cdt import positional_cdt_edge_scores
    from tests.test_positional import aligned_task

    task = aligned_task(n=3, length=6)
    task = dataclasses.replace(task, read_positions=torch.full((3,), 3))
    exp = Experiment(_tiny_spec("gpt2"), task, "logit_diff", batch_size=3)
    pos = positional_cdt_edge_scores(exp)
    assert bool((pos.values[:, :, 4:] == 0).all()) and float(pos.values[:, :, :4].abs().max()) > 1e-4
    assert _relative(pos.summed().values, cdt_edge_scores(exp).values) < 1e-5


@pytest.mark.parametrize("name", ["gpt2-mini", "llama-mqa", "gemma3"])
def test_linear_model_positional_exact_scores_equal_positional_edge_patching(name: str) -> None:
    """On the linear network (the oracle of the non-positional exact mode), positional CD-T is
    exactly positional edge patching, m(clean, u@t -> r@t ablated) - m(clean), at every position."""
    from circuits.methods.cdt import positional_cdt_edge_scores
    from circuits.methods.patching import positional_edge_patching

    spec = _linearise(_tiny_spec(name))
    exp = _aligned_exp(spec, n=3, length=5, batch_size=3)
    cdt = positional_cdt_edge_scores(exp, "exact", config=LINEAR)
    patched = positional_edge_patching(exp, max_rows=512)
    assert float(patched.values.abs().max()) > 1e-2
    torch.testing.assert_close(cdt.values.double(), patched.values.double(), atol=1e-5, rtol=0)


def test_positional_scores_chunked_and_batched_equal_all_at_once() -> None:
    """Prompts batched or one at a time, (sender, prefix) pairs all in one pass or one per pass
    (max_floats=1 chunks the positions too): the same scores."""
    from circuits.methods.cdt import positional_cdt_edge_scores

    spec = _randomise_biases(_tiny_spec("qwen2-bias"))
    for mode in ("projected", "exact"):
        big = positional_cdt_edge_scores(_aligned_exp(spec, n=4, batch_size=4), mode)
        small = positional_cdt_edge_scores(_aligned_exp(spec, n=4, batch_size=1), mode, config=CDTConfig(max_floats=1))
        torch.testing.assert_close(big.values, small.values, atol=1e-5, rtol=1e-4)


def test_slot_prefixes_equal_masked_sources_and_q_v_split_by_position() -> None:
    """decompose_attention_slot_prefixes(X, ends) is decompose_attention_slots(X at positions <= e)
    for every end e; for the q and v slots the increment between prefixes is the slot output of X at
    that one position alone (so projected positional q / v scores are the token's own part)."""
    from circuits.methods.cdt.layers import (
        decompose_attention_slot_prefixes,
        decompose_attention_slots,
    )
    from circuits.methods.cdt.positional import prefix_chunks, telescope

    assert list(prefix_chunks(3, 4, 8)) == [(0, 2, 0, 4), (2, 3, 0, 4)]
    assert list(prefix_chunks(2, 5, 2)) == [(0, 1, 0, 2), (0, 1, 2, 4), (0, 1, 4, 5), (1, 2, 0, 2), (1, 2, 2, 4), (1, 2, 4, 5)]
    torch.testing.assert_close(telescope(torch.tensor([[1.0, 3.0, 6.0]]), torch.tensor([0.5])), torch.tensor([[0.5, 2.0, 3.0]]))
    spec = _randomise_biases(_tiny_spec("llama-gqa", torch.float64))
    ids, T = random_ids(2, 5, 3), 5
    from circuits.methods.cdt.forward import BatchState

    state = BatchState.build(spec, ids, rt.corrupted_values(spec, random_ids(2, 5, 4)))
    lay, layer = spec.layers[1], 1
    X = state.delta(slice(0, 3)).permute(2, 0, 1, 3)  # [3, P, T, d]: three senders' relevant outputs
    config = CDTConfig()
    got = decompose_attention_slot_prefixes(lay.attn, lay.attn_norm, state.resid[layer], X, state.rotary[layer], config, range(T))
    positions = torch.arange(T)
    for e in range(T):
        masked = X * (positions <= e).to(X.dtype)[None, None, :, None]
        ref = decompose_attention_slots(lay.attn, lay.attn_norm, state.resid[layer], masked, state.rotary[layer], config)
        one = X * (positions == e).to(X.dtype)[None, None, :, None]
        alone = decompose_attention_slots(lay.attn, lay.attn_norm, state.resid[layer], one, state.rotary[layer], config)
        for slot in ("q", "k", "v"):
            z = got[slot].view(3, T, *got[slot].shape[1:])  # type: ignore[union-attr]
            torch.testing.assert_close(z[:, e], ref[slot], atol=1e-10, rtol=0)
            if slot != "k":
                step = z[:, e] - (z[:, e - 1] if e > 0 else 0)
                torch.testing.assert_close(step, alone[slot], atol=1e-10, rtol=0)
        z_k = got["k"].view(3, T, *got["k"].shape[1:])  # type: ignore[union-attr]
        if e == T - 1:  # keys share one softmax: the last increment is not the last key alone
            assert float((z_k[:, e] - z_k[:, e - 1] - alone["k"]).abs().max()) > 1e-8


def test_positional_cdt_refuses_misaligned_prompts_and_bad_modes() -> None:
    from circuits.methods.cdt import positional_cdt_edge_scores
    from circuits.positional import AlignmentError

    with pytest.raises(AlignmentError, match="prompt 1"):
        positional_cdt_edge_scores(_exp(_tiny_spec("gpt2"), n=4))
    with pytest.raises(CDTError, match="mode"):
        positional_cdt_edge_scores(_aligned_exp(_tiny_spec("gpt2")), "dot")  # type: ignore[arg-type]
