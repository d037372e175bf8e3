"""Model references: parse what a recipe names, and turn it into a local folder.

Design
------
A reference is ``path[@revision][+adapter[@revision]]`` (mergekit's syntax). ``ModelRef.parse``
only checks syntax; ``resolve`` decides what the text means, in this order:

0. Inside ``stage_outputs`` (a multi-stage recipe's run or plan), a name of one of its stages:
   that stage's output folder (or, while planning, its planned stand-in).
1. ``base+adapter`` (LoRA): ``resolve_pair`` resolves both sides by the rules below and reports
   the failures of both together; ``resolve`` gives the base's folder (config and tokenizer
   come from it). ``merge.lora`` applies the adapter when the checkpoint is opened.
2. A local directory, relative to the current directory or to one of ``search_dirs`` (the
   recipe's folder), ``~`` expanded. Text that can only be a path (``./``, ``../``, ``/``, ``~``,
   or more than one ``/``) and does not exist is an error, never a Hub lookup.
3. A Hub id ``org/name``: handed to ``merge.hub.download_model`` (the only Hub code), or, for
   the plan phase (``locate_pair``), to ``merge.hub.locate_model``: a model whose weights are
   not in the cache then comes back as a ``merge.hub.RemoteModel`` (small files in the cache,
   weights still on the Hub). An adapter is small and is always downloaded.

Inside ``pinned({(repo, revision): Pin(commit, where)})`` (a ContextVar, so threads and nested
runs do not leak into each other) a Hub reference whose ``(repo, revision)`` is pinned is
downloaded at the locked commit instead of its branch or tag; offline, the cached snapshot of
that commit is used. ``merge.build.locked`` sets the pins from a lock file; a failure names
the lock entry (``where``).

What this module does not do: read checkpoints (``merge.checkpoint``), talk to the Hub itself,
write or check lock files (``merge.build``), or read LoRA adapters (``merge.lora``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from merge.errors import SourceError

if TYPE_CHECKING:  # pragma: no cover
    from merge.hub import RemoteModel

_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[\w])?"
HUB_ID = re.compile(rf"^{_NAME}/{_NAME}$")  # the Hub's rules: no '..' or '--' either
LOCAL_PREFIXES = ("./", "../", "/", "~")


@dataclass(frozen=True)
class ModelRef:
    """A model as a recipe names it: local path or Hub id, optional revision and adapter."""

    path: str
    revision: str | None = None
    lora: ModelRef | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``path[@rev][+adapter[@rev]]``; raise ValueError with a one-line reason."""
        text = text.strip()
        if not text:
            raise ValueError("empty model reference")
        parts = text.split("+")
        if any(not p.strip() for p in parts):
            raise ValueError(f"'{text}': empty model name around '+'")
        if len(parts) > 2:
            raise ValueError(f"'{text}': at most one '+adapter' is allowed")
        lora = cls._parse_one(parts[1], text) if len(parts) == 2 else None
        base = cls._parse_one(parts[0], text)
        return cls(base.path, base.revision, lora)

    @classmethod
    def _parse_one(cls, part: str, text: str) -> ModelRef:
        path, at, revision = part.strip().rpartition("@")
        if not at:
            return cls(revision)
        if not path:
            raise ValueError(f"'{text}': missing model name before '@'")
        if not revision:
            raise ValueError(f"'{text}': missing revision after '@'")
        return cls(path, revision)

    @property
    def base(self) -> ModelRef:
        """The reference without its adapter."""
        return ModelRef(self.path, self.revision)

    def __str__(self) -> str:
        text = self.path if self.revision is None else f"{self.path}@{self.revision}"
        return text if self.lora is None else f"{text}+{self.lora}"

    @property
    def is_hub(self) -> bool:
        """Looks like a Hub id (``org/name``) rather than a path; no filesystem access."""
        p = self.path
        return (
            not p.startswith(LOCAL_PREFIXES)
            and bool(HUB_ID.match(p))
            and ".." not in p
            and "--" not in p
        )


_STAGES: ContextVar[Mapping[str, Path]] = ContextVar(
    "merge_stage_outputs", default=MappingProxyType({})
)


def stage_names() -> frozenset[str]:
    """The stage names that resolve to stage outputs here (inside ``stage_outputs``)."""
    return frozenset(_STAGES.get())


@contextmanager
def stage_outputs(folders: Mapping[str, Path]) -> Iterator[None]:
    """Inside the block a reference side whose path is a key (a stage name of a multi-stage
    recipe, ``merge.build.stages``) resolves to that key's folder, before any other rule."""
    token = _STAGES.set(dict(folders))
    try:
        yield
    finally:
        _STAGES.reset(token)


@dataclass(frozen=True)
class Pin:
    """A locked Hub reference: the commit to use, and the lock entry that says so
    (``ties.lock:9``) for messages."""

    commit: str
    where: str


Pins = Mapping[tuple[str, str | None], Pin]  # (repo id, revision as written) -> pin
_PINS: ContextVar[Pins | None] = ContextVar("merge_pins", default=None)


