"""The discovery pipeline behind ``circuits discover``: model + task -> scores -> circuit -> files.

    load model -> ModelSpec ; make task -> TokenizedTask ; both -> Experiment
    -> method -> EdgeScores -> selection (edges / threshold / target faithfulness) -> Circuit
    -> faithfulness, curve, random baseline -> circuit.json, scores.safetensors, circuit.svg, curve.json

Everything the CLI does lives here, so scripts get the same behaviour (and tests need no CLI).

Long runs (docs/scale.md): with ``run_dir`` the method's progress and the minimal-circuit search
are saved under ``run_dir/progress/`` (atomic files tagged with a fingerprint of the run);
``resume=True`` continues from them, and without it existing progress is an error. With a
``World`` of several ranks (torchrun) every rank scores its shard of the prompts, the partial sums
are all-reduced, and rank 0 alone selects, evaluates and writes the outputs.

Outputs are deterministic: the same settings and seed give byte-identical files apart from the
provenance ``date`` (which ``SOURCE_DATE_EPOCH`` fixes too).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from circuits.checkpoint import Checkpointer, fingerprint, weights_fingerprint
from circuits.distributed import SINGLE, World, shard_experiment, world_reducer
from circuits.evaluate import (
    Curve,
    Faithfulness,
    RandomBaseline,
    faithfulness,
    faithfulness_curve,
    positional_faithfulness,
    random_baseline,
    reference_metrics,
)
from circuits.experiment import Experiment
from circuits.methods.registry import POSITIONAL, RESUMABLE, SHARDED, MethodOutput, method
from circuits.metrics import make_metric
from circuits.prune import MinimalCircuit, minimal_circuit, remove_dangling, select, threshold
from circuits.tasks import load_task_file, make_task
from circuits.tasks.base import TaskError, TokenizedTask
from graphs.adapters import build_spec
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.loading import LoadedModel, load_model
from graphs.positional import PositionalCircuit, PositionalEdgeScores
from graphs.provenance import make_provenance
from graphs.scores import EdgeScores


class DiscoveryError(ValueError):
    """The discovery settings are inconsistent (e.g. two selection rules at once)."""


POSITIONAL_METHODS = POSITIONAL  # methods with a token-position variant (the registry says which)
LIMITS = {"n_prompts": 10**7, "steps": 10**5, "random_samples": 10**5, "k": 10**6}


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
    positional: bool = False  # token-position circuit (eap, eap-ig, edge-patching, cdt; docs/positions.md)
    aligned_subset: bool = False  # positional: keep the largest group of prompts sharing one alignment

    def __post_init__(self) -> None:
        """Refuse wrong types and non-finite numbers (config files can hold anything) up front."""
        for name, f in self.__dataclass_fields__.items():
            value = getattr(self, name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            optional = "None" in kind
            if value is None:
                if not optional:
                    raise DiscoveryError(f"setting {name!r} must not be empty (null)")
                continue
            if kind.startswith("int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DiscoveryError(f"setting {name!r} must be an integer, got {value!r}")
            elif kind.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DiscoveryError(f"setting {name!r} must be a finite number, got {value!r}")
            elif kind.startswith("str"):
                if not isinstance(value, str):
                    raise DiscoveryError(f"setting {name!r} must be a string, got {value!r}")
            elif kind == "bool" and not isinstance(value, bool):
                raise DiscoveryError(f"setting {name!r} must be true or false, got {value!r}")
        for name in ("n_prompts", "batch_size", "steps", "k"):
            if getattr(self, name) < 1:
                raise DiscoveryError(f"setting {name!r} must be at least 1, got {getattr(self, name)}")
        if self.edges is not None and self.edges < 1:
            raise DiscoveryError(f"edges must be at least 1, got {self.edges}")
        if self.random_samples < 1:
            raise DiscoveryError(f"random_samples must be at least 1, got {self.random_samples}")
        for name, cap in LIMITS.items():  # far beyond any real run; refuse before a generator loops for ever
            if getattr(self, name) > cap:
                raise DiscoveryError(f"setting {name!r} is {getattr(self, name)}, above the limit of {cap}")
        if not -(2**63) <= self.seed < 2**63:
            raise DiscoveryError(f"seed must fit in 64 bits, got {self.seed}")
        if self.tau < 0:
            raise DiscoveryError(f"tau must be non-negative, got {self.tau}")
        if self.target_faithfulness is not None and not 0 < self.target_faithfulness <= 1:
            raise DiscoveryError(f"target_faithfulness must lie in (0, 1], got {self.target_faithfulness}")
        if self.positional and self.method not in POSITIONAL_METHODS:
            raise DiscoveryError(
                f"--positional supports {', '.join(POSITIONAL_METHODS)}; {self.method} has no token-position "
                "variant yet (docs/positions.md)"
            )
        if self.positional and self.selection != "top-n":
            raise DiscoveryError("positional circuits are selected top-n (or by threshold); greedy is not supported")

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


PROGRESS_DIR = "progress"


def progress_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its progress files: ``RUN_DIR/progress``."""
    return Path(run_dir) / PROGRESS_DIR


