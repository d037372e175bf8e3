"""One error path: every failure is one escaped line, exit 2 (exit 1 for a bug), nothing left.

OS errors the library does not name itself are mapped to a line with the path and the next
step; deep nesting, odd header numbers and unreadable tokenizer files are found before any
tensor is computed; an output that no rename can produce (the current directory, a mount
point, a path through a file, a name too long) is refused up front.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merge.cli import app
from merge.clihelp import escape_control

runner = CliRunner()


def recipe_for(tmp_path: Path, model: Path | str, **extra: object) -> Path:
    recipe = {
        "merge_method": "linear",
        **extra,
        "models": [{"model": str(model), "parameters": {"weight": 1.0}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_fails(*args: str | Path, code: int = 2, out: Path | None = None) -> str:
    """Run the command; assert ``code``, no traceback, one ``error:`` line, and (given the
    output) no output and no temporary sibling. Returns the line without ``error: ``."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0].removeprefix("error: ")


def copy_model(src: Path, tmp_path: Path, name: str = "model") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --- messages ----------------------------------------------------------------------------


def test_escape_control_keeps_tab_and_text() -> None:
    assert escape_control("a\tb") == "a\tb"
    assert escape_control("x\ny\rz\x1b[31m\x7f\x85é") == "x\\ny\\rz\\x1b[31m\\x7f\\x85é"


def test_newline_in_a_model_name_cannot_forge_an_error_line(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path, "./gone\nerror: forged\x1b[2J")
    line = run_fails("run", recipe, tmp_path / "out", out=tmp_path / "out")
    assert "\\nerror: forged\\x1b[2J" in line


# --- bugs ----------------------------------------------------------------------------------


def test_a_bug_is_internal_error_exit_1(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr("merge.api.execute", boom)
    out = tmp_path / "out"
    line = run_fails("run", recipe_for(tmp_path, llama_base), out, code=1, out=out)
    assert line == (
        "internal error, please report it: ValueError: boom (set MERGE_DEBUG=1 for the traceback)"
    )
    monkeypatch.setenv("MERGE_DEBUG", "1")
    result = runner.invoke(app, ["run", str(recipe_for(tmp_path, llama_base)), str(out)])
    assert isinstance(result.exception, ValueError) and not out.exists()


# --- the disk ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "step"),
    [
        (errno.ENOSPC, "no space left on the device; free some space or choose another output"),
        (errno.EROFS, "read-only file system; choose an output on a writable file system"),
    ],
)
def test_disk_full_or_read_only_during_the_write(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch, number: int, step: str
) -> None:
    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        if offset > 0:  # the header goes in; the first tensor does not
            raise OSError(number, os.strerror(number))
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out"
    line = run_fails("run", recipe_for(tmp_path, llama_base), out, out=out)
    assert line == f"'{out / 'model.safetensors'}': {step}"


