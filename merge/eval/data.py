"""Reading the built-in tasks' files: documents of a text file, records of a JSONL file.

A text file holds documents separated by blank lines (a file without blank lines is one
document). A JSONL file holds one JSON object a line (blank lines skipped); a line that is not
an object, or lacks a field a task needs, is an ``EvalError`` naming ``file:line``.

What it does not do: tokenize, or know what the fields mean (``merge.eval.tasks`` does).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.errors import EvalError


@dataclass(frozen=True)
class Record:
    """One JSONL line: its object and where it is (``file:line``) for messages."""

    data: dict[str, Any]
    where: str

    def text(self, key: str) -> str:
        """The string field ``key``; an EvalError naming the line when it is missing."""
        value = self.data.get(key)
        if not isinstance(value, str):
            got = "missing" if key not in self.data else f"a {type(value).__name__}"
            raise EvalError(f"{self.where}: field '{key}' must be a string, got {got}")
        return value


def read_text(path: Path) -> str:
    """The file's text; EvalError when it is missing or unreadable."""
    if not path.is_file():
        raise EvalError(f"{path}: task file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read: {e}") from None


def read_jsonl(path: Path) -> list[Record]:
    """Every non-blank line of ``path`` as a Record; EvalError at the first bad line."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(data).__name__}")
        records.append(Record(data, where))
    if not records:
        raise EvalError(f"{path}: no records")
    return records


def read_documents(path: Path) -> list[str]:
    """The documents of a perplexity file: a JSONL file's ``text`` fields, else the text
    file's blank-line-separated parts."""
    if path.suffix == ".jsonl":
        return [r.text("text") for r in read_jsonl(path)]
    parts = [p.strip("\n") for p in re.split(r"\n\s*\n", read_text(path))]
    documents = [p for p in parts if p.strip()]
    if not documents:
        raise EvalError(f"{path}: no text")
    return documents