def check_progress(run_dir: str | Path | None, resume: bool) -> None:
    """Refuse to start over a run directory that holds another run's progress unless resuming."""
    if run_dir is None or resume:
        return
    folder = progress_dir(run_dir)
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        raise DiscoveryError(
            f"{folder} holds the progress of an interrupted run; pass --resume to continue it, "
            f"or delete {folder} (or use another --out) to start over"
        )


def clear_progress(run_dir: str | Path | None) -> None:
    """Delete a finished run's progress files."""
    if run_dir is not None:
        shutil.rmtree(progress_dir(run_dir), ignore_errors=True)


def run_facts(settings: DiscoverySettings, loaded: LoadedModel, task: TokenizedTask, graph: ComputationGraph,
              metric: str) -> dict[str, Any]:
    """What defines the scores of a run: its fingerprint is stored in every progress file."""
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "family": loaded.family,
        "weights": weights_fingerprint(loaded.model.named_parameters()),
        "graph": [graph.n_layers, graph.n_heads, graph.parallel_residual],
        "dataset_sha256": task.dataset_hash(),
        "n_prompts": len(task),
        "method": settings.method,
        "metric": metric,
        "ablation": settings.ablation,
        "batch_size": settings.batch_size,
        **_method_settings(settings, selection=False),
    }