def test_output_directory_not_writable(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()

    def denied(path: Path) -> None:  # what a mode 555 parent does to a non-root user
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr("merge.outdir._mkdir", denied)
    out = parent / "out"
    line = run_fails("run", recipe_for(tmp_path, llama_base), out, out=out)
    assert line == f"'{parent}': permission denied; check its permissions or choose another path"


# --- where the output goes ---------------------------------------------------------------


def test_output_is_the_current_directory_or_above(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = recipe_for(tmp_path, llama_base)
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    line = run_fails("run", recipe, ".", "--overwrite")
    assert line == "output '.' is the current directory; choose a new directory, e.g. './merged'"
    line = run_fails("run", recipe, "..", "--overwrite")
    assert line == (
        "output '..' is above the current directory; choose a new directory, e.g. '../merged'"
    )
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["sub"]
    assert list(work.iterdir()) == []


def test_output_is_a_mount_point(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mnt"
    out.mkdir()
    monkeypatch.setattr("merge.outdir.os.path.ismount", lambda p: Path(p) == out)
    line = run_fails("run", recipe_for(tmp_path, llama_base), out, "--overwrite")
    assert line == f"output '{out}' is a mount point; choose a directory inside it"
    assert list(out.iterdir()) == []


def test_output_through_a_file(tmp_path: Path, llama_base: Path) -> None:
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "out"
    line = run_fails("run", recipe_for(tmp_path, llama_base), out)
    assert line == (
        f"output '{out}': '{tmp_path / 'afile'}' is a file, not a directory; choose another path"
    )


@pytest.mark.parametrize(("length", "limit", "below"), [(300, 241, False), (300, 255, True)])
def test_output_name_too_long(
    tmp_path: Path, llama_base: Path, length: int, limit: int, below: bool
) -> None:
    out = tmp_path / ("a" * length)
    if below:
        out = out / "x"
    line = run_fails("run", recipe_for(tmp_path, llama_base), out)
    assert line == (
        f"output name '{'a' * 20}...' ({length} bytes) is too long: at most {limit} bytes "
        "here; choose a shorter name"
    )


def test_output_name_fits_with_its_temporary_sibling(tmp_path: Path, llama_base: Path) -> None:
    out = tmp_path / ("b" * 241)
    result = runner.invoke(app, ["run", str(recipe_for(tmp_path, llama_base)), str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file()


# --- inputs nested too deeply, odd header numbers ----------------------------------------

DEEP = 10_000


def test_deeply_nested_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("merge_method: linear\nmodels: " + "[" * DEEP + "]" * DEEP + "\n")
    line = run_fails("validate", recipe)
    assert line == f"{recipe}: nested more than 100 levels deep"


def _write_safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_deeply_nested_safetensors_header(tmp_path: Path, llama_base: Path) -> None:
    model = copy_model(llama_base, tmp_path)
    _write_safetensors(model / "model.safetensors", b"[" * DEEP + b"]" * DEEP)
    recipe = recipe_for(tmp_path, model)
    line = run_fails("plan", recipe)
    assert line == (
        f"{recipe}:3: models[0].model: model '{model}' ({model / 'model.safetensors'}): "
        "corrupt header: JSON nested too deeply"
    )


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json(tmp_path: Path, llama_base: Path, name: str) -> None:
    model = copy_model(llama_base, tmp_path)
    if name.endswith("index.json"):  # a sharded model: the index is read
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / name).write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")
    recipe = recipe_for(tmp_path, model)
    line = run_fails("plan", recipe)
    assert line == (
        f"{recipe}:3: models[0].model: model '{model}' ({model / name}): "
        "invalid JSON: nested too deeply"
    )


@pytest.mark.parametrize(
    ("offset", "shown"),
    [("Infinity", "inf"), ("NaN", "nan"), ("1e3", "1000.0"), ("true", "True"), ('"8"', "8")],
)
def test_non_integer_data_offsets(
    tmp_path: Path, llama_base: Path, offset: str, shown: str
) -> None:
    model = copy_model(llama_base, tmp_path)
    file = model / "model.safetensors"
    text = f'{{"w": {{"dtype": "F32", "shape": [2], "data_offsets": [0, {offset}]}}}}'
    _write_safetensors(file, text.encode(), b"\0" * 8)
    recipe = recipe_for(tmp_path, model)
    line = run_fails("plan", recipe)
    assert line == (
        f"{recipe}:3: models[0].model: model '{model}' ({file}): corrupt header: tensor 'w' "
        f"has shape [2] and offsets [0, {shown}]: they must be integers"
    )


# --- tokenizer files: found before any tensor --------------------------------------------


def test_chat_template_not_utf8(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy_model(llama_base, tmp_path)
    (model / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    monkeypatch.setattr("merge.api.execute", _no_compute)
    out = tmp_path / "out"
    line = run_fails("run", recipe_for(tmp_path, model, chat_template="auto"), out, out=out)
    assert line == (
        f"{model / 'chat_template.jinja'}: not UTF-8 text (byte 0); fix or remove the chat template"
    )


def test_broken_donor_tokenizer_config_with_a_chat_template(
    tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = copy_model(llama_base, tmp_path)
    (model / "tokenizer_config.json").write_text('{"chat_template": "x",\n')
    monkeypatch.setattr("merge.api.execute", _no_compute)
    out = tmp_path / "out"
    line = run_fails("run", recipe_for(tmp_path, model, chat_template="chatml"), out, out=out)
    assert line == (
        f"{model / 'tokenizer_config.json'}: invalid JSON at line 2: "
        "Expecting property name enclosed in double quotes"
    )


def _no_compute(*args: object, **kwargs: object) -> None:
    raise AssertionError("a tensor was computed before the tokenizer files were checked")


def test_valid_tokenizer_config_still_gets_the_template(tmp_path: Path, llama_base: Path) -> None:
    out = tmp_path / "out"
    recipe = recipe_for(tmp_path, llama_base, chat_template="chatml")
    result = runner.invoke(app, ["run", str(recipe), str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "im_start" in cfg["chat_template"]
