"""Entry point of the ``circuits`` command (``circuits = "cli.main:main"`` in pyproject.toml).

This module imports only click and the command modules, which import torch / transformers inside
their functions, so ``circuits --help`` answers instantly. To add a command, write a module in
``cli/commands/`` and list its command (or group) in ``cli.commands.COMMANDS``.
"""

from __future__ import annotations

import click

from cli.commands import COMMANDS
from cli.errors import CircuitsGroup

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=CircuitsGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="causal-circuits", prog_name="circuits")
def cli(debug: bool) -> None:
    """Find the minimal circuits of Hugging Face language models.

    \b
    Examples:
      circuits models                                 # supported architectures and aliases
      circuits tasks                                  # built-in tasks
      circuits graph --model smollm2-135m             # size of a model's computation graph
      circuits --debug graph --model ./my-model       # full traceback on errors
    """


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="circuits")


if __name__ == "__main__":
    main()
