"""Progress files for long runs, so a crash or a kill costs only the unit of work in flight.

A ``Checkpointer`` owns one safetensors file: tensors (partial sums, masks, ...) plus JSON metadata
(which units of work are done, and a *fingerprint* of the run: method, settings, model revision,
dataset hash, graph shape). Writes are atomic (a temporary file in the same directory, flushed,
then renamed over the old one), so the file on disk is always a complete earlier state. Resuming a
run with a different fingerprint is refused: its partial sums would mean something else.

Helpers for the methods: ``BatchProgress`` (per-batch float64 accumulators: skip saved batches,
save after each finished one), ``batches_from`` (an experiment's batches from the k-th on, without
preparing the earlier ones), ``restore`` (saved tensors into accumulators, shapes checked) and
``weights_fingerprint`` (a cheap hash of a model's weights for run fingerprints). How the CLI lays
out its progress files: docs/scale.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from circuits.experiment import Experiment, PreparedBatch


class CheckpointError(ValueError):
    """A progress file cannot be used for this run (other run, damaged file)."""


def fingerprint(**facts: Any) -> str:
    """A stable hash of what defines a run (JSON-serialisable facts)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Checkpointer:
    path: Path
    run_id: str  # the fingerprint of the run this file belongs to

    def load(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """(tensors, metadata) of the saved state, or None when there is none yet."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.path.exists():
            return None
        try:
            tensors = load_file(str(self.path))
            with open(self.path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > 100_000_000:
                    raise CheckpointError(f"{self.path} has an absurd header; delete it to start over")
                header = json.loads(f.read(header_len))
            meta = json.loads(header.get("__metadata__", {}).get("state", "{}"))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"progress file {self.path} is damaged ({err}); delete it to start over") from None
        if meta.get("run_id") != self.run_id:
            raise CheckpointError(
                f"progress file {self.path} belongs to another run (different method, settings, model or data);"
                " use another output directory or delete it"
            )
        return tensors, meta

    def save(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Atomically replace the progress file with this state."""
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        state = json.dumps({**dict(meta), "run_id": self.run_id}, sort_keys=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"state": state})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        try:  # make the rename itself durable (best effort: not every platform can open a directory)
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def restore(saved: Mapping[str, Tensor], into: Mapping[str, Tensor], where: Path | str) -> None:
    """Copy saved tensors into the accumulators of the same names (shapes must match exactly)."""
    for name, target in into.items():
        if name not in saved or tuple(saved[name].shape) != tuple(target.shape):
            raise CheckpointError(f"progress file {where} does not hold {name!r} of shape {tuple(target.shape)}; "
                                  "delete it to start over")
        target.copy_(saved[name])


def batches_from(experiment: Experiment, first_batch: int) -> Iterator[PreparedBatch]:
    """``experiment.batches()`` from batch ``first_batch`` on, without preparing the earlier ones.

    The batches are exactly those of ``experiment.batches()`` (same prompts, same ablation values:
    mean ablations keep the full reference set); their ``rows`` count from the experiment's start."""
    if first_batch <= 0:
        yield from experiment.batches()
        return
    lo = first_batch * experiment.batch_size
    if lo >= experiment.n_prompts:
        return
    rest = replace(
        experiment,
        task=experiment.task.subset(slice(lo, None)),
        reference_task=experiment.reference_task or experiment.task,
    )
    for batch in rest.batches():
        yield replace(batch, rows=slice(batch.rows.start + lo, batch.rows.stop + lo))


class BatchProgress:
    """Resume a method that adds one batch at a time into float64 accumulators.

    ``batches()`` skips the batches a saved state already holds and saves the accumulators after
    each batch the caller finished (when the caller asks for the next one), so a kill costs at most
    the batch in flight. Without a checkpointer it is ``experiment.batches()``."""

    def __init__(self, experiment: Experiment, checkpoint: Checkpointer | None, accumulators: Mapping[str, Tensor]):
        self.experiment = experiment
        self.checkpoint = checkpoint
        self.accumulators = dict(accumulators)
        self.done = 0
        saved = None if checkpoint is None else checkpoint.load()
        if saved is not None:
            assert checkpoint is not None
            restore(saved[0], self.accumulators, checkpoint.path)
            self.done = int(saved[1].get("batches", 0))

    def batches(self) -> Iterator[PreparedBatch]:
        for batch in batches_from(self.experiment, self.done):
            yield batch
            self.done += 1
            if self.checkpoint is not None:
                self.checkpoint.save(self.accumulators, {"batches": self.done})

    def prompts_done(self) -> int:
        return min(self.experiment.n_prompts, self.done * self.experiment.batch_size)


def weights_fingerprint(parameters: Iterator[tuple[str, Tensor]], sample: int = 4096) -> str:
    """A cheap hash of a model's weights: every parameter's name, shape, dtype and an evenly spaced
    sample of ``sample`` of its values (different weights at the same path give another run id)."""
    h = hashlib.sha256()
    for name, p in parameters:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step][:sample].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:32]

