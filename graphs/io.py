"""Circuit files: our own JSON, MIB / EAP-IG JSON, and GraphML / GEXF / node-link exports.

Formats are documented in docs/formats.md. The guarantees:

* **Exact round trips.** ``load_circuit(save_circuit(c))`` has the same graph, mask, score tensor
  (dtype and every bit: floats are written with Python's shortest round-trip repr) and provenance.
  MIB JSON round-trips the same way through an extra top-level key that EAP-IG ignores.
* **Loading never executes code.** Only ``json`` parses files; no object deserialisation, no YAML.
* **One error type.** Anything wrong with a file (unreadable, too large, not UTF-8, not JSON, NaN or
  infinite numbers, duplicate keys, nesting too deep, wrong types, missing keys, unknown format or
  version, absurd graph sizes, ids not in the graph, non-edges, duplicate edges) raises
  ``CircuitFileError`` (a ``ValueError``) with a message that says where.
* **Atomic writes.** Every writer validates its content first (non-finite scores and unstorable
  provenance raise ValueError before the disk is touched), writes a temporary file in the target
  directory, fsyncs it and ``os.replace``s it over the target: a crash or an error mid-way leaves
  any existing file untouched.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import networkx as nx
import torch

from graphs.circuit import Circuit
from graphs.graph import ComputationGraph
from graphs.ids import IdError, NodeId, parse_edge, parse_node, parse_positional_edge
from graphs.positional import MAX_POSITIONS, PositionalCircuit, PositionalEdgeScores
from graphs.provenance import ProvenanceError, check_provenance, json_safe
from graphs.scores import EdgeScores

FORMAT_NAME = "causal-circuits/circuit"
POSITIONAL_FORMAT_NAME = "causal-circuits/positional-circuit"
FORMAT_VERSION = 1
MIB_EXTENSION_KEY = "causal_circuits"  # our extra top-level key in MIB files (EAP-IG ignores it)
MIB_EXTENSION_NAME = "causal-circuits/mib-extension"
DEFAULT_MAX_BYTES = 512 * 2**20  # refuse larger files before reading them
MAX_DENSE_ENTRIES = 2**27  # cap on n_senders * n_receivers (a 70B model needs ~8e7)
EXPORT_FORMATS = ("json", "mib-json", "graphml", "gexf", "node-link")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

PathLike = str | os.PathLike[str]


class CircuitFileError(ValueError):
    """A circuit file is unreadable, malformed, hostile or does not fit its graph."""


# ====================================================================== atomic writing
@contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file next to ``path`` for binary writing; on success replace ``path`` with it.

    On any exception the temporary file is removed and ``path`` is left as it was. The new file gets
    the old file's permission bits, or the usual ``0o666 & ~umask`` when it is new."""
    target = Path(path)
    directory = target.parent
    for _ in range(100):
        tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 random collisions
        raise FileExistsError(f"could not create a temporary file next to {target}")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(obj: Mapping[str, Any], path: PathLike) -> None:
    """Write a top-level JSON object atomically, one node / edge per line (readable, diffable, fast)."""
    with atomic_write(path) as handle:
        for chunk in _json_lines(obj):
            handle.write(chunk.encode("utf-8"))


def _json_lines(obj: Mapping[str, Any]) -> Iterator[str]:
    """Chunks of the JSON text of ``obj``: scalar members inline, big lists / dicts one item per line.

    Every piece goes through ``json.dumps(allow_nan=False)`` (ASCII output, exact float repr)."""
    dumps = json.dumps
    yield "{"
    for i, (key, value) in enumerate(obj.items()):
        yield ("\n" if i == 0 else ",\n") + dumps(key) + ": "
        if isinstance(value, list) and value:
            yield "[\n" + ",\n".join(dumps(item, allow_nan=False) for item in value) + "\n]"
        elif isinstance(value, dict) and len(value) > 1 and all(isinstance(v, dict) for v in value.values()):
            body = ",\n".join(f"{dumps(k)}: {dumps(v, allow_nan=False)}" for k, v in value.items())
            yield "{\n" + body + "\n}"
        else:
            yield dumps(value, allow_nan=False)
    yield "\n}\n"


# ====================================================================== safe reading
def read_json_file(path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES, *, allow_nan: bool = False) -> Any:
    """Parse a JSON file defensively (size limit, strict UTF-8, no NaN/inf, no duplicate keys).

    ``allow_nan`` lets the literal ``NaN`` through (MIB node scores use it for "not scored");
    ``Infinity`` and numbers that overflow to infinity are always refused."""
    name = str(path)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise CircuitFileError(f"{name}: is a directory, not a circuit file")
        if stat.S_ISREG(info.st_mode) and info.st_size > max_bytes:
            raise CircuitFileError(f"{name}: {info.st_size} bytes is larger than the limit of {max_bytes} bytes")
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise CircuitFileError(f"{name}: cannot read: {err.strerror or err}") from err
    except (ValueError, TypeError) as err:  # e.g. a NUL byte in the path
        raise CircuitFileError(f"{name[:200]!r}: cannot read: {err}") from None
    if len(data) > max_bytes:
        raise CircuitFileError(f"{name}: larger than the limit of {max_bytes} bytes")
    return parse_json_bytes(data, name, allow_nan=allow_nan)


