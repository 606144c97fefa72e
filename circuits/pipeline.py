"""The discovery pipeline behind ``circuits discover``: model + task -> scores -> circuit -> files.

    load model -> ModelSpec ; make task -> TokenizedTask ; both -> Experiment
    -> method -> EdgeScores -> selection (edges / threshold / target faithfulness) -> Circuit
    -> faithfulness, curve, random baseline -> circuit.json, scores.safetensors, circuit.svg, curve.json

Everything the CLI does lives here, so scripts get the same behaviour (and tests need no CLI).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from circuits.evaluate import (
    Curve,
    Faithfulness,
    RandomBaseline,
    faithfulness,
    faithfulness_curve,
    random_baseline,
    reference_metrics,
)
from circuits.experiment import Experiment
from circuits.methods.registry import method
from circuits.metrics import make_metric
from circuits.prune import MinimalCircuit, minimal_circuit, remove_dangling, select, threshold
from circuits.tasks import load_task_file, make_task
from circuits.tasks.base import TaskError, TokenizedTask
from graphs.adapters import build_spec
from graphs.circuit import Circuit
from graphs.loading import LoadedModel, load_model
from graphs.provenance import make_provenance
from graphs.scores import EdgeScores


class DiscoveryError(ValueError):
    """The discovery settings are inconsistent (e.g. two selection rules at once)."""


@dataclass(frozen=True)
class DiscoverySettings:
    model: str = "smollm2-135m"
    task: str = "ioi"
    task_file: str | None = None
    method: str = "eap-ig"
    edges: int | None = None
    threshold: float | None = None
    target_faithfulness: float | None = 0.9
    selection: str = "top-n"  # or "greedy"
    ablation: str = "corrupted"
    metric: str | None = None  # None: the method's default (kl for ACDC, logit_diff otherwise)
    n_prompts: int = 32
    seed: int = 0
    batch_size: int = 16
    steps: int = 5  # EAP-IG
    ig_variant: str = "inputs"  # EAP-IG
    tau: float = 0.01  # ACDC
    k: int = 5  # path-patching search
    random_samples: int = 5
    curve: bool = True

    def rule(self) -> str:
        """Which selection rule applies: "acdc", "edges", "threshold" or "target"."""
        if self.method == "acdc":
            return "acdc"
        given = [name for name, v in (("edges", self.edges), ("threshold", self.threshold)) if v is not None]
        if len(given) > 1:
            raise DiscoveryError("give at most one of --edges and --threshold")
        if given:
            return given[0]
        if self.target_faithfulness is None:
            raise DiscoveryError("give --edges, --threshold or --target-faithfulness")
        return "target"


@dataclass(frozen=True, eq=False)
class DiscoveryResult:
    settings: DiscoverySettings
    circuit: Circuit
    scores: EdgeScores
    faithfulness: Faithfulness
    random: RandomBaseline
    curve: Curve | None
    search: MinimalCircuit | None
    timings: dict[str, float] = field(default_factory=dict)
    d_model: int = 0

    def summary(self) -> dict[str, Any]:
        nodes = self.circuit.nodes()
        return {
            "method": self.settings.method,
            "edges": self.circuit.n_edges,
            "edge_fraction": self.circuit.edge_fraction,
            "nodes": len(nodes),
            "heads": sum(1 for n in nodes if n.kind.value == "head"),
            "mlps": sum(1 for n in nodes if n.kind.value == "mlp"),
            "faithfulness": self.faithfulness.value,
            "random_faithfulness": self.random.mean,
            "cpr": None if self.curve is None else self.curve.cpr,
            "cmd": None if self.curve is None else self.curve.cmd,
            "seconds": self.timings,
        }


def load_task(settings: DiscoverySettings, loaded: LoadedModel) -> TokenizedTask:
    if loaded.tokenizer is None:
        raise TaskError(f"model {settings.model!r} has no tokenizer, so tasks cannot be tokenized for it")
    if settings.task_file is not None:
        return load_task_file(settings.task_file, loaded.tokenizer)
    return make_task(settings.task, loaded.tokenizer, n_prompts=settings.n_prompts, seed=settings.seed)


def discover(settings: DiscoverySettings, progress: bool = False, loaded: LoadedModel | None = None) -> DiscoveryResult:
    """Run the whole pipeline (see the module docstring)."""
    rule = settings.rule()
    info = method(settings.method)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = loaded or load_model(settings.model, progress=progress)
    spec = build_spec(loaded.model)
    task = load_task(settings, loaded)
    metric = make_metric(settings.metric or info.default_metric)
    experiment = Experiment(spec, task, metric, ablation=settings.ablation, batch_size=settings.batch_size)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    output = info.run(
        experiment, progress, steps=settings.steps, ig_variant=settings.ig_variant, tau=settings.tau, k=settings.k
    )
    timings["scores"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    baseline = reference_metrics(experiment)
    search = None
    if rule == "acdc":
        assert output.circuit is not None
        circuit = output.circuit
    elif rule == "edges":
        assert settings.edges is not None
        circuit = remove_dangling(select(output.scores, settings.edges, settings.selection))
    elif rule == "threshold":
        assert settings.threshold is not None
        circuit = remove_dangling(threshold(output.scores, settings.threshold))
    else:
        assert settings.target_faithfulness is not None
        search = minimal_circuit(
            experiment, output.scores, settings.target_faithfulness, settings.selection, baseline=baseline
        )
        circuit = search.circuit
    faith = search.faithfulness if search is not None else faithfulness(experiment, circuit, baseline)
    rand = random_baseline(experiment, circuit.n_edges, samples=settings.random_samples, seed=settings.seed,
                           baseline=baseline)
    curve = faithfulness_curve(experiment, output.scores, baseline=baseline, selection=settings.selection) \
        if settings.curve else None
    timings["evaluate"] = time.perf_counter() - t0

    provenance = make_provenance(
        model=loaded.name,
        model_revision=loaded.revision,
        family=loaded.family,
        task=task.name,
        dataset_sha256=task.dataset_hash(),
        n_prompts=len(task),
        method=settings.method,
        settings={**dict(output.scores.settings), **_method_settings(settings), **output.extra},
        selection=rule if rule != "target" else f"minimal circuit at faithfulness >= {settings.target_faithfulness}",
        ablation=settings.ablation,
        metric=metric.name,
        seed=settings.seed,
        faithfulness=faith.value,
        random_faithfulness=rand.mean,
        d_model=spec.d_model,
    )
    circuit = Circuit(circuit.graph, circuit.in_circuit, output.scores, provenance)
    return DiscoveryResult(settings, circuit, output.scores, faith, rand, curve, search, timings, spec.d_model)


def _method_settings(settings: DiscoverySettings) -> dict[str, Any]:
    keys = {"eap-ig": ("steps", "ig_variant"), "acdc": ("tau",), "path-patching": ("k",)}.get(settings.method, ())
    return {k: getattr(settings, k) for k in keys} | {"batch_size": settings.batch_size, "selection": settings.selection}


def curve_record(result: DiscoveryResult) -> dict[str, Any]:
    """What ``curve.json`` holds: the faithfulness curve, CPR/CMD, the random baseline, the search."""
    out: dict[str, Any] = {
        "faithfulness": asdict(result.faithfulness),
        "random_baseline": {"n_edges": result.random.n_edges, "values": list(result.random.values),
                            "mean": result.random.mean, "std": result.random.std, "seed": result.random.seed},
    }
    if result.curve is not None:
        c = result.curve
        out["curve"] = {"fractions": list(c.fractions), "n_edges": list(c.n_edges), "faithfulness": list(c.values),
                        "cpr": c.cpr, "cmd": c.cmd, "selection": c.selection}
    if result.search is not None:
        out["minimal_circuit_search"] = {"target": result.search.target, "n": result.search.n,
                                         "points": [asdict(p) for p in result.search.points]}
    return out


def write_outputs(result: DiscoveryResult, out_dir: str | Path, svg: bool = True) -> dict[str, Path]:
    """Write circuit.json, scores.safetensors, curve.json and (with graphviz) circuit.svg."""
    from safetensors.torch import save_file

    from graphs.io import atomic_write, save_circuit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"circuit": out / "circuit.json", "scores": out / "scores.safetensors", "curve": out / "curve.json"}
    save_circuit(result.circuit, paths["circuit"])
    g = result.scores.graph
    metadata = {"provenance": json.dumps(dict(result.circuit.provenance), sort_keys=True),
                "graph": json.dumps({"n_layers": g.n_layers, "n_heads": g.n_heads,
                                     "parallel_residual": g.parallel_residual})}
    tensors = {"scores": result.scores.values.contiguous(), "edge_mask": g.edge_mask.contiguous(),
               "in_circuit": result.circuit.in_circuit.contiguous()}
    tmp = paths["scores"].with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(paths["scores"])
    with atomic_write(paths["curve"]) as f:
        f.write(json.dumps(curve_record(result), indent=2, sort_keys=True).encode())
    if svg:
        from graphs.render import render

        paths["svg"] = out / "circuit.svg"
        render(result.circuit, paths["svg"])
    return paths


def settings_from_mapping(values: Mapping[str, Any]) -> DiscoverySettings:
    """Settings from a config mapping (e.g. a TOML file's table); unknown keys are an error."""
    known = set(DiscoverySettings.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise DiscoveryError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return DiscoverySettings(**dict(values))


__all__ = ["DiscoveryResult", "DiscoverySettings", "discover", "write_outputs"]
