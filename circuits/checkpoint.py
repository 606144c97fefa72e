"""Progress files for long runs, so a crash or a kill costs only the unit of work in flight.

A ``Checkpointer`` owns one safetensors file: tensors (partial sums, masks, ...) plus JSON metadata
(which units of work are done, and a *fingerprint* of the run: method, settings, model revision,
dataset hash, graph shape). Writes are atomic (a temporary file in the same directory, flushed,
then renamed over the old one), so the file on disk is always a complete earlier state. Resuming a
run with a different fingerprint is refused: its partial sums would mean something else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor


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

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

