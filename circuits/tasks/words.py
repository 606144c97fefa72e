"""Word lists shipped as package data (``circuits/tasks/data/*.txt``).

Plain text, one entry per line; ``#`` starts a comment line; pairs are ``a,b``. Read on every call
(no module-level cache: the lists are tiny and this keeps the module free of mutable state).
"""

from __future__ import annotations

from importlib import resources

from .base import TaskError


def _lines(filename: str) -> list[str]:
    try:
        text = resources.files("circuits.tasks").joinpath("data", filename).read_text(encoding="utf-8")
    except FileNotFoundError as e:  # pragma: no cover - a broken installation
        raise TaskError(f"package data file {filename!r} is missing from circuits/tasks/data") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def load_words(filename: str) -> tuple[str, ...]:
    """The entries of a one-word-per-line list, in file order."""
    return tuple(_lines(filename))


def load_pairs(filename: str) -> tuple[tuple[str, str], ...]:
    """The ``a,b`` entries of a pair list, in file order."""
    out: list[tuple[str, str]] = []
    for ln in _lines(filename):
        a, sep, b = ln.partition(",")
        if not sep:  # pragma: no cover - a broken data file
            raise TaskError(f"package data file {filename!r}: line {ln!r} is not 'a,b'")
        out.append((a.strip(), b.strip()))
    return tuple(out)
