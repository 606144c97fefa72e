"""``circuits tasks``: the built-in tasks."""

from __future__ import annotations

import click

from cli.options import echo_json, json_option


@click.command()
@json_option
def tasks(as_json: bool) -> None:
    """List the built-in tasks (behaviours with clean / corrupted prompts and answers).

    \b
    Examples:
      circuits tasks
      circuits tasks --json
    """
    from circuits.tasks import available_tasks

    table = dict(available_tasks())
    if as_json:
        echo_json(table)
        return
    width = max((len(name) for name in table), default=0)
    for name, description in table.items():
        click.echo(f"{name:<{width}}  {description}")
