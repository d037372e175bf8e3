"""Publish a merge output to a Hub model repo (``merge publish``, ``--push-to-hub``).

Design
------
``publish(out, repo_id, ...)`` runs, in this order, and stops at the first failure:

1. The token: ``token=``, else ``HF_TOKEN``, else the one ``hf auth login`` saved
   (``huggingface_hub.get_token``); none is an error before any request or any reading
   (``resolve_token``, also called by the CLI before a long build).
2. ``merge verify`` on OUT (``merge.build.manifest.verify``): an output that does not match its
   manifest is never published.
3. ``create_repo(exist_ok=True, private=...)``; with ``revision``, the branch is created from
   the default branch when missing, except with ``create_pr``, where it must exist.
4. Change detection: the target revision's file listing (``list_repo_tree`` with the Hub's
   per-file metadata) against OUT: an LFS file is unchanged when its sha256 (from OUT's manifest,
   just verified) equals the remote's; a regular file when its git blob sha1 does. Only new and
   changed files are uploaded; files the repo has and OUT lacks are deleted only with
   ``delete_extra`` (``.gitattributes`` never).
5. Nothing to upload or delete: no commit, and the result says so. Otherwise one
   ``create_commit`` (``create_pr`` opens a pull request instead): huggingface_hub preuploads
   the LFS blobs first, asking the Hub which it already has, so an interrupted publish, rerun,
   sends only the blobs that had not arrived. The commit is atomic: nothing is half-published.
   It names the compared commit as its parent, so a branch that moved meanwhile (someone
   else's push) is refused by the Hub rather than overwritten on a stale comparison.

Files are uploaded exactly as they are in OUT (the model card included), so the repo's files
are byte-equal to OUT and ``merge verify`` holds for a download of it. All traffic goes through
``huggingface_hub`` (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET`` and proxies apply); every failure
becomes a one-line ``PublishError`` with the next step.

What this module does not do: write the model card (``merge.card``), build or verify by
itself (``merge.build``), or delete anything remote without ``delete_extra``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.build.manifest import MANIFEST_NAME, read_manifest, verify
from merge.errors import MergeError, PublishError
from merge.hub.download import _first_line, _is_network_error, hub_endpoint

LOGIN_STEP = "set HF_TOKEN or run `hf auth login`"
KEEP_REMOTE = frozenset({".gitattributes"})


@dataclass
class PublishResult:
    """What ``publish`` did: the repo, its commit (or PR), and the files by fate."""

    repo_id: str
    repo_url: str
    revision: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    commit_url: str | None = None  # None: nothing changed, no commit
    pr_url: str | None = None

    def summary(self) -> str:
        counts = f"{len(self.uploaded)} uploaded, {len(self.unchanged)} unchanged"
        counts += f", {len(self.deleted)} deleted" if self.deleted else ""
        if self.commit_url is None:
            return f"{self.repo_url}: already up to date ({counts}); nothing uploaded"
        if self.pr_url is not None:
            return f"opened pull request {self.pr_url} ({counts})"
        return f"published to {self.repo_url} ({self.revision}): {self.commit_url} ({counts})"


def resolve_token(token: str | None = None) -> str:
    """The token to publish with: ``token``, else ``HF_TOKEN``, else the saved login."""
    from huggingface_hub import get_token

    found = token or os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise PublishError(f"no Hugging Face token: {LOGIN_STEP} (or pass --token)")
    return found


def publish(
    out: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    delete_extra: bool = False,
    progress: bool = True,
) -> PublishResult:
    """See the module docstring."""
    from huggingface_hub import HfApi

    out = Path(out)
    token = resolve_token(token)  # before verify, which reads every byte of OUT
    sha256s = _verified(out)
    api = HfApi(endpoint=hub_endpoint(), token=token)
    branch = revision or "main"
    with _publish_errors(repo_id, branch), _progress(progress):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        parent, remote = _remote_files(api, repo_id, branch, create_pr)
        result = PublishResult(repo_id, url, branch)
        ops = _operations(out, sha256s, remote, delete_extra, result)
        if not ops:
            return result
        message = commit_message or f"Upload merge output ({len(result.uploaded)} files)"
        info = api.create_commit(
            repo_id,
            ops,
            commit_message=message,
            revision=branch,
            create_pr=create_pr,
            parent_commit=parent,  # the commit compared with: the Hub refuses if it moved
        )
    result.commit_url, result.pr_url = info.commit_url, info.pr_url
    return result


def _verified(out: Path) -> dict[str, str]:
    """OUT's files and their sha256, once ``merge verify`` passed on it."""
    if not out.is_dir():
        raise PublishError(f"{out}: not a directory; publish a merge output (merge run)")
    try:
        verdict = verify(out)
    except MergeError as e:  # no readable manifest: the message names OUT and what to do
        raise PublishError(f"{e.problems[0]}; nothing was published") from e
    if not verdict.ok:
        more = f" and {len(verdict.problems) - 1} more" if len(verdict.problems) > 1 else ""
        raise PublishError(
            f"{out} fails verify ({verdict.problems[0]}{more}); nothing was published: "
            f"run `merge verify {out}` and rebuild it"
        )
    manifest = read_manifest(out) or {}
    files = {entry["path"]: entry["sha256"] for entry in manifest.get("files", [])}
    files[MANIFEST_NAME] = hashlib.sha256((out / MANIFEST_NAME).read_bytes()).hexdigest()
    return files


