"""``UploadHub``: ``hubserver.HubServer`` plus what huggingface_hub 2.4 uses to upload.

Design
------
``UploadHub(repos, store, tokens)`` serves the read endpoints of ``HubServer`` and, for
writes, the endpoints ``create_repo``, ``create_branch``, ``create_commit`` (with its
``preupload`` and LFS steps) and ``whoami`` call with ``HF_HUB_DISABLE_XET=1`` (see
``hf_api.py``, ``_commit_api.py``, ``lfs.py``):

- ``GET /api/whoami-v2``: the token's account (``name``, ``orgs``, ``auth.accessToken.role``).
- ``POST /api/repos/create``: a new repo whose first commit holds ``.gitattributes``, as on the
  Hub; ``409`` when it exists (the client's ``exist_ok`` handles it); ``private`` is kept.
- ``POST /api/models/{repo}/branch/{name}``: a branch at ``main``'s head; ``409`` if it exists.
- ``POST /api/models/{repo}/preupload/{rev}``: weight files (``LFS_SUFFIXES``) go LFS.
- ``POST /api/validate-yaml``: always valid.
- ``POST /{repo}.git/info/lfs/objects/batch``: basic transfer; an upload action only for the
  blobs the server lacks. Blobs are kept across commits and failed publishes, so a rerun sends
  only what never arrived.
- ``PUT /_lfs/{repo}/{sha256}``: the blob; its sha256 is checked. ``drop[sha256] = n`` makes the
  next ``n`` PUTs of that blob end with the connection dropped after half the body.
  ``fail_commits = n`` answers the next ``n`` commits ``500``.
- ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``: NDJSON lines ``header``, ``file``
  (base64), ``lfsFile`` (a received blob), ``deletedFile``. A commit is a new folder under
  ``store`` (files hard-linked from the parent commit and the blob store) registered with
  ``HubServer.push``, so every read endpoint serves it; ``create_pr`` makes ``refs/pr/N`` and
  answers ``pullRequestUrl``.

A ``409`` carries the repo's ``url``, as the Hub's does (``create_repo`` reads it).

Tokens: ``tokens`` maps a token to an ``Account`` (user name, orgs it may write to, whether it
may write at all). Every write needs one: no token ``401``; a read-only token, or a namespace
that is neither the user nor one of its orgs, ``403`` (with ``X-Error-Message``). Reads need no
token. Counters for tests: ``.received`` (sha256 of each blob received whole, in order),
``.commits`` (each ``Commit`` made), ``.blob_puts`` (PUTs begun), ``.bytes_received`` (the
bodies of whole blob PUTs and of commits).

A ``parentCommit`` that is not the branch's head gets ``412``, as on the Hub.

Not implemented: multipart LFS transfer, Xet, folder deletions, repo
types other than model, gitignore handling.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from hubserver import LFS_SUFFIXES, HubError, HubServer, _Handler

WRITE_RE = re.compile(
    r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>branch|preupload|commit|paths-info)/(?P<rev>[^/]+)"
)
BATCH_RE = re.compile(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch")
BLOB_RE = re.compile(r"/_lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass(frozen=True)
class Account:
    name: str
    orgs: tuple[str, ...] = ()
    write: bool = True


@dataclass
class Commit:
    repo: str
    ref: str  # branch or refs/pr/N
    sha: str
    message: str
    changed: list[str] = field(default_factory=list)  # paths added or replaced
    deleted: list[str] = field(default_factory=list)


class UploadHub(HubServer):
    """A ``HubServer`` whose repos can be created and committed to (see the module doc)."""

    def __init__(
        self,
        repos: dict[str, dict[str, Path]],
        store: Path,
        tokens: dict[str, Account] | None = None,
    ) -> None:
        super().__init__(repos)
        self.store = Path(store)
        (self.store / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = tokens or {}
        self.private: set[str] = set()
        self.received: list[str] = []
        self.commits: list[Commit] = []
        self.blob_puts = 0
        self.bytes_received = 0  # bodies of blob PUTs and commits
        self.drop: dict[str, int] = {}
        self.fail_commits = 0
        self._prs: dict[str, int] = {}

    # --- accounts ---------------------------------------------------------------------------

    def account(self, authorization: str | None) -> Account:
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token:
            raise HubError(401, "Unauthorized", "Invalid username or password.")
        if token not in self.tokens:
            raise HubError(401, "Unauthorized", "Invalid credentials in Authorization header")
        return self.tokens[token]

    def writer(self, authorization: str | None, namespace: str) -> Account:
        user = self.account(authorization)
        if not user.write or namespace not in (user.name, *user.orgs):
            raise HubError(
                403, "Forbidden", f'You don\'t have the rights to write under "{namespace}"'
            )
        return user

    # --- repos and commits ------------------------------------------------------------------

    def create(self, repo_id: str, private: bool) -> None:
        with self._lock:
            if repo_id in self.repos:
                conflict = HubError(409, "RepoExists", "You already created this model repo")
                conflict.body = {"url": f"{self.endpoint}/{repo_id}"}  # type: ignore[attr-defined]
                raise conflict
        if private:
            self.private.add(repo_id)
        self.commit(repo_id, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, [])

    def branch(self, repo_id: str, name: str) -> None:
        if name in self.names.get(repo_id, {}):
            raise HubError(409, "BranchExists", "Reference already exists")
        sha, _ = self.snapshot(repo_id, "main")
        with self._lock:
            self.names[repo_id][name] = sha

    def commit(
        self,
        repo_id: str,
        ref: str,
        message: str,
        files: dict[str, bytes | str],
        deleted: list[str],
        parent: Path | None = None,
    ) -> Commit:
        """A commit on ``ref``: ``parent``'s files, then ``files`` (bytes, or the sha256 of a
        received blob), less ``deleted``."""
        folder = self.store / "commits" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        if parent is not None:
            for path in self.files(parent):
                if path not in deleted and path not in files:
                    _link(parent / path, folder / path)
        for path, content in files.items():
            if isinstance(content, bytes):
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_bytes(content)
            else:
                _link(self.store / "blobs" / content, folder / path)
        sha = self.push(repo_id, folder, ref)
        done = Commit(repo_id, ref, sha, message, sorted(files), sorted(deleted))
        with self._lock:
            self.commits.append(done)
        return done

    def pr_ref(self, repo_id: str) -> tuple[int, str]:
        with self._lock:
            n = self._prs[repo_id] = self._prs.get(repo_id, 0) + 1
        return n, f"refs/pr/{n}"

    def has_blob(self, oid: str) -> bool:
        return (self.store / "blobs" / oid).is_file()


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class _UploadHandler(_Handler):
    @property
    def up(self) -> UploadHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/api/whoami-v2":
            self._answer(self._whoami)
        else:
            super().do_GET()

    def do_POST(self) -> None:
        self._answer(self._post)

    def do_PUT(self) -> None:
        self._answer(self._put)

    def _answer(self, fn: object) -> None:
        self.up.record(self.command, self.path)
        try:
            result = fn()  # type: ignore[operator]
        except HubError as e:
            self._body()  # drain what is left of the request
            data = json.dumps({"error": str(e), **getattr(e, "body", {})}).encode()
            headers = {"X-Error-Code": e.code, "X-Error-Message": str(e)}
            self._send(e.status, data, {"Content-Type": "application/json", **headers}, True)
            return
        if result is not None:
            data = json.dumps(result).encode()
            self._send(200, data, {"Content-Type": "application/json"}, True)

    def _body(self) -> bytes:
        """The request body, read once (plain or chunked)."""
        done: bytes | None = getattr(self, "_read", None)
        if done is not None:
            return done
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            done = b"".join(parts)
        else:
            done = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._read = done
        return done

    def _json(self) -> dict:
        return json.loads(self._body() or b"{}")

    def _whoami(self) -> dict:
        user = self.up.account(self.headers.get("Authorization"))
        role = "write" if user.write else "read"
        orgs = [{"name": org, "type": "org"} for org in user.orgs]
        return {
            "type": "user",
            "name": user.name,
            "orgs": orgs,
            "auth": {"accessToken": {"role": role}},
        }

    def _post(self) -> dict | None:
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        if url.path == "/api/validate-yaml":
            self._body()
            return {"errors": [], "warnings": []}
        if url.path == "/api/repos/create":
            payload = self._json()
            user = self.up.account(auth)
            namespace = payload.get("organization") or user.name
            self.up.writer(auth, namespace)
            repo_id = f"{namespace}/{payload['name']}"
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.up.create(repo_id, private)
            return {"url": f"{self.up.endpoint}/{repo_id}", "name": repo_id}
        if m := BATCH_RE.fullmatch(url.path):
            return self._batch(unquote(m["repo"]), auth)
        m = WRITE_RE.fullmatch(url.path)
        if m is None:
            raise HubError(404, "NotFound", f"no such endpoint: {url.path}")
        repo_id, rev = unquote(m["repo"]), unquote(m["rev"])
        if m["kind"] == "paths-info":
            return self._paths_info(repo_id, rev)
        self.up.writer(auth, repo_id.split("/")[0])
        if m["kind"] == "branch":
            self._body()
            self.up.branch(repo_id, rev)
            return {}
        if m["kind"] == "preupload":
            self.up.snapshot(repo_id, rev)
            files = self._json()["files"]
            modes = [("lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular") for f in files]
            return {
                "files": [
                    {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
                    for f, mode in zip(files, modes, strict=True)
                ]
            }
        create_pr = parse_qs(url.query).get("create_pr", ["0"])[0] == "1"
        return self._commit(repo_id, rev, create_pr)

    def _paths_info(self, repo_id: str, rev: str) -> list[dict]:
        paths = parse_qs(self._body().decode()).get("paths", [])
        _, folder = self.up.snapshot(repo_id, rev)
        files = self.up.files(folder)
        return [files[p] for p in paths if p in files]

    def _batch(self, repo_id: str, auth: str | None) -> dict:
        self.up.writer(auth, repo_id.split("/")[0])
        objects = []
        for obj in self._json()["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.up.has_blob(obj["oid"]):
                href = f"{self.up.endpoint}/_lfs/{repo_id}/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _put(self) -> dict | None:
        m = BLOB_RE.fullmatch(urlsplit(self.path).path)
        if m is None:
            raise HubError(404, "NotFound", "no such upload")
        oid = m["oid"]
        with self.up._lock:
            self.up.blob_puts += 1
            drop = self.up.drop.get(oid, 0) > 0
            if drop:
                self.up.drop[oid] -= 1
        if drop:
            self.rfile.read(int(self.headers.get("Content-Length") or 2) // 2)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "BadRequest", "the body does not match its sha256")
        blob = self.up.store / "blobs" / oid
        tmp = blob.with_suffix(f".{os.getpid()}.{id(self)}.part")
        tmp.write_bytes(data)
        tmp.replace(blob)
        with self.up._lock:
            self.up.received.append(oid)
            self.up.bytes_received += len(data)
        return {}

    def _commit(self, repo_id: str, rev: str, create_pr: bool) -> dict:
        body = self._body()
        with self.up._lock:
            self.up.bytes_received += len(body)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.up._lock:
            fail, self.up.fail_commits = self.up.fail_commits > 0, max(0, self.up.fail_commits - 1)
        if fail:
            raise HubError(500, "InternalError", "Internal Error - we're working hard to fix this")
        _, parent = self.up.snapshot(repo_id, rev)
        message, files, deleted = "", {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                message = value["summary"]
                head = self.up.names[repo_id].get(unquote(rev), unquote(rev))
                if value.get("parentCommit", head) != head:
                    raise HubError(412, "PreconditionFailed", "A commit has happened since")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if not self.up.has_blob(value["oid"]):
                    raise HubError(422, "LfsMissing", f"{value['path']}: blob not uploaded")
                files[value["path"]] = value["oid"]
            elif key == "deletedFile":
                if value["path"] not in self.up.files(parent):
                    raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
                deleted.append(value["path"])
        ref = unquote(rev)
        pr_url = None
        if create_pr:
            n, ref = self.up.pr_ref(repo_id)
            pr_url = f"{self.up.endpoint}/{repo_id}/discussions/{n}"
        done = self.up.commit(repo_id, ref, message, files, deleted, parent)
        url = f"{self.up.endpoint}/{repo_id}/commit/{done.sha}"
        return {"commitUrl": url, "commitOid": done.sha, "pullRequestUrl": pr_url, "success": True}


UploadHub.handler = _UploadHandler
