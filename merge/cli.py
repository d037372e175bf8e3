"""The ``merge`` command: parse options, call one library function, print.

User errors (``MergeError``) print one line per problem to stderr and exit 2, with no
traceback (``MERGE_DEBUG=1`` shows it). Data goes to stdout; progress and warnings to stderr.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from merge import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build new LLM checkpoints out of existing ones from a YAML recipe.",
)

T = TypeVar("T")

RecipeArg = Annotated[
    Path, typer.Argument(help="The recipe (mergekit syntax).", show_default=False)
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Seed for random methods (default: the recipe's seed, else a fixed one).",
        show_default=False,
    ),
]
ShardOpt = Annotated[
    str, typer.Option("--out-shard-size", help="Largest output shard, e.g. 5GB or 500MB.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or warnings.")]


def _fail(problems: list[str]) -> None:
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn user errors into one-line messages and exit code 2."""
    from merge.errors import MergeError

    try:
        return fn()
    except MergeError as e:
        if os.environ.get("MERGE_DEBUG"):
            raise
        _fail(e.problems)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _warn(warnings: list[str], quiet: bool) -> None:
    if not quiet:
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"merge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Build new LLM checkpoints out of existing ones from a YAML recipe."""


@app.command()
def run(
    recipe: RecipeArg,
    out: Annotated[
        Path | None,
        typer.Argument(
            help="Output directory (default: ./<recipe stem>-merged).", show_default=False
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output directory.")
    ] = False,
    seed: SeedOpt = None,
    out_shard_size: ShardOpt = "5GB",
    quiet: QuietOpt = False,
) -> None:
    """Merge the models of RECIPE into OUT."""
    from merge import api

    def go() -> Path:
        rec = api.load_recipe(recipe)
        return api.run(
            rec,
            out,
            overwrite=overwrite,
            seed=seed,
            shard_size=out_shard_size,
            progress=not quiet,
            warn=None if quiet else lambda w: _warn([w], quiet),
            info=None if quiet else lambda line: typer.echo(line, err=True),
        )

    start = time.perf_counter()
    target = _guard(go)
    if not quiet:
        typer.echo(f"wrote {target} in {time.perf_counter() - start:.2f} s", err=True)


@app.command()
def validate(recipe: RecipeArg, quiet: QuietOpt = False) -> None:
    """Check RECIPE and its models' headers without reading tensor data."""
    from merge import api
    from merge.report import summary

    def go() -> list[str]:
        p = api.plan(recipe)
        _warn(p.warnings, quiet)
        return summary(p)

    lines = _guard(go)
    typer.echo(f"{recipe}: ok")
    for line in lines[1:]:
        typer.echo(f"  {line}")


@app.command()
def plan(
    recipe: RecipeArg,
    seed: SeedOpt = None,
    out_shard_size: ShardOpt = "5GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Print every output tensor of RECIPE with its sources, method and parameters."""
    from merge import api
    from merge.report import plan_json, plan_text

    def go() -> Any:
        p = api.plan(recipe, seed=seed, shard_size=out_shard_size)
        _warn(p.warnings, quiet)
        return json.dumps(plan_json(p), indent=2) if as_json else plan_text(p)

    typer.echo(_guard(go))


@app.command()
def methods(
    name: Annotated[
        str | None,
        typer.Argument(help="Show only this method, with each parameter's meaning."),
    ] = None,
) -> None:
    """List the merge methods with their parameters (scope, type, default, range) and papers."""
    from merge.methods import UnknownMethodError, get_method
    from merge.methods.docs import method_text, methods_text

    if name is None:
        typer.echo(methods_text())
        return
    try:
        method = get_method(name)
    except UnknownMethodError as e:
        _fail([str(e)])
    typer.echo(method_text(method, details=True))


def main() -> None:
    app(prog_name="merge")


if __name__ == "__main__":  # pragma: no cover
    main()
