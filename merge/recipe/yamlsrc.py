"""YAML loading that remembers where every value came from.

``load_yaml(path)`` returns the plain Python data (as ``yaml.safe_load`` would) together with a
``Locator`` that maps a recipe path such as ``("models", 1, "parameters", "density")`` to its
line in the file. Duplicate keys are an error here, because PyYAML silently keeps the last one.
A file of several documents (``---`` between them: a multi-stage recipe, ``merge.build.stages``)
is read by ``parse_documents``, one ``Document`` each, with the file's line numbers, so every
message about a stage names its line in the file. ``parse_yaml`` reads one recipe and says so
when a second document follows. It does not validate anything else: that is the schema's job.

The work is bounded before anything is built from the text (``check_bounds``): a file of at
most ``MAX_FILE_BYTES``, a string of at most ``MAX_STRING_CHARS``, nesting at most ``MAX_DEPTH``
levels deep, and at most ``MAX_VALUES`` values once every alias is expanded. Aliases are
counted, not expanded (an alias is the node it names, so its size is memoised), so a "billion
laughs" recipe is refused in milliseconds at the line whose aliases pass the bound. Flow
brackets (``[[[...``) are counted on the raw text first (``_too_deep``): PyYAML's scanner takes
time quadratic in the flow nesting, so 10,000 levels would take half a minute to reach the
composer's own bound.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge.errors import RecipeError

PathKey = tuple[str | int, ...]

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_STRING_CHARS = 1024 * 1024
MAX_DEPTH = 100
MAX_VALUES = 100_000
# Raw bracket depth past which the text is refused before PyYAML scans it (a loose count:
# brackets in quotes and comments count too, so it is far above MAX_DEPTH).
_SCAN_DEPTH = 10 * MAX_DEPTH
_BRACKETS = re.compile(r"[\[\]{}]")


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


def _measure(
    node: yaml.Node, path: PathKey, depth: int, line: int, file: str, sizes: dict[int, int]
) -> int:
    """The number of values ``node`` expands to (aliases counted as copies, each node's size
    computed once); RecipeError at ``line`` (where ``node`` is written) past a bound."""
    if id(node) in sizes:
        return sizes[id(node)]
    if depth > MAX_DEPTH:
        raise RecipeError(
            f"{file}:{line}: {format_path(path[:4])}...: nested more than {MAX_DEPTH} levels deep"
        )
    total = 1
    if isinstance(node, yaml.ScalarNode):
        if len(node.value) > MAX_STRING_CHARS:
            raise RecipeError(
                f"{file}:{line}: {format_path(path)}: a value of {len(node.value):,} characters "
                f"(at most {MAX_STRING_CHARS:,})"
            )
    else:
        children: list[tuple[str | int, yaml.Node, int]] = []
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                at = key_node.start_mark.line + 1
                total += _measure(key_node, path, depth + 1, at, file, sizes)
                children.append((str(getattr(key_node, "value", "?")), value_node, at))
        elif isinstance(node, yaml.SequenceNode):
            children = [(i, item, line) for i, item in enumerate(node.value)]
        for key, child, at in children:
            total += _measure(child, path + (key,), depth + 1, at, file, sizes)
            if total > MAX_VALUES:
                raise RecipeError(
                    f"{file}:{at}: {format_path(path + (key,))}: the recipe expands to more "
                    f"than {MAX_VALUES:,} values (each alias counts as a copy of what it names)"
                )
    sizes[id(node)] = total
    return total


def check_bounds(node: yaml.Node, file: str) -> None:
    """RecipeError when a composed document is nested too deep, holds too long a string or
    expands (aliases included) to too many values; see the module's bounds."""
    _measure(node, (), 0, node.start_mark.line + 1, file, {})


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


@dataclass(frozen=True)
class Document:
    """One YAML document of a file: its data, a Locator with the file's line numbers, its own
    text (the file's lines from its ``---`` to the next one), the line where that text starts
    and the line of its first value (1-based)."""

    data: Any
    loc: Locator
    text: str
    start: int
    line: int


def _starts(text: str) -> list[int]:
    """The 0-based line where each document's text begins: 0 for the first, then the line of
    each later document's start (its ``---``)."""
    starts = [
        event.start_mark.line
        for event in yaml.parse(text, Loader=yaml.SafeLoader)
        if isinstance(event, yaml.DocumentStartEvent) and event.start_mark is not None
    ]
    return [0, *starts[1:]] if starts else []


def _yaml_error(e: yaml.YAMLError, file: str) -> RecipeError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        return RecipeError(f"{file}{line}: not valid YAML: {what}")
    return RecipeError(f"{file}: not valid YAML: {e}")


def _too_deep(text: str) -> bool:
    """Whether the text's flow brackets nest more than ``_SCAN_DEPTH`` deep (linear time)."""
    if text.count("[") + text.count("{") <= _SCAN_DEPTH:
        return False
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        if depth > _SCAN_DEPTH:
            return True
    return False


def parse_documents(text: str, file: str) -> list[Document]:
    """Every document of YAML text that holds something (an empty one, or one of comments
    only, is left out); RecipeError with the file and line on a syntax error or duplicate key."""
    if _too_deep(text):
        raise RecipeError(f"{file}: nested more than {MAX_DEPTH} levels deep")
    try:
        starts = _starts(text)
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        for node in nodes:
            if node is not None:
                check_bounds(node, file)
        datas = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    except RecursionError:
        raise RecipeError(f"{file}: nested more than {MAX_DEPTH} levels deep") from None
    lines = text.splitlines(keepends=True)
    bounds = [*starts, len(lines)]
    docs: list[Document] = []
    problems: list[str] = []
    for i, (node, data) in enumerate(zip(nodes, datas, strict=True)):
        if data is None:
            continue
        loc = Locator(file)
        _walk(node, (), loc, problems)
        own = "".join(lines[bounds[i] : bounds[i + 1]])
        docs.append(Document(data, loc, own, bounds[i] + 1, node.start_mark.line + 1))
    if problems:
        raise RecipeError(problems)
    return docs


def parse_yaml(text: str, file: str) -> tuple[Any, Locator]:
    """Parse one recipe's YAML text; raise RecipeError with the file and line on a syntax
    error, and on a second document (a multi-stage recipe: ``merge.build.stages``)."""
    docs = parse_documents(text, file)
    if len(docs) > 1:
        raise RecipeError(
            f"{file}:{docs[1].start}: a second YAML document: this is a multi-stage recipe "
            f"(mergekit-multi, one stage per document); load it with merge.build.stages"
        )
    if not docs:
        return None, Locator(file)
    return docs[0].data, docs[0].loc


def read_text(path: Path) -> str:
    """A recipe file's text; RecipeError when it cannot be read."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES and path.is_file():
            raise RecipeError(
                f"{path}: a recipe of {size:,} bytes (at most {MAX_FILE_BYTES:,}); "
                f"is this the right file?"
            )
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a directory, expected a recipe file (.yaml)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None


def load_yaml(path: Path) -> tuple[Any, Locator, str]:
    """Read and parse a recipe file: (data, locator, original text)."""
    text = read_text(path)
    data, loc = parse_yaml(text, str(path))
    return data, loc, text
