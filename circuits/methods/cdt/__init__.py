"""Contextual decomposition for transformers (CD-T; Hsu et al. 2024). User guide: docs/methods/cdt.md.

Modules, one job each: ``rules`` (how one operation splits relevance), ``layers`` (decomposed
attention and MLP), ``forward`` (the decomposed pass over a ``ModelSpec``), ``sources`` (which nodes
are relevant, per pass), ``readout`` (final norm, unembedding, metric), ``contributions`` (source ->
target contributions over an experiment), ``edges`` (scores for every edge), ``positional`` (edge
scores per token position), ``search`` (circuit discovery).
"""

from circuits.methods.cdt.contributions import (
    cdt_contributions,
    cdt_node_scores,
    decompose,
)
from circuits.methods.cdt.edges import (
    EdgeContributions,
    cdt_edge_contributions,
    cdt_edge_scores,
)
from circuits.methods.cdt.forward import PassResult, Point
from circuits.methods.cdt.positional import (
    PositionalEdgeContributions,
    positional_cdt_edge_contributions,
    positional_cdt_edge_scores,
)
from circuits.methods.cdt.rules import CDTConfig, CDTError
from circuits.methods.cdt.search import CDTResult, Round, cdt_circuit
from circuits.methods.cdt.sources import Source

__all__ = [
    "CDTConfig",
    "CDTError",
    "CDTResult",
    "EdgeContributions",
    "PassResult",
    "Point",
    "PositionalEdgeContributions",
    "Round",
    "Source",
    "cdt_circuit",
    "cdt_contributions",
    "cdt_edge_contributions",
    "cdt_edge_scores",
    "cdt_node_scores",
    "decompose",
    "positional_cdt_edge_contributions",
    "positional_cdt_edge_scores",
]
