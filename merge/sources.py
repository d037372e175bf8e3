"""Model references: parse what a recipe names, and turn it into a local folder.

Design
------
A reference is ``path[@revision][+adapter[@revision]]`` (mergekit's syntax). ``ModelRef.parse``
only checks syntax; ``resolve`` decides what the text means, in this order:

1. ``base+adapter`` (LoRA): refused for now, behind one function (``_resolve_lora``) that a later
   release replaces.
2. A local directory, relative to the current directory or to one of ``search_dirs`` (the
   recipe's folder), ``~`` expanded. Text that can only be a path (``./``, ``../``, ``/``, ``~``,
   or more than one ``/``) and does not exist is an error, never a Hub lookup.
3. A Hub id ``org/name``: handed to ``merge.hub.download_model`` (the only Hub code).

What this module does not do: read checkpoints (``merge.checkpoint``), talk to the Hub itself,
pin or record revisions (``merge.lock``), or merge LoRA adapters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from merge.errors import SourceError

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


def resolve(ref: ModelRef, *, search_dirs: Sequence[Path] = ()) -> Path:
    """Return the local folder holding ``ref``'s files, downloading Hub models if needed."""
    if ref.lora is not None:
        return _resolve_lora(ref, search_dirs)
    local = _find_local(ref.path, search_dirs)
    if local is not None:
        if ref.revision is not None:
            raise SourceError(
                f"model '{ref}': a revision (@{ref.revision}) applies only to Hub models, "
                f"but '{ref.path}' is a local directory ({local})"
            )
        return local
    if _must_be_local(ref.path):
        raise SourceError(f"model '{ref}': local path not found{_looked_in(ref.path, search_dirs)}")
    if ref.is_hub:
        from merge.hub import download_model

        return download_model(ref.path, ref.revision)
    raise SourceError(
        f"model '{ref}': not a local directory{_looked_in(ref.path, search_dirs)} and not a "
        "Hugging Face repo id; use a model folder path or 'org/name' (optionally '@revision')"
    )


def _resolve_lora(ref: ModelRef, search_dirs: Sequence[Path]) -> Path:
    """Seam for ``base+adapter``: a later release resolves both and merges the adapter.

    Both sides are resolved first, so an unreachable model is reported as such."""
    resolve(ModelRef(ref.path, ref.revision), search_dirs=search_dirs)
    assert ref.lora is not None
    resolve(ref.lora, search_dirs=search_dirs)
    raise SourceError(
        f"model '{ref}': LoRA adapters (base+adapter) are not supported in this release"
    )


def _find_local(path: str, search_dirs: Sequence[Path]) -> Path | None:
    """The first existing directory among CWD/path and dir/path for each search dir."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *(Path(d) / p for d in search_dirs)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.absolute()
    return None


def _must_be_local(path: str) -> bool:
    return path.startswith(LOCAL_PREFIXES) or path.count("/") > 1


def _looked_in(path: str, search_dirs: Sequence[Path]) -> str:
    if Path(path).expanduser().is_absolute():
        return f" ({Path(path).expanduser()})"
    return " (looked in CWD" + "".join(f" and {d}" for d in search_dirs) + ")"
