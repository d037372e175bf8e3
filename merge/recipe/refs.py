"""Model references as recipes write them: the text form, or mergekit's mapping form.

mergekit accepts a model reference as text (``org/name@rev+org/adapter@rev``) or as a mapping
with the same parts spelt out::

    model:
      model: {path: org/name, revision: main}   # or just  model: org/name@main
      lora: {path: org/adapter, revision: v2}    # optional; or  lora: org/adapter@v2

``ref_text`` turns either form into the text form, which the rest of the project uses as the
model's key (``merge.sources.ModelRef.parse`` reads it). A mapping whose parts cannot be
written as text (a path containing ``@`` or ``+``) and mergekit's ``override_architecture``
are refused with a one-line reason.

What it does not do: check that the model exists (``merge.sources``).
"""

from __future__ import annotations

from typing import Any

REF_KEYS = ("model", "lora", "override_architecture")
PATH_KEYS = ("path", "revision")


def is_ref_mapping(value: Any) -> bool:
    """True for mergekit's mapping form of a model reference (a mapping with ``model``)."""
    return isinstance(value, dict) and "model" in value and "kind" not in value


def ref_text(value: Any) -> Any:
    """The text form of a model reference given as text or as mergekit's mapping; other
    values are returned unchanged for the schema to reject. ValueError (one line) for a
    mapping that is malformed or uses what is not supported."""
    if not isinstance(value, dict):
        return value
    unknown = [str(k) for k in value if k not in REF_KEYS]
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in a model reference mapping "
            f"(allowed: {', '.join(REF_KEYS)})"
        )
    if "override_architecture" in value:
        raise ValueError(
            "override_architecture (mergekit's per-model architecture override) is not "
            "supported yet; remove it (the architecture is read from each model's config.json)"
        )
    if "model" not in value:
        raise ValueError("a model reference mapping needs 'model' (and optionally 'lora')")
    text = _part(value["model"], "model")
    if value.get("lora") is not None:
        text += "+" + _part(value["lora"], "lora")
    return text


def _part(value: Any, key: str) -> str:
    """``path[@revision]`` from a string or a ``{path, revision}`` mapping."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be a model path or {{path, revision}}, got {value!r}")
    unknown = [str(k) for k in value if k not in PATH_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in '{key}' (allowed: path, revision)")
    path, revision = value.get("path"), value.get("revision")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"'{key}' needs a path (a string), got {path!r}")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"'{key}.revision' must be a branch, tag or commit, got {revision!r}")
    for char in "@+":
        if char in path:
            raise ValueError(
                f"'{key}.path' {path!r} contains {char!r}, which model references use to mark "
                "revisions and adapters; rename or link the folder"
            )
    return path if revision is None else f"{path}@{revision}"
