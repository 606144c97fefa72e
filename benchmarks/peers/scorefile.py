"""The score file both sides write: edge scores keyed by *our* edge ids, in safetensors.

One tensor ``scores`` [E] (float64) and, in the metadata, ``edges``: the E edge ids in our spelling
(``a0.h3->m0``, ``input->a1.h2<q>``, ``m2->logits``), one per line, in the same order; optional
``kept`` [E] (uint8) marks the edges of a circuit (ACDC). Any other metadata is free-form
strings. A single vector with its id list keeps the file small (123,211 keys as separate tensors
would make a 10 MB header).

This module only needs torch and safetensors: the peers venv imports it too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file


def write_scores(
    path: Path,
    scores: dict[str, float],
    meta: dict[str, str] | None = None,
    kept: set[str] | None = None,
) -> None:
    """Write ``{our edge id: score}`` (and optionally the ids of kept edges) to ``path``."""
    ids = sorted(scores)
    tensors = {"scores": torch.tensor([scores[e] for e in ids], dtype=torch.float64)}
    if kept is not None:
        tensors["kept"] = torch.tensor([e in kept for e in ids], dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={**(meta or {}), "edges": "\n".join(ids)})


def read_scores(path: Path) -> tuple[dict[str, float], set[str] | None, dict[str, str]]:
    """``({edge id: score}, kept edge ids or None, metadata)`` from a file of ``write_scores``."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        values = f.get_tensor("scores").tolist()
        names = set(f.keys())
        kept_flags = f.get_tensor("kept").tolist() if "kept" in names else None
    ids = meta.pop("edges").split("\n") if meta.get("edges") else []
    if len(ids) != len(values):
        raise ValueError(f"{path}: {len(ids)} edge ids for {len(values)} scores")
    kept = None if kept_flags is None else {e for e, k in zip(ids, kept_flags, strict=True) if k}
    return dict(zip(ids, values, strict=True)), kept, meta