def provenance_date() -> str | None:
    """The provenance date from ``SOURCE_DATE_EPOCH`` (reproducible builds), or None for "now"."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        raise DiscoveryError(f"SOURCE_DATE_EPOCH must be a Unix time in seconds, got {epoch!r}") from None


def _load_scores_stage(ck: Checkpointer, graph: ComputationGraph) -> MethodOutput | None:
    saved = ck.load()
    if saved is None:
        return None
    tensors, meta = saved
    scores = EdgeScores(graph, tensors["scores"], meta["method"], meta["settings"])
    circuit = None
    if "circuit" in tensors:
        circuit = Circuit(graph, tensors["circuit"], scores, {"method": meta["method"], "method_settings": meta["settings"]})
    return MethodOutput(scores, circuit, meta["extra"])


def _save_scores_stage(ck: Checkpointer, output: MethodOutput) -> None:
    tensors = {"scores": output.scores.values}
    if output.circuit is not None:
        tensors["circuit"] = output.circuit.in_circuit
    ck.save(tensors, {"method": output.scores.method, "settings": dict(output.scores.settings), "extra": output.extra})


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def discover(
    settings: DiscoverySettings,
    progress: bool = False,
    loaded: LoadedModel | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> DiscoveryResult | PositionalDiscoveryResult:
    """Run the whole pipeline in this process (see the module docstring; ``settings.positional``:
    a token-position circuit, ``discover_positional``).

    ``run_dir``: keep progress files there (``resume``: continue from them); ``run`` also writes the
    outputs there, and is the entry point for distributed jobs."""
    result = discover_on_rank(settings, progress, loaded, run_dir=run_dir, resume=resume, world=SINGLE)
    assert result is not None
    return result


def discover_on_rank(
    settings: DiscoverySettings,
    progress: bool = False,
    loaded: LoadedModel | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    world: World = SINGLE,
) -> DiscoveryResult | PositionalDiscoveryResult | None:
    """``discover`` as one rank of a job (``world`` from ``circuits.distributed.init_from_env``):
    every rank scores its shard; ranks other than 0 return None once the scores are reduced, and
    rank 0 alone selects and evaluates."""
    rule = settings.rule()
    info = method(settings.method)
    if settings.positional:
        if world.active or resume:
            raise DiscoveryError("positional discovery runs in one process and does not resume yet")
        return discover_positional(settings, progress, loaded)
    check_progress(run_dir, resume)
    date = provenance_date()
    sharded = world.active and settings.method in SHARDED
    if world.active and not sharded:
        if not world.is_root:
            return None  # this method does not reduce over ranks: rank 0 computes it alone
        _say(f"note: {settings.method} is not sharded across ranks yet; rank 0 computes it on all prompts")
        world = SINGLE
    everyone = world_reducer(world)  # collectives over the ranks of a sharded run (identity otherwise)
    everyone.flag(True)  # barrier: every rank has checked the run directory before any rank writes to it
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = loaded or load_model(settings.model, progress=progress and world.is_root)
    if any(p.device.type == "meta" for p in loaded.model.parameters()):
        raise DiscoveryError(
            "the model has weights on the meta device (offloaded to disk by device_map / max_memory); the runtime "
            "reads weights directly and needs every one of them in memory (see docs/scale.md)"
        )
    spec = build_spec(loaded.model)
    task = load_task(settings, loaded)
    metric = make_metric(settings.metric or info.default_metric)
    experiment = Experiment(spec, task, metric, ablation=settings.ablation, batch_size=settings.batch_size)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    facts = run_facts(settings, loaded, task, spec.graph, metric.name)
    folder = None if run_dir is None else progress_dir(run_dir)
    stage = None if folder is None else Checkpointer(folder / "scores.safetensors", fingerprint(stage="scores", **facts))
    output = _load_scores_stage(stage, spec.graph) if stage is not None and world.is_root else None
    if everyone.flag(output is not None):  # rank 0 has the finished scores: nothing to compute
        if not world.is_root:
            return None
        assert output is not None
        _say(f"resumed: scores of {settings.method} read from {stage.path if stage else ''}")
    else:
        method_ck = None
        if folder is not None and settings.method in RESUMABLE:
            suffix = f".rank{world.rank}" if sharded else ""
            method_ck = Checkpointer(
                folder / f"method{suffix}.safetensors",
                fingerprint(stage="method", rank=world.rank if sharded else 0, world=world.size if sharded else 1, **facts),
            )
        run_on = shard_experiment(experiment, world) if sharded else experiment
        output = info.run(
            run_on, progress and world.is_root, steps=settings.steps, ig_variant=settings.ig_variant, tau=settings.tau,
            k=settings.k, checkpoint=method_ck,
        )
        if world.is_root and stage is not None:
            _save_scores_stage(stage, output)
        if sharded:
            everyone.flag(True)  # barrier: the scores are safe on rank 0 before shard progress goes
        if method_ck is not None:
            method_ck.clear()
        if not world.is_root:
            return None
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
        search_ck = None if folder is None else Checkpointer(
            folder / "search.safetensors",
            fingerprint(stage="search", target=settings.target_faithfulness, selection=settings.selection, **facts),
        )
        search = minimal_circuit(
            experiment, output.scores, settings.target_faithfulness, settings.selection, baseline=baseline,
            checkpoint=search_ck,
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
        **({"date": date} if date is not None else {}),
    )
    circuit = Circuit(circuit.graph, circuit.in_circuit, output.scores, provenance)
    return DiscoveryResult(settings, circuit, output.scores, faith, rand, curve, search, timings, spec.d_model)


def run(
    settings: DiscoverySettings,
    out_dir: str | Path,
    *,
    resume: bool = False,
    world: World = SINGLE,
    svg: bool = True,
    progress: bool = False,
    loaded: LoadedModel | None = None,
) -> tuple[DiscoveryResult, dict[str, Path]] | None:
    """``discover`` with progress files in ``out_dir``, then ``write_outputs`` there (rank 0), then
    the progress files are deleted. Returns None on ranks other than 0."""
    result = discover_on_rank(settings, progress, loaded, run_dir=out_dir, resume=resume, world=world)
    if result is None:
        return None
    if isinstance(result, PositionalDiscoveryResult):
        return result, write_positional_outputs(result, out_dir, svg=svg)  # type: ignore[return-value]
    paths = write_outputs(result, out_dir, svg=svg)
    clear_progress(out_dir)
    return result, paths


def _method_settings(settings: DiscoverySettings, selection: bool = True) -> dict[str, Any]:
    keys = {"eap-ig": ("steps", "ig_variant"), "acdc": ("tau",), "path-patching": ("k",)}.get(settings.method, ())
    out = {k: getattr(settings, k) for k in keys} | {"batch_size": settings.batch_size}
    return out | {"selection": settings.selection} if selection else out


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


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file with a canonical header (keys sorted, compact JSON), so that equal tensors
    and metadata always give identical bytes (``safetensors`` itself orders metadata at random)."""
    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(metadata))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


