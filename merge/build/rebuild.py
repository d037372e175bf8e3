"""``merge rebuild RECIPE OUT``: CI's one command. Build only when something changed.

Design
------
``rebuild`` decides, then acts, in this order:

1. **What moved upstream.** Without a lock yet, one is written (``merge lock``). Otherwise
   ``merge outdated`` compares it with upstream (Hub commits, local contents); an error there
   (offline, unknown repo, a bad lock) stops everything. When a model moved, or the recipe
   changed since it was locked, the lock is refreshed (``merge lock --update``).
2. **Whether OUT still holds that build**, when nothing moved: OUT exists, has a readable
   manifest, was built from exactly this lock (its ``lock_sha256``) by this tool version, and
   ``merge verify`` passes (every byte read).
3. **Build** when any of that failed: ``build(out)`` runs ``merge run --locked --overwrite``
   (a multi-stage recipe rebuilds only the stages whose key changed), then OUT must verify.
   An OUT that exists but is no merge output (no manifest) is refused, never replaced.
4. **Publish** (``publish(out)``, the seam for ``--push-to-hub``) once OUT is verified, built
   now or up to date; the line it returns ends the summary.

The result's ``summary`` is the one line CI shows: what it did and why.

What this module does not do: build itself (``merge.build.runner``), or upload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from merge import __version__
from merge.build.lock import lock_recipe
from merge.build.lockfile import lock_path, read_lock, recipe_sha256
from merge.build.manifest import MANIFEST_NAME, read_manifest, verify
from merge.build.outdated import outdated
from merge.errors import BuildError


@dataclass
class Rebuild:
    """What ``rebuild`` found and did."""

    out: Path
    reasons: list[str] = field(default_factory=list)  # why it built; none: up to date
    lock_changes: list[str] = field(default_factory=list)  # the lock's entries that changed
    built: str | None = None  # the build's own summary
    verified: int = 0  # files checked against the manifest
    published: bool = False
    publish_summary: str | None = None  # what ``publish`` said it did

    def summary(self) -> str:
        said = self._built_summary()
        return f"{said}; {self.publish_summary}" if self.publish_summary else said

    def _built_summary(self) -> str:
        if self.built is None:
            return f"{self.out} is up to date: no input moved and its {self.verified} files verify"
        n = len(self.lock_changes)
        lock = f"; lock updated ({n} {'entry' if n == 1 else 'entries'})" if n else ""
        why = "; ".join(self.reasons)
        return f"rebuilt {self.out} ({why}){lock}; {self.verified} files verify"


def rebuild(
    recipe_file: str | Path,
    out: str | Path,
    *,
    build: Callable[[Path], str],
    publish: Callable[[Path], str | None] | None = None,
    report: Callable[[str], None] | None = None,
) -> Rebuild:
    """See the module docstring. ``report`` gets a line per step (what moved, the build's
    own lines come from ``build``)."""
    recipe_file, out = Path(recipe_file), Path(out)
    if not recipe_file.is_file():
        raise BuildError(f"{recipe_file}: recipe not found")
    done = Rebuild(out)
    done.reasons, done.lock_changes = _refresh_lock(recipe_file, report)
    lock_sha = read_lock(lock_path(recipe_file), recipe_file).sha256
    if not done.reasons:
        done.reasons, done.verified = _output_state(out, lock_sha)
    if done.reasons:
        _refuse_foreign(out)
        if report is not None:
            report(f"building: {'; '.join(done.reasons)}")
        done.built = build(out)
        verdict = verify(out)
        if not verdict.ok:
            raise BuildError(
                f"{out}: the new build does not verify ({verdict.problems[0]}); this is a bug, "
                "please report it"
            )
        done.verified = verdict.checked
    if publish is not None:
        done.publish_summary = publish(out)
        done.published = True
    return done


def _refresh_lock(recipe_file: Path, report: Callable[[str], None] | None) -> tuple[list, list]:
    """Why the lock changed (no lock, models moved, recipe edited) and its changed entries."""
    path = lock_path(recipe_file)
    if not path.is_file():
        result = lock_recipe(recipe_file)
        if report is not None:
            for change in result.changes:
                report(f"lock: {change.line()}")
        return [f"no lock yet: wrote {path}"], []
    found = outdated(recipe_file)
    reasons = [m.line() for m in found.models if m.moved]
    if report is not None:
        for line in reasons:
            report(f"moved: {line}")
    lock = read_lock(path, recipe_file)
    if lock.recipe_sha256 != recipe_sha256(recipe_file):
        reasons.append(f"{recipe_file} changed since it was locked")
    if not reasons:
        return [], []
    result = lock_recipe(recipe_file, update=True)
    changed = [c.line() for c in result.changes if c.kind not in ("unchanged", "kept")]
    if report is not None:
        for line in changed:
            report(f"lock: {line}")
    return reasons, changed


def _output_state(out: Path, lock_sha: str) -> tuple[list[str], int]:
    """Why ``out`` is not the build of this lock (none: it is), and the files verified."""
    if not out.exists():
        return [f"{out} does not exist"], 0
    try:
        manifest = read_manifest(out) if out.is_dir() else None
    except BuildError as e:
        return [f"{out}'s manifest is unusable ({e.problems[0]})"], 0
    if manifest is None:
        return [f"{out} has no {MANIFEST_NAME}"], 0
    if manifest["lock_sha256"] != lock_sha:
        return [f"{out} was built from another lock"], 0
    if manifest["tool_version"] != __version__:
        return [f"{out} was built by version {manifest['tool_version']}, this is {__version__}"], 0
    verdict = verify(out)
    if not verdict.ok:
        more = f" and {len(verdict.problems) - 1} more" if len(verdict.problems) > 1 else ""
        return [f"{out} fails verify ({verdict.problems[0]}{more})"], 0
    return [], verdict.checked


def _refuse_foreign(out: Path) -> None:
    """OUT may be replaced only when it is a merge output (or missing)."""
    if not out.exists():
        return
    if not out.is_dir() or not (out / MANIFEST_NAME).is_file():
        raise BuildError(
            f"{out} exists and is not a merge output (no {MANIFEST_NAME}); rebuild never "
            "replaces it: remove it or choose another OUT"
        )
