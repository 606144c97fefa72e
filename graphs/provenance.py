"""Provenance: where a circuit came from, as a JSON-safe mapping (DESIGN.md section 8).

Callers (the discovery pipeline, the CLI) pass the fields they know; ``make_provenance`` fills the
tool version and the date and checks that everything can be written to JSON and read back *equal*.
The recommended keys are listed in ``PROVENANCE_FIELDS``; others are allowed.

JSON-safe means: ``None``, ``bool``, ``int``, finite ``float``, ``str``, lists of JSON-safe values
and mappings with ``str`` keys. Tuples become lists and other mappings become dicts (so the value
that is stored is the value that loads back); numpy / torch scalars become Python numbers. Anything
else (tensors, paths, objects, NaN, infinity) raises ``ProvenanceError`` naming where it sits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

DISTRIBUTION = "causal-circuits"
UNKNOWN_VERSION = "0+unknown"
MAX_DEPTH = 64  # nesting depth of provenance values: far beyond any real use, far below recursion limits

# The keys DESIGN.md section 8 asks for. None is required; writers use these names so readers agree.
PROVENANCE_FIELDS: dict[str, str] = {
    "tool_version": "version of causal-circuits that made the circuit (filled by make_provenance)",
    "date": "UTC ISO-8601 time the provenance was made (filled by make_provenance)",
    "model": "model name on the hub or local path",
    "model_revision": "hub revision / commit, when loaded from the hub",
    "model_sha256": "hash of the weights file, when loaded from a file",
    "family": "architecture family: gpt2, llama, neox, ...",
    "task": "task name",
    "dataset_sha256": "hash of the tokenized dataset",
    "method": "attribution / discovery method",
    "settings": "the method's settings (a mapping)",
    "ablation": "corrupted, mean, mean-position or zero",
    "metric": "metric name",
    "seed": "random seed",
    "faithfulness": "measured faithfulness, if any",
    "d_model": "residual width (needed by MIB / EAP-IG files)",
}


class ProvenanceError(ValueError):
    """A provenance value cannot be stored as JSON and read back equal."""


def tool_version() -> str:
    """The installed version of this package, or ``0+unknown`` when it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def utc_now() -> str:
    """Current UTC time, ISO-8601 to the second, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def json_safe(value: Any, where: str = "provenance", _depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` (tuples -> lists, mappings -> dicts); ProvenanceError otherwise."""
    if _depth > MAX_DEPTH:
        raise ProvenanceError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats, 0-d float tensors are not Real
        f = float(value)
        if not math.isfinite(f):
            raise ProvenanceError(f"{where}: {f} is not a finite number (JSON has no NaN or infinity)")
        return f
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProvenanceError(f"{where}: key {key!r} is not a string")
            out[key] = json_safe(item, f"{where}.{key}", _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(item, f"{where}[{i}]", _depth + 1) for i, item in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # torch / numpy 0-d scalars
        return json_safe(value.item(), where, _depth)
    raise ProvenanceError(f"{where}: {type(value).__name__} is not JSON-safe (use str, number, bool, None, list or dict)")


def check_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalise a provenance mapping (top level must be a mapping with str keys)."""
    if not isinstance(provenance, Mapping):
        raise ProvenanceError(f"provenance must be a mapping, got {type(provenance).__name__}")
    out = json_safe(provenance)
    assert isinstance(out, dict)
    return out


def make_provenance(**fields: Any) -> dict[str, Any]:
    """Provenance with ``tool_version`` and ``date`` filled in (callers may override both).

    >>> p = make_provenance(model="gpt2", task="ioi", seed=0, settings={"steps": (1, 2)})
    >>> p["settings"], sorted(p)[:3]
    ({'steps': [1, 2]}, ['date', 'model', 'seed'])
    """
    return check_provenance({"tool_version": tool_version(), "date": utc_now(), **fields})
