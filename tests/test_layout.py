"""Project contracts: imports go cli -> circuits -> graphs; no unsafe loading anywhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from transformers import BertConfig, OPTConfig, OPTForCausalLM

from graphs.adapters import UnsupportedArchitecture, build_spec, family_of

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "graphs": {"circuits", "cli", "groundtruth", "benchmarks"},
    "circuits": {"cli", "groundtruth", "benchmarks"},
    "cli": {"groundtruth", "benchmarks"},
    "groundtruth": {"cli"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_layout_checker_detects_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import os\nfrom circuits.metrics import logit_diff\n")
    assert "circuits" in _imported_top_levels(bad)


def test_no_pickle_or_unsafe_torch_load() -> None:
    offenders = []
    for package in ("graphs", "circuits", "cli"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if re.search(r"\bpickle\b|\bdill\b", text):
                offenders.append(f"{path}: pickle")
            for call in re.findall(r"torch\.load\([^)]*\)", text):
                if "weights_only=True" not in call:
                    offenders.append(f"{path}: {call}")
    assert not offenders, offenders


def test_unsupported_architecture_names_supported_families() -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        family_of("bert")
    message = str(info.value)
    for expected in ("gpt2", "llama", "mistral", "qwen2", "gpt_neox"):
        assert expected in message
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=16, num_attention_heads=2,
                                     vocab_size=50, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitecture, match="opt"):
        build_spec(model)
    assert BertConfig().model_type == "bert"