def _remote_files(
    api: Any, repo_id: str, branch: str, create_pr: bool
) -> tuple[str, dict[str, Any]]:
    """The target branch's head commit and its files (path -> RepoFile); a missing branch is
    created first, unless a pull request is asked for."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        head = api.model_info(repo_id, revision=branch).sha
    except RevisionNotFoundError:
        if create_pr:
            raise
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.model_info(repo_id, revision=branch).sha
    entries = api.list_repo_tree(repo_id, revision=head, recursive=True)
    return head, {e.path: e for e in entries if isinstance(e, RepoFile)}


def _operations(
    out: Path,
    sha256s: dict[str, str],
    remote: dict[str, Any],
    delete_extra: bool,
    result: PublishResult,
) -> list[Any]:
    """The commit's operations: an add per new or changed file, a delete per extra one when
    asked; ``result``'s lists are filled on the way."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = []
    for path, sha256 in sorted(sha256s.items()):
        entry = remote.get(path)
        if entry is not None and _same(out / path, sha256, entry):
            result.unchanged.append(path)
            continue
        op = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(out / path))
        op.upload_info.sha256 = bytes.fromhex(sha256)  # verified: no second hashing pass
        ops.append(op)
        result.uploaded.append(path)
    if delete_extra:
        for path in sorted(set(remote) - set(sha256s) - KEEP_REMOTE):
            ops.append(CommitOperationDelete(path_in_repo=path))
            result.deleted.append(path)
    return ops


def _same(file: Path, sha256: str, entry: Any) -> bool:
    """Whether the remote ``entry`` (a RepoFile) holds exactly ``file``'s bytes."""
    if entry.lfs is not None:
        return bool(entry.lfs.sha256 == sha256)
    if entry.size != file.stat().st_size:
        return False
    return bool(entry.blob_id == git_blob_sha1(file))


def git_blob_sha1(file: Path) -> str:
    """The git blob id of ``file``: sha1 of ``blob <size>\\0`` and its bytes."""
    digest = hashlib.sha1(b"blob %d\0" % file.stat().st_size)
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _progress(show: bool) -> Iterator[None]:
    """huggingface_hub's upload progress bars, off when ``show`` is false."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_off = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_off:
            enable_progress_bars()


@contextmanager
def _publish_errors(repo_id: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub failures into one-line PublishErrors with the next step."""
    try:
        yield
    except Exception as e:
        error = _explain(e, repo_id, revision)
        if error is None:
            raise
        raise error from e


def _explain(e: BaseException, repo_id: str, revision: str) -> PublishError | None:
    """The PublishError for ``e`` or the first error of its cause chain that is a client or
    network failure (an LFS upload's RuntimeError wraps the real one); None: not the Hub's."""
    from huggingface_hub import errors as hf

    where = f"publish to {repo_id}"
    rerun = "nothing was committed; rerun the same command to resume (uploaded files are kept)"
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, hf.RevisionNotFoundError):
            return PublishError(
                f"{where}: revision '{revision}' does not exist; a pull request needs an "
                "existing branch: create it, or publish without --create-pr"
            )
        if isinstance(cause, hf.RepositoryNotFoundError):
            return PublishError(f"{where}: {_denied(cause, repo_id)}")
        if isinstance(cause, hf.HfHubHTTPError):
            status = getattr(cause.response, "status_code", None) or 0
            if status in (401, 403):
                return PublishError(f"{where}: {_denied(cause, repo_id)}")
            if status in (409, 412):  # parent_commit is no longer the branch's head
                return PublishError(
                    f"{where}: '{revision}' moved while publishing (someone else pushed); "
                    "nothing was committed: rerun to compare with the new head"
                )
            if status >= 500 or status == 429:
                return PublishError(f"{where}: the Hub failed ({_first_line(cause)}); {rerun}")
            return PublishError(
                f"{where}: the Hub refused the upload ({_first_line(cause)}); nothing was "
                "committed: check REPO_ID and the options"
            )
        if _is_network_error(cause):
            return PublishError(
                f"{where}: network failure ({type(cause).__name__}: {_first_line(cause)}); "
                f"check your connection, then {rerun}"
            )
        cause = cause.__cause__
    return None


def _denied(e: Any, repo_id: str) -> str:
    """Why the Hub said no to a write: a bad token, or one that may not write there."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    namespace = repo_id.split("/")[0]
    if status == 401:
        return f"the token was rejected (invalid or expired); {LOGIN_STEP} with a valid token"
    return (
        f"the token may not write to '{namespace}' (read-only token, or not a member of that "
        "org); use a token with write access there"
    )