def parse_json_bytes(data: bytes, name: str = "<bytes>", *, allow_nan: bool = False) -> Any:
    """``json.loads`` with the checks of ``read_json_file`` (all failures are CircuitFileError)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CircuitFileError(f"{name}: not valid UTF-8 (byte {err.start}: {err.reason})") from None
    text = text.removeprefix("\ufeff")

    def constant(token: str) -> float:
        if token == "NaN" and allow_nan:
            return math.nan
        raise CircuitFileError(f"{name}: {token} is not allowed (scores must be finite numbers)")

    def real(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise CircuitFileError(f"{name}: number {token[:40]} overflows to infinity")
        return value

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise CircuitFileError(f"{name}: duplicate key {key[:200]!r}")
                seen.add(key)
        return out

    try:
        return json.loads(text, parse_constant=constant, parse_float=real, object_pairs_hook=no_duplicates)
    except CircuitFileError:
        raise
    except RecursionError:
        raise CircuitFileError(f"{name}: JSON nested too deeply") from None
    except json.JSONDecodeError as err:
        raise CircuitFileError(f"{name}: not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except ValueError as err:  # e.g. integers with more digits than Python converts
        raise CircuitFileError(f"{name}: not valid JSON: {err}") from None


# ====================================================================== field validation
def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise CircuitFileError(f"{where}: missing key {key!r}")
    return obj[key]


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CircuitFileError(f"{where}: expected an object, got {_type(value)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise CircuitFileError(f"{where}: expected a list, got {_type(value)}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise CircuitFileError(f"{where}: expected a string, got {_type(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise CircuitFileError(f"{where}: expected true or false, got {_type(value)}")
    return value


def _int(value: Any, where: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CircuitFileError(f"{where}: expected an integer, got {_type(value)}")
    if value < low:
        raise CircuitFileError(f"{where}: must be at least {low}, got {value}")
    return value


def _number(value: Any, where: str, *, allow_nan: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CircuitFileError(f"{where}: expected a number, got {_type(value)}")
    try:
        out = float(value)
    except OverflowError:
        raise CircuitFileError(f"{where}: number too large") from None
    if math.isinf(out) or (math.isnan(out) and not allow_nan):
        raise CircuitFileError(f"{where}: score must be a finite number, got {out}")
    return out


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _json_value(value: Any, where: str) -> dict[str, Any]:
    """A provenance / settings object from a file, normalised (CircuitFileError when not JSON-safe)."""
    _dict(value, where)
    try:
        return check_provenance(value)
    except ProvenanceError as err:
        raise CircuitFileError(f"{where}: {err}") from None


def make_graph(spec: Mapping[str, Any], parallel_key: str, where: str) -> ComputationGraph:
    """A graph from a file's ``n_layers`` / ``n_heads`` / ``parallel_key`` fields.

    Refuses sizes whose dense [n_senders, n_receivers] tensors would be absurd, before allocating."""
    L = _int(_get(spec, "n_layers", where), f"{where}.n_layers", 1)
    H = _int(_get(spec, "n_heads", where), f"{where}.n_heads", 1)
    P = _bool(_get(spec, parallel_key, where), f"{where}.{parallel_key}")
    dense = (1 + L * (H + 1)) * (L * (3 * H + 1) + 1)
    if dense > MAX_DENSE_ENTRIES:
        raise CircuitFileError(
            f"{where}: {L} layers x {H} heads needs {dense} dense score entries, above the cap of {MAX_DENSE_ENTRIES}"
        )
    return ComputationGraph(L, H, P)


class _EdgeLookup:
    """Edge id text -> (sender, receiver) for one graph: dict lookups, with parse_edge as fallback."""

    def __init__(self, graph: ComputationGraph) -> None:
        self.graph = graph
        self.senders = {str(n): i for i, n in enumerate(graph.senders)}
        self.receivers = {str(r): j for j, r in enumerate(graph.receivers)}
        self.nodes = {str(n): n for n in graph.nodes}

    def edge(self, text: Any, where: str) -> tuple[int, int]:
        text = _str(text, where)
        parts = text.split("->")
        if len(parts) == 2 and parts[0] in self.senders and parts[1] in self.receivers:
            s, r = self.senders[parts[0]], self.receivers[parts[1]]
        else:
            try:
                edge = parse_edge(text)
            except IdError as err:
                raise CircuitFileError(f"{where}: {err}") from None
            try:
                s, r = self.graph.sender_index(edge.sender), self.graph.receiver_index(edge.receiver)
            except IdError:
                missing = edge.sender if str(edge.sender) not in self.nodes else edge.receiver
                raise CircuitFileError(
                    f"{where}: edge {text[:200]!r} names {missing}, which is not in the graph ({self.graph.describe()})"
                ) from None
        if not self.graph.is_edge(s, r):
            raise CircuitFileError(
                f"{where}: {text[:200]!r} is not an edge: {self.graph.senders[s]} is not upstream of "
                f"{self.graph.receivers[r]}"
            )
        return s, r

    def node(self, text: Any, where: str) -> NodeId:
        text = _str(text, where)
        if text in self.nodes:
            return self.nodes[text]
        try:
            node = parse_node(text)
        except IdError as err:
            raise CircuitFileError(f"{where}: {err}") from None
        if str(node) not in self.nodes:
            raise CircuitFileError(f"{where}: node {text[:200]!r} is not in the graph ({self.graph.describe()})")
        return node


class _ScoreTable:
    """Collects (sender, receiver, value) triples, refusing duplicates, into dense tensors."""

    def __init__(self, graph: ComputationGraph) -> None:
        self.graph = graph
        self.seen: dict[tuple[int, int], str] = {}
        self.cells: list[tuple[int, int]] = []
        self.values: list[float] = []
        self.member: list[bool] = []

    def add(self, cell: tuple[int, int], value: float, member: bool, name: str, where: str) -> None:
        if cell in self.seen:
            raise CircuitFileError(f"{where}: duplicate edge {name[:200]!r} (same edge as {self.seen[cell][:200]!r})")
        self.seen[cell] = name
        self.cells.append(cell)
        self.values.append(value)
        self.member.append(member)

    def mask(self) -> torch.Tensor:  # [S, R] bool
        out = torch.zeros(self.graph.n_senders, self.graph.n_receivers, dtype=torch.bool)
        chosen = [c for c, m in zip(self.cells, self.member, strict=True) if m]
        if chosen:
            ss, rs = zip(*chosen, strict=True)
            out[list(ss), list(rs)] = True
        return out

    def scores(self, dtype: torch.dtype, where: str) -> torch.Tensor:  # [S, R] dtype
        out = torch.zeros(self.graph.n_senders, self.graph.n_receivers, dtype=dtype)
        if self.cells:
            ss, rs = zip(*self.cells, strict=True)
            vals = torch.tensor(self.values, dtype=torch.float64).to(dtype)
            bad = (~torch.isfinite(vals)).nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                raise CircuitFileError(f"{where}: score {self.values[i]!r} of {self.seen[self.cells[i]]!r} overflows {dtype}")
            out[list(ss), list(rs)] = vals
        return out


def _scores_meta(value: Any, where: str) -> tuple[str, dict[str, Any], torch.dtype] | None:
    if value is None:
        return None
    meta = _dict(value, where)
    method = _str(_get(meta, "method", where), f"{where}.method")
    settings = _json_value(meta.get("settings", {}), f"{where}.settings")
    dtype_name = _str(meta.get("dtype", "float32"), f"{where}.dtype")
    if dtype_name not in _DTYPES:
        raise CircuitFileError(f"{where}.dtype: unknown dtype {dtype_name[:40]!r} (expected float32 or float64)")
    return method, settings, _DTYPES[dtype_name]


def _scores_meta_out(scores: EdgeScores | PositionalEdgeScores | None) -> dict[str, Any] | None:
    if scores is None:
        return None
    dtype = {v: k for k, v in _DTYPES.items()}.get(scores.values.dtype)
    if dtype is None:
        raise ValueError(f"cannot store {scores.values.dtype} scores (float32 or float64 only)")
    return {"method": scores.method, "settings": json_safe(scores.settings, "scores.settings"), "dtype": dtype}


def _flat_scores(circuit: Circuit, where: str) -> list[float] | None:
    """Scores of all graph edges in graph order as Python floats; ValueError naming a non-finite one."""
    if circuit.scores is None:
        return None
    flat = circuit.scores.flat()  # [n_edges] in graph edge order
    bad = (~torch.isfinite(flat)).nonzero().flatten()
    if len(bad):
        edge = next(e for i, e in enumerate(circuit.graph.edges()) if i == int(bad[0]))
        raise ValueError(f"{where}: score of {edge} is {float(flat[bad[0]])}; files hold finite scores only")
    return flat.tolist()


def _checked(fn: Any, *args: Any) -> Any:
    """Run a decoder; errors that slipped past validation still come out as CircuitFileError."""
    try:
        return fn(*args)
    except CircuitFileError:
        raise
    except RecursionError:
        raise CircuitFileError("circuit file: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as err:
        raise CircuitFileError(f"circuit file: {err}") from None


# ====================================================================== own JSON format
def circuit_to_dict(circuit: Circuit) -> dict[str, Any]:
    """The circuit as a JSON-ready dict (schema in docs/formats.md).

    With scores, every graph edge is listed (so the scores round trip); without, only circuit edges."""
    g = circuit.graph
    node_flags = circuit.node_mask().tolist()
    nodes = [
        {"id": str(n), "kind": n.kind.value, "layer": n.layer, "head": n.head, "in_circuit": flag}
        for n, flag in zip(g.nodes, node_flags, strict=True)
    ]
    flat = _flat_scores(circuit, "save")
    edges: list[dict[str, Any]]
    if flat is None:
        edges = [{"id": str(e), "score": None, "in_circuit": True} for e in circuit.edges()]
    else:
        members = circuit.in_circuit.T[g.edge_mask.T].tolist()
        edges = [
            {"id": str(e), "score": v, "in_circuit": m} for e, v, m in zip(g.edges(), flat, members, strict=True)
        ]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "graph": {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_residual": g.parallel_residual},
        "provenance": check_provenance(circuit.provenance),
        "scores": _scores_meta_out(circuit.scores),
        "n_edges": circuit.n_edges,
        "nodes": nodes,
        "edges": edges,
    }


def circuit_from_dict(data: Any, name: str = "circuit") -> Circuit:
    """Rebuild a circuit from ``circuit_to_dict`` output; CircuitFileError on anything malformed."""
    return _checked(_circuit_from_dict, data, name)


def _circuit_from_dict(data: Any, name: str) -> Circuit:
    top = _dict(data, name)
    hint = " (this looks like MIB / EAP-IG JSON: use load_mib_json)" if "cfg" in top else ""
    if "format" not in top:
        raise CircuitFileError(f"{name}: missing key 'format'{hint}")
    fmt = top["format"]
    if fmt == POSITIONAL_FORMAT_NAME:
        raise CircuitFileError(f"{name}: this is a token-position circuit: read it with load_positional_circuit")
    if fmt != FORMAT_NAME:
        raise CircuitFileError(f"{name}: not a {FORMAT_NAME} file (format {str(fmt)[:80]!r}){hint}")
    version = _int(_get(top, "version", name), f"{name}.version")
    if version != FORMAT_VERSION:
        newer = " (written by a newer version of causal-circuits)" if version > FORMAT_VERSION else ""
        raise CircuitFileError(f"{name}: unsupported format version {version}; this tool reads {FORMAT_VERSION}{newer}")
    _reject_nan(top, name)  # the parser may have let NaN through (import_circuit parses before it knows the format)
    spec = _dict(_get(top, "graph", name), f"{name}.graph")
    graph = make_graph(spec, "parallel_residual", f"{name}.graph")
    provenance = _json_value(top.get("provenance", {}), f"{name}.provenance")
    meta = _scores_meta(top.get("scores"), f"{name}.scores")
    lookup = _EdgeLookup(graph)
    if "n_edges" in top:  # informational (the edges are the truth); type-checked only
        _int(top["n_edges"], f"{name}.n_edges")

    for i, entry in enumerate(_list(top.get("nodes", []), f"{name}.nodes")):
        where = f"{name}.nodes[{i}]"
        entry = _dict(entry, where)
        lookup.node(_get(entry, "id", where), f"{where}.id")
        _bool(entry.get("in_circuit", False), f"{where}.in_circuit")  # derived from edges; checked, not used

    table = _ScoreTable(graph)
    for i, entry in enumerate(_list(_get(top, "edges", name), f"{name}.edges")):
        where = f"{name}.edges[{i}]"
        entry = _dict(entry, where)
        text = _get(entry, "id", where)
        cell = lookup.edge(text, f"{where}.id")
        member = _bool(_get(entry, "in_circuit", where), f"{where}.in_circuit")
        raw = entry.get("score")
        if meta is None:
            if raw is not None:
                raise CircuitFileError(f"{where}.score: the file declares no scores (\"scores\": null) but this edge has one")
            value = 0.0
        else:
            value = _number(_get(entry, "score", where), f"{where}.score")
        table.add(cell, value, member, text, where)

    scores = None
    if meta is not None:
        if len(table.cells) != graph.n_edges:
            missing = next(e for e in graph.edges() if graph.edge_index(e) not in table.seen)
            raise CircuitFileError(
                f"{name}.edges: a scored file lists every edge of the graph; {len(table.cells)} of {graph.n_edges} "
                f"listed (e.g. {missing} is missing)"
            )
        method, settings, dtype = meta
        scores = EdgeScores(graph, table.scores(dtype, f"{name}.edges"), method, settings)
    return Circuit(graph, table.mask(), scores, provenance)


def save_circuit(circuit: Circuit, path: PathLike) -> None:
    """Write ``circuit`` as our JSON format, atomically. ValueError if scores or provenance cannot be stored."""
    _write_json(circuit_to_dict(circuit), path)


def load_circuit(path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Circuit:
    """Read a circuit written by ``save_circuit``. CircuitFileError on any problem with the file."""
    return circuit_from_dict(read_json_file(path, max_bytes, allow_nan=True), str(path))


# ====================================================================== MIB / EAP-IG JSON
def circuit_to_mib_dict(circuit: Circuit, d_model: int | None = None) -> dict[str, Any]:
    """The circuit in MIB / EAP-IG ``Graph.to_json`` layout, plus our round-trip key.

    ``d_model`` (EAP-IG needs it to load the file) defaults to ``provenance["d_model"]``. Without
    scores, every edge gets score 0.0 (EAP-IG requires one); our extension key records that the
    circuit was unscored so the round trip gives ``scores=None`` again. Node ``in_graph`` flags are
    the nodes touched by circuit edges; ``logits`` is always in the graph, as in EAP-IG. Node scores
    are written from ``provenance["node_scores"]`` when present."""
    g = circuit.graph
    width = d_model if d_model is not None else circuit.provenance.get("d_model")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError("MIB / EAP-IG JSON needs d_model: pass d_model= or put it in the provenance")
    provenance = check_provenance({**circuit.provenance, "d_model": width})
    node_scores = _node_scores_out(g, provenance.get("node_scores"))
    flags = circuit.node_mask().tolist()
    nodes: dict[str, dict[str, Any]] = {}
    for node, flag in zip(g.nodes, flags, strict=True):
        entry: dict[str, Any] = {"in_graph": True if node == NodeId.logits() else flag}
        if str(node) in node_scores:
            entry["score"] = node_scores[str(node)]
        nodes[str(node)] = entry
    flat = _flat_scores(circuit, "save_mib_json")
    members = circuit.in_circuit.T[g.edge_mask.T].tolist()
    values = flat if flat is not None else [0.0] * g.n_edges
    edges = {str(e): {"score": v, "in_graph": m} for e, v, m in zip(g.edges(), values, members, strict=True)}
    return {
        "cfg": {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel_residual, "d_model": width},
        "nodes": nodes,
        "edges": edges,
        MIB_EXTENSION_KEY: {
            "format": MIB_EXTENSION_NAME,
            "version": FORMAT_VERSION,
            "provenance": provenance,
            "scores": _scores_meta_out(circuit.scores),
        },
    }


def _node_scores_out(graph: ComputationGraph, value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError("provenance['node_scores'] must map node ids to numbers")
    names = {str(n) for n in graph.senders}
    out = {}
    for key, score in value.items():
        if key not in names or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"provenance['node_scores']: {key!r}: {score!r} is not a sender node with a number")
        out[key] = float(score)
    return out


def circuit_from_mib_dict(data: Any, name: str = "mib circuit") -> Circuit:
    """Rebuild a circuit from MIB / EAP-IG JSON; CircuitFileError on anything malformed."""
    return _checked(_circuit_from_mib_dict, data, name)


def _circuit_from_mib_dict(data: Any, name: str) -> Circuit:
    top = _dict(data, name)
    cfg = _dict(_get(top, "cfg", name), f"{name}.cfg")
    graph = make_graph(cfg, "parallel_attn_mlp", f"{name}.cfg")
    d_model = cfg.get("d_model")
    if d_model is not None:
        _int(d_model, f"{name}.cfg.d_model", 1)
    lookup = _EdgeLookup(graph)

    ext = top.get(MIB_EXTENSION_KEY)
    if ext is not None:
        where = f"{name}.{MIB_EXTENSION_KEY}"
        ext = _dict(ext, where)
        if _get(ext, "format", where) != MIB_EXTENSION_NAME:
            raise CircuitFileError(f"{where}.format: expected {MIB_EXTENSION_NAME!r}")
        version = _int(_get(ext, "version", where), f"{where}.version")
        if version != FORMAT_VERSION:
            raise CircuitFileError(f"{where}: unsupported version {version}; this tool reads {FORMAT_VERSION}")
        provenance = _json_value(ext.get("provenance", {}), f"{where}.provenance")
        meta = _scores_meta(_get(ext, "scores", where), f"{where}.scores")
    else:
        provenance = {"source_format": "mib-json"}
        meta = None

    node_scores: dict[str, float] = {}
    for key, entry in _dict(_get(top, "nodes", name), f"{name}.nodes").items():
        where = f"{name}.nodes[{key[:200]!r}]"
        node = lookup.node(key, where)
        entry = _dict(entry, where)
        _bool(_get(entry, "in_graph", where), f"{where}.in_graph")  # derived from edges; checked, not used
        if entry.get("score") is not None:
            score = _number(entry["score"], f"{where}.score", allow_nan=True)
            if not math.isnan(score) and node != NodeId.logits():  # NaN = "not scored" in EAP-IG
                node_scores[str(node)] = score
        if "neurons" in entry:
            neurons = _list(entry["neurons"], f"{where}.neurons")
            for i, flag in enumerate(neurons):
                if isinstance(flag, (bool, int, float)):
                    if not flag:
                        raise CircuitFileError(f"{where}.neurons: neuron-level circuits are not supported")
                else:
                    raise CircuitFileError(f"{where}.neurons[{i}]: expected a boolean, got {_type(flag)}")

    table = _ScoreTable(graph)
    any_score = False
    for key, entry in _dict(_get(top, "edges", name), f"{name}.edges").items():
        where = f"{name}.edges[{key[:200]!r}]"
        cell = lookup.edge(key, where)
        entry = _dict(entry, where)
        member = _bool(_get(entry, "in_graph", where), f"{where}.in_graph")
        value = 0.0
        if entry.get("score") is not None:
            value = _number(entry["score"], f"{where}.score")
            any_score = True
        table.add(cell, value, member, key, where)

    if ext is None:
        if node_scores:
            provenance["node_scores"] = node_scores
        if any_score:
            meta = ("unknown", {}, torch.float32)
    if d_model is not None:
        provenance["d_model"] = d_model
    scores = None
    if meta is not None:
        method, settings, dtype = meta
        scores = EdgeScores(graph, table.scores(dtype, f"{name}.edges"), method, settings)
    return Circuit(graph, table.mask(), scores, provenance)


def save_mib_json(circuit: Circuit, path: PathLike, d_model: int | None = None) -> None:
    """Write MIB / EAP-IG circuit JSON (loadable by ``eap.graph.Graph.from_json``), atomically."""
    _write_json(circuit_to_mib_dict(circuit, d_model), path)


def load_mib_json(path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Circuit:
    """Read MIB / EAP-IG circuit JSON. NaN node scores mean "not scored"; NaN edge scores are refused."""
    return circuit_from_mib_dict(read_json_file(path, max_bytes, allow_nan=True), str(path))


# ====================================================================== any format
def import_circuit(path: PathLike, fmt: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES) -> Circuit:
    """Load our JSON or MIB JSON; ``fmt="auto"`` tells them apart by their top-level keys."""
    if fmt not in ("auto", "json", "mib-json"):
        raise ValueError(f"cannot import {fmt!r}: expected auto, json or mib-json")
    data = read_json_file(path, max_bytes, allow_nan=True)
    if fmt == "auto":
        if isinstance(data, dict) and "format" in data:
            fmt = "json"
        elif isinstance(data, dict) and "cfg" in data:
            fmt = "mib-json"
        else:
            raise CircuitFileError(f"{path}: neither a {FORMAT_NAME} file nor MIB / EAP-IG circuit JSON")
    if fmt == "json":
        return circuit_from_dict(data, str(path))
    return circuit_from_mib_dict(data, str(path))


def import_any_circuit(path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Circuit | PositionalCircuit:
    """Load any circuit file: a token-position circuit (``format`` is ``causal-circuits/positional-circuit``)
    as a ``PositionalCircuit``, our JSON or MIB JSON as a ``Circuit``. The file is read once; the
    same hostile-input guarantees as the single-format loaders (CircuitFileError on any problem)."""
    data = read_json_file(path, max_bytes, allow_nan=True)
    if isinstance(data, dict) and data.get("format") == POSITIONAL_FORMAT_NAME:
        return positional_circuit_from_dict(data, str(path))
    if isinstance(data, dict) and "format" in data:
        return circuit_from_dict(data, str(path))
    if isinstance(data, dict) and "cfg" in data:
        return circuit_from_mib_dict(data, str(path))
    raise CircuitFileError(
        f"{path}: neither a {FORMAT_NAME} / {POSITIONAL_FORMAT_NAME} file nor MIB / EAP-IG circuit JSON"
    )


def _reject_nan(data: Any, name: str) -> None:
    """Our own format never holds NaN anywhere; refuse it (iterative walk: no recursion limit)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and math.isnan(item):
            raise CircuitFileError(f"{name}: NaN is not allowed (scores must be finite numbers)")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def export_circuit(
    circuit: Circuit | PositionalCircuit, path: PathLike, fmt: str, *, d_model: int | None = None, collapse: bool = False
) -> None:
    """Write ``circuit`` as ``fmt``: json, mib-json, graphml, gexf or node-link (all atomic).

    GraphML and GEXF get the merged DiGraph of ``Circuit.to_networkx`` with export-safe attributes:
    ``score`` (omitted without scores), ``slot``, per-slot ``score_q`` / ``score_k`` / ``score_v`` on
    head edges, and the provenance as a JSON string graph attribute ``provenance_json``.
    Node-link JSON keeps the DiGraph attributes as they are (``slot_scores`` dicts, nulls).

    A ``PositionalCircuit`` goes to ``export_positional_circuit`` (``collapse`` applies to it only)."""
    if isinstance(circuit, PositionalCircuit):
        export_positional_circuit(circuit, path, fmt, d_model=d_model, collapse=collapse)
        return
    if fmt == "json":
        save_circuit(circuit, path)
    elif fmt == "mib-json":
        save_mib_json(circuit, path, d_model)
    else:
        _export_networkx(circuit, path, fmt)


