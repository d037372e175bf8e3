"""The lock file: what each model of a recipe resolved to, as YAML that diffs well.

Format (``version: 1``), written beside the recipe as ``<stem>.lock`` (``ties.yaml`` ->
``ties.lock``)::

    # merge lock file for ties.yaml (comment lines are ignored)
    version: 1
    tool: mergesmith 0.1.0
    recipe:
      file: ties.yaml
      sha256: 5d41...         # of the recipe's text
    models:                   # sorted by ref; one entry per side of base+adapter
    - ref: org/name@v1        # the reference as the recipe writes it (one side)
      source: hub
      repo: org/name
      revision: v1            # only when the recipe names one
      commit: 0a1b...         # 40 hex digits
      files:                  # sorted by path: every file the merge reads
      - path: model.safetensors
        size: 1234
        sha256: 9f86...
    - ref: ./local-model      # a local directory: no path beyond the ref, so the lock is
      source: local           # the same in any checkout
      files: [...]

Each entry is ``merge.build.inputs.InputId.as_dict()``, so locks and output manifests compare
entry by entry. Keys are written in that fixed order, lists sorted, one value per line.

Reading is strict: every problem (not YAML, an unknown or missing field, a wrong type, a
malformed sha, a ref locked twice) is one line ``ties.lock:12: models[0].commit: ...`` with the
next step, all reported together as one ``BuildError``. Nothing is dropped or defaulted.

What this module does not do: resolve or hash inputs (``merge.build.lock``), or compare a
lock with a recipe or the models of a run (``merge.build.locked``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge import __version__
from merge.build.inputs import FileId, InputId
from merge.errors import BuildError, MergeError
from merge.recipe.yamlsrc import Locator, PathKey, parse_yaml

LOCK_VERSION = 1
SUFFIX = ".lock"
TOOL = f"mergesmith {__version__}"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
TOP_KEYS = ("version", "tool", "recipe", "models")
RECIPE_KEYS = ("file", "sha256")
FILE_KEYS = ("path", "size", "sha256")
ENTRY_KEYS = {
    "hub": (("ref", "source", "repo", "commit", "files"), ("revision",)),
    "local": (("ref", "source", "files"), ()),
}


def lock_path(recipe_file: Path) -> Path:
    """Where the lock of ``recipe_file`` lives: beside it, ``<stem>.lock``."""
    return Path(recipe_file).with_suffix(SUFFIX)


def recipe_sha256(recipe_file: Path) -> str:
    """sha256 of the recipe's text as read (UTF-8, newlines as Python reads them): what the
    lock records, and what the output manifest's ``recipe_sha256`` is."""
    return hashlib.sha256(Path(recipe_file).read_text(encoding="utf-8").encode()).hexdigest()


@dataclass(frozen=True)
class FileChanges:
    """The files of an input that differ between two identities of it, by path."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changed or self.added or self.removed)

    def text(self) -> str:
        """``changed: a, b; added: c``."""
        parts = [(k, getattr(self, k)) for k in ("changed", "added", "removed")]
        return "; ".join(f"{k}: {', '.join(v)}" for k, v in parts if v)


def file_changes(old: Sequence[FileId], new: Sequence[FileId]) -> FileChanges:
    """What changed from ``old`` to ``new``: a file with another size or sha256 is changed."""
    before, after = {f.path: f for f in old}, {f.path: f for f in new}
    return FileChanges(
        tuple(sorted(p for p in before.keys() & after.keys() if before[p] != after[p])),
        tuple(sorted(after.keys() - before.keys())),
        tuple(sorted(before.keys() - after.keys())),
    )


@dataclass(frozen=True)
class LockFile:
    """A lock, as read or about to be written. ``loc`` gives line numbers (read locks)."""

    path: Path
    recipe_file: str
    recipe_sha256: str
    models: tuple[InputId, ...]
    tool: str = TOOL
    loc: Locator | None = None
    sha256: str = ""  # of the file's bytes, once read or written

    def index(self, ref: str) -> int | None:
        return next((i for i, m in enumerate(self.models) if m.ref == ref), None)

    def entry(self, ref: str) -> InputId | None:
        i = self.index(ref)
        return None if i is None else self.models[i]

    def where(self, path: PathKey) -> str:
        """``ties.lock:12: models[0]`` (the prefix of an error line)."""
        return (self.loc or Locator(str(self.path))).where(path)

    def line(self, ref: str) -> str:
        """``ties.lock:12``: the file and line of an entry."""
        i = self.index(ref)
        line = None if i is None or self.loc is None else self.loc.line(("models", i))
        return f"{self.path}:{line}" if line else str(self.path)

    def at(self, ref: str) -> str:
        """``ties.lock:12: models[0] (org/name)``: where an entry is, for messages."""
        i = self.index(ref)
        return f"{self.path}" if i is None else f"{self.where(('models', i))} ({ref})"


def render(lock: LockFile) -> str:
    """The lock's text: a comment, then the fields in their fixed order."""
    data = {
        "version": LOCK_VERSION,
        "tool": lock.tool,
        "recipe": {"file": lock.recipe_file, "sha256": lock.recipe_sha256},
        "models": [m.as_dict() for m in sorted(lock.models, key=lambda m: m.ref)],
    }
    head = (
        f"# merge lock file for {lock.recipe_file}: what each model resolved to.\n"
        f"# Refresh with `merge lock --update {lock.recipe_file} [MODEL ...]`; "
        f"see what moved upstream with `merge outdated {lock.recipe_file}`.\n"
    )
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=2**16)
    return head + body


