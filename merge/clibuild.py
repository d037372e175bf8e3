"""The build commands of ``merge``: verify, lock, outdated, rebuild (``merge.build``), card
(``merge.card.output``) and ``merge publish`` (``merge.clipublish``), registered after them.

``register(app)`` adds them to ``merge.cli.app``; they share ``merge.clihelp``: user errors
print one line each and exit 2, data goes to stdout, the rest to stderr.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from merge import clipublish as pub
from merge import options as opt
from merge.clihelp import _guard, _note_line, _reporting, _warn


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


def card(
    out: opt.OutDirArg,
    write: opt.CardWriteOpt = False,
    license: opt.LicenseOpt = None,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Print OUT's model card (README.md) as it is made from OUT's files; changes nothing.

    --write rewrites it (after --license, say) and updates merge-manifest.json to match.

    Works offline: the card is made of merge-card.json, the recipe, the manifest and the lock."""
    from merge.card.output import card as make_card

    made = _guard(lambda: make_card(out, license=license, write=write), quiet)
    _warn(made.warnings, quiet)
    if not write:
        typer.echo(made.text, nl=False)
    elif not quiet:
        typer.echo(
            f"wrote {', '.join(f'{out}/{n}' for n in made.written)}; manifest updated", err=True
        )


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
    license: opt.LicenseOpt = None,
    push_to_hub: pub.PushToHubOpt = None,
    private: pub.PrivateOpt = False,
    revision: pub.RevisionOpt = None,
    create_pr: pub.CreatePrOpt = False,
    commit_message: pub.CommitMessageOpt = None,
    token: pub.TokenOpt = None,
    delete_extra: pub.DeleteExtraOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Bring OUT up to date with RECIPE's upstream models, for CI (see the README).

    merge outdated; if a model moved or the recipe changed: merge lock --update.

    If that, or OUT is missing, stale or fails verify: merge run --locked, merge verify.

    With --push-to-hub, then publish the verified OUT (as merge publish).

    Exit 0 with a one-line summary of what it did, 2 on an error."""
    from merge.build.multistage import Settings
    from merge.build.rebuild import rebuild as bring_up_to_date
    from merge.build.runner import run_file
    from merge.resources import Resources
    from merge.settings import device_name

    publishing = pub.Publishing(
        push_to_hub, private, revision, create_pr, commit_message, token, delete_extra, quiet
    )

    def go() -> str:
        dev = device_name(device)
        Resources.resolve(threads, max_memory, dev)
        send = publishing.publisher()  # a missing token fails now, not after the build
        settings = Settings(
            shard_size=out_shard_size,
            allow_crimes=allow_crimes,
            trust_remote_code=trust_remote_code,
            cache_dir=transformers_cache,
            locked=True,
            license=license,
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

        report = None if quiet else _note_line
        done = bring_up_to_date(recipe, out, build=build, publish=send, report=report)
        return done.summary()

    typer.echo(_guard(go, quiet))


def register(app: typer.Typer) -> None:
    """Add the build commands to ``app``, in this order."""
    for command in (verify, lock, outdated, rebuild, card, pub.publish):
        app.command(add_help_option=False)(command)
