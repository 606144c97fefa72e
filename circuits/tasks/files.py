"""User tasks from JSONL or CSV files: rows ``{"clean", "corrupted", "answer", "wrong"}``.

Formats (chosen by the file extension):

- ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are skipped. ``.json``: a JSON
  array of such objects, or JSONL.
- ``.csv``: a header row naming exactly the four columns (any order), then one row per pair. A
  cell whose first character is ``[`` is read as a JSON array of strings (several answers); any
  other cell is one answer, taken verbatim (leading spaces matter: ``" Mary"``).

``answer`` and ``wrong`` are a string or a non-empty list of strings, each of which must be one
token. Only ``json`` and ``csv`` parsing is used: nothing in a file is ever executed.
Every problem raises ``TaskError`` naming the row (1-based, counting data rows, not the header).
"""

from __future__ import annotations

import csv
import io
import json
import reprlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from .base import TaskError, TokenizedTask
from .encoding import (
    EncodedPair,
    PromptPair,
    assemble,
    encode_pair,
    is_aligned,
    pad_id_for,
    special_prefix,
)

FIELDS: tuple[str, ...] = ("clean", "corrupted", "answer", "wrong")
_JSONL = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class TaskRow:
    """One user row: prompts and answer strings (lists normalised to tuples)."""

    clean: str
    corrupted: str
    answer: tuple[str, ...]
    wrong: tuple[str, ...]


# --------------------------------------------------------------------------- parsing


def _check_row(obj: Any, where: str) -> TaskRow:
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected an object with fields {list(FIELDS)}, got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    extra = sorted(str(k) for k in obj if k not in FIELDS)
    if missing or extra:
        parts = ([f"missing field(s) {missing}"] if missing else []) + ([f"unknown field(s) {extra}"] if extra else [])
        raise TaskError(f"{where}: {'; '.join(parts)} (expected exactly {list(FIELDS)})")
    for f in ("clean", "corrupted"):
        if not isinstance(obj[f], str):
            raise TaskError(f"{where}: field {f!r} must be a string, got {type(obj[f]).__name__}")
        _check_text(obj[f], where, f)
    return TaskRow(
        obj["clean"], obj["corrupted"], _answers(obj["answer"], where, "answer"), _answers(obj["wrong"], where, "wrong")
    )


