"""A Hub-compatible HTTP server for tests: model repos served read-only from local folders.

Design
------
``HubServer({"org/name": {"main": folder, "v1": other_folder}})`` serves each folder as one
revision of a model repo on ``127.0.0.1`` (a free port), so tests can run the real
huggingface_hub client against it (``HF_ENDPOINT=server.endpoint``, ``HF_HUB_DISABLE_XET=1``).
A revision key is a branch/tag name or a 40-hex commit sha; a name gets a deterministic sha
(``commit_sha(repo, name)``), and every revision can also be asked for by its sha. Every
request is recorded in ``.requests`` as ``(method, path)``; ``.fetched()`` lists the files whose
bytes were sent, whole or in part. Every answer is also recorded in ``.log`` as a ``Served``
(method, path, the request's ``Range`` header, status, body bytes sent): ``.fetched_whole()``
lists the files sent whole, ``.bytes_served(suffix)`` counts the bytes of files sent.
``.push(repo, folder, branch)`` makes a new commit while the server runs.
``use_endpoint(monkeypatch, endpoint, cache)`` undoes the session's offline setup for one test
and points the client at ``endpoint`` (a server's, or one that cannot be reached).

The endpoints are the ones huggingface_hub 2.4 calls to read a model repo (see ``hf_api.py``
``model_info`` / ``_iter_repo_tree_pages`` and ``file_download.py``):

- ``GET /api/models/{repo}[/revision/{rev}]``: ``model_info``/``repo_info`` (``sha``,
  ``siblings``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=``: ``list_repo_tree`` /
  ``list_repo_files``, one page (no ``Link`` header).
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``: ``hf_hub_download``, with ``X-Repo-Commit``,
  ``ETag`` (git blob sha1), and for LFS-like files ``X-Linked-Etag`` (sha256) and
  ``X-Linked-Size``, as the Hub sends them; ``Accept-Ranges: bytes``. A GET with
  ``Range: bytes=A-B`` (or ``A-``) gets ``206`` with ``Content-Range: bytes A-B/SIZE`` and
  those bytes only, as ``parse_safetensors_file_metadata`` asks (``bytes=0-100000``, then
  ``bytes=8-N`` for a longer header) and a resumed download does; a range past the end gets
  ``416``.

Errors carry the Hub's ``X-Error-Code``: ``RepoNotFound`` (404), ``RevisionNotFound`` (404),
``EntryNotFound`` (404), ``GatedRepo`` (401, for repos listed in ``gated``). Not implemented:
authentication, pagination, multi-part or suffix ranges, redirects to a CDN, Xet; uploads
are ``hubupload.UploadHub``'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".onnx", ".msgpack", ".h5")
SHA_RE = re.compile(r"[0-9a-f]{40}")
REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"  # org/name or a legacy name without org
API_RE = re.compile(
    rf"/api/models/{REPO}(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?"
)
RESOLVE_RE = re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
RANGE_RE = re.compile(r"bytes=(?P<start>\d+)-(?P<end>\d*)")


@dataclass(frozen=True)
class Served:
    """One answer: the request (method, path, Range header) and what was sent back."""

    method: str
    path: str
    range: str | None
    status: int
    sent: int  # body bytes

    @property
    def file(self) -> str | None:
        """The repo file of a ``.../resolve/...`` request, else None."""
        m = RESOLVE_RE.fullmatch(urlsplit(self.path).path)
        return unquote(m["path"]) if m else None

    @property
    def repo(self) -> str | None:
        """The repo id of a ``.../resolve/...`` request, else None."""
        m = RESOLVE_RE.fullmatch(urlsplit(self.path).path)
        return unquote(m["repo"]) if m else None


def commit_sha(repo_id: str, revision: str) -> str:
    """The commit sha the server reports for ``revision`` of ``repo_id``."""
    if SHA_RE.fullmatch(revision):
        return revision
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """Online mode against ``endpoint`` with a fresh ``cache``: the environment and the
    ``huggingface_hub.constants`` values frozen at import, both undone at the test's end."""
    from huggingface_hub import constants

    for key, value in {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_CACHE": str(cache),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_CACHE": str(cache),
    }.items():
        monkeypatch.setattr(constants, key, value)


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


