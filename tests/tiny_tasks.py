"""Experiments on tiny random models and random tasks for evaluation and pruning tests."""

from __future__ import annotations

import torch

from circuits.experiment import Experiment
from graphs.adapters import build_spec
from graphs.adapters.spec import ModelSpec
from graphs.graph import ComputationGraph
from graphs.scores import EdgeScores
from tests.conftest import make_tiny, random_task


def tiny_spec(name: str = "gpt2") -> ModelSpec:
    return build_spec(make_tiny(name))


def experiment(
    spec: ModelSpec,
    metric: str = "logit_diff",
    ablation: str = "corrupted",
    n: int = 8,
    batch_size: int = 3,
    seed: int = 0,
) -> Experiment:
    return Experiment(spec, random_task(n, 7, seed=seed), metric, ablation=ablation, batch_size=batch_size)


def random_scores(graph: ComputationGraph, seed: int = 0) -> EdgeScores:
    gen = torch.Generator().manual_seed(seed)
    return EdgeScores(graph, torch.randn(graph.n_senders, graph.n_receivers, generator=gen), method="random")
