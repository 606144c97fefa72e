"""Data-parallel discovery with ``torch.distributed`` (DESIGN.md section 10; user guide: docs/scale.md).

Every rank holds the whole model and a *shard* of the prompts; it scores its shard and the float64
partial sums are all-reduced, so every rank ends with the dataset-mean scores of a single process.

* ``shard_task(task, rank, world, batch_size)``: the prompts of one rank, a contiguous run of whole
  batches (``batch_size`` prompts each, the last one possibly shorter), so that every rank sees
  exactly the batches a single process would see and only the order of the final sum changes.
* ``ShardedExperiment``: an ``Experiment`` on one shard that knows the whole dataset: its
  ``shard`` records the rank, the world size, which rows of the full task it holds and the global
  prompt count. Mean ablations are computed over the *full* reference set on every rank.
* ``reducer(experiment)``: what a method calls to combine its partial sums: ``count(n_local)``
  gives the global prompt count, ``sum(t)`` all-reduces a float64 tensor (SUM), ``broadcast_state``
  sends rank 0's resumed state to the others. For a plain ``Experiment`` it is the identity, so a
  single-process run computes exactly what it computed before.
* ``all_reduce_scores(scores, local_prompts, total_prompts)``: for a method that does not reduce
  internally but whose scores are means over prompts: each rank's mean is re-weighted by its
  prompt count, summed in float64 and divided by the global count.

Methods that reduce their partial sums themselves (see ``circuits.methods``): EAP, EAP-IG, AtP*
(its GradDrop estimates are reduced *before* the non-linear combination), edge patching, node and
path patching, the path-patching search and ACDC (every candidate mask's dataset mean is reduced,
so all ranks take the same decisions) and CD-T (its sums, before the projected mode divides them).
``init_from_env`` starts the process group from the
variables ``torchrun`` sets (gloo: CPU tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from circuits.experiment import Experiment
from circuits.tasks.base import TokenizedTask
from graphs.scores import EdgeScores


class DistributedError(ValueError):
    """A distributed run cannot be set up (no torchrun environment, fewer batches than ranks...)."""


# --------------------------------------------------------------------------- the process group


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def init_from_env(backend: str = "gloo", timeout_minutes: float = 60.0) -> World:
    """Join the process group described by torchrun's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
    ``MASTER_PORT`` (an already initialised group is reused). ``DistributedError`` without them."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); launch with "
            "`torchrun --nproc_per_node N -m cli.main discover --distributed ...`"
        )
    if not dist.is_available():  # pragma: no cover - every desktop build has it
        raise DistributedError("this torch build has no torch.distributed")
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise DistributedError("RANK and WORLD_SIZE must be integers") from None
    if not 0 <= rank < size:
        raise DistributedError(f"RANK {rank} is not in [0, WORLD_SIZE={size})")
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(minutes=timeout_minutes))
    return World(rank, size, backend)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    """The initialised process group as a ``World`` (``SINGLE`` when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return SINGLE


# --------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class Shard:
    """Which prompts one rank holds: rows ``start:stop`` of a task of ``total_prompts`` prompts."""

    rank: int
    world_size: int
    start: int
    stop: int
    total_prompts: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def n_prompts(self) -> int:
        return self.stop - self.start


def shard_rows(n_prompts: int, rank: int, world_size: int, batch_size: int = 1) -> Shard:
    """Rank ``rank``'s contiguous share of ``n_prompts`` prompts, in whole batches of ``batch_size``.

    The ``ceil(n / batch_size)`` batches are dealt out in contiguous runs whose lengths differ by at
    most one (earlier ranks get the extra batch). ``DistributedError`` when there are fewer batches
    than ranks (a rank without prompts has nothing to score)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is not in [0, {world_size})")
    if batch_size < 1:
        raise DistributedError("batch_size must be at least 1")
    n_batches = -(-n_prompts // batch_size)
    if n_batches < world_size:
        raise DistributedError(
            f"{n_prompts} prompts in batches of {batch_size} make {n_batches} batch(es), fewer than the "
            f"{world_size} ranks; use more prompts, a smaller --batch-size or fewer processes"
        )
    base, extra = divmod(n_batches, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return Shard(rank, world_size, first * batch_size, min(last * batch_size, n_prompts), n_prompts)


def shard_task(task: TokenizedTask, rank: int, world_size: int, batch_size: int = 1) -> TokenizedTask:
    """The prompts of ``task`` that rank ``rank`` scores (see ``shard_rows``)."""
    return task.subset(shard_rows(len(task), rank, world_size, batch_size).rows)


@dataclass(frozen=True, eq=False)
class ShardedExperiment(Experiment):
    """An experiment on one rank's shard of the prompts (``shard`` says which; see the module docstring)."""

    shard: Shard | None = None


def shard_experiment(experiment: Experiment, world: World) -> Experiment:
    """``experiment`` restricted to this rank's shard (the experiment itself when not distributed).

    Mean ablations keep the full reference set (the experiment's ``reference_task`` or its whole
    task), so every rank ablates with the same values a single process would use."""
    if not world.active:
        return experiment
    if isinstance(experiment, ShardedExperiment):
        raise DistributedError("this experiment is already a shard")
    shard = shard_rows(experiment.n_prompts, world.rank, world.size, experiment.batch_size)
    return ShardedExperiment(
        experiment.spec,
        experiment.task.subset(shard.rows),
        experiment.metric,
        ablation=experiment.ablation,
        batch_size=experiment.batch_size,
        reference_task=experiment.reference_task or experiment.task,
        shard=shard,
    )


def row_offset(experiment: Experiment) -> int:
    """Index in the full task of the experiment's first prompt (0 unless it is a shard)."""
    shard = getattr(experiment, "shard", None)
    return 0 if shard is None else shard.start


# --------------------------------------------------------------------------- reductions


class Reducer:
    """How a method combines per-rank partial results (the identity for a single process)."""

    def __init__(self, shard: Shard | None) -> None:
        self.active = shard is not None and shard.world_size > 1
        if self.active and not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("a sharded experiment needs an initialised process group (init_from_env)")
        self.shard = shard
        self.rank = shard.rank if self.active and shard is not None else 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def count(self, n_local: int) -> int:
        """The number of prompts over all ranks (``n_local`` when not distributed)."""
        return self.shard.total_prompts if self.active and self.shard is not None else n_local

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over ranks, in float64 (``tensor`` itself when not distributed)."""
        if not self.active:
            return tensor
        out = tensor.detach().to(torch.float64).contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast_state(
        self, state: tuple[dict[str, Tensor], dict[str, Any]] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Rank 0's ``(tensors, metadata)`` (or None) on every rank; ``state`` is ignored elsewhere.

        Metadata travels as JSON text in a byte tensor (no object serialisation)."""
        if not self.active:
            return state
        header = None
        if self.is_root:
            header = json.dumps(
                None if state is None else {
                    "meta": state[1],
                    "tensors": [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in state[0].items()],
                },
                sort_keys=True,
            )
        text = broadcast_json_text(header)
        decoded = json.loads(text)
        if decoded is None:
            return None
        tensors: dict[str, Tensor] = {}
        for name, dtype, shape in decoded["tensors"]:
            t = state[0][name].contiguous() if self.is_root and state is not None else torch.empty(
                shape, dtype=getattr(torch, dtype)
            )
            dist.broadcast(t, src=0)
            tensors[name] = t
        return tensors, decoded["meta"]

    def flag(self, value: bool) -> bool:
        """Rank 0's boolean on every rank."""
        if not self.active:
            return value
        t = torch.tensor([1 if value else 0], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return bool(t.item())


def broadcast_json_text(text: str | None) -> str:
    """Rank 0's string on every rank (as UTF-8 bytes in a uint8 tensor)."""
    data = (text or "").encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    if int(size):
        dist.broadcast(buf, src=0)
    return bytes(buf.tolist()).decode() if int(size) else "null"


def world_reducer(world: World) -> Reducer:
    """A reducer over the whole job (for flags and states that are not about prompts)."""
    return Reducer(Shard(world.rank, world.size, 0, 0, 0) if world.active else None)


def reducer(experiment: Experiment) -> Reducer:
    """The reducer for ``experiment``: collective when it is a shard of a multi-rank run."""
    return Reducer(getattr(experiment, "shard", None))


def all_reduce_scores(scores: EdgeScores, local_prompts: int, total_prompts: int) -> EdgeScores:
    """Dataset-mean ``EdgeScores`` from every rank's mean over its ``local_prompts`` prompts:
    ``sum_ranks(mean_r * n_r) / total_prompts``, summed in float64 (for linear methods that do not
    reduce internally; the identity in a single process with ``local_prompts == total_prompts``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if local_prompts != total_prompts:
            raise DistributedError(f"{local_prompts} of {total_prompts} prompts but no process group to reduce over")
        return scores
    partial = scores.values.to(torch.float64) * local_prompts
    dist.all_reduce(partial, op=dist.ReduceOp.SUM)
    settings = {**dict(scores.settings), "n_prompts": total_prompts}
    return EdgeScores(scores.graph, (partial / total_prompts).to(scores.values.dtype), scores.method, settings)


def describe(world: World) -> Mapping[str, Any]:
    return {"rank": world.rank, "world_size": world.size, "backend": world.backend}