def _file_info(path: str, data: bytes) -> dict:
    """A file as the tree endpoint lists it (git blob oid; LFS metadata for weight files)."""
    info: dict = {"type": "file", "path": path, "size": len(data)}
    info["oid"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if path.endswith(LFS_SUFFIXES):
        sha256 = hashlib.sha256(data).hexdigest()
        info["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
    return info


class HubServer:
    """Serve ``repos`` (repo id -> {revision or sha -> folder}) on 127.0.0.1 while entered."""

    handler: type[BaseHTTPRequestHandler]  # set below: ``_Handler``; ``hubupload`` extends it

    def __init__(self, repos: dict[str, dict[str, Path]], gated: tuple[str, ...] = ()) -> None:
        self.names = {repo: {r: commit_sha(repo, r) for r in revs} for repo, revs in repos.items()}
        self.repos = {
            repo: {self.names[repo][r]: Path(folder) for r, folder in revs.items()}
            for repo, revs in repos.items()
        }
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []
        self.log: list[Served] = []
        self._lock = threading.Lock()
        self._infos: dict[tuple[str, int, int], dict] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def __enter__(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def push(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """A new commit on ``branch`` of ``repo_id`` (a new repo or branch too) whose files are
        ``folder``'s, while the server runs; earlier commits stay reachable by sha, as on the
        Hub. Returns the new commit's sha."""
        with self._lock:
            revs = self.repos.setdefault(repo_id, {})
            sha = hashlib.sha1(f"{repo_id}@{branch}#{len(revs)}".encode()).hexdigest()
            revs[sha] = Path(folder)
            self.names.setdefault(repo_id, {})[branch] = sha
        return sha

    def fetched(self, repo_id: str | None = None) -> set[str]:
        """Files (repo paths) whose content was sent by ``GET .../resolve/...``."""
        files = set()
        for method, path in list(self.requests):
            m = RESOLVE_RE.fullmatch(urlsplit(path).path)
            if method == "GET" and m and repo_id in (None, unquote(m["repo"])):
                files.add(unquote(m["path"]))
        return files

    def fetched_whole(self, repo_id: str | None = None) -> set[str]:
        """Files (repo paths) sent whole: a ``GET .../resolve/...`` answered 200."""
        return {
            s.file
            for s in self.served(repo_id)
            if s.method == "GET" and s.status == 200 and s.file is not None
        }

    def bytes_served(self, suffix: str = "", repo_id: str | None = None) -> int:
        """Body bytes sent of files whose name ends with ``suffix``, whole or in ranges."""
        return sum(s.sent for s in self.served(repo_id) if s.file and s.file.endswith(suffix))

    def served(self, repo_id: str | None = None) -> list[Served]:
        """``.log``; only the ``.../resolve/...`` answers of ``repo_id`` when given."""
        return [s for s in list(self.log) if repo_id in (None, s.repo)]

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def record_served(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    # --- repo lookups (raise HubError) ------------------------------------------------------

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, Path]:
        """(commit sha, folder) of a revision given by name or sha."""
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if repo_id in self.gated:
            raise HubError(401, "GatedRepo", "Access to this model is restricted")
        sha = self.names[repo_id].get(revision, revision)
        if sha not in self.repos[repo_id]:
            raise HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return sha, self.repos[repo_id][sha]

    def files(self, folder: Path) -> dict[str, dict]:
        """Every file under ``folder``, by repo path, as tree entries."""
        paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        return {p: self.file_info(folder, p) for p in paths}

    def file_info(self, folder: Path, path: str) -> dict:
        """``_file_info`` of one file, remembered by (file, size, mtime): a listing of large
        files hashes each once, not on every request."""
        st = (folder / path).stat()
        key = (str(folder / path), st.st_size, st.st_mtime_ns)
        with self._lock:
            info = self._infos.get(key)
        if info is None:
            info = _file_info(path, (folder / path).read_bytes())
            with self._lock:
                self._infos[key] = info
        return info

    def tree(self, folder: Path, under: str, recursive: bool) -> list[dict]:
        files = self.files(folder)
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, info in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way down
                sub = prefix + "/".join(parts[:depth])
                oid = hashlib.sha1(sub.encode()).hexdigest()
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": oid})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = info
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{under} does not exist on this revision")
        return list(entries.values())


class _Handler(BaseHTTPRequestHandler):
    server_version = "HubServer/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        self.hub.record(self.command, self.path)
        url = urlsplit(self.path)
        try:
            if api := API_RE.fullmatch(url.path):
                self._api(api, parse_qs(url.query), body)
            elif resolve := RESOLVE_RE.fullmatch(url.path):
                self._resolve(resolve, body)
            else:
                raise HubError(404, "NotFound", f"no such endpoint: {url.path}")
        except HubError as e:
            headers = {"X-Error-Code": e.code, "X-Error-Message": str(e)}
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            data = json.dumps({"error": str(e)}).encode()
            self._send(e.status, data, {"Content-Type": "application/json", **headers}, body)

    def _api(self, m: re.Match[str], query: dict[str, list[str]], body: bool) -> None:
        repo_id, revision = unquote(m["repo"]), unquote(m["rev"] or "main")
        sha, folder = self.hub.snapshot(repo_id, revision)
        if m["kind"] == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            result: object = self.hub.tree(folder, unquote(m["path"] or ""), recursive)
        else:
            siblings = [{"rfilename": p} for p in self.hub.files(folder)]
            private = repo_id in getattr(self.hub, "private", ())
            result = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": private}
            result.update(gated=False, disabled=False, siblings=siblings)
        data = json.dumps(result).encode()
        self._send(200, data, {"Content-Type": "application/json"}, body)

    def _resolve(self, m: re.Match[str], body: bool) -> None:
        sha, folder = self.hub.snapshot(unquote(m["repo"]), unquote(m["rev"]))
        path = unquote(m["path"])
        file = folder / path
        if ".." in path.split("/") or not file.is_file():
            raise HubError(404, "EntryNotFound", f"{path} does not exist on this revision", sha)
        data = file.read_bytes()
        info = self.hub.file_info(folder, path)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{info["oid"]}"', "Accept-Ranges": "bytes"}
        if "lfs" in info:
            headers["X-Linked-Etag"] = f'"{info["lfs"]["oid"]}"'
            headers["X-Linked-Size"] = str(len(data))
        headers["Content-Type"] = "application/octet-stream"
        wanted = RANGE_RE.fullmatch(self.headers.get("Range", "").strip()) if body else None
        if wanted is None:
            self._send(200, data, headers, body)
            return
        start, size = int(wanted["start"]), len(data)
        end = min(int(wanted["end"] or size - 1), size - 1)
        if start >= size or end < start:
            self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"}, body)
            return
        part = {"Content-Range": f"bytes {start}-{end}/{size}"}
        self._send(206, data[start : end + 1], {**headers, **part}, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        # Logged first: a client that has the answer finds it in the log.
        sent = len(data) if body else 0
        self.hub.record_served(
            Served(self.command, self.path, self.headers.get("Range"), status, sent)
        )
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


HubServer.handler = _Handler