def _export_networkx(circuit: Circuit | PositionalCircuit, path: PathLike, fmt: str) -> None:
    """Write the ``to_networkx`` view as ``graphml`` / ``gexf`` (``xml_safe_view``) or ``node-link`` JSON
    (atomic); ValueError for any other ``fmt``."""
    if fmt in ("graphml", "gexf"):
        view = xml_safe_view(circuit)
        with atomic_write(path) as handle:
            (nx.write_graphml if fmt == "graphml" else nx.write_gexf)(view, handle)
    elif fmt == "node-link":
        view = circuit.to_networkx()
        view.graph["provenance"] = check_provenance(circuit.provenance)
        _write_json(nx.node_link_data(view, edges="edges"), path)
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")


def xml_safe_view(circuit: Circuit | PositionalCircuit) -> nx.DiGraph:
    """``to_networkx`` with GraphML / GEXF-safe attributes only (str, int, float, bool; no None, no dicts).

    Positional circuits also get their tokens as a JSON string graph attribute ``tokens_json``."""
    view = circuit.to_networkx()
    view.graph["provenance_json"] = json.dumps(check_provenance(view.graph.pop("provenance")), sort_keys=True)
    if "tokens" in view.graph:
        view.graph["tokens_json"] = json.dumps(view.graph.pop("tokens"))
    for _, _, data in view.edges(data=True):
        slot_scores = data.pop("slot_scores")
        if data["score"] is None:
            del data["score"]
        else:
            data["score"] = float(data["score"])
            for slot, value in slot_scores.items():
                if slot:
                    data[f"score_{slot}"] = float(value)
    return view


