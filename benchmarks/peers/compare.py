"""Agreement between two score files keyed by our edge ids (project interpreter).

EAP scores are compared on the edges both graphs have. auto-circuit's scores are the gradient of
its loss (minus the logit difference), accumulated over batches, so they are expected to be
``-n_batches`` times ours; the fitted factor ``<ours, theirs> / <ours, ours>`` is reported, and
theirs are divided by ``sign(fitted) * n_batches`` before the differences are measured.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 100) -> float:
    """Fraction of the ``k`` largest-|score| edges of ``a`` that are among those of ``b``."""
    k = min(k, len(a))
    if k == 0:
        return math.nan
    top_a = set(torch.topk(a.abs(), k).indices.tolist())
    top_b = set(torch.topk(b.abs(), k).indices.tolist())
    return len(top_a & top_b) / k


def graph_difference(ours: dict[str, float], theirs: dict[str, float], examples: int = 10) -> dict[str, Any]:
    """Edge counts of both graphs, of their intersection and of what each lacks (with examples)."""
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    return {
        "edges_ours": len(ours),
        "edges_theirs": len(theirs),
        "edges_common": len(set(ours) & set(theirs)),
        "only_ours": len(only_ours),
        "only_theirs": len(only_theirs),
        "only_ours_examples": only_ours[:examples],
        "only_theirs_examples": only_theirs[:examples],
    }


def eap_agreement(ours: dict[str, float], theirs: dict[str, float], n_batches: int, k: int = 100) -> dict[str, Any]:
    """Score agreement on the common edges after aligning auto-circuit's sign and batch sum."""
    common = sorted(set(ours) & set(theirs))
    a = torch.tensor([ours[e] for e in common], dtype=torch.float64)
    b = torch.tensor([theirs[e] for e in common], dtype=torch.float64)
    fitted = float(a @ b) / float(a @ a) if float(a @ a) > 0 else math.nan
    sign = -1.0 if fitted < 0 else 1.0
    aligned = b / (sign * n_batches)
    diff = (aligned - a).abs()
    scale = float(a.abs().max()) if len(a) else math.nan
    big = a.abs() >= 0.01 * scale
    record: dict[str, Any] = {
        **graph_difference(ours, theirs),
        "fitted_factor_theirs_over_ours": fitted,
        "alignment_divisor": sign * n_batches,
        "sign": "theirs = -ours (per batch)" if sign < 0 else "theirs = ours (per batch)",
        "max_abs_score_ours": scale,
        "max_abs_diff": float(diff.max()) if len(a) else math.nan,
        "max_rel_diff": float(diff.max()) / scale if scale > 0 else math.nan,
        "max_rel_diff_per_edge_above_1pct": float((diff[big] / a[big].abs()).max()) if bool(big.any()) else math.nan,
        "pearson": _pearson(a, aligned),
        "spearman": _spearman(a, aligned),
        f"top{k}_overlap": top_overlap(a, aligned, k),
        "sum_ours": float(a.sum()),
        "sum_theirs_aligned": float(aligned.sum()),
    }
    return record


def circuit_agreement(
    ours: dict[str, float], theirs: dict[str, float], kept_ours: set[str], kept_theirs: set[str]
) -> dict[str, Any]:
    """Overlap of two circuits (sets of kept edges), restricted to the edges both graphs have.

    ``precision`` and ``recall`` take auto-circuit's circuit as the reference: the fraction of our
    kept edges it keeps too, and the fraction of its kept edges we keep (1.0 when the set is empty)."""
    common = set(ours) & set(theirs)
    a, b = kept_ours & common, kept_theirs & common
    union = a | b
    return {
        **graph_difference(ours, theirs),
        "kept_ours": len(a),
        "kept_theirs": len(b),
        "kept_both": len(a & b),
        "kept_only_ours": len(a - b),
        "kept_only_theirs": len(b - a),
        "jaccard": len(a & b) / len(union) if union else 1.0,
        "precision": len(a & b) / len(a) if a else 1.0,
        "recall": len(a & b) / len(b) if b else 1.0,
        "kept_only_ours_examples": sorted(a - b)[:10],
        "kept_only_theirs_examples": sorted(b - a)[:10],
    }
