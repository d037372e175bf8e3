"""The identity of a resolved input: where it came from and the content of every file used.

Design
------
An ``InputId`` describes one side of a model reference (a model, or a LoRA adapter of
``base+adapter``) as resolved for a merge:

- ``source: hub``: the repo id, the revision the recipe asked for (None: the default branch)
  and the commit it resolved to;
- ``source: local``: the folder as the recipe wrote it (``ref``; no absolute path, so that a
  lock or manifest is the same in any checkout);
- ``source: stage``: an earlier stage of a multi-stage recipe, by name.

``files`` lists, sorted by path, the size and sha256 of each file the merge reads
(``used_files``: the choice ``merge.hub.select_files`` makes for a Hub repo, applied to the
folder's top-level files). Locks, manifests and multi-stage stage keys all use this one form
(``as_dict`` / ``from_dict``), so they compare entry by entry.

``identify(ref, folder)`` computes it from a folder on disk: a Hugging Face cache snapshot
(``.../models--org--name/snapshots/<commit>``) is a Hub input, anything else a local one.
Hub weight files are identified by their blob names (the sha256 the Hub sent); every other
file is hashed (``merge.build.hashing``, cached).

What this module does not do: ask the Hub anything (locks get remote metadata from
``merge.hub``), or decide whether two identities are close enough (callers compare).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from merge.build.hashing import hub_blob_sha256, sha256_file
from merge.sources import ModelRef

if TYPE_CHECKING:  # pragma: no cover
    from merge.sourceset import Model

Source = Literal["hub", "local", "stage"]


@dataclass(frozen=True)
class FileId:
    """One file an input contributes: its path in the folder or repo, size and sha256."""

    path: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class InputId:
    """One resolved input (see the module docstring)."""

    ref: str
    source: Source
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    stage: str | None = None
    files: tuple[FileId, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The entry as locks and manifests write it: set fields only, files last."""
        out: dict[str, Any] = {"ref": self.ref, "source": self.source}
        for key in ("repo", "revision", "commit", "stage"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["files"] = [f.as_dict() for f in self.files]
        return out

    def file_map(self) -> dict[str, FileId]:
        return {f.path: f for f in self.files}


def used_files(folder: Path) -> list[str]:
    """The top-level files of ``folder`` a merge reads: weights of one format, json files,
    tokenizer files (as for a Hub repo listing)."""
    from merge.hub import select_files

    return select_files(p.name for p in folder.iterdir() if p.is_file())


def file_ids(folder: Path, names: Iterable[str]) -> tuple[FileId, ...]:
    """Size and sha256 of each named file of ``folder``, sorted by name."""
    out = []
    for name in sorted(names):
        path = folder / name
        sha = hub_blob_sha256(path) or sha256_file(path)
        out.append(FileId(name, path.stat().st_size, sha))
    return tuple(out)


def hub_snapshot(folder: Path) -> tuple[str, str] | None:
    """(repo id, commit) when ``folder`` is a Hugging Face cache snapshot of a model repo."""
    if folder.parent.name != "snapshots":
        return None
    repo_dir = folder.parent.parent.name
    if not repo_dir.startswith("models--"):
        return None
    return repo_dir[len("models--") :].replace("--", "/", 1), folder.name


def identify(ref: ModelRef, folder: Path, written: str | None = None) -> InputId:
    """The identity of one side (no adapter) of a reference, resolved to ``folder``;
    ``written`` is the text the recipe used (default ``str(ref)``)."""
    text = written or str(ref)
    files = file_ids(folder, used_files(folder))
    snap = hub_snapshot(folder)
    if snap is not None:
        repo, commit = snap
        return InputId(text, "hub", repo=repo, revision=ref.revision, commit=commit, files=files)
    return InputId(text, "local", files=files)


def identify_model(model: Model) -> list[InputId]:
    """A recipe model's identities: the model, then its adapter for ``base+adapter``."""
    ref = ModelRef.parse(model.ref)
    ids = [identify(ref.base, model.directory)]
    if ref.lora is not None and model.adapter is not None:
        ids.append(identify(ref.lora, model.adapter))
    return ids
