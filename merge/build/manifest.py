"""``merge-manifest.json``: what an output was built from, and the bytes it holds.

Design
------
Every output directory gets a manifest, written last into the temporary output (so it is part
of the atomic rename): the format ``version``, the tool and its version, the recipe's sha256,
the lock's sha256 when the run used one, the seed, the multi-stage ``build_key`` when a build
set one, the resolved inputs (``merge.build.inputs.InputId`` entries, as a lock writes them)
and the path, size and sha256 of every other file of the output, sorted by path. Nothing in it
depends on the time or the machine beyond the inputs' identities, so two runs of the same
recipe from the same lock write the same manifest.

Input hashes come from ``merge.build.hashing`` (cached; Hub weight files by their blob names)
and are computed on a background thread while the merge runs (``InputHashes``); output files
are hashed after they are written, several at a time, except the shards: the writer hashes
those from the files while it writes them (``merge.shardhash``) and passes their digests in.

``verify(out)`` recomputes every output file's size and sha256 (never from the cache: it reads
every byte) and reports each file that is missing, differs or is not in the manifest.

What this module does not do: decide whether an output is up to date (stage keys and rebuilds
compare ``build_key`` and inputs), or read locks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge import __version__
from merge.build.hashing import digest
from merge.build.inputs import InputId, identify_model
from merge.errors import BuildError
from merge.sources import ModelRef, stage_names

if TYPE_CHECKING:  # pragma: no cover
    from merge.sourceset import Model

MANIFEST_NAME = "merge-manifest.json"
FORMAT_VERSION = 1
TOOL = "mergesmith"
KEYS = (
    "version",
    "tool",
    "tool_version",
    "recipe_sha256",
    "lock_sha256",
    "seed",
    "build_key",
    "inputs",
    "files",
)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class InputHashes:
    """The identities of a run's inputs, computed on one background thread from ``start``
    until ``result`` (hashing local inputs reads them while the merge reads them too)."""

    def __init__(self, models: dict[str, Model]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="merge-input-hash")
        stages = stage_names()  # read here: the worker thread does not see the context
        self._future: Future[list[InputId]] = self._pool.submit(_identify_all, models, stages)

    def result(self) -> list[InputId]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown(wait=False)

    def cancel(self) -> None:
        self._future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _identify_all(models: dict[str, Model], stages: frozenset[str]) -> list[InputId]:
    """Every input side once, sorted by ref; an earlier stage's output as ``source: stage``
    (with the content of its files, as built)."""
    found: dict[str, InputId] = {}
    for model in models.values():
        for ident in identify_model(model):
            name = ModelRef.parse(ident.ref).path
            if name in stages:
                ident = InputId(ident.ref, "stage", stage=name, files=ident.files)
            found.setdefault(ident.ref, ident)
    return [found[ref] for ref in sorted(found)]


def output_files(out: Path) -> list[str]:
    """Every file under ``out`` (posix paths relative to it) but the manifest, sorted."""
    names = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(n for n in names if n != MANIFEST_NAME)


def hash_files(out: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """path -> {size, sha256} of each named file, several read at once."""
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers, thread_name_prefix="merge-output-hash") as pool:
        digests = list(pool.map(lambda n: digest(out / n), names))
    return {
        n: {"size": (out / n).stat().st_size, "sha256": d}
        for n, d in zip(names, digests, strict=True)
    }


def make_manifest(
    out: Path,
    *,
    recipe_text: str,
    seed: int | None,
    inputs: list[InputId],
    lock_sha256: str | None = None,
    build_key: str | None = None,
    known: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest of the files now in ``out``; ``known`` (path -> sha256) gives the digests
    of files already hashed from their bytes on disk (the shards, as the writer wrote them)."""
    known = known or {}
    names = output_files(out)
    files = hash_files(out, [n for n in names if n not in known])
    for name in names:
        if name in known:
            files[name] = {"size": (out / name).stat().st_size, "sha256": known[name]}
    return {
        "version": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": __version__,
        "recipe_sha256": sha256_text(recipe_text),
        "lock_sha256": lock_sha256,
        "seed": seed,
        "build_key": build_key,
        "inputs": [i.as_dict() for i in inputs],
        "files": [{"path": n, **files[n]} for n in sorted(files)],
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    (out / MANIFEST_NAME).write_text(text, encoding="utf-8")


def update_files(out: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Rehash the named files of ``out`` into ``manifest`` (added when new) and write it: for
    a file rewritten after the build (``merge card --write``)."""
    files = {f["path"]: f for f in manifest["files"]}
    for name, entry in hash_files(out, names).items():
        files[name] = {"path": name, **entry}
    manifest["files"] = [files[n] for n in sorted(files)]
    write_manifest(out, manifest)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of ``out``; None when it has none; BuildError when it is unusable."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BuildError(f"{where}:{e.lineno}: not valid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{where}: cannot read: {e}") from None
    _check(data, where)
    return data


def _check(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise BuildError(f"{where}: expected a JSON object")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise BuildError(
            f"{where}: version: {version!r} is not a manifest version this tool reads "
            f"({FORMAT_VERSION}); it was written by {data.get('tool_version', 'another version')}"
        )
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise BuildError(f"{where}: unknown field '{unknown[0]}'; allowed: {', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise BuildError(f"{where}: missing field '{missing[0]}'")
    files = data["files"]
    if not isinstance(files, list) or not all(_file_entry(f) for f in files):
        raise BuildError(f"{where}: files: expected a list of {{path, size, sha256}} entries")
    if not isinstance(data["inputs"], list):
        raise BuildError(f"{where}: inputs: expected a list")


def _file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"path", "size", "sha256"}
        and isinstance(entry["path"], str)
        and not entry["path"].startswith("/")
        and ".." not in entry["path"].split("/")
        and isinstance(entry["size"], int)
        and isinstance(entry["sha256"], str)
    )


@dataclass
class Verdict:
    """What ``verify`` found: each problem as ``path: what``; ``ok`` when there are none."""

    out: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(out: str | Path, progress: Callable[[str], None] | None = None) -> Verdict:
    """Recompute every file of ``out`` against its manifest (see the module docstring).
    BuildError when ``out`` is not an output with a readable manifest."""
    out = Path(out)
    if not out.is_dir():
        raise BuildError(f"{out}: not a directory; expected a merge output")
    manifest = read_manifest(out)
    if manifest is None:
        raise BuildError(
            f"{out}: no {MANIFEST_NAME}; it was not written by this tool (or by a version "
            f"before manifests); rebuild it with merge run"
        )
    verdict = Verdict(out)
    listed = {f["path"]: f for f in manifest["files"]}
    present = set(output_files(out))
    same_size = []
    for path in sorted(listed):
        entry = listed[path]
        if path not in present:
            verdict.problems.append(f"{path}: missing")
            continue
        size = (out / path).stat().st_size
        if size != entry["size"]:
            verdict.problems.append(f"{path}: size {size} bytes, the manifest says {entry['size']}")
        else:
            same_size.append(path)
    if progress is not None:
        progress(f"hashing {len(same_size)} files")
    for path, found in hash_files(out, same_size).items():
        if found["sha256"] != listed[path]["sha256"]:
            verdict.problems.append(f"{path}: content differs from the manifest (sha256)")
    verdict.checked = len(listed)
    for path in sorted(present - set(listed)):
        verdict.problems.append(f"{path}: not in the manifest")
    verdict.problems.sort()
    return verdict
