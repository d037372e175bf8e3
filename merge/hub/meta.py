"""What a lock asks the Hub: which commit a revision is now, and that commit's files.

Design
------
``remote_snapshot(repo, revision)`` resolves a revision (None: the default branch) to its
commit sha (``model_info``), lists that commit's top-level files (``list_repo_tree``: size,
and for LFS files the sha256 the Hub keeps) and keeps those a merge uses
(``merge.hub.select_files``, the choice ``download_model`` makes). No weight is downloaded.
Git-stored files (config.json, tokenizer files) have no sha256 in the Hub's metadata, only a
git blob sha1; ``fetch_files`` downloads such files at the commit into the Hugging Face cache
(they are small, and the merge needs them anyway) so the caller can hash them.

Everything goes through ``huggingface_hub`` with ``HF_ENDPOINT`` and the cache folder read at
call time. Failures become the one-line ``SourceError``s of ``merge.hub.download``. Inside
``hub_run`` the Hub is probed once, before the first question; found unreachable, every
question fails at once (``HubUnreachableError``) instead of waiting for the client's retries.
Callers check ``offline_reason()`` first: with ``HF_HUB_OFFLINE`` nothing here may be called.

What this module does not do: hash files or build lock entries (``merge.build``), or decide
what to do offline (the callers: a lock falls back to the cache, ``outdated`` refuses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merge.errors import SourceError
from merge.hub.download import (
    HubUnreachableError,
    _hub_down,
    _hub_errors,
    hub_cache_dir,
    select_files,
)

NETWORK_STEP = "check your connection or proxy"

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import HfApi


@dataclass(frozen=True)
class RemoteFile:
    """A file of a commit as the Hub describes it; ``sha256`` only for LFS files."""

    path: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class RemoteSnapshot:
    """A revision of a repo resolved to its commit, with the files a merge uses."""

    repo: str
    revision: str | None
    commit: str
    files: tuple[RemoteFile, ...]


def _reachable(label: str, step: str) -> None:
    down = _hub_down()
    if down:
        error = HubUnreachableError(f"model '{label}': {down}; {step}")
        error.reason = down
        raise error


def _label(repo: str, revision: str | None) -> str:
    return repo if revision is None else f"{repo}@{revision}"


def _api() -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def remote_snapshot(repo: str, revision: str | None, step: str = NETWORK_STEP) -> RemoteSnapshot:
    """The commit ``revision`` of ``repo`` is now, and its files a merge uses (metadata only);
    ``step`` ends the message when the Hub cannot be reached."""
    from huggingface_hub import RepoFile

    label, cache = _label(repo, revision), hub_cache_dir()
    _reachable(label, step)
    with _hub_errors(label, revision, cache):
        commit = _api().model_info(repo, revision=revision).sha
        tree = list(_api().list_repo_tree(repo, revision=commit))
    if not commit:
        raise SourceError(f"model '{label}': the Hub gave no commit for this revision")
    entries = {e.path: e for e in tree if isinstance(e, RepoFile)}
    used = select_files(entries)
    if not used:
        raise SourceError(
            f"model '{label}': the repo has no safetensors, pytorch_model.bin or adapter weights"
        )
    files = []
    for name in used:
        entry = entries[name]
        sha = entry.lfs.sha256 if entry.lfs is not None else None
        files.append(RemoteFile(name, int(entry.size), sha))
    return RemoteSnapshot(repo, revision, str(commit), tuple(files))


def fetch_files(repo: str, commit: str, names: list[str], label: str) -> Path:
    """Download ``names`` of ``repo`` at ``commit`` into the Hugging Face cache (or find them
    there) and return the snapshot folder."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    with _hub_errors(label, commit, cache):
        folder = snapshot_download(
            repo,
            revision=commit,
            cache_dir=cache,
            allow_patterns=names,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    return Path(folder)
