"""The commands of ``circuits``, one module per command or command group.

Modules here import nothing heavy at module level (torch, transformers and the library are
imported inside the command functions) so that ``circuits --help`` stays fast.
"""

from __future__ import annotations

import click

from cli.commands.discover import discover
from cli.commands.graph import graph
from cli.commands.models import models
from cli.commands.tasks import tasks

COMMANDS: tuple[click.Command, ...] = (models, tasks, graph, discover)

__all__ = ["COMMANDS"]