SVG_EDGES = 500  # circuit.svg draws at most this many edges (the strongest, and says so in its title)


def write_outputs(
    result: DiscoveryResult, out_dir: str | Path, svg: bool = True, svg_edges: int = SVG_EDGES
) -> dict[str, Path]:
    """Write circuit.json, scores.safetensors, curve.json and (with graphviz) circuit.svg.

    A circuit of more than ``svg_edges`` edges is drawn as its ``svg_edges`` strongest edges (by
    |score|; the drawing's subtitle says how many of how many); the JSON always holds all of them.

    All files are first written in full to temporary names in ``out_dir``; only when every one of
    them is complete are they renamed over the old ones. A failure before that point (a bad value,
    a missing graphviz, a full disk) leaves every existing output untouched."""
    from graphs.io import save_circuit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"circuit": out / "circuit.json", "scores": out / "scores.safetensors", "curve": out / "curve.json"}
    if svg:
        paths["svg"] = out / "circuit.svg"
    token = secrets.token_hex(6)
    staged = {name: out / f".{path.name}.{token}.partial" for name, path in paths.items()}
    try:
        save_circuit(result.circuit, staged["circuit"])
        g = result.scores.graph
        metadata = {"provenance": json.dumps(dict(result.circuit.provenance), sort_keys=True),
                    "graph": json.dumps({"n_layers": g.n_layers, "n_heads": g.n_heads,
                                         "parallel_residual": g.parallel_residual}, sort_keys=True)}
        tensors = {"scores": result.scores.values.contiguous(), "edge_mask": g.edge_mask.contiguous(),
                   "in_circuit": result.circuit.in_circuit.contiguous()}
        staged["scores"].write_bytes(safetensors_bytes(tensors, metadata))
        staged["curve"].write_text(json.dumps(curve_record(result), indent=2, sort_keys=True), encoding="utf-8")
        if svg:
            from graphs.render import render

            top = svg_edges if result.circuit.n_edges > svg_edges else None
            render(result.circuit, staged["svg"], fmt="svg", top=top)
        umask = os.umask(0)
        os.umask(umask)
        for name, path in staged.items():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            try:  # the old file's permission bits, or the usual ones for a new file
                mode = paths[name].stat().st_mode & 0o777
            except FileNotFoundError:
                mode = 0o666 & ~umask
            os.chmod(path, mode)
        for name, path in staged.items():
            os.replace(path, paths[name])
    finally:
        for path in staged.values():
            with suppress(FileNotFoundError):
                path.unlink()
    with suppress(OSError):
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return paths


