"""ACDC (Conmy et al. 2023): greedy edge removal in reverse topological order.

Receivers are visited from the logits back (descending receiver index: logits, m_{L-1}, the value,
key and query slots of layer L-1, m_{L-2}, ...); for each receiver its incoming edges are tried
latest sender first. An edge stays removed when the metric drops by less than ``tau``:

    m(current circuit) - m(current circuit without the edge) < tau

With the default KL metric (``m = -KL(full || circuit)``, see circuits/metrics.py) this is ACDC's
rule "KL increases by less than tau". Edges into a node that no longer has any outgoing edge cannot
change the output; they are removed without a forward pass (score 0), as in the original.

ACDC is sequential by nature. Here candidates are evaluated *speculatively*: for the next k
candidates of a receiver one batched pass evaluates k trials along a predicted path of decisions
(trial j removes candidate j on top of the predicted decisions for the candidates before it), the
decisions are replayed in order, and evaluation restarts after the first decision that differs
from its prediction. Every candidate is predicted removed (most are) unless a trial wasted after
an earlier misprediction already showed it raising the metric drop by at least ``tau``: such a
candidate is usually kept, and predicting that keeps it from ending the next batch. Each decision
is taken from a trial whose state is exactly the sequential algorithm's, so the circuit and the
scores are those of the plain sequential algorithm.

A trial differs from the current circuit only in the edges into one receiver, so it can change only
the nodes that receiver's node reaches through kept edges - a few percent of the edges once the
later layers are pruned. Trials recompute just those nodes from a base run of the current circuit
(``graphs.downstream``; the base run is made afresh at each layer's first receiver and updated as
receivers are decided). Models with post-attention norms (Gemma), and datasets too large to keep
cached with their base runs, use full runs resumed from a clean checkpoint at the receiver's layer.

Long runs: ``checkpoint=`` saves the whole search state (removed edges, scores, predicted keeps, the current metric,
the position in the receiver loop and the speculation width) after every pass, atomically; a run
resumed from it evaluates exactly the masks the uninterrupted run would have, so it ends with the
same circuit. On a shard of a distributed run (``circuits.distributed``) every mask's metric sum is
all-reduced over the ranks, so every rank takes the same decisions; rank 0 alone writes progress.
Prepared batches (clean runs and ablation values) are cached up to ``cache_floats`` floats; the
rest of the dataset is prepared again for every pass, so memory stays bounded on large datasets.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from circuits import residual_metric
from circuits.checkpoint import Checkpointer, CheckpointError, batches_from, restore
from circuits.distributed import reducer
from circuits.experiment import Experiment, PreparedBatch
from circuits.numerics import score
from circuits.progress import progress_bar
from circuits.residual_metric import ResidualScorer
from graphs import downstream
from graphs import runtime as rt
from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import NodeKind
from graphs.scores import EdgeScores

CACHE_FLOATS = 2**28  # the least memory ACDC may keep between passes (1 GiB of float32)


def memory_limit_bytes() -> int | None:
    """The memory this process may use: the cgroup's limit in a container, else the physical
    memory, whichever is smaller; None where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" means no limit
            limits.append(int(text))
    return min(limits) if limits else None


