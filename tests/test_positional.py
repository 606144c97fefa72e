"""Token-position circuits (docs/positions.md) against oracles: the non-positional runtime, hand-written
hooks at one token, autograd through a positional mask, and plain EAP summed over positions."""

from __future__ import annotations

import pytest
import torch

import circuits.methods.eap as eap_module
from circuits.evaluate import faithfulness, positional_faithfulness, reference_metrics
from circuits.experiment import Experiment
from circuits.methods.eap import eap, eap_ig, positional_eap, positional_eap_ig
from circuits.methods.patching import PatchingError, positional_edge_patching
from circuits.metrics import make_metric
from circuits.positional import AlignmentError, aligned_subset, check_alignment
from circuits.tasks.base import TokenizedTask
from graphs import runtime as rt
from graphs.adapters import build_spec
from graphs.circuit import Circuit
from graphs.ids import IdError, parse_edge
from graphs.positional import PositionalCircuit, PositionalEdgeScores
from tests.conftest import VOCAB, make_tiny, random_ids, random_task
from tests.hook_oracle import single_edge_logits

T = 6


def aligned_task(n: int = 4, length: int = T, seed: int = 0) -> TokenizedTask:
    """Random clean / corrupted prompts that share one alignment: no padding, one read position."""
    gen = torch.Generator().manual_seed(seed)
    answers = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return TokenizedTask(
        name="aligned",
        clean_ids=torch.randint(0, VOCAB, (n, length), generator=gen),
        corrupted_ids=torch.randint(0, VOCAB, (n, length), generator=gen),
        lengths=torch.full((n,), length),
        answers=answers,
        wrongs=(answers + 1 + torch.randint(0, VOCAB - 1, (n, 1), generator=gen)) % VOCAB,
        read_positions=torch.full((n,), length - 1),
        seed=seed,
    )


def _experiment(name: str = "gpt2", dtype: torch.dtype = torch.float32, **kw) -> Experiment:
    spec = build_spec(make_tiny(name, dtype=dtype))
    return Experiment(spec, aligned_task(**kw), make_metric("logit_diff"), batch_size=2)


