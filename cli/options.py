"""Options shared by several commands, and the one way the CLI loads a model."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = (
    "Model to load: an alias (smollm2-135m), a local folder saved with save_pretrained, "
    "a .gguf file, or a Hugging Face hub id (needs a network). See `circuits models`."
)


def model_option(func: F) -> F:
    """``--model/-m NAME`` (required)."""
    return click.option("--model", "-m", "model_name", required=True, metavar="NAME", help=MODEL_HELP)(func)


def json_option(func: F) -> F:
    """``--json``: machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


class InputError(ValueError):
    """Bad input found by a command itself (exit code 2, like the library's own ValueErrors)."""


@contextmanager
def bad_input() -> Iterator[None]:
    """Report a plain ``ValueError`` from the library call inside as bad input (exit 2).

    For calls whose documented ``ValueError``s all mean "change the command line or the input file"
    (a render filter on an unscored circuit, a drawing that is too big, circuits on different graphs).
    Subclasses (and every other exception) pass through unchanged."""
    try:
        yield
    except ValueError as err:
        if type(err) is not ValueError:
            raise
        raise InputError(str(err)) from err


def circuit_argument(func: F) -> F:
    """``CIRCUIT.json``: a circuit file, ours or MIB / EAP-IG JSON (told apart by their keys)."""
    return click.argument("circuit", metavar="CIRCUIT.json")(func)


def read_circuit(path: str) -> Any:
    """``graphs.io.import_circuit(path)``: our circuit JSON or MIB / EAP-IG JSON (``CircuitFileError``
    with a one-line reason for a missing, unreadable or malformed file)."""
    from graphs.io import import_circuit

    return import_circuit(path)


def read_any_circuit(path: str) -> Any:
    """``graphs.io.import_any_circuit(path)``: a ``PositionalCircuit`` for a token-position circuit file,
    else a ``Circuit`` (our JSON or MIB / EAP-IG JSON); ``CircuitFileError`` with a one-line reason."""
    from graphs.io import import_any_circuit

    return import_any_circuit(path)


def is_positional(circuit: Any) -> bool:
    """True for a ``graphs.positional.PositionalCircuit`` (token-position circuit)."""
    from graphs.positional import PositionalCircuit

    return isinstance(circuit, PositionalCircuit)


def position_option(func: F) -> F:
    """``--position T``: only what lies at token position T (token-position circuits only)."""
    return click.option("--position", type=click.IntRange(min=0), metavar="T",
                        help="Token-position circuits: only nodes / edges at token position T.")(func)


def check_position(circuit: Any, position: int | None, path: str) -> None:
    """InputError when ``--position`` is given for a circuit without positions or out of range."""
    if position is None:
        return
    if not is_positional(circuit):
        raise InputError(f"{path} is not a token-position circuit; --position needs one (circuits discover --positional)")
    if position >= circuit.n_positions:
        raise InputError(f"--position {position} is outside the {circuit.n_positions} token positions of {path} "
                         f"(0..{circuit.n_positions - 1})")


def check_same_graph(graph: Any, other: Any, what: str, other_what: str) -> None:
    """InputError naming both shapes when two computation graphs differ."""
    if graph != other:
        raise InputError(f"{what} is on a graph of {graph.describe()}, but {other_what} has {other.describe()}")


def circuit_title(circuit: Any) -> str:
    """``method on task (model)`` from a circuit's provenance, leaving out what it does not record."""
    prov = circuit.provenance
    method = prov.get("method") or (circuit.scores.method if circuit.scores is not None else None)
    text = " on ".join(str(x) for x in (method, prov.get("task")) if x)
    model = prov.get("model")
    if model:
        text = f"{text} ({model})" if text else str(model)
    return text or "circuit without provenance"