# ====================================================================== token-position circuits
def positional_circuit_to_dict(circuit: PositionalCircuit) -> dict[str, Any]:
    """A positional circuit as a JSON-ready dict (docs/positions.md, docs/formats.md).

    Edges carry positional ids (``a0.h1@3->a3.h2@3<q>``). Listed: every positional edge that is in
    the circuit or has a nonzero score, in positional edge order; an unlisted edge is not in the
    circuit and scores 0, so the scores round-trip exactly without listing T times every edge."""
    g = circuit.graph
    scores = circuit.scores
    listed = circuit.in_circuit.clone()
    if scores is not None:
        bad = ~torch.isfinite(scores.values)
        if bool(bad.any()):
            s, r, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"save: score of {g.edge_id(s, r).at(t)} is not finite; files hold finite scores only")
        listed |= scores.values != 0
    listed &= g.edge_mask[:, :, None]
    ts, rs, ss = listed.permute(2, 1, 0).nonzero(as_tuple=True)  # positional edge order
    edges = []
    values = None if scores is None else scores.values[ss, rs, ts].tolist()
    members = circuit.in_circuit[ss, rs, ts].tolist()
    for i, (s, r, t) in enumerate(zip(ss.tolist(), rs.tolist(), ts.tolist(), strict=True)):
        edge = g.edge_id(s, r).at(t)
        edges.append({"id": str(edge), "score": None if values is None else values[i], "in_circuit": members[i]})
    return {
        "format": POSITIONAL_FORMAT_NAME,
        "version": FORMAT_VERSION,
        "graph": {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_residual": g.parallel_residual},
        "tokens": list(circuit.tokens),
        "provenance": check_provenance(circuit.provenance),
        "scores": _scores_meta_out(scores),
        "n_edges": circuit.n_edges,
        "edges": edges,
    }


def positional_circuit_from_dict(data: Any, name: str = "positional circuit") -> PositionalCircuit:
    """Rebuild a positional circuit from ``positional_circuit_to_dict`` output (CircuitFileError otherwise)."""
    return _checked(_positional_circuit_from_dict, data, name)


def _positional_circuit_from_dict(data: Any, name: str) -> PositionalCircuit:
    top = _dict(data, name)
    fmt = _get(top, "format", name)
    if fmt != POSITIONAL_FORMAT_NAME:
        hint = " (a non-positional circuit: use load_circuit)" if fmt == FORMAT_NAME else ""
        raise CircuitFileError(f"{name}: not a {POSITIONAL_FORMAT_NAME} file (format {str(fmt)[:80]!r}){hint}")
    version = _int(_get(top, "version", name), f"{name}.version")
    if version != FORMAT_VERSION:
        raise CircuitFileError(f"{name}: unsupported format version {version}; this tool reads {FORMAT_VERSION}")
    _reject_nan(top, name)
    graph = make_graph(_dict(_get(top, "graph", name), f"{name}.graph"), "parallel_residual", f"{name}.graph")
    tokens = [_str(t, f"{name}.tokens[{i}]") for i, t in enumerate(_list(_get(top, "tokens", name), f"{name}.tokens"))]
    T = len(tokens)
    if not 1 <= T <= MAX_POSITIONS:
        raise CircuitFileError(f"{name}.tokens: need 1 to {MAX_POSITIONS} positions, got {T}")
    dense = graph.n_senders * graph.n_receivers * T
    if dense > MAX_DENSE_ENTRIES:
        raise CircuitFileError(f"{name}: {T} positions need {dense} dense score entries, above the cap of {MAX_DENSE_ENTRIES}")
    provenance = _json_value(top.get("provenance", {}), f"{name}.provenance")
    meta = _scores_meta(top.get("scores"), f"{name}.scores")
    if "n_edges" in top:
        _int(top["n_edges"], f"{name}.n_edges")
    mask = torch.zeros(graph.n_senders, graph.n_receivers, T, dtype=torch.bool)
    cells: list[tuple[int, int, int]] = []
    values: list[float] = []
    seen: dict[tuple[int, int, int], str] = {}
    for i, entry in enumerate(_list(_get(top, "edges", name), f"{name}.edges")):
        where = f"{name}.edges[{i}]"
        entry = _dict(entry, where)
        text = _str(_get(entry, "id", where), f"{where}.id")
        try:
            base, t = parse_positional_edge(text)
            s, r = graph.edge_index(base)
        except IdError as err:
            raise CircuitFileError(f"{where}.id: {str(err)[:300]}") from None
        if t >= T:
            raise CircuitFileError(f"{where}.id: {text[:200]!r} is at position {t}, the file has {T} positions")
        cell = (s, r, t)
        if cell in seen:
            raise CircuitFileError(f"{where}: duplicate edge {text[:200]!r}")
        seen[cell] = text
        if _bool(_get(entry, "in_circuit", where), f"{where}.in_circuit"):
            mask[cell] = True
        raw = entry.get("score")
        if meta is None:
            if raw is not None:
                raise CircuitFileError(f"{where}.score: the file declares no scores (\"scores\": null) but this edge has one")
            continue
        cells.append(cell)
        values.append(_number(_get(entry, "score", where), f"{where}.score"))
    scores = None
    if meta is not None:
        method, settings, dtype = meta
        dense_scores = torch.zeros(graph.n_senders, graph.n_receivers, T, dtype=dtype)
        if cells:
            vals = torch.tensor(values, dtype=torch.float64).to(dtype)
            if not bool(torch.isfinite(vals).all()):
                raise CircuitFileError(f"{name}.edges: a score overflows {dtype}")
            ss, rs, ts = zip(*cells, strict=True)
            dense_scores[list(ss), list(rs), list(ts)] = vals
        scores = PositionalEdgeScores(graph, dense_scores, tuple(tokens), method, settings)
    return PositionalCircuit(graph, mask, tuple(tokens), scores, provenance)


def save_positional_circuit(circuit: PositionalCircuit, path: PathLike) -> None:
    """Write a positional circuit as JSON, atomically (ValueError for non-finite scores)."""
    _write_json(positional_circuit_to_dict(circuit), path)


def load_positional_circuit(path: PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> PositionalCircuit:
    """Read a file written by ``save_positional_circuit``; CircuitFileError on any problem."""
    return positional_circuit_from_dict(read_json_file(path, max_bytes, allow_nan=True), str(path))


def save_positional_mib_json(
    circuit: PositionalCircuit, path: PathLike, d_model: int | None = None, *, collapse: bool = False
) -> None:
    """MIB / EAP-IG circuit JSON has no token positions. With ``collapse=True`` write its nearest
    equivalent, ``circuit.collapsed()`` (an edge is in it if it is in at any position; scores
    summed over positions); otherwise refuse with a ValueError that says so."""
    if not collapse:
        raise ValueError(
            "MIB / EAP-IG circuit JSON has no token positions, so a positional circuit has no exact MIB form; "
            "pass collapse=True to write circuit.collapsed() (edges in at any position, scores summed)"
        )
    save_mib_json(circuit.collapsed(), path, d_model)


def export_positional_circuit(
    circuit: PositionalCircuit, path: PathLike, fmt: str, *, d_model: int | None = None, collapse: bool = False
) -> None:
    """Write a positional circuit as ``fmt`` (atomic): ``json`` (the positional format), ``graphml`` /
    ``gexf`` / ``node-link`` (``PositionalCircuit.to_networkx``: node ids ``a3.h7@12`` with ``position``
    and ``token`` attributes; GraphML / GEXF as in ``xml_safe_view``), ``mib-json`` only with
    ``collapse=True`` (MIB has no token positions: ``save_positional_mib_json``)."""
    if fmt == "json":
        save_positional_circuit(circuit, path)
    elif fmt == "mib-json":
        save_positional_mib_json(circuit, path, d_model, collapse=collapse)
    else:
        _export_networkx(circuit, path, fmt)
