"""The ``merge`` command: parse options, call one library function, print.

User errors (``MergeError``) print one line per problem to stderr and exit 2, with no
traceback (``MERGE_DEBUG=1`` shows it); a bug is one ``internal error`` line, exit 1
(``merge.clihelp._guard``). Data goes to stdout; progress, notices and warnings
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
from typing import Annotated, Any

import typer

from merge import __version__, clibuild, clieval, clievolve
from merge import clipublish as pub
from merge import options as opt
from merge.clihelp import (  # noqa: F401 (_startup: main's state, tests patch it here)
    _fail,
    _guard,
    _imports_done,
    _note_line,
    _reporting,
    _startup,
    _warn,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    add_help_option=False,
    help="Build new LLM checkpoints out of existing ones from a YAML recipe.",
)


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
    resume: opt.ResumeOpt = False,
    seed: opt.SeedOpt = None,
    out_shard_size: opt.ShardOpt = "5GB",
    threads: opt.ThreadsOpt = None,
    max_memory: opt.MemoryOpt = None,
    device: opt.DeviceOpt = None,
    max_vram: opt.VramOpt = None,
    cuda: opt.CudaOpt = False,
    gpu_rich: opt.GpuRichOpt = False,
    copy_tokenizer: opt.CopyTokenizerOpt = True,
    write_model_card: opt.WriteCardOpt = True,
    allow_crimes: opt.AllowCrimesOpt = False,
    trust_remote_code: opt.TrustRemoteCodeOpt = False,
    transformers_cache: opt.CacheOpt = None,
    locked: opt.LockedOpt = False,
    license: opt.LicenseOpt = None,
    strict_finite: opt.StrictFiniteOpt = False,
    intermediate_dir: opt.IntermediateDirOpt = None,
    lazy: opt.LazyOpt = True,
    out_path: opt.OutPathOpt = None,
    push_to_hub: pub.PushToHubOpt = None,
    private: pub.PrivateOpt = False,
    revision: pub.RevisionOpt = None,
    create_pr: pub.CreatePrOpt = False,
    commit_message: pub.CommitMessageOpt = None,
    token: pub.TokenOpt = None,
    delete_extra: pub.DeleteExtraOpt = False,
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
    DIR/<name> and the unnamed one into OUT, rebuilding only what changed.

    With --push-to-hub, OUT is then published (as merge publish)."""
    from merge.api import default_output
    from merge.build.multistage import Settings
    from merge.build.runner import run_file
    from merge.resources import Resources
    from merge.resume import stop_on_signals
    from merge.settings import device_name

    if out is not None and out_path is not None and out != out_path:
        _fail([f"give the output once: OUT ({out}) or --out-path ({out_path})"])
    target = out if out is not None else out_path
    publishing = pub.Publishing(
        push_to_hub, private, revision, create_pr, commit_message, token, delete_extra, quiet
    )

    def go() -> str:
        dev = device_name(device, cuda, gpu_rich)
        Resources.resolve(threads, max_memory, dev, max_vram)  # bad options first
        # a missing token fails now, not after the build
        send = publishing.publisher(echo=None if quiet else _note_line)
        settings = Settings(
            seed=seed,
            shard_size=out_shard_size,
            copy_tokenizer=copy_tokenizer,
            write_card=write_model_card,
            allow_crimes=allow_crimes,
            trust_remote_code=trust_remote_code,
            cache_dir=transformers_cache,
            locked=locked,
            license=license,
            strict_finite=strict_finite,
            resume=resume,
        )
        said = run_file(
            recipe,
            target,
            settings=settings,
            overwrite=overwrite,
            intermediate_dir=intermediate_dir,
            lazy=lazy,
            report=None if quiet else _note_line,
            **_reporting(quiet, threads, max_memory, dev, max_vram),
        )
        if send is not None:
            send(target if target is not None else default_output(recipe))
        return said

    start = time.perf_counter()
    with stop_on_signals():  # SIGTERM, SIGHUP stop as Ctrl-C does, keeping finished work
        said = _guard(go, quiet, opt.notices(ctx))
    if not quiet:
        typer.echo(f"{said} in {time.perf_counter() - start:.2f} s", err=True)


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
    device: opt.DeviceOpt = None,
    max_vram: opt.VramOpt = None,
    allow_crimes: opt.AllowCrimesOpt = False,
    trust_remote_code: opt.TrustRemoteCodeOpt = False,
    transformers_cache: opt.CacheOpt = None,
    intermediate_dir: opt.IntermediateDirOpt = None,
    as_json: opt.JsonOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Print every output tensor of RECIPE: sources, method, parameters; and the peak memory.

    The expected peak memory is that of the run under the budget (--threads, --max-memory);
    with --device cuda, the expected VRAM peak under --max-vram too.
    A multi-stage RECIPE prints each stage's plan (--json: a list, one object per stage)."""
    from merge import api
    from merge.build import multistage as ms
    from merge.build.stagerun import stage_folders
    from merge.build.stages import Stages, load
    from merge.report import plan_json, plan_text
    from merge.resources import Resources

    def go() -> Any:
        from merge.settings import device_name

        dev = device_name(device)
        resources = Resources.resolve(threads, max_memory, dev, max_vram, planning=True)
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
        vram = api.vram(p, resources)
        _warn([*p.warnings, *mem.warnings(), *(vram.warnings() if vram else [])], quiet)
        if as_json:
            extra = {"vram": vram.as_json()} if vram else {}
            return json.dumps({**plan_json(p), "memory": mem.as_json(), **extra}, indent=2)
        return plan_text(p) + "\n" + mem.line() + (f"\n{vram.line()}" if vram else "")

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


clibuild.register(app)  # verify, lock, outdated, rebuild: listed after these
clieval.register(app)  # eval
clievolve.register(app)  # evolve


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
