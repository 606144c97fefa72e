"""How the ``circuits`` command turns exceptions into one-line messages and exit codes.

Exit codes: 0 success; 2 bad input (click usage errors, and any ``ValueError`` subclass raised by
this project's own packages: unknown model or task, bad path, ``UnsupportedArchitecture``,
``IdError``, ``TaskError`` ...; also ``FileNotFoundError``); 1 any other failure. Without
``--debug`` an error is one line on stderr, ``error: <message>``; with ``--debug`` the traceback
is printed first. Commands just raise: the group below does the mapping, so new commands get it
for free.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
_OWN_PACKAGES = frozenset({"graphs", "circuits", "cli"})


def is_bad_input(exc: BaseException) -> bool:
    """True for errors the user fixes by changing the command line or an input file."""
    if isinstance(exc, FileNotFoundError):
        return True
    own = type(exc).__module__.split(".")[0] in _OWN_PACKAGES
    return own and isinstance(exc, ValueError)


def exit_code_for(exc: BaseException) -> int:
    return EXIT_BAD_INPUT if is_bad_input(exc) else EXIT_FAILURE


def one_line(exc: BaseException) -> str:
    """The exception as a single line; unexpected errors also name their type and --debug."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if is_bad_input(exc):
        return text
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"


class CircuitsGroup(click.Group):
    """A click group that maps library exceptions to ``error: ...`` lines and exit codes.

    ``--debug`` (a parameter of the root group) is read from the root context, so every
    subcommand, and every subgroup created with ``cls=CircuitsGroup``, honours it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place errors are reported
            if ctx.find_root().params.get("debug"):
                click.echo(traceback.format_exc().rstrip(), err=True)
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.stderr.flush()
            ctx.exit(exit_code_for(exc))