# ====================================================================== token-position circuits
@dataclass(frozen=True, eq=False)
class PositionalDiscoveryResult:
    """What ``discover`` returns with ``positional=True`` (docs/positions.md)."""

    settings: DiscoverySettings
    circuit: PositionalCircuit
    scores: PositionalEdgeScores
    faithfulness: Faithfulness
    read_position: int
    timings: dict[str, float] = field(default_factory=dict)
    d_model: int = 0

    def summary(self) -> dict[str, Any]:
        nodes = self.circuit.nodes()
        heads = [n for n in nodes if n.kind.value == "head"]
        return {
            "method": self.settings.method,
            "positional": True,
            "edges": self.circuit.n_edges,
            "edge_fraction": self.circuit.edge_fraction,
            "positions": self.circuit.n_positions,
            "read_position": self.read_position,
            "nodes": len(nodes),
            "heads": len(heads),
            "heads_at_read_position": sum(1 for n in heads if n.position == self.read_position),
            "mlps": sum(1 for n in nodes if n.kind.value == "mlp"),
            "faithfulness": self.faithfulness.value,
            "random_faithfulness": None,
            "cpr": None,
            "cmd": None,
            "seconds": self.timings,
        }


def _positional_scores(settings: DiscoverySettings, experiment: Experiment, tokenizer: Any, progress: bool
                       ) -> PositionalEdgeScores:
    """The method's token-position scores (``MethodInfo.run_positional`` of the registry)."""
    run = method(settings.method).run_positional
    if run is None:  # settings refuse this earlier; kept for callers that build settings by hand
        raise DiscoveryError(f"{settings.method} has no token-position variant (docs/positions.md)")
    return run(experiment, progress, steps=settings.steps, ig_variant=settings.ig_variant, tokenizer=tokenizer)


def positional_minimal_circuit(
    experiment: Experiment, scores: PositionalEdgeScores, target: float, baseline: Any
) -> tuple[PositionalCircuit, Faithfulness]:
    """The smallest top-n positional circuit reaching ``target`` faithfulness, by bisection over n
    (n ranges over the edges with a nonzero score; faithfulness is assumed to grow with n)."""
    hi = max(1, int((scores.values != 0).sum()))

    def at(n: int) -> tuple[PositionalCircuit, Faithfulness]:
        circuit = PositionalCircuit(scores.graph, scores.top_n_mask(n), scores.tokens, scores)
        return circuit, positional_faithfulness(experiment, circuit, baseline)

    best = at(hi)
    if best[1].value < target:
        return best
    lo = 0  # f(lo) < target (the empty circuit has f = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = at(mid)
        if trial[1].value >= target:
            hi, best = mid, trial
        else:
            lo = mid
    return best


