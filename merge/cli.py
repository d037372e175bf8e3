"""The ``merge`` command: parse options, call one library function, print.

User errors (``MergeError``) print one line per problem to stderr and exit 2, with no
traceback (``MERGE_DEBUG=1`` shows it). Data goes to stdout; progress, notices and warnings
(third-party ones included, ``merge.capture``) to stderr, and ``--quiet`` leaves errors only.
The options are declared in ``merge.options``, mergekit's among them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from merge import __version__
from merge import options as opt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    add_help_option=False,
    help="Build new LLM checkpoints out of existing ones from a YAML recipe.",
)

T = TypeVar("T")


def _fail(problems: list[str]) -> None:
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _show_warning(text: str) -> None:
    typer.echo(f"warning: {text}", err=True)


def _guard(fn: Callable[[], T], quiet: bool = False, notes: list[str] | None = None) -> T:
    """Run ``fn``; turn user errors into one-line messages and exit code 2. The notices of
    no-op options come first; third-party warnings and log records inside are shown once each
    (``merge.capture``); ``quiet`` silences both."""
    from merge.capture import captured
    from merge.errors import MergeError

    _imports_done()
    with captured(None if quiet else _show_warning):
        for note in [] if quiet else notes or []:
            typer.echo(f"note: {note}", err=True)
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
            "--version",
            metavar="",
            callback=_version,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
    help: opt.HelpOpt = False,
) -> None:
    """Build new LLM checkpoints out of existing ones from a YAML recipe."""


@app.command(add_help_option=False)
def run(
    ctx: typer.Context,
    recipe: opt.RecipeArg,
    out: opt.OutArg = None,
    overwrite: opt.OverwriteOpt = False,
    seed: opt.SeedOpt = None,
    out_shard_size: opt.ShardOpt = "5GB",
    threads: opt.ThreadsOpt = None,
    max_memory: opt.MemoryOpt = None,
    device: opt.DeviceOpt = None,
    cuda: opt.CudaOpt = False,
    gpu_rich: opt.GpuRichOpt = False,
    copy_tokenizer: opt.CopyTokenizerOpt = True,
    write_model_card: opt.WriteCardOpt = True,
    allow_crimes: opt.AllowCrimesOpt = False,
    trust_remote_code: opt.TrustRemoteCodeOpt = False,
    transformers_cache: opt.CacheOpt = None,
    locked: opt.LockedOpt = False,
    intermediate_dir: opt.IntermediateDirOpt = None,
    lazy: opt.LazyOpt = True,
    out_path: opt.OutPathOpt = None,
    quiet: opt.QuietOpt = False,
    # mergekit's options with no effect: each given one leaves its notice (opt.notices)
    lazy_unpickle: opt.LazyUnpickle = None,
    low_cpu_memory: opt.LowCpuMemory = None,
    read_to_gpu: opt.ReadToGpu = None,
    multi_gpu: opt.MultiGpu = None,
    lora_merge_cache: opt.LoraMergeCache = None,
    lora_merge_dtype: opt.LoraMergeDtype = None,
    clone_tensors: opt.CloneTensors = None,
    safe_serialization: opt.SafeSerialization = None,
    async_write: opt.AsyncWrite = None,
    write_threads: opt.WriteThreads = None,
    load_in_4bit: opt.LoadIn4bit = None,
    load_in_8bit: opt.LoadIn8bit = None,
    not_useful: opt.NotUseful = None,
    verbose: opt.Verbose = 0,
    help: opt.HelpOpt = False,
) -> None:
    """Merge the models of RECIPE into OUT.

    A multi-stage RECIPE (several YAML documents) builds each named stage in
    DIR/<name> and the unnamed one into OUT, rebuilding only what changed."""
    from merge.build.multistage import Settings
    from merge.build.runner import run_file
    from merge.execute import Resources
    from merge.settings import device_name

    if out is not None and out_path is not None and out != out_path:
        _fail([f"give the output once: OUT ({out}) or --out-path ({out_path})"])
    target = out if out is not None else out_path

    def go() -> str:
        dev = device_name(device, cuda, gpu_rich)
        Resources.resolve(threads, max_memory, dev)  # bad options before recipe problems
        settings = Settings(
            seed=seed,
            shard_size=out_shard_size,
            copy_tokenizer=copy_tokenizer,
            write_card=write_model_card,
            allow_crimes=allow_crimes,
            trust_remote_code=trust_remote_code,
            cache_dir=transformers_cache,
            locked=locked,
        )
        return run_file(
            recipe,
            target,
            settings=settings,
            overwrite=overwrite,
            intermediate_dir=intermediate_dir,
            lazy=lazy,
            report=None if quiet else _note_line,
            **_reporting(quiet, threads, max_memory, dev),
        )

    start = time.perf_counter()
    said = _guard(go, quiet, opt.notices(ctx))
    if not quiet:
        typer.echo(f"{said} in {time.perf_counter() - start:.2f} s", err=True)


def _note_line(line: str) -> None:
    typer.echo(line, err=True)


def _reporting(quiet: bool, threads: int | None, max_memory: str | None, dev: str) -> dict:
    """The keywords of a build that change neither what nor whether it builds."""
    return {
        "progress": not quiet,
        "warn": None if quiet else _show_warning,
        "info": None if quiet else _note_line,
        "threads": threads,
        "max_memory": max_memory,
        "device": dev,
    }


@app.command(add_help_option=False)
def validate(
    recipe: opt.RecipeArg,
    allow_crimes: opt.AllowCrimesOpt = False,
    trust_remote_code: opt.TrustRemoteCodeOpt = False,
    transformers_cache: opt.CacheOpt = None,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Check RECIPE and its models' headers without reading tensor data.

    Every stage of a multi-stage RECIPE is checked, later ones against the plans of the
    earlier ones."""
    from merge import api
    from merge.build.multistage import Settings, plan_stages, stage_warnings, stages_summary
    from merge.build.stages import Stages, load
    from merge.report import summary

    def go() -> tuple[str, list[str]]:
        rec = load(recipe)
        settings = Settings(
            allow_crimes=allow_crimes,
            trust_remote_code=trust_remote_code,
            cache_dir=transformers_cache,
        )
        if isinstance(rec, Stages):
            plans = plan_stages(rec, settings)
            _warn(stage_warnings(plans), quiet)
            return f", {len(plans)} stages", stages_summary(plans)
        p = api.plan(rec, **settings.plan_options())
        _warn(p.warnings, quiet)
        return "", summary(p)[1:]

    head, lines = _guard(go, quiet)
    typer.echo(f"{recipe}: ok{head}")
    for line in lines:
        typer.echo(f"  {line}")


