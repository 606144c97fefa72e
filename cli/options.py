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
