"""The study scripts' shared helpers (benchmarks/common.py): reading a run's scores, updating a run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import common


class _Task:
    def __init__(self, name: str, digest: str, n: int) -> None:
        self.name, self._digest, self._n = name, digest, n

    def dataset_hash(self) -> str:
        return self._digest

    def __len__(self) -> int:
        return self._n


def _scores_file(path: Path, provenance: dict[str, object], shape: tuple[int, int]) -> Path:
    save_file({"scores": torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)}, str(path),
              metadata={"provenance": json.dumps(provenance)})
    return path


def test_read_study_scores_returns_scores_made_on_the_same_dataset(tmp_path: Path) -> None:
    prov = {"task": "ioi", "dataset_sha256": "abc", "n_prompts": 16, "method": "acdc"}
    path = _scores_file(tmp_path / "s.safetensors", prov, (3, 4))
    values, got = common.read_study_scores(path, _Task("ioi", "abc", 16), SimpleNamespace(n_senders=3, n_receivers=4))
    assert got["method"] == "acdc"
    assert torch.equal(values, torch.arange(12, dtype=torch.float32).view(3, 4))


@pytest.mark.parametrize("task, shape", [
    (_Task("greater-than", "abc", 16), (3, 4)),  # another task
    (_Task("ioi", "abd", 16), (3, 4)),  # another dataset
    (_Task("ioi", "abc", 8), (3, 4)),  # fewer prompts
    (_Task("ioi", "abc", 16), (4, 3)),  # another graph
])
def test_read_study_scores_rejects_scores_of_another_dataset_or_graph(tmp_path: Path, task: _Task,
                                                                     shape: tuple[int, int]) -> None:
    prov = {"task": "ioi", "dataset_sha256": "abc", "n_prompts": 16}
    path = _scores_file(tmp_path / "s.safetensors", prov, shape)
    with pytest.raises(SystemExit, match="was made on"):
        common.read_study_scores(path, task, SimpleNamespace(n_senders=3, n_receivers=4))


def test_update_study_run_adds_fields_to_one_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    runs = [{"task": "ioi", "method": "acdc", "edges": 287}, {"task": "ioi", "method": "eap", "edges": 9},
            {"task": "induction", "method": "acdc", "edges": 55}]
    (tmp_path / "study_smollm2.json").write_text(json.dumps({"model": "m", "runs": runs}))
    common.update_study_run("ioi", "acdc", ranking_minimal={"edges": 3568})
    after = json.loads((tmp_path / "study_smollm2.json").read_text())["runs"]
    assert after[0] == {**runs[0], "ranking_minimal": {"edges": 3568}}
    assert after[1:] == runs[1:]
    with pytest.raises(SystemExit, match="no cdt run on ioi"):
        common.update_study_run("ioi", "cdt", x=1)
