"""Options shared by several commands, and the one way the CLI loads a model."""

from __future__ import annotations

import json
from collections.abc import Callable
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


def load(model_name: str) -> Any:
    """``graphs.loading.load_model`` with progress on stderr (stdout stays parseable)."""
    from graphs.loading import load_model

    return load_model(model_name, progress=True)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _read_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Load a TOML config file into the command's defaults (flags given on the line still win).

    The file may hold the settings at top level or under a table named after the command
    (``[discover]``); keys use the option names with ``-`` or ``_`` (``n-prompts`` = ``n_prompts``)."""
    if value is None:
        return None
    import tomllib
    from pathlib import Path

    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file {value} does not exist", ctx=ctx, param=param)
    if path.stat().st_size > 1 << 20:
        raise click.BadParameter(f"config file {value} is larger than 1 MB", ctx=ctx, param=param)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"config file {value} is not valid TOML: {err}", ctx=ctx, param=param) from None
    name = ctx.command.name or ""
    section = data.get(name, data)
    if not isinstance(section, dict):
        raise click.BadParameter(f"[{name}] in {value} must be a table", ctx=ctx, param=param)
    known = {p.name for p in ctx.command.params if p.name}
    values: dict[str, Any] = {}
    for key, item in section.items():
        if isinstance(item, dict) and key != name:
            continue  # another command's table
        dest = key.replace("-", "_")
        if dest not in known or dest == "config":
            raise click.BadParameter(f"unknown setting {key!r} in {value}; known: {', '.join(sorted(known - {'config'}))}",
                                     ctx=ctx, param=param)
        values[dest] = item
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def config_option(func: F) -> F:
    """``--config FILE.toml``: settings whose values act as defaults that flags override."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_read_config,
        help="TOML file of settings (top level or a [<command>] table); flags override it.",
    )(func)
