"""The peers' own virtual environment: created on first use, reused afterwards.

The peer stack is never a project dependency. It lives under the user cache
(``.../causal-circuits/peers/venv``, outside the repository, so no tool scanning the tree reads it)
and is installed in two steps, as ``/work/shared/PEERS.md`` prescribes: ``torch`` first (so the
resolver keeps the CPU build the machine already has a wheel of), then auto-circuit with the
TransformerLens release whose API it was written against, plus ``attrs``, which auto-circuit imports
without declaring it. A marker file records what was installed; when it matches, nothing is run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path



def default_venv() -> Path:
    """Where the peers' environment lives: next to the benchmark's other work files, in the user cache."""
    from graphs.alias_cache import cache_dir

    return cache_dir() / "peers" / "venv"

TORCH = "torch==2.13.0"
PEERS: tuple[str, ...] = (
    "auto-circuit==1.0.1",
    # auto-circuit imports HookedTransformer and transformer_lens.past_key_value_caching, both gone in
    # TransformerLens 4; 2.18 pulls transformers 4.57 and numpy < 2 and needs this pyarrow.
    "transformer-lens==2.18.0",
    "pyarrow==21.0.0",
    "attrs",
)
_MARKER = "peers-installed.json"


def venv_python(path: Path | None = None) -> Path:
    """The interpreter of the peers venv at ``path``."""
    path = path or default_venv()
    return path / "bin" / "python"


def _wanted() -> dict[str, object]:
    return {"torch": TORCH, "peers": list(PEERS), "python": sys.version.split()[0]}


def is_ready(path: Path | None = None) -> bool:
    """True when ``path`` holds a venv with exactly the pinned peer stack installed."""
    path = path or default_venv()
    marker = path / _MARKER
    if not (venv_python(path).exists() and marker.exists()):
        return False
    try:
        return bool(json.loads(marker.read_text()) == _wanted())
    except ValueError:
        return False


def _pip(path: Path, args: list[str], log: Path) -> None:
    cmd = [str(venv_python(path)), "-m", "pip", "install", "--disable-pip-version-check", *args]
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        raise RuntimeError(f"installing {' '.join(args)} into {path} failed; see {log}")


def ensure_venv(path: Path | None = None, quiet: bool = False) -> Path:
    """Create the peers venv at ``path`` and install the peers unless already done; its python."""
    path = path or default_venv()
    if is_ready(path):
        return venv_python(path)
    path.mkdir(parents=True, exist_ok=True)
    log = path / "install.log"
    if not quiet:
        print(f"setting up the peers venv in {path} (log: {log}) ...", flush=True)
    if not venv_python(path).exists():
        venv.EnvBuilder(with_pip=True, clear=False).create(path)
    _pip(path, ["-q", TORCH], log)
    _pip(path, ["-q", *PEERS], log)
    check = subprocess.run(
        [str(venv_python(path)), "-c", "import auto_circuit.prune_algos.mask_gradient, transformer_lens"],
        check=False, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    if check.returncode != 0:
        raise RuntimeError(f"the peers venv does not import auto-circuit:\n{check.stderr[-2000:]}")
    (path / _MARKER).write_text(json.dumps(_wanted()))
    return venv_python(path)
