"""What every ``merge`` command shares: user errors as one-line messages, warnings, notices.

``_guard(fn)`` runs a command's body: a ``MergeError`` prints ``error: ...`` per problem and
exits 2 (``MERGE_DEBUG=1`` re-raises it for the traceback), Ctrl-C exits 130; third-party
warnings inside are shown once each (``merge.capture``). ``_imports_done`` is the start-up
hook of ``merge.cli.main`` (the cycle collector comes back once the imports are done).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import TypeVar

import typer

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


_startup = {"gc_off": False}


def _imports_done() -> None:
    """The command has imported what it needs: if ``main`` turned the cycle collector off for
    the imports, move what they made out of its sight (``gc.freeze``) and turn it back on."""
    if _startup["gc_off"]:
        _startup["gc_off"] = False
        gc.freeze()
        gc.enable()
