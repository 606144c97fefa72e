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
      circuits discover --out runs/ioi                # minimal IOI circuit of SmolLM2-135M (EAP-IG)
      circuits evaluate runs/ioi/circuit.json         # faithfulness, curve, random baseline
      circuits render runs/ioi/circuit.json -o ioi.svg
      circuits query runs/ioi/circuit.json edges --into logits --top 10
      circuits compare a.json b.json --svg diff.svg
      circuits export runs/ioi/circuit.json --format graphml -o ioi.graphml
      circuits models | tasks | graph --model smollm2-135m
      circuits --debug ...                            # full traceback on errors
    """


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    from graphs.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # before torch's first large allocation (see graphs/allocator.py)
    cli(prog_name="circuits")


if __name__ == "__main__":
    main()
