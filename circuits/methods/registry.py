"""Methods by name, for ``circuits discover``: each turns an ``Experiment`` into ``EdgeScores``.

ACDC is different in kind: it selects the circuit itself (threshold ``tau``); its scores are the
metric drops it measured, so the usual selection rules still apply to them if asked.

Methods with a token-position variant (docs/positions.md) also name it: ``MethodInfo.run_positional``
turns an ``Experiment`` whose prompts share one alignment into ``PositionalEdgeScores`` [S, R, T]
(``POSITIONAL``: their names, for ``circuits discover --positional``).

``checkpoint=`` (a ``circuits.checkpoint.Checkpointer``) is passed to the methods that can resume
(``RESUMABLE``: all but CD-T); ``SHARDED`` names the methods that all-reduce their partial sums when the experiment
is a distributed shard (``circuits.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from circuits.experiment import Experiment
from graphs.circuit import Circuit
from graphs.positional import PositionalEdgeScores
from graphs.scores import EdgeScores

SHARDED = frozenset({"edge-patching", "path-patching", "acdc", "eap", "eap-ig", "atp*", "cdt"})
RESUMABLE = SHARDED - {"cdt"}


class UnknownMethod(ValueError):
    """No method has this name."""


@dataclass(frozen=True)
class MethodOutput:
    scores: EdgeScores
    circuit: Circuit | None = None  # a circuit the method chose itself (ACDC)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    default_metric: str
    run: Callable[..., MethodOutput]
    computes: str  # what the scores are, for --help and docs
    run_positional: Callable[..., PositionalEdgeScores] | None = None  # token-position variant, if any


def _edge_patching(exp: Experiment, progress: bool, checkpoint: Any = None, **_: Any) -> MethodOutput:
    from circuits.methods.patching import edge_patching

    return MethodOutput(edge_patching(exp, progress=progress, checkpoint=checkpoint))


def _path_patching(exp: Experiment, progress: bool, k: int = 5, checkpoint: Any = None, **_: Any) -> MethodOutput:
    from circuits.methods.path_search import path_patching_search

    result = path_patching_search(exp, k=k, progress=progress, checkpoint=checkpoint)
    return MethodOutput(result.scores, None, {"expanded": [str(n) for n in result.expanded]})


def _acdc(exp: Experiment, progress: bool, tau: float = 0.01, checkpoint: Any = None, **_: Any) -> MethodOutput:
    from circuits.methods.acdc import acdc

    result = acdc(exp, tau, progress=progress, checkpoint=checkpoint)
    extra = {"tau": tau, "evaluations": result.evaluations, "passes": result.passes}
    return MethodOutput(result.scores, result.circuit, extra)


def _eap(exp: Experiment, progress: bool, checkpoint: Any = None, **_: Any) -> MethodOutput:
    from circuits.methods.eap import eap

    return MethodOutput(eap(exp, progress=progress, checkpoint=checkpoint))


def _eap_ig(
    exp: Experiment, progress: bool, steps: int = 5, ig_variant: str = "inputs", checkpoint: Any = None, **_: Any
) -> MethodOutput:
    from circuits.methods.eap import eap_ig

    return MethodOutput(eap_ig(exp, steps=steps, variant=ig_variant, progress=progress, checkpoint=checkpoint))


def _atp_star(exp: Experiment, progress: bool, checkpoint: Any = None, **_: Any) -> MethodOutput:
    from circuits.methods.eap import atp_star

    return MethodOutput(atp_star(exp, progress=progress, checkpoint=checkpoint))


def _cdt(exp: Experiment, progress: bool, **_: Any) -> MethodOutput:
    from circuits.methods import cdt

    return MethodOutput(cdt.cdt_edge_scores(exp, progress=progress))


def _positional_eap(exp: Experiment, progress: bool, tokenizer: Any = None, **_: Any) -> PositionalEdgeScores:
    from circuits.methods.eap import positional_eap

    return positional_eap(exp, tokenizer=tokenizer, progress=progress)


def _positional_eap_ig(
    exp: Experiment, progress: bool, steps: int = 5, ig_variant: str = "inputs", tokenizer: Any = None, **_: Any
) -> PositionalEdgeScores:
    from circuits.methods.eap import positional_eap_ig

    return positional_eap_ig(exp, steps=steps, variant=ig_variant, tokenizer=tokenizer, progress=progress)


def _positional_edge_patching(exp: Experiment, progress: bool, tokenizer: Any = None, **_: Any) -> PositionalEdgeScores:
    from circuits.methods.patching import positional_edge_patching

    return positional_edge_patching(exp, tokenizer=tokenizer, progress=progress)


def _positional_cdt(exp: Experiment, progress: bool, tokenizer: Any = None, **_: Any) -> PositionalEdgeScores:
    from circuits.methods.cdt import positional_cdt_edge_scores

    return positional_cdt_edge_scores(exp, tokenizer=tokenizer, progress=progress)


METHODS: MappingProxyType[str, MethodInfo] = MappingProxyType(
    {
        m.name: m
        for m in (
            MethodInfo("edge-patching", "exact single-edge ablation of every edge", "logit_diff", _edge_patching,
                       "m(clean, edge ablated) - m(clean)", _positional_edge_patching),
            MethodInfo("path-patching", "Wang et al. path patching, searched back from the logits", "logit_diff",
                       _path_patching, "path-patching effect of each sender on each expanded receiver slot"),
            MethodInfo("acdc", "ACDC greedy edge removal (threshold tau, KL by default)", "kl", _acdc,
                       "metric change when ACDC tried removing the edge"),
            MethodInfo("eap", "edge attribution patching (one gradient)", "logit_diff", _eap,
                       "(A_u - a_u) . dm/d in_r", _positional_eap),
            MethodInfo("eap-ig", "EAP with integrated gradients (inputs by default)", "logit_diff", _eap_ig,
                       "(A_u - a_u) . dm/d in_r averaged over interpolations", _positional_eap_ig),
            MethodInfo("atp*", "AtP*: EAP with the QK fix and GradDrop", "logit_diff", _atp_star,
                       "EAP with exact attention patterns for q/k edges, GradDrop magnitudes"),
            MethodInfo("cdt", "contextual decomposition for transformers", "logit_diff", _cdt,
                       "relevant part of the metric contributed through each edge", _positional_cdt),
        )
    }
)


POSITIONAL = tuple(name for name, info in METHODS.items() if info.run_positional is not None)


def method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