@contextmanager
def pinned(pins: Pins) -> Iterator[None]:
    """Within the block, each pinned Hub reference resolves to its locked commit."""
    token = _PINS.set(dict(pins))
    try:
        yield
    finally:
        _PINS.reset(token)


def resolve(ref: ModelRef, *, search_dirs: Sequence[Path] = ()) -> Path:
    """Return the local folder holding ``ref``'s files, downloading Hub models if needed.

    For ``base+adapter`` both are resolved and the base's folder is returned."""
    return resolve_pair(ref, search_dirs=search_dirs)[0]


def resolve_pair(ref: ModelRef, *, search_dirs: Sequence[Path] = ()) -> tuple[Path, Path | None]:
    """The base's folder and the adapter's folder (None without ``+adapter``).

    A failure on either side is reported, both sides' together."""
    base, adapter = locate_pair(ref, search_dirs=search_dirs)
    assert isinstance(base, Path)
    return base, adapter


def locate_pair(
    ref: ModelRef, *, search_dirs: Sequence[Path] = (), headers_only: bool = False
) -> tuple[Path | RemoteModel, Path | None]:
    """As ``resolve_pair``; with ``headers_only`` a Hub base whose weights are not in the
    cache is not downloaded but given as a ``RemoteModel``."""
    problems: list[str] = []
    sides: list[Path | RemoteModel | None] = []
    for side, what in ((ref.base, "model"), (ref.lora, "adapter")):
        remote = headers_only and what == "model"
        try:
            sides.append(None if side is None else _resolve_one(side, search_dirs, what, remote))
        except SourceError as e:
            problems.extend(e.problems)
    if problems:
        raise SourceError(problems)
    base, adapter = sides
    assert base is not None and (adapter is None or isinstance(adapter, Path))
    return base, adapter


def _resolve_one(
    ref: ModelRef, search_dirs: Sequence[Path], what: str, headers_only: bool = False
) -> Path | RemoteModel:
    """One side of a reference: a stage's output (``stage_outputs``), a local folder, the Hub
    (at its pin, if any)."""
    stage = _STAGES.get().get(ref.path)
    if stage is not None:
        if ref.revision is not None:
            raise SourceError(
                f"{what} '{ref}': a revision (@{ref.revision}) applies only to Hub models, "
                f"but '{ref.path}' is a stage of this recipe"
            )
        return stage
    local = local_folder(ref, search_dirs, what)
    if local is not None:
        return local
    from merge import hub

    fetch = hub.locate_model if headers_only else hub.download_model
    pin = (_PINS.get() or {}).get((ref.path, ref.revision))
    if pin is None:
        return fetch(ref.path, ref.revision)
    try:
        return fetch(ref.path, pin.commit)
    except SourceError as e:
        label = f"model '{ref.path}@{pin.commit}': "
        raise SourceError(
            f"{what} '{ref}' (locked in {pin.where} at {pin.commit[:12]}): {p.removeprefix(label)}"
            for p in e.problems
        ) from e


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def local_folder(ref: ModelRef, search_dirs: Sequence[Path], what: str = "model") -> Path | None:
    """The local folder one side of a reference names, or None when it is a Hub id; a
    SourceError when it is neither (or a local folder with a revision)."""
    local = find_local(ref.path, search_dirs)
    if local is not None:
        if ref.revision is not None:
            raise SourceError(
                f"{what} '{ref}': a revision (@{ref.revision}) applies only to Hub models, "
                f"but '{ref.path}' is a local directory ({local})"
            )
        return local
    if must_be_local(ref.path):
        files = [f for f in (Path(ref.path), *(d / ref.path for d in search_dirs)) if _is_file(f)]
        if files:
            raise SourceError(
                f"{what} '{ref}': {files[0]} is a file; give the {what} folder that holds it"
            )
        raise SourceError(
            f"{what} '{ref}': local path not found{_looked_in(ref.path, search_dirs)}"
        )
    if ref.is_hub:
        return None
    raise SourceError(
        f"{what} '{ref}': not a local directory{_looked_in(ref.path, search_dirs)} and not a "
        f"Hugging Face repo id; use a {what} folder path or 'org/name' (optionally '@revision')"
    )


def find_local(path: str, search_dirs: Sequence[Path]) -> Path | None:
    """The first existing directory among CWD/path and dir/path for each search dir."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *(Path(d) / p for d in search_dirs)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.absolute()
    return None


def must_be_local(path: str) -> bool:
    """Text that can only be a path (``./``, ``../``, ``/``, ``~``, or more than one ``/``)."""
    return path.startswith(LOCAL_PREFIXES) or path.count("/") > 1


def _looked_in(path: str, search_dirs: Sequence[Path]) -> str:
    if Path(path).expanduser().is_absolute():
        return f" ({Path(path).expanduser()})"
    return " (looked in CWD" + "".join(f" and {d}" for d in search_dirs) + ")"
