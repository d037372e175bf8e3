"""Merge methods: pure tensor functions with declared parameters, looked up by name.

    from merge.methods import get_method
    method = get_method("ties")
    out = method.fn(tensors, base, params, rng)

See ``base.py`` for the call convention and ``registry.py`` for registration.
"""

from merge.methods.base import REQUIRED, Method, Param
from merge.methods.registry import (
    METHODS,
    UnknownMethodError,
    get_method,
    method_names,
    register,
    suggest,
    unregister,
)

__all__ = [
    "METHODS",
    "REQUIRED",
    "Method",
    "Param",
    "UnknownMethodError",
    "get_method",
    "method_names",
    "register",
    "suggest",
    "unregister",
]
