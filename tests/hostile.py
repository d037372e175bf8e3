"""The hostile corpus (``tests/data/hostile/``): reading its cases and building its inputs.

A recipe case is a YAML file whose leading comment lines say what must happen
(``# expect-exit:``, ``# expect-error:``, ``# expect-warning:``, ``# command:``, ``# args:``,
``# cwd:``, ``# out:``); a checkpoint case is a YAML spec naming a good tiny checkpoint, the
mutations that corrupt a copy of it, and the same expectations. ``tests/data/hostile/README.md``
describes both formats. Placeholders (``@base``, ``@ckpt``, ``@tmp``, ``@repeat(c,n)``...)
are replaced at test time, so big or path-dependent inputs are never committed.

What this does not do: run the CLI or assert anything (``test_hostile.py`` does), or touch
anything outside the temporary folder it is given.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CORPUS = Path(__file__).resolve().parent / "data" / "hostile"
COMMANDS = ("validate", "plan", "run")
_REPEAT = re.compile(r"@repeat\((.+?),(\d+)\)")
_RAW = "\x00raw\x00"


@dataclass
class Case:
    """What a corpus case expects: the command, its arguments, the exit code, the lines."""

    name: str
    command: str = "validate"
    args: list[str] = field(default_factory=list)
    exit: int = 2
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    cwd: str | None = None
    out: str = "@out"
    xfail: str | None = None
    must_not_exist: list[str] = field(default_factory=list)


def read_recipe_case(path: Path) -> tuple[Case, str]:
    """The expectations in the leading ``# key: value`` lines of a recipe, and its text."""
    text = path.read_text(encoding="utf-8")
    case = Case(path.stem)
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        _apply(case, key.strip(), value.strip())
    return case, text


def _apply(case: Case, key: str, value: str) -> None:
    if key == "expect-exit":
        case.exit = int(value)
    elif key == "expect-error":
        case.error = value
    elif key == "expect-warning":
        case.warnings.append(value)
    elif key == "command":
        assert value in COMMANDS, value
        case.command = value
    elif key == "args":
        case.args = shlex.split(value)
    elif key == "cwd":
        case.cwd = value
    elif key == "out":
        case.out = value
    elif key == "xfail":
        case.xfail = value


def read_checkpoint_case(path: Path) -> tuple[Case, dict[str, Any]]:
    """The expectations and the mutation spec of a checkpoint case."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    case = Case(path.stem, command=spec.get("command", "validate"))
    case.exit = spec.get("expect-exit", 2)
    case.error = spec.get("expect-error")
    case.warnings = list(spec.get("expect-warnings", []))
    case.args = [str(a) for a in spec.get("args", [])]
    case.xfail = spec.get("xfail")
    case.must_not_exist = list(spec.get("must-not-exist", []))
    return case, spec


def substitute(text: str, places: dict[str, Path | str]) -> str:
    """``@repeat(c,n)`` -> ``c`` n times, then each ``@name`` -> its path (longest first)."""
    text = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    for name in sorted(places, key=len, reverse=True):
        text = text.replace(f"@{name}", str(places[name]))
    return text


# --- checkpoint mutations -------------------------------------------------------------------


def corrupt(src: Path, dst: Path, mutations: list[dict[str, Any]], tmp: Path) -> Path:
    """Copy the good checkpoint ``src`` to ``dst`` and apply each mutation in order."""
    shutil.copytree(src, dst, symlinks=True)
    for mutation in mutations:
        ((op, arg),) = mutation.items()
        _OPS[op](dst, arg, tmp)
    return dst


def _split(raw: bytes) -> tuple[int, dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _tensor_name(header: dict[str, Any], which: str) -> str:
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    if which.startswith("@"):
        return names[{"@first": 0, "@second": 1, "@last": -1}[which]]
    return which


def _header_set(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Set one field of a tensor entry (or the whole entry, or ``__metadata__``) to raw JSON
    text, so that values JSON allows but Python would not write (``Infinity``) can be set."""
    file = model / arg.get("file", "model.safetensors")
    _, header, data = _split(file.read_bytes())
    target = arg.get("tensor", "@first")
    key = "__metadata__" if target == "__metadata__" else _tensor_name(header, target)
    if "field" in arg:
        header[key][arg["field"]] = _RAW
    else:
        header[key] = _RAW
    text = json.dumps(header).replace(json.dumps(_RAW), substitute(arg["json"], {}))
    _write_st(file, text.encode(), data)


