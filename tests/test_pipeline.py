"""The discovery pipeline end to end on a tiny model saved to disk with an offline tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuits.methods.path_search import path_patching_search
from circuits.pipeline import DiscoveryError, DiscoverySettings, discover, settings_from_mapping, write_outputs
from graphs.io import load_circuit


def _settings(tiny_dir: Path, **kw) -> DiscoverySettings:
    base = {"model": str(tiny_dir), "task": "ioi", "n_prompts": 6, "batch_size": 3, "random_samples": 2}
    return DiscoverySettings(**{**base, **kw})


@pytest.mark.parametrize("method", ["eap-ig", "eap", "edge-patching", "atp*", "path-patching"])
def test_discover_reaches_the_target(tiny_dir: Path, method: str) -> None:
    result = discover(_settings(tiny_dir, method=method, target_faithfulness=0.8))
    assert result.faithfulness.value >= 0.8
    assert 0 < result.circuit.n_edges <= result.circuit.graph.n_edges
    assert result.search is not None and result.search.n >= 1
    prov = result.circuit.provenance
    for key in ("tool_version", "model", "family", "task", "dataset_sha256", "method", "ablation", "metric", "seed",
                "date", "faithfulness"):
        assert key in prov, key
    assert prov["method"] == method and prov["faithfulness"] == pytest.approx(result.faithfulness.value)


def test_discover_with_edges_and_acdc(tiny_dir: Path) -> None:
    fixed = discover(_settings(tiny_dir, method="eap", edges=10, target_faithfulness=None, curve=False))
    assert fixed.circuit.n_edges <= 10 and fixed.curve is None
    acdc = discover(_settings(tiny_dir, method="acdc", tau=1e-4))
    assert acdc.settings.rule() == "acdc" and acdc.circuit.provenance["metric"] == "kl"


def test_outputs_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    result = discover(_settings(tiny_dir, method="eap", edges=12, target_faithfulness=None))
    paths = write_outputs(result, tmp_path / "run", svg=False)
    loaded = load_circuit(paths["circuit"])
    assert torch.equal(loaded.in_circuit, result.circuit.in_circuit)
    assert torch.equal(loaded.scores.values, result.scores.values)
    tensors = load_file(str(paths["scores"]))
    assert torch.equal(tensors["scores"], result.scores.values) and torch.equal(tensors["in_circuit"], loaded.in_circuit)
    curve = json.loads(paths["curve"].read_text())
    assert curve["curve"]["fractions"][-1] == 1.0 and curve["curve"]["faithfulness"][-1] == pytest.approx(1.0)
    assert "random_baseline" in curve


def test_bad_settings(tiny_dir: Path) -> None:
    with pytest.raises(DiscoveryError):
        _settings(tiny_dir, edges=3, threshold=0.1).rule()
    with pytest.raises(DiscoveryError, match="unknown setting"):
        settings_from_mapping({"modle": "x"})
    with pytest.raises(ValueError, match="unknown method"):
        discover(_settings(tiny_dir, method="magic"))


def test_path_search_expands_from_the_logits() -> None:
    from tests.test_known_path import TRUE_PATH, _experiment

    result = path_patching_search(_experiment("logit_diff"), k=1, max_nodes=4)
    assert str(result.expanded[0]) == "logits"
    assert "a0.h0" in {str(n) for n in result.expanded}
    nonzero = {str(e) for e, s in result.scores.items() if abs(s) > 1e-5}
    assert nonzero == TRUE_PATH


def test_large_circuits_are_drawn_as_their_strongest_edges(tiny_dir: Path, tmp_path: Path) -> None:
    """A circuit too large to draw readably still gets its SVG: the strongest edges, labelled as such."""
    result = discover(_settings(tiny_dir, method="eap", edges=12, target_faithfulness=None, curve=False))
    assert result.circuit.n_edges > 5
    paths = write_outputs(result, tmp_path / "run", svg_edges=5)
    svg = paths["svg"].read_text()
    assert f"showing 5 of {result.circuit.n_edges} circuit edges" in svg
    assert load_circuit(paths["circuit"]).n_edges == result.circuit.n_edges  # the JSON keeps them all