# ----------------------------------------------------------------------------- runtime masks


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel", "gemma2"])
def test_all_positions_mask_equals_the_plain_mask(name: str) -> None:
    """[S, R, T] with the same column at every position is the [S, R] mask, sparse or dense, shared or
    per row group; positions where nothing is ablated keep their clean logits."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    ids, cor = random_ids(3, T, 1), random_ids(3, T, 2)
    values = rt.corrupted_values(spec, cor)
    gen = torch.Generator().manual_seed(0)
    for density in (0.2, 0.8):
        mask = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < density).float()
        plain = rt.run(spec, ids, mask=mask, ablation=values).logits
        positional = rt.run(spec, ids, mask=mask[:, :, None].expand(-1, -1, T), ablation=values).logits
        assert torch.allclose(plain, positional, atol=1e-5)
    masks = (torch.rand(2, g.n_senders, g.n_receivers, generator=gen) < 0.5).float()
    grid = rt.run(spec, ids.repeat(2, 1), mask=masks, ablation=values).logits
    grid_pos = rt.run(spec, ids.repeat(2, 1), mask=masks[..., None].expand(-1, -1, -1, T), ablation=values).logits
    assert torch.allclose(grid, grid_pos, atol=1e-5)
    late = torch.zeros(g.n_senders, g.n_receivers, T)
    late[:, :, 3:] = mask[:, :, None]
    out = rt.run(spec, ids, mask=late, ablation=values).logits
    assert torch.allclose(out[:, :3], rt.run(spec, ids).logits[:, :3], atol=1e-5)  # causal: earlier tokens clean
    assert not torch.allclose(out[:, 3:], rt.run(spec, ids).logits[:, 3:], atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "gemma3"])
def test_one_positional_edge_equals_a_hook_at_that_token(name: str) -> None:
    spec = build_spec(make_tiny(name))
    g = spec.graph
    model = make_tiny(name)
    ids, cor = random_ids(2, T, 3), random_ids(2, T, 4)
    values = rt.corrupted_values(spec, cor)
    for text, t in (("input->a1.h2<k>", 2), ("a0.h1->a2.h0<v>", 1), ("m0->logits", 5), ("a1.h0->m1", 4)):
        edge = parse_edge(text)
        s, r = g.edge_index(edge)
        mask = torch.zeros(g.n_senders, g.n_receivers, T)
        mask[s, r, t] = 1
        ours = rt.run(spec, ids, mask=mask, ablation=values).logits
        hooks = single_edge_logits(model, ids, cor, edge, position=t)
        assert torch.allclose(ours, hooks, atol=2e-5), text
        assert (ours - rt.run(spec, ids).logits).abs().max() > 1e-4 or text == "m0->logits"


def test_positional_mask_shapes_are_checked() -> None:
    spec = build_spec(make_tiny("gpt2"))
    g = spec.graph
    ids = random_ids(2, T)
    values = rt.corrupted_values(spec, random_ids(2, T, 5))
    with pytest.raises(rt.RuntimeInputError, match="token positions"):
        rt.run(spec, ids, mask=torch.zeros(g.n_senders, g.n_receivers, T + 1), ablation=values)


# ----------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "neox-parallel"])
def test_positional_eap_sums_to_eap(name: str) -> None:
    exp = _experiment(name, n=5)
    plain = eap(exp).values.double()
    pos = positional_eap(exp)
    assert pos.values.shape == (*plain.shape, T)
    err = float((pos.summed().values.double() - plain).norm() / plain.norm())
    print(f"{name}: relative |sum_t positional EAP - EAP| = {err:.2e}")
    assert err < 1e-6
    assert float(pos.values[:, :, T - 1].abs().sum()) > 0  # the read position carries signal
    for variant in ("inputs", "activations"):
        plain_ig = eap_ig(exp, steps=2, variant=variant).values.double()
        pos_ig = positional_eap_ig(exp, steps=2, variant=variant).summed().values.double()
        assert float((pos_ig - plain_ig).norm() / plain_ig.norm()) < 1e-6


@pytest.mark.parametrize("fused", [1, 10_000])
def test_positional_eap_equals_autograd_through_a_positional_mask(fused: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eap_module, "FUSED_RECEIVERS", fused)
    exp = _experiment("qwen2-bias", dtype=torch.float64)
    g = exp.spec.graph
    mask = torch.zeros(g.n_senders, g.n_receivers, T, dtype=torch.float64, requires_grad=True)
    total = 0.0
    for b in exp.batches():
        logits = rt.run(exp.spec, b.clean_ids, mask=mask, ablation=b.ablation, read_positions=b.read_positions).logits
        total = total + b.score(logits).sum() / exp.n_prompts
    (through_mask,) = torch.autograd.grad(total, mask)
    scores = positional_eap(exp).values.double()
    assert torch.allclose(scores, through_mask * g.edge_mask[:, :, None], atol=1e-5)


# ----------------------------------------------------------------------------- edge patching


def test_positional_edge_patching_matches_hooks_and_masks() -> None:
    exp = _experiment("llama-gqa", n=3)
    g = exp.spec.graph
    model = make_tiny("llama-gqa")
    picks = [("input->a1.h2<k>", 2), ("a0.h1->a2.h0<v>", 4), ("m1->logits", T - 1), ("a0.h3->m0", 5)]
    cand = torch.zeros(g.n_senders, g.n_receivers, T, dtype=torch.bool)
    for text, t in picks:
        s, r = g.edge_index(parse_edge(text))
        cand[s, r, t] = True
    cand[g.edge_index(parse_edge("m0->logits")) + (2,)] = True  # logits read at T-1 only: skipped, 0
    scores = positional_edge_patching(exp, max_rows=4, edges=cand)
    assert isinstance(scores, PositionalEdgeScores) and scores.settings["edges"] == 4

    def mean_metric(logits_of) -> float:
        total = 0.0
        for b in exp.batches():
            logits = logits_of(b)
            total += float(b.score(logits[torch.arange(b.size), b.read_positions]).sum())
        return total / exp.n_prompts

    clean = mean_metric(lambda b: rt.run(exp.spec, b.clean_ids).logits)
    for text, t in picks:
        edge = parse_edge(text)
        hooks = mean_metric(lambda b: single_edge_logits(model, b.clean_ids, b.corrupted_ids, edge, position=t))
        assert scores[edge.at(t)] == pytest.approx(hooks - clean, abs=2e-5)
        assert scores[f"{edge.at(t)}"] != 0.0
    assert scores["m0@2->logits@2"] == 0.0
    assert int((scores.values != 0).sum()) == len(picks)


def test_positional_edge_patching_sums_like_the_runtime_and_skips_dead_pairs() -> None:
    """Without candidates, every (edge, t) is patched; pairs that cannot act score exactly 0 and
    a pair's score equals the runtime run with that one positional edge ablated."""
    exp = _experiment("gpt2-mini", n=2)
    g = exp.spec.graph
    scores = positional_edge_patching(exp, max_rows=256)
    assert bool((scores.values[:, g.logits_receiver, : T - 1] == 0).all())
    edge = parse_edge("a0.h2->a1.h1<k>")
    s, r = g.edge_index(edge)
    mask = torch.zeros(g.n_senders, g.n_receivers, T)
    mask[s, r, 2] = 1
    assert scores[edge.at(2)] == pytest.approx(exp.dataset_mean(mask) - exp.dataset_mean(None), abs=1e-6)
    with pytest.raises(PatchingError, match="candidate edges"):
        positional_edge_patching(exp, edges=torch.ones(3, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- alignment


def test_alignment_names_the_first_misaligned_prompt() -> None:
    ragged = random_task(6, 7, seed=2)
    first_short = int((ragged.lengths != 7).nonzero()[0])
    with pytest.raises(AlignmentError, match=f"prompt {first_short} of task 'random' has"):
        check_alignment(ragged)
    task = aligned_task(4)
    moved = TokenizedTask(**{**task.__dict__, "read_positions": torch.tensor([T - 1, T - 1, 2, T - 1])})
    with pytest.raises(AlignmentError, match="prompt 2 of task 'aligned' reads the logits at position 2"):
        check_alignment(moved)
    exp = Experiment(build_spec(make_tiny("gpt2")), ragged, make_metric("logit_diff"))
    with pytest.raises(AlignmentError):
        positional_eap(exp)
    subset = aligned_subset(ragged)
    assert check_alignment(subset).length == subset.max_length
    assert aligned_subset(task) is task
    assert check_alignment(task).tokens == tuple(f"#{i}" for i in task.clean_ids[0].tolist())


# ----------------------------------------------------------------------------- scores, circuits, evaluation


def test_positional_scores_selection_and_queries() -> None:
    exp = _experiment("gpt2", n=3)
    scores = positional_eap(exp)
    g = exp.spec.graph
    top = scores.top_edges(5)
    assert len(top) == 5 and all(e.position is not None for e, _ in top)
    assert [abs(v) for _, v in top] == sorted((abs(v) for _, v in top), reverse=True)
    mask = scores.top_n_mask(5)
    assert int(mask.sum()) == 5
    circuit = PositionalCircuit(g, mask, scores.tokens, scores)
    assert sorted(map(str, circuit.edges())) == sorted(str(e) for e, _ in top)
    t = top[0][0].position
    assert all(e.position == t for e in circuit.edges(position=t))
    assert all(n.position == t for n in circuit.nodes(position=t))
    receiver = top[0][0].receiver
    assert (top[0][0], top[0][1]) in circuit.in_edges(receiver)
    assert (top[0][0], top[0][1]) in circuit.out_edges(top[0][0].sender)
    assert str(top[0][0]) in circuit and "a0.h0@99->m0@99" not in circuit
    assert circuit.at(t).n_edges == len(circuit.edges(position=t))
    assert circuit.collapsed().n_edges <= 5
    with pytest.raises(IdError, match="equal positions"):
        scores["a0.h1@2->a1.h0@3<q>"]
    with pytest.raises(IdError, match="outside"):
        scores[f"a0.h1@{T}->a1.h0@{T}<q>"]


def test_positional_faithfulness() -> None:
    exp = _experiment("gpt2", n=4)
    g = exp.spec.graph
    base = reference_metrics(exp)
    toks = check_alignment(exp.task).tokens
    assert positional_faithfulness(exp, PositionalCircuit.full(g, toks), base).value == pytest.approx(1.0, abs=1e-6)
    assert positional_faithfulness(exp, PositionalCircuit.empty(g, toks), base).value == pytest.approx(0.0, abs=1e-6)
    plain = Circuit(g, eap(exp).top_n_mask(30))
    expanded = PositionalCircuit.from_circuit(plain, toks)
    assert positional_faithfulness(exp, expanded, base).value == pytest.approx(faithfulness(exp, plain, base).value,
                                                                               abs=1e-5)
    # only the read position's edges: position T-1 alone is not the whole circuit
    only_last = expanded.in_circuit.clone()
    only_last[:, :, : T - 1] = False
    f_last = positional_faithfulness(exp, expanded.with_mask(only_last), base).value
    mask = torch.zeros(g.n_senders, g.n_receivers, T)
    mask[...] = (g.edge_mask[:, :, None] & ~only_last).float()
    assert f_last == pytest.approx(base.normalise(exp.dataset_mean(mask)), abs=1e-6)


# ----------------------------------------------------------------------------- files and drawings


def _scored_circuit() -> PositionalCircuit:
    from graphs.graph import ComputationGraph

    g = ComputationGraph(2, 3)
    toks = ("When", "<script>alert(1)</script>", " Mary", "&amp;", "\\G")
    values = torch.randn(g.n_senders, g.n_receivers, 5, generator=torch.Generator().manual_seed(0))
    values[:, :, 3] = 0  # unlisted in the file: still round-trips
    scores = PositionalEdgeScores(g, values, toks, "eap", {"positional": True})
    edges = [f"input@{t}->a0.h1@{t}<q>" for t in range(5)] + [f"a0.h1@{t}->logits@{t}" for t in range(5)]
    return PositionalCircuit.from_edges(g, toks, edges + ["m0@1->a1.h2@1<k>"], scores, {"model": "tiny"})


def test_positional_json_round_trip_and_hostile_files(tmp_path) -> None:
    from graphs.io import (
        CircuitFileError,
        load_circuit,
        load_mib_json,
        load_positional_circuit,
        positional_circuit_from_dict,
        positional_circuit_to_dict,
        save_positional_circuit,
        save_positional_mib_json,
    )

    pc = _scored_circuit()
    path = tmp_path / "pc.json"
    save_positional_circuit(pc, path)
    back = load_positional_circuit(path)
    assert torch.equal(back.in_circuit, pc.in_circuit) and back.tokens == pc.tokens
    assert back.scores is not None and pc.scores is not None and torch.equal(back.scores.values, pc.scores.values)
    assert dict(back.provenance) == dict(pc.provenance)
    assert "a0.h1@2->logits@2" in path.read_text()
    with pytest.raises(CircuitFileError, match="token-position circuit"):
        load_circuit(path)
    good = positional_circuit_to_dict(pc)
    bad_cases = {
        "equal positions": {**good, "edges": [{"id": "a0.h1@1->logits@2", "score": 1.0, "in_circuit": True}]},
        "position 7": {**good, "edges": [{"id": "a0.h1@7->logits@7", "score": 1.0, "in_circuit": True}]},
        "not a positional edge": {**good, "edges": [{"id": "a0.h1->logits", "score": 1.0, "in_circuit": True}]},
        "duplicate": {**good, "edges": good["edges"][:1] * 2},
        "not upstream": {**good, "edges": [{"id": "a1.h0@0->a0.h1@0<q>", "score": 1.0, "in_circuit": True}]},
        "tokens": {**good, "tokens": [1, 2]},
        "positions": {**good, "tokens": []},
        "true or false": {**good, "edges": [{"id": "a0.h1@1->logits@1", "score": 1.0, "in_circuit": "yes"}]},
    }
    for message, data in bad_cases.items():
        with pytest.raises(CircuitFileError, match=message):
            positional_circuit_from_dict(data)
    with pytest.raises(ValueError, match="no token positions"):
        save_positional_mib_json(pc, tmp_path / "mib.json", d_model=8)
    save_positional_mib_json(pc, tmp_path / "mib.json", d_model=8, collapse=True)
    mib = load_mib_json(tmp_path / "mib.json")
    assert torch.equal(mib.in_circuit, pc.collapsed().in_circuit)
    assert torch.allclose(mib.scores.values, pc.scores.summed().values)


def test_positional_svg_has_token_columns_escaped(tmp_path) -> None:
    import re
    import xml.etree.ElementTree as ET

    from graphs.render_positional import render_positional

    pc = _scored_circuit()
    result = render_positional(pc, tmp_path / "pc.svg")
    svg = (tmp_path / "pc.svg").read_text()
    root = ET.fromstring(svg)  # well-formed XML
    texts = [el.text for el in root.iter() if el.text]
    assert "<script>alert(1)</script>" in texts  # shown as text ...
    assert not any(el.tag.endswith("script") for el in root.iter())  # ... never as an element
    assert "\\G" in texts and "&amp;" in texts
    xs = [float(re.search(rf'id="cc_col{t}".*?<text[^>]*x="([-\d.]+)"', svg, re.S).group(1)) for t in range(5)]
    assert xs == sorted(xs)  # columns in token order
    assert result.n_edges == pc.n_edges
    assert 'id="cc_n2_p2"' in svg  # a0.h1 (sender 2) at position 2


# ----------------------------------------------------------------------------- pipeline and CLI


def test_discover_positional_writes_a_positional_circuit(tiny_dir, tmp_path) -> None:
    from circuits.pipeline import (
        DiscoveryError,
        DiscoverySettings,
        PositionalDiscoveryResult,
        discover,
        run,
    )
    from graphs.io import load_positional_circuit

    base = {"model": str(tiny_dir), "task": "ioi", "n_prompts": 8, "batch_size": 4, "positional": True}
    with pytest.raises(AlignmentError, match="prompt"):
        discover(DiscoverySettings(**base, method="eap", edges=20))
    result, paths = run(DiscoverySettings(**base, method="eap", edges=20, aligned_subset=True), tmp_path / "run")
    assert isinstance(result, PositionalDiscoveryResult)
    assert result.circuit.n_edges == 20 and result.summary()["positional"]
    loaded = load_positional_circuit(paths["circuit"])
    assert torch.equal(loaded.in_circuit, result.circuit.in_circuit) and loaded.tokens == result.scores.tokens
    assert loaded.provenance["faithfulness"] == pytest.approx(result.faithfulness.value)
    assert paths["svg"].read_text().startswith("<?xml")
    target = discover(DiscoverySettings(**base, method="eap-ig", steps=2, target_faithfulness=0.8, aligned_subset=True))
    assert target.faithfulness.value >= 0.8
    for name in ("acdc", "atp*", "path-patching"):
        with pytest.raises(DiscoveryError, match="--positional supports edge-patching, eap, eap-ig, cdt"):
            DiscoverySettings(**base, method=name)
    cdt = discover(DiscoverySettings(**base, method="cdt", edges=15, aligned_subset=True))
    assert isinstance(cdt, PositionalDiscoveryResult) and cdt.scores.method == "cdt/projected"
    assert cdt.circuit.n_edges == 15 and cdt.circuit.provenance["method"] == "cdt"


def test_cli_discover_positional(tiny_dir, tmp_path) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "cli"
    args = ["discover", "--model", str(tiny_dir), "--positional", "--aligned-subset", "--method", "edge-patching",
            "--edges", "10", "--n-prompts", "4", "--batch-size", "4", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "read position" in result.output and (out / "circuit.json").exists()
    cdt = CliRunner().invoke(cli, [*args[:-2], "--method", "cdt", "--out", str(tmp_path / "cdt")])
    assert cdt.exit_code == 0, cdt.output
    assert "read position" in cdt.output and (tmp_path / "cdt" / "circuit.json").exists()
    bad = CliRunner().invoke(cli, [*args[:-2], "--method", "acdc", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--positional supports" in bad.output


def test_positional_drawing_filter_ranks_non_finite_scores_last() -> None:
    """``--top`` keeps the largest finite |score| first (as the plain filter does); NaN / inf last."""
    from graphs.graph import ComputationGraph
    from graphs.positional import PositionalEdgeScores
    from graphs.render_positional import filter_positional

    g = ComputationGraph(2, 2)
    values = torch.zeros(g.n_senders, g.n_receivers, 3)
    real = torch.nonzero(g.edge_mask)
    (s0, r0), (s1, r1), (s2, r2) = real[0].tolist(), real[1].tolist(), real[2].tolist()
    values[s0, r0, 1] = float("nan")
    values[s1, r1, 2] = float("inf")
    values[s2, r2, 0] = 0.5
    scores = PositionalEdgeScores(g, values, ("a", "b", "c"))
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[s0, r0, 1] = mask[s1, r1, 2] = mask[s2, r2, 0] = True
    circuit = PositionalCircuit(g, mask, scores.tokens, scores)
    shown = filter_positional(circuit, top=1)
    assert shown.in_circuit.sum() == 1 and bool(shown.in_circuit[s2, r2, 0])