def write_lock(lock: LockFile) -> LockFile:
    """Write the lock atomically (a temporary sibling renamed into place); the lock as
    written, with its sha256."""
    data = render(lock).encode("utf-8")
    path = lock.path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a file meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sha = hashlib.sha256(data).hexdigest()
    return LockFile(path, lock.recipe_file, lock.recipe_sha256, lock.models, lock.tool, None, sha)


def read_lock(path: Path, recipe_file: Path) -> LockFile:
    """Read and check ``path`` strictly; ``recipe_file`` names the next step in messages."""
    step = f"fix it or rewrite it with `merge lock --update {recipe_file}`"
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: cannot read the lock file ({e}); {step}") from None
    try:
        several = len(list(yaml.compose_all(text, Loader=yaml.SafeLoader))) > 1
    except yaml.YAMLError:
        several = False  # parse_yaml says where
    if several:
        raise BuildError(f"{path}: a lock file is one YAML document; {step}")
    try:
        data, loc = parse_yaml(text, str(path))
    except MergeError as e:
        raise BuildError([f"{p}; {step}" for p in e.problems]) from None
    if data is None:
        raise BuildError(f"{path}: the lock file is empty; {step}")
    reader = _Reader(loc, step)
    lock = reader.lock(path, data)
    if reader.problems or lock is None:
        raise BuildError(reader.problems)
    sha = hashlib.sha256(raw).hexdigest()
    return LockFile(path, lock.recipe_file, lock.recipe_sha256, lock.models, lock.tool, loc, sha)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


_TYPES = {str: "a string", int: "an integer", list: "a list", dict: "a mapping"}