def default_cache_floats() -> int:
    """What ACDC may keep in memory between passes by default, in float32 values: a quarter of
    ``memory_limit_bytes()``, and at least ``CACHE_FLOATS``. It is a cap, not an allocation: on
    SmolLM2-135M the base runs that let trials recompute only what they reach need 1-4 GiB for
    8-16 prompts, past the 1 GiB floor (docs/methods/acdc.md)."""
    limit = memory_limit_bytes()
    return CACHE_FLOATS if limit is None else max(CACHE_FLOATS, limit // 4 // 4)


@dataclass(frozen=True)
class ACDCResult:
    circuit: Circuit  # the edges ACDC kept
    scores: EdgeScores  # per edge: m(without it) - m(with it), at the time it was tried
    metric: float  # the kept circuit's metric (dataset mean)
    full_metric: float  # the full model's metric
    evaluations: int  # masks evaluated (each over the whole dataset)
    passes: int  # batched evaluation rounds


def _floats(batch: PreparedBatch, clean: rt.CleanRun) -> int:
    return sum(t.numel() for t in (clean.resid, clean.senders, clean.logits, batch.ablation.values))


class _Evaluator:
    """Dataset-mean metric of K masks at once, resumed at a layer.

    Batches (with their clean runs) are prepared once and cached while they fit in
    ``cache_floats``; later batches are prepared again on every pass. On a distributed shard the
    sums are all-reduced, so the means are those of the whole dataset on every rank."""

    def __init__(self, experiment: Experiment, max_rows: int, cache_floats: int = CACHE_FLOATS) -> None:
        self.experiment = experiment
        self.max_rows = max_rows
        self.reducer = reducer(experiment)
        self.n_total = self.reducer.count(experiment.n_prompts)
        self.prepared: list[tuple[PreparedBatch, rt.CleanRun]] = []
        self.cached_all = True
        used = 0
        for b in experiment.batches():
            clean = rt.clean_run(experiment.spec, b.clean_ids, b.read_positions)
            used += _floats(b, clean)
            if used > cache_floats and self.prepared:
                self.cached_all = False
                break
            self.prepared.append((b, clean))
        self.evaluations = 0
        self.passes = 0

    def _all(self):  # type: ignore[no-untyped-def]
        yield from self.prepared
        if not self.cached_all:
            for b in batches_from(self.experiment, len(self.prepared)):
                yield b, rt.clean_run(self.experiment.spec, b.clean_ids, b.read_positions)

    def full(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for b, c in self._all():
            total += score(self.experiment, b, c.logits).double().sum()
        return float(self.reducer.sum(total)) / self.n_total

    @torch.no_grad()
    def __call__(self, masks: Tensor, layer: int) -> Tensor:
        """Dataset means [K] of the metric with masks [K, S, R] (all entries at layers >= layer)."""
        spec = self.experiment.spec
        K = masks.shape[0]
        sums = torch.zeros(K, dtype=torch.float64)
        for batch, clean in self._all():
            P = batch.size
            step = max(1, self.max_rows // P)
            checkpoint = clean.at(spec, layer)
            for lo in range(0, K, step):
                part = masks[lo : lo + step].float()
                k = part.shape[0]
                logits = rt.run(
                    spec,
                    batch.clean_ids.repeat(k, 1),
                    mask=part,
                    ablation=batch.ablation,
                    read_positions=batch.read_positions.repeat(k),
                    start=checkpoint,
                ).logits
                sums[lo : lo + k] += score(self.experiment, batch, logits.view(k, P, -1)).sum(1).double()
        self.evaluations += K
        self.passes += 1
        return (self.reducer.sum(sums) / self.n_total).float()

    def start_receiver(self, removed: Tensor, receiver: int) -> None:
        """Called before the trials of ``receiver`` (``removed``: the circuit, that receiver's
        column as decided so far)."""

    def trials(self, removed: Tensor, receiver: int, columns: Tensor) -> Tensor:
        """Dataset means [K] of the circuits ``removed`` with receiver's column replaced by
        ``columns[k]`` [K, n_upstream]."""
        masks = removed.unsqueeze(0).repeat(columns.shape[0], 1, 1)
        masks[:, : columns.shape[1], receiver] = columns
        return self(masks, _layer_of(self.experiment.spec.graph, receiver))


class _DownstreamEvaluator(_Evaluator):
    """``_Evaluator`` whose trials recompute only what the changed receiver reaches through kept
    edges (``graphs.downstream``), from a base run of the current circuit per batch.

    The base runs are made afresh at the first receiver of every layer (the logits count as a
    layer) and moved from receiver to receiver within the layer by setting the decided columns
    (``downstream.with_column``). A resumed run rebuilds them the same way - afresh with this
    layer's columns cleared, then column by column - so it computes bitwise what the uninterrupted
    run computed."""

    def __init__(self, plain: _Evaluator) -> None:
        self.__dict__.update(plain.__dict__)
        spec = self.experiment.spec
        streamed = self.experiment.metric.name in residual_metric.STREAMED
        W_T = residual_metric.transposed_unembedding(spec) if streamed else None  # [d, V], shared by the batches
        self.scorers = [ResidualScorer.for_batch(spec, b, W_T) for b, _ in self.prepared]  # None: score the logits
        # the full model's metric as the trials compute theirs (the first decisions compare with it)
        total = torch.zeros((), dtype=torch.float64)
        for (b, clean), scorer in zip(self.prepared, self.scorers, strict=True):
            if scorer is None:
                total += score(self.experiment, b, clean.logits).double().sum()
            else:
                final = clean.resid[-1][torch.arange(b.size), b.read_positions]  # [P, d]
                total += scorer(final[None]).double().sum()
        self.full_value = float(self.reducer.sum(total)) / self.n_total
        self.batches = [b for b, _ in self.prepared]
        self.prepared = []  # the clean runs are not needed any more
        self.memo = downstream.Memo()
        self.bases: list[downstream.BaseRun] = []
        self.layer: int | None = None  # the layer of the base runs
        self.pending = 0  # the base runs have every column of this layer above this receiver set
        self.at_read_positions = True  # False: trials compute every node at every position (a baseline)
        self.reuse_base = True  # False: each decided receiver copies the base run (a baseline)

    @staticmethod
    def fits(experiment: Experiment, evaluator: _Evaluator, cache_floats: int) -> bool:
        """Whether every batch is cached and its base run fits next to them in ``cache_floats``:
        the batches, every batch's base run (sender outputs, receiver inputs, attention patterns),
        room for one more (base runs are updated in place, so this is headroom for the trials'
        changes and a new layer's base runs), and the transposed unembedding."""
        return _DownstreamEvaluator.why_not(experiment, evaluator, cache_floats) is None

    @staticmethod
    def why_not(experiment: Experiment, evaluator: _Evaluator, cache_floats: int) -> str | None:
        """None if downstream trials can run, else the reason, for the user (see ``fits``)."""
        spec = experiment.spec
        g, d = spec.graph, spec.d_model
        if not downstream.supports(spec):
            return "the model has post-attention norms"
        gib = 4 / 2**30
        if not evaluator.cached_all:
            return f"the prepared batches alone need more than the cache's {cache_floats * gib:.1f} GiB"
        used = sum(_floats(b, c) for b, c in evaluator.prepared)
        per_batch = [
            b.clean_ids.numel() * ((g.n_senders + g.n_receivers) * d + b.clean_ids.shape[1] * g.n_layers * g.n_heads)
            for b, _ in evaluator.prepared
        ]
        unembedding = spec.W_U.numel() if experiment.metric.name in residual_metric.STREAMED else 0
        need = used + sum(per_batch) + max(per_batch) + unembedding
        if need > cache_floats:
            return f"batches and base runs need {need * gib:.1f} GiB, more than the cache's {cache_floats * gib:.1f} GiB"
        return None

    def full(self) -> float:
        return self.full_value

    def start_receiver(self, removed: Tensor, receiver: int) -> None:
        g, spec = self.experiment.spec.graph, self.experiment.spec
        layer = _layer_of(g, receiver)
        if layer != self.layer:
            last = g.logits_receiver if layer == g.n_layers else g.mlp_receiver(layer)
            mask = removed.clone()
            mask[:, receiver : last + 1] = False  # the layer as it was before its first receiver
            self.bases = []  # one batch's base run at a time: free the old ones first
            for b in self.batches:
                self.bases.append(downstream.base_run(spec, b.clean_ids, mask, b.ablation, b.read_positions))
            self.layer, self.pending = layer, last
        for r in range(self.pending, receiver, -1):  # the receivers decided since
            column = removed[: g.n_upstream[r], r]
            for i, b in enumerate(self.batches):
                self.bases[i] = downstream.with_column(spec, self.bases[i], r, column, b.ablation, self.memo,
                                                       reuse=self.reuse_base)
        self.pending = receiver

    @torch.no_grad()
    def trials(self, removed: Tensor, receiver: int, columns: Tensor) -> Tensor:
        spec = self.experiment.spec
        K = columns.shape[0]
        sums = torch.zeros(K, dtype=torch.float64)
        for batch, base, scorer in zip(self.batches, self.bases, self.scorers, strict=True):
            P = batch.size
            step = max(1, self.max_rows // P)
            for lo in range(0, K, step):
                part = columns[lo : lo + step]
                k = part.shape[0]
                final = downstream.column_finals(  # [k*P, d]
                    spec, base, receiver, part, batch.ablation, self.memo, self.at_read_positions
                )
                values = None if scorer is None else scorer(final.view(k, P, -1))  # [k, P]
                if values is None or not bool(torch.isfinite(values).all()):  # score the logits (names bad prompts)
                    values = score(self.experiment, batch, rt.unembed(spec, final).view(k, P, -1))
                sums[lo : lo + k] += values.sum(1).double()
        self.evaluations += K
        self.passes += 1
        return (self.reducer.sum(sums) / self.n_total).float()


def _learn_from_wasted(
    predicted_kept: Tensor, batch: list[int], guesses: list[bool], values: list[float], r: int, start: float, tau: float
) -> None:
    """Predictions for the candidates whose trials a misprediction wasted.

    Those trials followed the predicted path from a state that turned out wrong (``start``: its
    metric, the one the mispredicted trial assumed), so they decide nothing; but each still shows how
    much its candidate drops the metric near the current circuit. A drop of at least ``tau``
    predicts the candidate kept."""
    previous = start
    for c, guess, value in zip(batch, guesses, values, strict=True):
        drop = previous - value
        predicted_kept[c, r] = drop >= tau
        if not guess:
            previous = value  # this trial's removal stays on the speculative path


def _next_width(width: int, tried: int, k: int, max_speculation: int) -> int:
    """The next batch's speculation width after ``tried`` of ``k`` trials decided something: double
    after a batch that decided all its candidates (a misprediction at its last trial wastes
    nothing), else halve (keeping at least the trials that decided).

    A pass costs a fixed part (streaming the unembedding, dispatching the layers) plus a part per
    trial, and the trials a misprediction wastes still predict the keeps of the next batch, so a
    width that collapses to the first misprediction costs more passes than it saves trials
    (409 -> 287 passes on ``gpt2-random``, about 10 % faster; docs/scale.md)."""
    return min(max_speculation, width * 2) if tried == k else max(1, width // 2, tried)


def _layer_of(graph: ComputationGraph, receiver: int) -> int:
    node = graph.receivers[receiver].node
    return graph.n_layers if node.kind is NodeKind.LOGITS else int(node.layer)  # type: ignore[arg-type]


def _sender_of_receiver(graph: ComputationGraph, receiver: int) -> int | None:
    """The sender index of the node that owns ``receiver`` (None for logits)."""
    node = graph.receivers[receiver].node
    if node.kind is NodeKind.LOGITS:
        return None
    return graph.sender_index(node)


@dataclass
class _State:
    """Everything the search needs to continue: the next unit is candidate ``i`` of receiver ``r``."""

    removed: Tensor  # [S, R] bool
    scores: Tensor  # [S, R] float32
    predicted_kept: Tensor  # [S, R] bool: candidates the next batch assumes kept
    current: float
    r: int
    i: int
    width: int
    evaluations: int = 0
    passes: int = 0

    def save(self, checkpoint: Checkpointer | None, is_root: bool, full: float, tau: float) -> None:
        if checkpoint is not None and is_root:
            meta = {"current": self.current, "r": self.r, "i": self.i, "width": self.width, "full": full,
                    "evaluations": self.evaluations, "passes": self.passes, "tau": tau}
            checkpoint.save({"removed": self.removed, "scores": self.scores, "predicted_kept": self.predicted_kept}, meta)


def acdc(
    experiment: Experiment,
    tau: float,
    speculation: int = 8,
    max_speculation: int = 64,
    max_rows: int = 256,
    progress: bool = False,
    checkpoint: Checkpointer | None = None,
    cache_floats: int | None = None,
) -> ACDCResult:
    """Run ACDC with threshold ``tau`` on ``experiment`` (its metric; KL is the usual choice).

    ``checkpoint``: save the search state after every pass and continue from a saved one (see the
    module docstring); ``cache_floats``: memory for prepared batches and base runs kept between
    passes (default: ``default_cache_floats()``)."""
    if tau < 0:
        raise ValueError("tau must be non-negative")
    if speculation < 1 or max_speculation < speculation:
        raise ValueError("need 1 <= speculation <= max_speculation")
    g = experiment.spec.graph
    cache_floats = default_cache_floats() if cache_floats is None else cache_floats
    evaluate = _Evaluator(experiment, max_rows, cache_floats)
    if _DownstreamEvaluator.fits(experiment, evaluate, cache_floats):
        evaluate = _DownstreamEvaluator(evaluate)
    elif progress and evaluate.reducer.is_root:
        why = _DownstreamEvaluator.why_not(experiment, evaluate, cache_floats)
        print(f"ACDC: every trial runs the model on from the receiver's layer: {why}", file=sys.stderr, flush=True)
    red = evaluate.reducer
    edge_mask = g.edge_mask
    full = evaluate.full()
    state = _State(
        torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool), torch.zeros(g.n_senders, g.n_receivers),
        torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool), full, g.n_receivers - 1, 0, speculation,
    )
    saved = red.broadcast_state(checkpoint.load() if checkpoint is not None and red.is_root else None)
    if saved is not None:
        tensors, meta = saved
        where = checkpoint.path if checkpoint is not None else "the progress file"
        into = {"removed": state.removed, "scores": state.scores}
        if "predicted_kept" in tensors:  # progress files of earlier versions: no predictions (same circuit)
            into["predicted_kept"] = state.predicted_kept
        restore(tensors, into, where)
        if float(meta.get("tau", tau)) != float(tau):
            raise CheckpointError(f"progress file {where} was made with tau={meta['tau']}, not {tau}")
        state.current, state.r, state.i, state.width = float(meta["current"]), int(meta["r"]), int(meta["i"]), int(meta["width"])
        state.evaluations, state.passes = int(meta["evaluations"]), int(meta["passes"])
        evaluate.evaluations, evaluate.passes = state.evaluations, state.passes
    removed, scores, predicted_kept = state.removed, state.scores, state.predicted_kept
    bar = progress_bar(g.n_edges, f"ACDC (tau={tau:g})", progress, "edge")
    bar.update(sum(g.n_upstream[r] for r in range(state.r + 1, g.n_receivers)) + state.i)
    while state.r >= 0:
        r = state.r
        candidates = list(reversed(range(g.n_upstream[r])))
        owner = _sender_of_receiver(g, r)
        if state.i == 0 and owner is not None and not bool((edge_mask[owner] & ~removed[owner]).any()):
            removed[candidates, r] = True  # nothing downstream reads this node: its inputs cannot matter
            bar.update(len(candidates))
            state.r, state.i = r - 1, 0
            state.save(checkpoint, red.is_root, full, tau)
            continue
        evaluate.start_receiver(removed, r)
        n = g.n_upstream[r]
        while state.r == r and state.i < len(candidates):
            i, width = state.i, state.width
            k = min(width, len(candidates) - i)
            batch = candidates[i : i + k]
            keep_guess = predicted_kept[batch, r].tolist()
            trial = removed[:n, r].unsqueeze(0).repeat(k, 1)  # [k, n]: receiver r's column per trial
            for j, c in enumerate(batch):
                trial[j, c] = True  # trial j removes candidate j ...
                if not keep_guess[j]:
                    trial[j + 1 :, c] = True  # ... and the later trials assume it removed
            values = evaluate.trials(removed, r, trial).tolist()
            previous = state.current
            tried = k
            for j, c in enumerate(batch):
                before = previous
                scores[c, r] = values[j] - before
                remove = before - values[j] < tau
                if remove:
                    removed[c, r] = True
                    previous = values[j]
                if remove == keep_guess[j]:  # the later trials assumed the other decision
                    tried = j + 1
                    assumed = before if keep_guess[j] else values[j]  # the metric the later trials built on
                    _learn_from_wasted(predicted_kept, batch[tried:], keep_guess[tried:], values[tried:], r, assumed, tau)
                    break
            state.current = previous
            state.i = i + tried
            bar.update(tried)
            state.width = _next_width(width, tried, k, max_speculation)
            state.evaluations, state.passes = evaluate.evaluations, evaluate.passes
            if state.i >= len(candidates):
                state.r, state.i = r - 1, 0
            state.save(checkpoint, red.is_root, full, tau)
        if state.r == r:  # a receiver without candidates
            state.r, state.i = r - 1, 0
    bar.close()
    kept = edge_mask & ~removed
    settings = {
        "tau": tau,
        "metric": experiment.metric.name,
        "ablation": experiment.ablation,
        "n_prompts": evaluate.n_total,
    }
    edge_scores = EdgeScores(g, scores, "acdc", settings)
    circuit = Circuit(g, kept, edge_scores, {"method": "acdc", "method_settings": settings})
    return ACDCResult(circuit, edge_scores, state.current, full, state.evaluations, state.passes)
