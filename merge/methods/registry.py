"""The method registry: one explicit dict, filled through the same ``register`` a plugin uses.

``get_method`` raises ``UnknownMethodError`` (a ``KeyError``) whose message lists the valid
names and the closest match, e.g. ``unknown merge method 'tie' (did you mean 'ties'?); ...``.
Tests (and plugins) can undo a registration with ``unregister``.
"""

from __future__ import annotations

import difflib

from merge.methods.adaptive import MODEL_STOCK, SCE
from merge.methods.base import Method
from merge.methods.karcher import KARCHER
from merge.methods.linear import LINEAR, PASSTHROUGH
from merge.methods.pairwise import ARCEE_FUSION, NEARSWAP
from merge.methods.ram import RAM, RAMPLUS_TL
from merge.methods.slerp import SLERP
from merge.methods.spherical import MULTISLERP, NUSLERP
from merge.methods.task_family import (
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DARE_LINEAR,
    DARE_TIES,
    DELLA,
    DELLA_LINEAR,
    TASK_ARITHMETIC,
    TIES,
)

__all__ = [
    "METHODS",
    "UnknownMethodError",
    "get_method",
    "method_names",
    "register",
    "suggest",
    "unregister",
]

METHODS: dict[str, Method] = {}


class UnknownMethodError(KeyError):
    """No method of that name is registered. ``str()`` is the plain message (no quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` under ``method.name``; refuse to shadow an existing one unless ``replace``."""
    if method.name in METHODS and not replace:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove and return the method called ``name``."""
    if name not in METHODS:
        raise UnknownMethodError(_unknown(name))
    return METHODS.pop(name)


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def suggest(name: str) -> str | None:
    """The registered name closest to ``name`` (difflib), or ``None`` if nothing is close."""
    matches = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.6)
    return matches[0] if matches else None


def get_method(name: str) -> Method:
    """The method called ``name``; ``UnknownMethodError`` (a ``KeyError``) if there is none."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(_unknown(name)) from None


def _unknown(name: str) -> str:
    close = suggest(name)
    hint = f" (did you mean {close!r}?)" if close else ""
    return f"unknown merge method {name!r}{hint}; valid methods: {', '.join(method_names())}"


for _builtin in (LINEAR, PASSTHROUGH, SLERP, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES):
    register(_builtin)
for _builtin in (BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR):
    register(_builtin)
for _builtin in (NUSLERP, MULTISLERP, KARCHER, MODEL_STOCK, SCE, RAM, RAMPLUS_TL):
    register(_builtin)
for _builtin in (NEARSWAP, ARCEE_FUSION):
    register(_builtin)
