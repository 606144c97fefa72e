"""The commands of ``circuits``, one module per command or command group.

Modules here import nothing heavy at module level (torch, transformers and the library are
imported inside the command functions) so that ``circuits --help`` stays fast.
"""

from __future__ import annotations

import click

from cli.commands.compare import compare
from cli.commands.discover import discover
from cli.commands.evaluate import evaluate
from cli.commands.export import export
from cli.commands.graph import graph
from cli.commands.models import models
from cli.commands.query import query
from cli.commands.render import render
from cli.commands.tasks import tasks

COMMANDS: tuple[click.Command, ...] = (models, tasks, graph, discover, evaluate, render, query, compare, export)

__all__ = ["COMMANDS"]
