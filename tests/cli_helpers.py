"""Helpers for tests that invoke the ``circuits`` CLI in-process (click's ``CliRunner``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from cli.main import cli


def run(*args: str | Path) -> Result:
    """Invoke ``circuits ARGS...`` (paths turned into strings); the exit code is not checked."""
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="circuits")


def ok(*args: str | Path) -> Result:
    """``run`` that must exit 0 (the assertion shows stdout and stderr otherwise)."""
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def ok_json(*args: str | Path) -> Any:
    """The parsed ``--json`` output of a successful run."""
    return json.loads(ok(*args, "--json").stdout)
