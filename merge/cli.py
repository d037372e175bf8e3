"""The ``merge`` command: parse options, call one library function, print.

User errors (``MergeError``) print one line per problem to stderr and exit 2, with no
traceback (``MERGE_DEBUG=1`` shows it). Data goes to stdout; progress and warnings
(third-party ones included, ``merge.capture``) to stderr, and ``--quiet`` leaves errors only.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
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
    str,
    typer.Option(
        "--out-shard-size",
        help="Largest output shard: 5B or 5GB (10^9 bytes), 500MB, 2GiB; at least 1MB.",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress bars or warnings, third-party ones included."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="Tensors merged at once (default: the cores available). Never changes the output.",
        show_default=False,
    ),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Budget for tensor data in flight, e.g. 8GB (default: half the available RAM).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Where the method math runs: cpu, cuda or cuda:N.")
]


def _fail(problems: list[str]) -> None:
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _show_warning(text: str) -> None:
    typer.echo(f"warning: {text}", err=True)


def _guard(fn: Callable[[], T], quiet: bool = False) -> T:
    """Run ``fn``; turn user errors into one-line messages and exit code 2. Third-party
    warnings and log records inside are shown once each (``merge.capture``), or not at all
    when ``quiet``."""
    from merge.capture import captured
    from merge.errors import MergeError

    _imports_done()
    with captured(None if quiet else _show_warning):
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
            _show_warning(w)


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
    threads: ThreadsOpt = None,
    max_memory: MemoryOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Merge the models of RECIPE into OUT."""
    from merge import api
    from merge.execute import Resources

    def go() -> Path:
        Resources.resolve(threads, max_memory, device)  # bad options before recipe problems
        rec = api.load_recipe(recipe)
        return api.run(
            rec,
            out,
            overwrite=overwrite,
            seed=seed,
            shard_size=out_shard_size,
            progress=not quiet,
            warn=None if quiet else _show_warning,
            info=None if quiet else lambda line: typer.echo(line, err=True),
            threads=threads,
            max_memory=max_memory,
            device=device,
        )

    start = time.perf_counter()
    target = _guard(go, quiet)
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

    lines = _guard(go, quiet)
    typer.echo(f"{recipe}: ok")
    for line in lines[1:]:
        typer.echo(f"  {line}")


@app.command()
def plan(
    recipe: RecipeArg,
    seed: SeedOpt = None,
    out_shard_size: ShardOpt = "5GB",
    threads: ThreadsOpt = None,
    max_memory: MemoryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Print every output tensor of RECIPE with its sources, method and parameters, and the
    expected peak memory under the budget."""
    from merge import api
    from merge.execute import Resources
    from merge.report import plan_json, plan_text

    def go() -> Any:
        resources = Resources.resolve(threads, max_memory)
        p = api.plan(recipe, seed=seed, shard_size=out_shard_size)
        mem = api.memory(p, resources)
        _warn([*p.warnings, *mem.warnings()], quiet)
        if as_json:
            return json.dumps({**plan_json(p), "memory": mem.as_json()}, indent=2)
        return plan_text(p) + "\n" + mem.line()

    typer.echo(_guard(go, quiet))


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

    _imports_done()
    if name is None:
        typer.echo(methods_text())
        return
    try:
        method = get_method(name)
    except UnknownMethodError as e:
        _fail([str(e)])
    typer.echo(method_text(method, details=True))


_startup = {"gc_off": False}


def _imports_done() -> None:
    """The command has imported what it needs: if ``main`` turned the cycle collector off for
    the imports, move what they made out of its sight (``gc.freeze``) and turn it back on."""
    if _startup["gc_off"]:
        _startup["gc_off"] = False
        gc.freeze()
        gc.enable()


def main() -> None:
    """The console script: run the command, then leave without the interpreter's teardown.

    Importing torch makes hundreds of thousands of objects, which the cycle collector would
    scan again and again (about a tenth of a second): it stays off until the command has
    imported what it needs (``_imports_done``).

    Freeing every module torch loaded takes about half a second at exit, a quarter of a small
    merge; by then the command has closed its files and moved its output into place, so the
    process flushes its streams and logging and exits at once. In-process callers (tests,
    library users) call ``app`` and keep the normal exit."""
    if gc.isenabled():
        gc.disable()
        _startup["gc_off"] = True
    try:
        app(prog_name="merge")
        code = 0
    except SystemExit as e:
        code = _exit_status(e.code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            code = code or 1
    os._exit(code)


def _exit_status(code: object) -> int:
    """The process status ``sys.exit(code)`` gives: None is 0, an int is itself, anything
    else is printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    main()