def _header_raw(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Replace the header text (keeping the data), or the length prefix, or both."""
    file = model / arg.get("file", "model.safetensors")
    n, _, data = _split(file.read_bytes())
    if "hex" in arg:
        text = bytes.fromhex(arg["hex"])
    elif "text" in arg:
        text = substitute(arg["text"], {}).encode()
    else:
        text = file.read_bytes()[8 : 8 + n]
    length = arg.get("length", len(text))
    file.write_bytes(struct.pack("<Q", length) + text + data)


def _header_copy(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Give tensor ``to`` the ``fields`` of tensor ``from`` (two tensors on the same bytes)."""
    file = model / "model.safetensors"
    _, header, data = _split(file.read_bytes())
    src, dst = _tensor_name(header, arg["from"]), _tensor_name(header, arg["to"])
    for name in arg["fields"]:
        header[dst][name] = header[src][name]
    _write_st(file, json.dumps(header).encode(), data)


def _header_shift(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Move a tensor's data offsets by ``by`` bytes (past the end of the data, say)."""
    file = model / "model.safetensors"
    _, header, data = _split(file.read_bytes())
    entry = header[_tensor_name(header, arg.get("tensor", "@last"))]
    entry["data_offsets"] = [o + arg["by"] for o in entry["data_offsets"]]
    _write_st(file, json.dumps(header).encode(), data)


def _header_duplicate(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Write a tensor's entry twice in the header text (JSON allows duplicate keys)."""
    file = model / "model.safetensors"
    _, header, data = _split(file.read_bytes())
    first, second = _tensor_name(header, "@first"), _tensor_name(header, "@second")
    text = json.dumps(header)
    entry = json.dumps({first: header[second]})[1:-1]
    _write_st(file, (text[:-1] + ", " + entry + "}").encode(), data)


def _header_add(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Add tensor ``name``: a copy of tensor ``like``'s dtype, shape and bytes, appended."""
    file = model / "model.safetensors"
    _, header, data = _split(file.read_bytes())
    like = header[_tensor_name(header, arg.get("like", "@first"))]
    begin, end = like["data_offsets"]
    header[arg["name"]] = {**like, "data_offsets": [len(data), len(data) + end - begin]}
    _write_st(file, json.dumps(header).encode(), data + data[begin:end])


def _write_st(file: Path, text: bytes, data: bytes) -> None:
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _truncate(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    file = model / arg["file"]
    raw = file.read_bytes()
    size = arg["size"] if arg["size"] >= 0 else len(raw) + arg["size"]
    file.write_bytes(raw[:size])


def _append(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    file = model / arg["file"]
    file.write_bytes(file.read_bytes() + bytes(arg["bytes"]))


def _write(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    file = model / arg["file"]
    if "hex" in arg:
        file.write_bytes(bytes.fromhex(arg["hex"]))
    else:
        file.write_text(substitute(arg["text"], {}), encoding="utf-8")


def _json_set(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Set a top-level key of a JSON file (``json``: raw JSON text of the value)."""
    file = model / arg["file"]
    doc = json.loads(file.read_text())
    doc[arg["key"]] = _RAW
    file.write_text(json.dumps(doc, indent=2).replace(json.dumps(_RAW), arg["json"]))


def _index_set(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Point one tensor of ``model.safetensors.index.json``'s weight map at another shard."""
    file = model / "model.safetensors.index.json"
    doc = json.loads(file.read_text())
    weight_map = doc["weight_map"]
    name = arg.get("tensor") or sorted(weight_map)[0]
    if arg.get("shard") is None:
        del weight_map[name]
    else:
        weight_map[name] = arg["shard"]
    file.write_text(json.dumps(doc, indent=2))


def _delete(model: Path, arg: str, tmp: Path) -> None:
    (model / arg).unlink()


def _rename(model: Path, arg: dict[str, str], tmp: Path) -> None:
    (model / arg["file"]).rename(model / arg["to"])


def _symlink_outside(model: Path, arg: str, tmp: Path) -> None:
    secret = tmp / "outside" / "secret.json"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text('{"secret": "root:x:0:0"}\n')
    link = model / arg
    link.unlink(missing_ok=True)
    link.symlink_to(secret)


def _tensor_fill(model: Path, arg: dict[str, Any], tmp: Path) -> None:
    """Overwrite the first ``count`` float32 values of a tensor's data with ``value``."""
    file = model / arg.get("file", "model.safetensors")
    raw = bytearray(file.read_bytes())
    n, header, _ = _split(bytes(raw))
    entry = header[_tensor_name(header, arg["tensor"])]
    begin = 8 + n + entry["data_offsets"][0]
    count = arg.get("count", 1)
    raw[begin : begin + 4 * count] = struct.pack(f"<{count}f", *[float(arg["value"])] * count)
    file.write_bytes(bytes(raw))


_OPS = {
    "header_set": _header_set,
    "header_raw": _header_raw,
    "header_duplicate": _header_duplicate,
    "header_copy": _header_copy,
    "header_shift": _header_shift,
    "header_add": _header_add,
    "truncate": _truncate,
    "append": _append,
    "write": _write,
    "json_set": _json_set,
    "index_set": _index_set,
    "delete": _delete,
    "rename": _rename,
    "symlink_outside": _symlink_outside,
    "tensor_fill": _tensor_fill,
}
