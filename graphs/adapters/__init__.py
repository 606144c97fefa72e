"""Adapters: Hugging Face causal LM -> ``ModelSpec`` (one module per architecture family)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from transformers import PreTrainedModel

from graphs.adapters import gemma, gpt2, llama, neox
from graphs.adapters.spec import ModelSpec, UnsupportedArchitecture

_FAMILIES: tuple[ModuleType, ...] = (gpt2, llama, neox, gemma)


def supported_model_types() -> dict[str, str]:
    """HF ``config.model_type`` -> family name, for every supported architecture."""
    return {mt: fam.FAMILY for fam in _FAMILIES for mt in fam.MODEL_TYPES}


def family_of(model_type: str) -> str:
    try:
        return supported_model_types()[model_type]
    except KeyError:
        raise UnsupportedArchitecture(_unsupported_message(model_type)) from None


def _unsupported_message(model_type: str) -> str:
    by_family: dict[str, list[str]] = {}
    for mt, fam in supported_model_types().items():
        by_family.setdefault(fam, []).append(mt)
    listed = "; ".join(f"{fam}: {', '.join(mts)}" for fam, mts in by_family.items())
    return f"unsupported architecture {model_type!r}; supported model types are {listed}"


def build_spec(model: PreTrainedModel) -> ModelSpec:
    """Read an HF causal LM into a ``ModelSpec`` (weights are views; the model is not modified)."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    family = family_of(model_type)
    builder: Callable[[PreTrainedModel], ModelSpec] = next(f.build for f in _FAMILIES if f.FAMILY == family)
    return builder(model)


__all__ = ["ModelSpec", "UnsupportedArchitecture", "build_spec", "family_of", "supported_model_types"]