@app.command(add_help_option=False)
def plan(
    recipe: opt.RecipeArg,
    seed: opt.SeedOpt = None,
    out_shard_size: opt.ShardOpt = "5GB",
    threads: opt.ThreadsOpt = None,
    max_memory: opt.MemoryOpt = None,
    allow_crimes: opt.AllowCrimesOpt = False,
    trust_remote_code: opt.TrustRemoteCodeOpt = False,
    transformers_cache: opt.CacheOpt = None,
    intermediate_dir: opt.IntermediateDirOpt = None,
    as_json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Print every output tensor of RECIPE: sources, method, parameters; and the peak memory.

    The expected peak memory is that of the run under the budget (--threads, --max-memory).
    A multi-stage RECIPE prints each stage's plan (--json: a list, one object per stage)."""
    from merge import api
    from merge.build import multistage as ms
    from merge.build.stagerun import stage_folders
    from merge.build.stages import Stages, load
    from merge.execute import Resources
    from merge.report import plan_json, plan_text

    def go() -> Any:
        resources = Resources.resolve(threads, max_memory)
        rec = load(recipe)
        settings = ms.Settings(
            seed=seed,
            shard_size=out_shard_size,
            allow_crimes=allow_crimes,
            trust_remote_code=trust_remote_code,
            cache_dir=transformers_cache,
        )
        if isinstance(rec, Stages):
            plans = ms.plan_stages(rec, settings, stage_folders(rec, intermediate_dir))
            _warn(ms.stage_warnings(plans, resources), quiet)
            if as_json:
                return json.dumps(ms.stages_plan_json(plans, resources), indent=2)
            return ms.stages_plan_text(plans, resources)
        p = api.plan(rec, **settings.plan_options())
        mem = api.memory(p, resources)
        _warn([*p.warnings, *mem.warnings()], quiet)
        if as_json:
            return json.dumps({**plan_json(p), "memory": mem.as_json()}, indent=2)
        return plan_text(p) + "\n" + mem.line()

    typer.echo(_guard(go, quiet))


@app.command(add_help_option=False)
def verify(out: opt.OutDirArg, quiet: opt.QuietOpt = False, help: opt.HelpOpt = False) -> None:
    """Check every file of OUT against its merge-manifest.json (reads every byte).

    Exit 0 when all match, 1 naming each file that differs, is missing or is unlisted.

    Exit 2 when OUT has no readable manifest."""
    from merge.build.manifest import verify as check

    verdict = _guard(lambda: check(out), quiet)
    for problem in verdict.problems:
        typer.echo(f"{out}/{problem}")
    if verdict.ok:
        if not quiet:
            typer.echo(f"{out}: ok, {verdict.checked} files match the manifest", err=True)
        return
    if not quiet:
        typer.echo(f"{out}: {len(verdict.problems)} problems against the manifest", err=True)
    raise typer.Exit(1)


@app.command(add_help_option=False)
def lock(
    recipe: opt.RecipeArg,
    models: opt.ModelsArg = None,
    update: opt.UpdateOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Write RECIPE's lock file (<stem>.lock): each model's commit and its files' sha256.

    An existing lock keeps its entries; only new models are resolved, unless --update.

    Hub files are described by the Hub's metadata: no weight is downloaded."""
    from merge.build.lock import lock_recipe

    result = _guard(lambda: lock_recipe(recipe, models or (), update=update), quiet)
    for change in result.changes:
        typer.echo(change.line())
    if not quiet:
        typer.echo(f"wrote {result.lock.path}", err=True)


@app.command(add_help_option=False)
def outdated(
    recipe: opt.RecipeArg,
    as_json: opt.OutdatedJsonOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Compare RECIPE's lock with upstream now: which models moved, which files changed.

    Exit 0 when nothing moved, 1 when something did, 2 on an error (no lock, offline...)."""
    from merge.build.outdated import outdated as compare

    result = _guard(lambda: compare(recipe), quiet)
    _warn(result.warnings, quiet)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
    else:
        typer.echo("\n".join(result.lines()))
    if result.moved:
        raise typer.Exit(1)


@app.command(add_help_option=False)
def rebuild(
    recipe: opt.RecipeArg,
    out: opt.OutDirArg,
    intermediate_dir: opt.IntermediateDirOpt = None,
    out_shard_size: opt.ShardOpt = "5GB",
    threads: opt.ThreadsOpt = None,
    max_memory: opt.MemoryOpt = None,
    device: opt.DeviceOpt = None,
    allow_crimes: opt.AllowCrimesOpt = False,
    trust_remote_code: opt.TrustRemoteCodeOpt = False,
    transformers_cache: opt.CacheOpt = None,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Bring OUT up to date with RECIPE's upstream models, for CI (see the README).

    merge outdated; if a model moved or the recipe changed: merge lock --update.

    If that, or OUT is missing, stale or fails verify: merge run --locked, merge verify.

    Exit 0 with a one-line summary of what it did, 2 on an error."""
    from merge.build.multistage import Settings
    from merge.build.rebuild import rebuild as bring_up_to_date
    from merge.build.runner import run_file
    from merge.execute import Resources
    from merge.settings import device_name

    def go() -> str:
        dev = device_name(device)
        Resources.resolve(threads, max_memory, dev)
        settings = Settings(
            shard_size=out_shard_size,
            allow_crimes=allow_crimes,
            trust_remote_code=trust_remote_code,
            cache_dir=transformers_cache,
            locked=True,
        )

        def build(target: Any) -> str:
            return run_file(
                recipe,
                target,
                settings=settings,
                overwrite=True,
                intermediate_dir=intermediate_dir,
                report=None if quiet else _note_line,
                **_reporting(quiet, threads, max_memory, dev),
            )

        done = bring_up_to_date(recipe, out, build=build, report=None if quiet else _note_line)
        return done.summary()

    typer.echo(_guard(go, quiet))


@app.command(add_help_option=False)
def methods(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME", help="Show only this method, with each parameter's meaning."
        ),
    ] = None,
    help: opt.HelpOpt = False,
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
