"""YAML loading that remembers where every value came from.

``load_yaml(path)`` returns the plain Python data (as ``yaml.safe_load`` would) together with a
``Locator`` that maps a recipe path such as ``("models", 1, "parameters", "density")`` to its
line in the file. Duplicate keys are an error here, because PyYAML silently keeps the last one.
It does not validate anything else: that is the schema's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge.errors import RecipeError

PathKey = tuple[str | int, ...]


def format_path(path: Sequence[str | int]) -> str:
    """``("models", 1, "parameters", "density")`` -> ``models[1].parameters.density``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


@dataclass
class Locator:
    """Line numbers of a YAML document, addressed by recipe path."""

    file: str
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line(self, path: Sequence[str | int]) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), None)

    def where(self, path: Sequence[str | int]) -> str:
        """``recipe.yaml:14: models[1].parameters.density`` (the prefix of an error line)."""
        line = self.line(path)
        loc = f"{self.file}:{line}" if line else self.file
        return f"{loc}: {format_path(path)}" if path else loc

    def error(self, path: Sequence[str | int], message: str) -> str:
        return f"{self.where(path)}: {message}"


def _walk(node: yaml.Node, path: PathKey, loc: Locator, problems: list[str]) -> None:
    loc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    f"{loc.file}:{line}: {format_path(path + (key,))}: "
                    f"duplicate key (first given on line {seen[key]})"
                )
                continue
            seen[key] = line
            loc.lines[path + (key,)] = line
            _walk(value_node, path + (key,), loc, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), loc, problems)


def _single_document(text: str, file: str) -> None:
    """Several YAML documents (``---`` between them) are a mergekit-multi recipe: one stage
    per document. Say so, naming the line where the second document starts."""
    starts = [
        event.start_mark.line + 1 if event.start_mark else 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader)
        if isinstance(event, yaml.DocumentStartEvent)
    ]
    if len(starts) > 1:
        raise RecipeError(
            f"{file}:{starts[1]}: a second YAML document: multi-stage recipes (mergekit-multi, "
            f"one stage per document) are not supported yet; run each stage as its own recipe"
        )


def parse_yaml(text: str, file: str) -> tuple[Any, Locator]:
    """Parse YAML text; raise RecipeError with the file and line on a syntax error."""
    loc = Locator(file)
    try:
        _single_document(text, file)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise RecipeError(f"{file}{line}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{file}: not valid YAML: {e}") from None
    problems: list[str] = []
    if node is not None:
        _walk(node, (), loc, problems)
    if problems:
        raise RecipeError(problems)
    return data, loc


def load_yaml(path: Path) -> tuple[Any, Locator, str]:
    """Read and parse a recipe file: (data, locator, original text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory, expected a recipe file (.yaml)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    data, loc = parse_yaml(text, str(path))
    return data, loc, text
