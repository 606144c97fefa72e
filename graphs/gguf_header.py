"""Read the architecture of a GGUF file from its header, without parsing the whole file.

``transformers`` learns a GGUF model's architecture only by parsing every metadata field (the
tokenizer's vocabulary included), which takes seconds; ``gguf.GGUFReader`` is not much faster.
The loader only needs ``general.architecture`` to refuse unsupported models *before* it spends
half a minute de-quantising them, and that key comes first in every GGUF writer's output. So this
module walks the key/value section and stops at that key (GGUF v2/v3, little-endian).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"GGUF"
# value type id -> size in bytes of a fixed-size scalar (string = 8, array = 9 are variable)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9

# GGUF architecture names that differ from the Hugging Face ``config.model_type``(s) they load as
# (mirrors transformers' ``load_gguf_checkpoint``; Gemma 3 text checkpoints may be either type).
_GGUF_TO_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "qwen2moe": ("qwen2_moe",),
    "qwen3moe": ("qwen3_moe",),
    "gpt-oss": ("gpt_oss",),
    "minimax-m2": ("minimax_m2",),
    "gemma3": ("gemma3_text", "gemma3"),
    "llama": ("llama", "mistral"),
}


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader understands."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFHeaderError("truncated GGUF header")
    return data


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read(f, 4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _string(f: BinaryIO) -> str:
    return _read(f, _u64(f)).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[vtype], 1)
    elif vtype == _STRING:
        f.seek(_u64(f), 1)
    elif vtype == _ARRAY:
        etype, count = _u32(f), _u64(f)
        if etype in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[etype] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        raise GGUFHeaderError(f"unknown GGUF value type {vtype}")


def read_metadata_string(path: str | Path, key: str) -> str | None:
    """The string value of metadata ``key`` (e.g. ``general.architecture``), or None if absent."""
    with open(path, "rb") as f:
        if _read(f, 4) != _MAGIC:
            raise GGUFHeaderError(f"{path} is not a GGUF file (bad magic)")
        version = _u32(f)
        if version < 2:
            raise GGUFHeaderError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        _u64(f)  # tensor count
        for _ in range(_u64(f)):
            name = _string(f)
            vtype = _u32(f)
            if name == key and vtype == _STRING:
                return _string(f)
            _skip_value(f, vtype)
    return None


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file (e.g. ``llama``, ``gpt2``)."""
    arch = read_metadata_string(path, "general.architecture")
    if arch is None:
        raise GGUFHeaderError(f"{path} has no general.architecture metadata")
    return arch


def model_types_for(architecture: str) -> tuple[str, ...]:
    """The HF ``config.model_type`` values a GGUF architecture may load as."""
    return _GGUF_TO_MODEL_TYPES.get(architecture, (architecture,))
