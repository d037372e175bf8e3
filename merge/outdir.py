"""The output directory: built aside, renamed into place, never over an input.

:class:`AtomicOutput` gives the writer a temporary sibling directory and renames it into place
only when the whole output is complete, so a failed run leaves nothing behind and an existing
output is never touched without ``overwrite``. ``check_output_location`` and
``check_disk_space`` run before any tensor is read.

With ``partial`` (what ``merge.api.run`` uses) the directory is the fixed sibling
``.NAME.partial`` (``merge.resume``) instead of a random ``.NAME.tmp-XXXXXXXX``, and an
interrupt (Ctrl-C, SIGTERM, SIGHUP: a ``KeyboardInterrupt``) keeps it, journal and finished
tensors included, for ``merge run --resume``; any other exception still removes it.

What it does not do: fsync (a crash of the machine itself, as opposed to the process, may leave
a renamed but partly flushed output).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from merge.errors import OutputError


def _mkdir(path: Path) -> None:
    os.mkdir(path)


class AtomicOutput:
    """Context manager: a temporary sibling directory that becomes ``final`` on success.

    On success an existing ``final`` (only with ``overwrite``) is moved aside, the temporary
    directory renamed into place, and the old one deleted. On an exception the temporary
    directory is removed and any existing ``final`` is left untouched.
    """

    def __init__(
        self, final: Path, overwrite: bool = False, *, partial: bool = False, resume: bool = False
    ) -> None:
        self.final = Path(final)
        self.overwrite = overwrite
        self.partial = partial
        self.resume = resume
        self.temp: Path | None = None

    def __enter__(self) -> Path:
        self._refuse_existing()
        parent = self.final.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.partial:
            from merge.resume import partial_dir

            self.temp = partial_dir(self.final)
            if self.resume and self.temp.is_dir() and not self.temp.is_symlink():
                return self.temp
            try:
                _mkdir(self.temp)
            except FileExistsError:
                raise OutputError(
                    f"'{self.temp}' appeared while planning; another merge is writing "
                    f"'{self.final}'"
                ) from None
            except PermissionError as e:  # the parent's permissions are what to check
                if e.filename == str(self.temp):
                    e.filename = str(parent)
                raise
            return self.temp
        self.temp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        self.temp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is not
        return self.temp

    def _refuse_existing(self) -> None:
        if not os.path.lexists(self.final):
            return
        if not self.overwrite:
            raise OutputError(
                f"output '{self.final}' already exists; pass --overwrite to replace it"
            )
        if not self.final.is_dir() or self.final.is_symlink():
            raise OutputError(f"output '{self.final}' exists and is not a directory")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.temp is not None, "AtomicOutput used without entering it"
        temp, self.temp = self.temp, None
        if exc_type is not None:
            if self.partial and issubclass(exc_type, KeyboardInterrupt):
                return  # kept for --resume
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(exc, OSError):
                self._name_final(exc, temp)
            return
        try:
            self._refuse_existing()  # it may have appeared while we were writing
            self._replace(temp)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def _name_final(self, exc: OSError, temp: Path) -> None:
        """An OS error about a file in the (now removed) temporary directory names the file
        the output would have had instead."""
        if isinstance(exc.filename, str) and Path(exc.filename).is_relative_to(temp):
            exc.filename = str(self.final / Path(exc.filename).relative_to(temp))

    def _replace(self, temp: Path) -> None:
        if not os.path.lexists(self.final):
            os.rename(temp, self.final)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=temp.parent))
        old = trash / "old"
        os.rename(self.final, old)
        try:
            os.rename(temp, self.final)
        except BaseException:
            os.rename(old, self.final)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


TEMP_SUFFIX_BYTES = len(".tmp-") + 1 + 8  # the leading dot, mkdtemp's 8 random characters


def _path_problems(final: Path, out: Path) -> list[str]:
    """Outputs no rename can produce: the current directory or one above it, a mount point,
    a path through a file, a name longer than the file system allows (the temporary sibling
    ``.NAME.tmp-XXXXXXXX`` needs 14 bytes more than NAME)."""
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        where = "the current directory" if out == cwd else "above the current directory"
        return [f"output '{final}' is {where}; choose a new directory, e.g. '{final}/merged'"]
    probe = existing_ancestor(out)
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    parts = out.relative_to(probe).parts
    for i, part in enumerate(parts):
        limit = name_max - (TEMP_SUFFIX_BYTES if i == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            short = part[:20] + "..." if len(part) > 20 else part
            return [
                f"output name '{short}' ({len(os.fsencode(part))} bytes) is too long: at most "
                f"{limit} bytes here; choose a shorter name"
            ]
    if not os.path.isdir(probe):
        return [f"output '{final}': '{probe}' is a file, not a directory; choose another path"]
    if probe == out and os.path.ismount(out):
        return [f"output '{final}' is a mount point; choose a directory inside it"]
    return []


def check_output_location(final: Path, inputs: Sequence[Path]) -> list[str]:
    """Problems with writing to ``final`` given the input model directories, one per line.

    The output may not be an input or lie inside one; no input may lie inside an existing
    output (replacing the output with ``--overwrite`` would delete it); and it must be a path
    a rename can produce (``_path_problems``), found before anything is computed.
    """
    out = Path(final).expanduser().resolve()
    problems = _path_problems(Path(final), out)
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if _inside(out, src):
            problems.append(
                f"output '{final}' is inside input model '{given}' ({src}); "
                "choose another directory"
            )
        elif _inside(src, out) and out.exists():
            problems.append(
                f"input model '{given}' ({src}) is inside output '{final}', which "
                "--overwrite would delete; choose another directory"
            )
    return problems


def existing_ancestor(path: Path) -> Path:
    """``path`` (absolute) or its nearest existing parent: where its file system is asked."""
    probe = Path(path).expanduser().absolute()
    while not os.path.exists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def check_disk_space(final: Path, needed_bytes: int) -> str | None:
    """A one-line problem if the file system holding ``final`` has too little free space."""
    probe = existing_ancestor(final)
    free = shutil.disk_usage(probe).free
    if free >= needed_bytes:
        return None
    return (
        f"not enough disk space for output '{final}': needs {needed_bytes / 1e9:.2f} GB, "
        f"{free / 1e9:.2f} GB free on {probe}"
    )