@dataclass
class _Reader:
    """Checks a parsed lock, collecting one line per problem."""

    loc: Locator
    step: str
    problems: list[str] = field(default_factory=list)

    def bad(self, path: PathKey, message: str) -> None:
        self.problems.append(f"{self.loc.where(path)}: {message}; {self.step}")

    def typed(self, value: Any, kind: type, path: PathKey) -> Any:
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        self.bad(path, f"expected {_TYPES[kind]}, got {_show(value)}")
        return None

    def fields(
        self, value: Any, path: PathKey, required: Sequence[str], optional: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        """A mapping with exactly ``required`` (and maybe ``optional``) keys."""
        if self.typed(value, dict, path) is None:
            return None
        allowed = (*required, *optional)
        for key in value:
            if key not in allowed:
                self.bad((*path, key), f"unknown field (allowed: {', '.join(allowed)})")
        missing = [k for k in required if k not in value]
        for key in missing:
            self.bad(path, f"missing field '{key}'")
        return None if missing else dict(value)

    def pattern(self, value: Any, regex: re.Pattern[str], what: str, path: PathKey) -> str:
        text = self.typed(value, str, path)
        if text is not None and not regex.fullmatch(text):
            self.bad(path, f"expected {what}, got {_show(text)}")
        return str(text)

    def lock(self, path: Path, data: Any) -> LockFile | None:
        top = self.fields(data, (), TOP_KEYS)
        if top is None:
            return None
        version = self.typed(top["version"], int, ("version",))
        if version is not None and version != LOCK_VERSION:
            self.bad(
                ("version",),
                f"unsupported lock version {version} (this merge reads version {LOCK_VERSION})",
            )
        tool = self.typed(top["tool"], str, ("tool",))
        recipe = self.fields(top["recipe"], ("recipe",), RECIPE_KEYS)
        file, sha = "", ""
        if recipe is not None:
            file = str(self.typed(recipe["file"], str, ("recipe", "file")))
            sha = self.pattern(recipe["sha256"], SHA256_RE, _SHA256, ("recipe", "sha256"))
        models = self.models(top["models"])
        return LockFile(path, file, sha, models, str(tool))

    def models(self, value: Any) -> tuple[InputId, ...]:
        entries = self.typed(value, list, ("models",)) or []
        out: list[InputId] = []
        first: dict[str, int | None] = {}
        for i, item in enumerate(entries):
            entry = self.entry(item, ("models", i))
            if entry is None:
                continue
            if entry.ref in first:
                self.bad(
                    ("models", i, "ref"),
                    f"{entry.ref!r} is locked twice (first on line {first[entry.ref]})",
                )
                continue
            first[entry.ref] = self.loc.line(("models", i))
            out.append(entry)
        return tuple(out)

    def entry(self, item: Any, path: PathKey) -> InputId | None:
        if self.typed(item, dict, path) is None:
            return None
        if "source" not in item:
            self.bad(path, "missing field 'source'")
            return None
        source = item["source"]
        if source not in ENTRY_KEYS:
            self.bad((*path, "source"), f"expected 'hub' or 'local', got {_show(source)}")
            return None
        fields = self.fields(item, path, *ENTRY_KEYS[source])
        if fields is None:
            return None
        n = len(self.problems)
        ref = self.typed(fields["ref"], str, (*path, "ref"))
        files = self.files(fields["files"], (*path, "files"))
        if source == "local":
            entry = InputId(str(ref), "local", files=files)
        else:
            entry = self.hub_entry(fields, path, str(ref), files)
        return entry if len(self.problems) == n else None

    def hub_entry(
        self, fields: dict[str, Any], path: PathKey, ref: str, files: tuple[FileId, ...]
    ) -> InputId:
        repo = self.typed(fields["repo"], str, (*path, "repo"))
        revision = fields.get("revision")
        if "revision" in fields:
            self.typed(revision, str, (*path, "revision"))
        commit = self.pattern(fields["commit"], COMMIT_RE, _COMMIT, (*path, "commit"))
        written = repo if revision is None else f"{repo}@{revision}"
        if isinstance(repo, str) and isinstance(revision, (str, type(None))) and ref != written:
            self.bad((*path, "ref"), f"{ref!r} does not match repo and revision ({written!r})")
        return InputId(ref, "hub", repo=repo, revision=revision, commit=commit, files=files)

    def files(self, value: Any, path: PathKey) -> tuple[FileId, ...]:
        out: dict[str, FileId] = {}
        for j, item in enumerate(self.typed(value, list, path) or []):
            where = (*path, j)
            fields = self.fields(item, where, FILE_KEYS)
            if fields is None:
                continue
            name = self.typed(fields["path"], str, (*where, "path"))
            size = self.typed(fields["size"], int, (*where, "size"))
            if size is not None and size < 0:
                self.bad((*where, "size"), f"expected a size >= 0, got {size}")
            sha = self.pattern(fields["sha256"], SHA256_RE, _SHA256, (*where, "sha256"))
            if name in out:
                self.bad((*where, "path"), f"{name!r} is listed twice")
            elif name is not None and size is not None:
                out[name] = FileId(name, size, sha)
        return tuple(sorted(out.values(), key=lambda f: f.path))


_SHA256 = "a sha256 (64 lowercase hex digits)"
_COMMIT = "a commit sha (40 lowercase hex digits)"
