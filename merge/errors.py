"""Errors a user can act on.

Library code raises these; the CLI prints ``str(error)`` (one line per problem) and exits 2.
A phase that finds several problems raises one error holding all of them, so a user fixes
everything in one go. Anything else escaping the library is a bug: the CLI says "internal
error, please report it" and exits 1 (``MERGE_DEBUG=1`` shows the traceback); an ``OSError``
it knows (no space, read-only, name too long, permission) is a one-line error, exit 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class MergeError(Exception):
    """Base class: one or more one-line problems."""

    exit_code = 2

    def __init__(self, problems: str | Iterable[str]):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class RecipeError(MergeError):
    """The recipe is malformed: schema, types, ranges, unknown keys or methods."""


class SourceError(MergeError):
    """A model reference cannot be resolved to local files."""


class CheckpointError(MergeError):
    """A checkpoint is missing, unreadable, truncated or of an unknown format."""


class PlanError(MergeError):
    """Recipe and checkpoints do not fit together: missing tensors, shapes, layer ranges."""


class OutputError(MergeError):
    """The output location is unusable: exists, inside an input, no disk space."""


class BuildError(MergeError):
    """A build record is unusable: a lock or manifest missing, corrupt or for another recipe,
    or an input that differs from what the lock pins."""


class PublishError(MergeError):
    """Publishing to the Hub failed."""


class ComputeError(MergeError):
    """A tensor cannot be written as merged: NaN/Inf in the result, an overflow of the output
    dtype, or integer tensors that differ between models (nothing is written)."""


class EvalError(MergeError):
    """An evaluation cannot run: an unknown task, a missing or malformed task file, a model
    that cannot be loaded, or the lm-evaluation-harness extra not installed."""