def _check_text(text: str, where: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON escapes such as "\ud800"
        raise TaskError(f"{where}: field {field!r} is not valid Unicode text: {e}") from e


def _answers(value: Any, where: str, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        for v in value:
            _check_text(v, where, field)
        return tuple(value)
    raise TaskError(
        f"{where}: field {field!r} must be a string or a non-empty list of strings, got {reprlib.repr(value)}"
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return out


def _loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (ValueError, like every other JSON problem)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _parse_json(text: str, is_array_ok: bool) -> list[TaskRow]:
    if is_array_ok and text.lstrip().startswith("["):
        try:
            data = _loads(text)
        except (ValueError, RecursionError) as e:
            raise TaskError(f"malformed JSON: {e}") from e
        if not isinstance(data, list):  # pragma: no cover - starts with '[' so it is a list
            raise TaskError("a .json task file must hold an array of row objects")
        return [_check_row(obj, f"row {i}") for i, obj in enumerate(data, start=1)]
    rows: list[TaskRow] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"row {len(rows) + 1} (line {line_no})"
        try:
            obj = _loads(line)
        except (ValueError, RecursionError) as e:
            raise TaskError(f"{where}: malformed JSON: {e}") from e
        rows.append(_check_row(obj, where))
    return rows


def _csv_cell(cell: str, where: str, field: str) -> str | list[str]:
    if field in ("answer", "wrong") and cell.startswith("["):
        try:
            value = _loads(cell)
        except (ValueError, RecursionError) as e:
            raise TaskError(f"{where}: field {field!r} starts with '[' but is not a JSON list: {e}") from e
        if not isinstance(value, list):  # pragma: no cover - starts with '[' so it is a list
            raise TaskError(f"{where}: field {field!r} is not a JSON list")
        return value
    return cell


def _parse_csv(text: str) -> list[TaskRow]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[TaskRow] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        if len(set(header)) != len(header):
            raise TaskError(f"CSV header {header} repeats a column")
        for cells in reader:
            where = f"row {len(rows) + 1} (line {reader.line_num})"
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise TaskError(f"{where}: {len(cells)} cells but the header has {len(header)} columns {header}")
            obj = dict(zip(header, cells, strict=True))
            rows.append(_check_row({k: _csv_cell(v, where, k) for k, v in obj.items()}, where))
    except csv.Error as e:
        raise TaskError(f"malformed CSV at line {reader.line_num}: {e}") from e
    return rows


def read_task_rows(path: str | Path) -> list[TaskRow]:
    """Parse a JSONL / JSON / CSV task file into rows (no tokenizer needed). ``TaskError`` on any problem."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (*_JSONL, ".json", ".csv"):
        raise TaskError(f"{p}: unknown task file type {suffix!r}; use .jsonl, .ndjson, .json or .csv")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise TaskError(f"{p}: cannot read the task file: {e}") from e
    except UnicodeDecodeError as e:
        raise TaskError(f"{p}: the task file is not UTF-8 text: {e}") from e
    rows = _parse_csv(text) if suffix == ".csv" else _parse_json(text, is_array_ok=suffix == ".json")
    if not rows:
        raise TaskError(f"{p}: the task file has no rows")
    return rows


def write_task_rows(path: str | Path, rows: Iterable[TaskRow]) -> None:
    """Write rows as JSONL or CSV (by extension) so that ``read_task_rows`` gives them back."""
    p = Path(path)
    suffix = p.suffix.lower()
    data = list(rows)
    if suffix in (*_JSONL, ".json"):
        lines = [
            json.dumps({"clean": r.clean, "corrupted": r.corrupted, "answer": list(r.answer), "wrong": list(r.wrong)})
            for r in data
        ]
        p.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    elif suffix == ".csv":
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)  # quoted: a lone "\r" survives
        w.writerow(FIELDS)
        for r in data:
            w.writerow([r.clean, r.corrupted, _csv_answers(r.answer), _csv_answers(r.wrong)])
        p.write_text(buf.getvalue(), encoding="utf-8", newline="")
    else:
        raise TaskError(f"{p}: unknown task file type {suffix!r}; use .jsonl, .ndjson, .json or .csv")


def _csv_answers(values: Sequence[str]) -> str:
    # One answer that cannot be mistaken for a JSON list is written verbatim; anything else as JSON.
    if len(values) == 1 and not values[0].startswith("["):
        return values[0]
    return json.dumps(list(values))


# --------------------------------------------------------------------------- tokenizing


def tokenize_rows(
    rows: Sequence[TaskRow],
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str = "user",
    drop_misaligned: bool = False,
) -> TokenizedTask:
    """Encode rows into a ``TokenizedTask`` (see ``load_task_file`` for the checks)."""
    if not rows:
        raise TaskError(f"task {name!r} is empty: it has no rows")
    prefix = special_prefix(tokenizer)
    encoded: list[EncodedPair] = []
    for i, r in enumerate(rows, start=1):
        encoded.append(
            encode_pair(tokenizer, PromptPair(r.clean, r.corrupted, r.answer, r.wrong), prefix, where=f"row {i}")
        )
    bad = [(i, e) for i, e in enumerate(encoded, start=1) if not is_aligned(e)]
    if bad and not drop_misaligned:
        shown = ", ".join(
            f"row {i} (clean {len(e.clean_ids)} tokens, corrupted {len(e.corrupted_ids)})" for i, e in bad[:10]
        )
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise TaskError(
            f"{len(bad)} of {len(rows)} rows have clean and corrupted prompts of different token lengths: "
            f"{shown}{more}. Fix them or pass drop_misaligned=True to drop them"
        )
    kept = [e for e in encoded if is_aligned(e)]
    if bad:
        warnings.warn(
            f"task {name!r}: dropped {len(bad)} of {len(rows)} rows whose clean and corrupted prompts "
            f"have different token lengths (rows {[i for i, _ in bad][:20]})",
            stacklevel=3,
        )
        if not kept:
            raise TaskError(f"task {name!r}: all {len(rows)} rows were misaligned and dropped; nothing is left")
    meta = {"source": "file", "bos": "yes" if prefix else "no", "dropped": str(len(bad))}
    return assemble(name, kept, pad_id=pad_id_for(tokenizer), metadata=meta)


def load_task_file(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, drop_misaligned: bool = False, name: str | None = None
) -> TokenizedTask:
    """A ``TokenizedTask`` from a JSONL / JSON / CSV file of clean/corrupted/answer/wrong rows.

    Raises ``TaskError`` for an unreadable or malformed file, an empty dataset, missing or unknown
    fields, an answer that is not a single token (naming the row and its tokens), an answer that is
    also a wrong answer, and clean/corrupted prompts of different token lengths (naming the rows).
    With ``drop_misaligned=True`` such rows are dropped instead, with a warning, and their count is
    kept in ``task.metadata["dropped"]``. The task is named after the file stem unless ``name``.
    """
    rows = read_task_rows(path)
    return tokenize_rows(rows, tokenizer, name=name or Path(path).stem, drop_misaligned=drop_misaligned)