def load(model_name: str) -> Any:
    """``graphs.loading.load_model`` with progress on stderr (stdout stays parseable)."""
    from graphs.loading import load_model

    return load_model(model_name, progress=True)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _read_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Load a TOML config file into the command's defaults (flags given on the line still win).

    Top-level keys are settings shared by every command; a table named after the command
    (``[discover]``, ``[evaluate]``) holds settings for that command alone and overrides the top
    level. Keys use the option names with ``-`` or ``_`` (``n-prompts`` = ``n_prompts``). A
    top-level key that only another command knows (``method`` for ``evaluate``) is skipped; a key
    no command knows, or a key in this command's table that it does not know, is an error."""
    if value is None:
        return None
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib  # type: ignore[import-not-found, no-redef]
        except ModuleNotFoundError:
            raise click.BadParameter("reading TOML needs Python 3.11+ or `pip install tomli`",
                                     ctx=ctx, param=param) from None

    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file {value} does not exist", ctx=ctx, param=param)
    if path.stat().st_size > 1 << 20:
        raise click.BadParameter(f"config file {value} is larger than 1 MB", ctx=ctx, param=param)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"config file {value} is not valid TOML: {err}", ctx=ctx, param=param) from None
    except RecursionError:
        raise click.BadParameter(f"config file {value} is nested too deeply", ctx=ctx, param=param) from None
    except OSError as err:
        raise click.BadParameter(f"config file {value} cannot be read: {err.strerror or err}", ctx=ctx, param=param) from None
    name = ctx.command.name or ""
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise click.BadParameter(f"[{name}] in {value} must be a table", ctx=ctx, param=param)
    known = _setting_names(ctx.command)
    commands, elsewhere = _other_commands(ctx)

    def unknown(key: str, where: str) -> click.BadParameter:
        return click.BadParameter(
            f"unknown setting {key!r}{where} in {value}; `{name}` knows: {', '.join(sorted(_setting_names(ctx.command, shown=True)))}",
            ctx=ctx, param=param,
        )

    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # parameter name -> the key as the file wrote it (for messages)
    for key, item in data.items():
        if isinstance(item, dict):
            if key != name and key not in commands:
                raise click.BadParameter(
                    f"unknown table [{key}] in {value}; tables are named after commands: "
                    f"{', '.join(sorted(commands | {name}))}", ctx=ctx, param=param,
                )
            continue  # this command's table (below) or another command's
        dest = known.get(key.replace("_", "-"))
        if dest is not None:
            values[dest] = item
            given[dest] = key
        elif key.replace("_", "-") not in elsewhere:
            raise unknown(key, "")
    for key, item in table.items():
        dest = known.get(key.replace("_", "-"))
        if dest is None:
            raise unknown(key, f" (in [{name}])")
        values[dest] = item
        given[dest] = key
    params = {p.name: p for p in ctx.command.params}
    for dest, item in values.items():  # settings are scalars: a list, table, date or NaN is a mistake
        target = params.get(dest)
        kind = None if target is None else target.type
        if isinstance(kind, click.types.BoolParamType):
            if not isinstance(item, bool):
                raise click.BadParameter(f"setting {given[dest]!r} in {value} must be true or false, got {item!r}",
                                         ctx=ctx, param=target or param)
        elif isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
            if isinstance(item, bool) or not isinstance(item, (int, float, str)):
                raise click.BadParameter(f"setting {given[dest]!r} in {value} must be a number, got {item!r}",
                                         ctx=ctx, param=target or param)
        elif kind is not None and not isinstance(item, str):  # paths, names, choices
            raise click.BadParameter(f"setting {given[dest]!r} in {value} must be a string, got {item!r}",
                                     ctx=ctx, param=target or param)
        if isinstance(item, float) and not math.isfinite(item):
            raise click.BadParameter(f"setting {given[dest]!r} in {value} must be a finite number, got {item}",
                                     ctx=ctx, param=target or param)
        if not isinstance(item, (str, int, float, bool)):
            raise click.BadParameter(
                f"setting {given[dest]!r} in {value} must be a string, number or true/false, "
                f"got {type(item).__name__}", ctx=ctx, param=target or param,
            )
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _setting_names(command: click.Command, shown: bool = False) -> dict[str, str]:
    """Config keys a command accepts (written with ``-``) -> the parameter they set.

    An option is named by its long flags (``n-prompts``, ``json``, ``no-curve``; not the ``--no-x``
    half of an on/off pair, which would invert the value) and by its parameter name; an argument
    by its parameter name (``circuit``). ``shown``: only the names to list in messages (the flags)."""
    names: dict[str, str] = {}
    for param in command.params:
        if not param.name or param.name == "config":
            continue
        flags = [flag[2:] for flag in param.opts if flag.startswith("--")]
        if not (shown and flags):
            names[param.name.replace("_", "-")] = param.name
        names.update(dict.fromkeys(flags, param.name))
    return names


def _other_commands(ctx: click.Context) -> tuple[set[str], set[str]]:
    """Names of the other commands of ``circuits`` and the config keys any other command accepts."""
    root = ctx.find_root().command
    names = {n for n in getattr(root, "commands", {}) if n != ctx.command.name}
    settings: set[str] = set()
    stack = list(getattr(root, "commands", {}).values())
    while stack:
        command = stack.pop()
        if command is not ctx.command:
            settings.update(_setting_names(command))
        if isinstance(command, click.Group):
            stack.extend(command.commands.values())
    return names, settings


def config_option(func: F) -> F:
    """``--config FILE.toml``: settings whose values act as defaults that flags override."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_read_config,
        help="TOML file of settings: shared top-level keys, then a [<command>] table; flags override both.",
    )(func)
