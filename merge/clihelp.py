"""What every ``merge`` command shares: user errors as one-line messages, warnings, notices.

``_guard(fn)`` runs a command's body: a ``MergeError`` prints ``error: ...`` per problem and
exits 2 (``MERGE_DEBUG=1`` re-raises it for the traceback), Ctrl-C exits 130; an OS error the
library did not name (no space, read-only, name too long, permission) is one line with the path
and the next step, exit 2; anything else is a bug: ``internal error, please report it``, exit 1
(the traceback only with ``MERGE_DEBUG=1``). Printed lines escape control characters. Third-party
warnings inside are shown once each (``merge.capture``). ``_imports_done`` is the start-up
hook of ``merge.cli.main`` (the cycle collector comes back once the imports are done).
"""

from __future__ import annotations

import errno
import gc
import os
import re
from collections.abc import Callable
from typing import TypeVar

import typer

T = TypeVar("T")


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """``text`` with control characters (all C0 but tab, DEL, C1) shown as escapes: a newline
    in a model name cannot forge another ``error:`` line, an ESC cannot drive the terminal."""

    def one(m: re.Match[str]) -> str:
        c = m.group()
        return {"\n": "\\n", "\r": "\\r"}.get(c) or f"\\x{ord(c):02x}"

    return _CONTROL.sub(one, text)


def _fail(problems: list[str], code: int = 2) -> None:
    for line in problems:
        typer.echo(f"error: {escape_control(line)}", err=True)
    raise typer.Exit(code)


def _show_warning(text: str) -> None:
    typer.echo(f"warning: {escape_control(text)}", err=True)


_OS_NEXT_STEP = {
    errno.ENOSPC: "no space left on the device; free some space or choose another output",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output",
    errno.EROFS: "read-only file system; choose an output on a writable file system",
    errno.ENAMETOOLONG: "file name too long; use a shorter name (at most 255 bytes a part)",
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "operation not permitted; check its permissions or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EBUSY: "device or resource busy (the current directory or a mount point?); "
    "choose another path",
    errno.EISDIR: "is a directory; give a file path",
    errno.ENOENT: "no such file or directory; check the path",
}


def os_error_line(e: OSError) -> str:
    """One line for an OS error the library did not turn into a ``MergeError``: the path(s)
    and the next step."""
    paths = " -> ".join(f"'{os.fsdecode(f)}'" for f in (e.filename, e.filename2) if f is not None)
    step = _OS_NEXT_STEP.get(e.errno) if e.errno is not None else None
    what = step or (e.strerror or str(e) or type(e).__name__)
    return f"{paths}: {what}" if paths else what


def _internal(e: BaseException) -> None:
    first = (str(e).strip().splitlines() or [""])[0]
    detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
    _fail([f"internal error, please report it: {detail} (set MERGE_DEBUG=1 for the traceback)"], 1)


def _guard(fn: Callable[[], T], quiet: bool = False, notes: list[str] | None = None) -> T:
    """Run ``fn``; turn user errors into one-line messages and exit code 2. The notices of
    no-op options come first; third-party warnings and log records inside are shown once each
    (``merge.capture``); ``quiet`` silences both."""
    from merge.capture import captured
    from merge.errors import MergeError

    _imports_done()
    with captured(None if quiet else _show_warning):
        for note in [] if quiet else notes or []:
            typer.echo(f"note: {escape_control(note)}", err=True)
        try:
            return fn()
        except MergeError as e:
            if os.environ.get("MERGE_DEBUG"):
                raise
            _fail(e.problems)
        except KeyboardInterrupt as e:  # merge.resume.Interrupted says what it kept
            typer.echo(escape_control(str(e)) or "interrupted; nothing was written", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, SystemExit):
            raise
        except OSError as e:
            if os.environ.get("MERGE_DEBUG"):
                raise
            if e.errno in _OS_NEXT_STEP:
                _fail([os_error_line(e)])
            _internal(e)
        except RecursionError:
            if os.environ.get("MERGE_DEBUG"):
                raise
            _fail(["input nested too deeply to process (recursion limit); flatten it"])
        except Exception as e:
            if os.environ.get("MERGE_DEBUG"):
                raise
            _internal(e)
    raise AssertionError("unreachable")  # pragma: no cover


def _warn(warnings: list[str], quiet: bool) -> None:
    if not quiet:
        for w in warnings:
            _show_warning(w)


def _note_line(line: str) -> None:
    typer.echo(escape_control(line), err=True)


def _reporting(
    quiet: bool,
    threads: int | None,
    max_memory: str | None,
    dev: str,
    max_vram: str | None = None,
) -> dict:
    """The keywords of a build that change neither what nor whether it builds."""
    return {
        "progress": not quiet,
        "warn": None if quiet else _show_warning,
        "info": None if quiet else _note_line,
        "threads": threads,
        "max_memory": max_memory,
        "device": dev,
        "max_vram": max_vram,
    }


_startup = {"gc_off": False}


def _imports_done() -> None:
    """The command has imported what it needs: if ``main`` turned the cycle collector off for
    the imports, move what they made out of its sight (``gc.freeze``) and turn it back on."""
    if _startup["gc_off"]:
        _startup["gc_off"] = False
        gc.freeze()
        gc.enable()
