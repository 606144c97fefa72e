"""Progress bars for long runs (tqdm on stderr); silent unless asked for."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, description: str, enabled: bool, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, disabled (a no-op) when ``enabled`` is False."""
    return tqdm(total=total, desc=description, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
