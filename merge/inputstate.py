"""Inputs that must not change while a run reads them, nor between a run and its resume.

Design
------
``Checkpoint.open`` records a ``Stamp`` (size, mtime in nanoseconds, inode) of every weight
file it finds, before it reads their headers. From then on ``Checkpoint`` calls ``check``
(one ``os.stat`` of the path, about a microsecond) before and after every tensor or chunk it
reads, and ``merge.api.run`` calls ``check_models`` once more right before the output is
committed. A file whose size, mtime or inode moved is a ``CheckpointError`` naming the model,
the file and what changed; the run stops, its ``.OUT.partial`` is removed (only an interrupt
keeps one) and no output appears. Safetensors tensors are read with ``os.preadv`` into fresh
buffers (``Checkpoint.read``/``read_range``), so a file truncated under the run gives a short
read, reported the same way, instead of a memory-mapped page past the end of the file, whose
touch is a SIGBUS that kills the process (Python cannot handle a synchronous SIGBUS).

``journal_inputs`` is what the resume journal's header records of the inputs (resolved path ->
[size, mtime_ns]; the inode is left out, so that a resume after a reboot or on a copied cache
still matches), and ``resume_problems`` compares it with the inputs as they are now: a resume
after an input changed is refused, naming the file, so tensors of old and new inputs never
mix in one output.

What it does not do, honestly:
- Torch ``.bin`` inputs are still memory-mapped by ``torch.load``: they are checked before each
  tensor is handed out, but a truncation after that check and before the bytes are touched is
  still a SIGBUS (a crash; the journal then makes ``--resume`` refuse the changed input).
  ``Checkpoint.view`` (a zero-copy map, which the executor no longer uses) has the same race.
  ``faulthandler`` is not enabled for it: it would only print a Python traceback before the
  same death, not turn the SIGBUS into an error.
- A change that keeps size, mtime and inode (a write that resets the mtime) is not seen; the
  manifest's sha256 of the inputs (``merge.build.manifest``) is the check of content.
- Tokenizer, generation-config and other small files are read once when written into the
  output and are not watched; LoRA adapter weights are read whole at open and so cannot
  change under the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merge.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from merge.sourceset import Model

NEXT_STEP = "nothing was written; rerun once the input is stable"


@dataclass(frozen=True)
class Stamp:
    """What ``os.stat`` says of a file that a change in it moves."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def stamp(path: Path) -> Stamp | None:
    """The file's stamp now, or None when it cannot be stat'ed (gone)."""
    try:
        return Stamp.of(os.stat(path))
    except OSError:
        return None


def difference(before: Stamp, now: Stamp | None) -> str | None:
    """How ``now`` differs from ``before`` in words, or None when it does not."""
    if now is None:
        return "it was deleted or moved"
    if now.size != before.size:
        return f"size {before.size} -> {now.size} bytes"
    if now.inode != before.inode:
        return "it was replaced by another file"
    if now.mtime_ns != before.mtime_ns:
        return "it was modified"
    return None


def changed_error(label: str, path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"model '{label}' ({path}): the input changed during the run ({what}); {NEXT_STEP}"
    )


def check(label: str, path: Path, before: Stamp) -> None:
    """Raise ``CheckpointError`` if ``path`` no longer has the stamp ``before``."""
    what = difference(before, stamp(path))
    if what is not None:
        raise changed_error(label, path, what)


def check_models(models: dict[str, Model]) -> None:
    """Every input weight file of ``models`` still has the stamp recorded at open."""
    for m in models.values():
        m.checkpoint.check_inputs()


def journal_inputs(models: dict[str, Model]) -> dict[str, list[int]]:
    """The inputs' identities as a resume journal records them: resolved path -> [size,
    mtime_ns], every weight file of every model."""
    found: dict[str, list[int]] = {}
    for m in models.values():
        for path, st in m.checkpoint.stamps().items():
            found[str(Path(path).resolve())] = [st.size, st.mtime_ns]
    return dict(sorted(found.items()))


def resume_problems(part: Path, recorded: object, now: dict[str, list[int]]) -> list[str]:
    """Why the journal of ``part`` (its inputs: ``recorded``) cannot be resumed with the
    inputs as they are ``now``: one line per changed, added or removed file."""
    delete = f"delete '{part}' to start over"
    if not isinstance(recorded, dict):
        return [f"cannot resume: '{part}' does not record its inputs (an older version); {delete}"]
    problems = []
    for path in sorted(set(recorded) | set(now)):
        old, new = recorded.get(path), now.get(path)
        if old == new:
            continue
        if old is None:
            what = "was not an input of the interrupted run"
        elif new is None:
            what = "was an input of the interrupted run and is not one now"
        elif isinstance(old, list) and len(old) == 2 and old[0] != new[0]:
            what = f"changed since the interrupted run (size {old[0]} -> {new[0]} bytes)"
        else:
            what = "was modified since the interrupted run"
        problems.append(f"cannot resume: input '{path}' {what}; {delete}")
    return problems