def discover_positional(
    settings: DiscoverySettings, progress: bool = False, loaded: LoadedModel | None = None
) -> PositionalDiscoveryResult:
    """``discover`` for a token-position circuit: positional scores, top-n / threshold / minimal
    positional circuit, positional faithfulness. The task must share one token alignment (or pass
    ``aligned_subset=True`` to keep the largest aligned group of prompts)."""
    from circuits.positional import aligned_subset, check_alignment

    rule = settings.rule()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = loaded or load_model(settings.model, progress=progress)
    spec = build_spec(loaded.model)
    task = load_task(settings, loaded)
    if settings.aligned_subset:
        task = aligned_subset(task)
    alignment = check_alignment(task, loaded.tokenizer)
    metric = make_metric(settings.metric or method(settings.method).default_metric)
    experiment = Experiment(spec, task, metric, ablation=settings.ablation, batch_size=settings.batch_size)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = _positional_scores(settings, experiment, loaded.tokenizer, progress)
    timings["scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline = reference_metrics(experiment)
    if rule == "edges":
        assert settings.edges is not None
        circuit = PositionalCircuit(spec.graph, scores.top_n_mask(settings.edges), scores.tokens, scores)
        faith = positional_faithfulness(experiment, circuit, baseline)
    elif rule == "threshold":
        assert settings.threshold is not None
        circuit = PositionalCircuit(spec.graph, scores.threshold_mask(settings.threshold), scores.tokens, scores)
        faith = positional_faithfulness(experiment, circuit, baseline)
    else:
        assert settings.target_faithfulness is not None
        circuit, faith = positional_minimal_circuit(experiment, scores, settings.target_faithfulness, baseline)
    timings["evaluate"] = time.perf_counter() - t0
    date = provenance_date()
    provenance = make_provenance(
        model=loaded.name, model_revision=loaded.revision, family=loaded.family, task=task.name,
        dataset_sha256=task.dataset_hash(), n_prompts=len(task), method=settings.method,
        settings={**dict(scores.settings), **_method_settings(settings), "positional": True,
                  "aligned_subset": settings.aligned_subset, "prompts_generated": settings.n_prompts},
        selection=rule if rule != "target" else f"minimal circuit at faithfulness >= {settings.target_faithfulness}",
        ablation=settings.ablation, metric=metric.name, seed=settings.seed, faithfulness=faith.value,
        d_model=spec.d_model, read_position=alignment.read_position,
        **({"date": date} if date is not None else {}),
    )
    circuit = circuit.with_provenance(**provenance)
    return PositionalDiscoveryResult(settings, circuit, scores, faith, alignment.read_position, timings, spec.d_model)


SVG_TOP = 300  # positional drawings show at most this many edges (the strongest): T columns need room


def write_positional_outputs(result: PositionalDiscoveryResult, out_dir: str | Path, svg: bool = True) -> dict[str, Path]:
    """Write circuit.json (positional ids), scores.safetensors ([S, R, T] scores and circuit mask)
    and circuit.svg (positions as columns; the ``SVG_TOP`` strongest circuit edges), atomically each."""
    from graphs.io import atomic_write, save_positional_circuit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"circuit": out / "circuit.json", "scores": out / "scores.safetensors"}
    save_positional_circuit(result.circuit, paths["circuit"])
    g = result.scores.graph
    metadata = {"provenance": json.dumps(dict(result.circuit.provenance), sort_keys=True),
                "tokens": json.dumps(list(result.scores.tokens)),
                "graph": json.dumps({"n_layers": g.n_layers, "n_heads": g.n_heads,
                                     "parallel_residual": g.parallel_residual}, sort_keys=True)}
    tensors = {"scores": result.scores.values.contiguous(), "in_circuit": result.circuit.in_circuit.contiguous()}
    with atomic_write(paths["scores"]) as handle:
        handle.write(safetensors_bytes(tensors, metadata))
    if svg:
        from graphs.render_positional import render_positional

        paths["svg"] = out / "circuit.svg"
        top = SVG_TOP if result.circuit.n_edges > SVG_TOP else None
        render_positional(result.circuit, paths["svg"], fmt="svg", top=top)
    return paths


def settings_from_mapping(values: Mapping[str, Any]) -> DiscoverySettings:
    """Settings from a config mapping (e.g. a TOML file's table); unknown keys are an error."""
    known = set(DiscoverySettings.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise DiscoveryError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return DiscoverySettings(**dict(values))


__all__ = ["DiscoveryResult", "DiscoverySettings", "PositionalDiscoveryResult", "discover_positional", "check_progress", "clear_progress", "discover", "discover_on_rank",
           "run", "write_outputs"]
