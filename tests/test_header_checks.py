"""Safetensors headers are checked as strictly as the safetensors library does (integral
offsets, no overlap, every data byte in a tensor, ``__metadata__`` a str -> str mapping), by
``merge validate`` as by ``merge run``; and a config that disagrees with its tensors (layer
count, ``vocab_size``) is a plan error."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from merge.cli import app

runner = CliRunner()


def _rewrite(f: Path, change: Callable[[dict[str, Any]], None], extra: bytes = b"") -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :] + extra)


def _first_two(header: dict[str, Any]) -> tuple[str, str]:
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return names[0], names[1]


def _float_offsets(h: dict[str, Any]) -> None:
    a, _ = _first_two(h)
    h[a]["data_offsets"] = [float(o) for o in h[a]["data_offsets"]]


def _overlap(h: dict[str, Any]) -> None:
    a, b = _first_two(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"] = list(h[a]["shape"])


def _metadata(h: dict[str, Any]) -> None:
    h["__metadata__"] = {"format": 1}


def _nothing(h: dict[str, Any]) -> None:
    pass


@pytest.mark.parametrize(
    "change, extra, problem",
    [
        (
            _float_offsets,
            b"",
            "tensor '{a}' has shape {shape} and offsets [{begin}.0, {end}.0]: "
            "they must be integers",
        ),
        (_overlap, b"", "tensors '{a}' and '{b}' overlap at bytes [{begin}, {end}] of the data"),
        (_nothing, bytes(8), "data bytes [{size}, {size8}] belong to no tensor"),
        (_metadata, b"", "'__metadata__' must map strings to strings"),
    ],
    ids=["float-offsets", "overlap", "uncovered-bytes", "metadata"],
)
def test_corrupt_header_fails_validate_and_run(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, change: Any, extra: bytes, problem: str
) -> None:
    donor = Path(shutil.copytree(llama_base, tmp_path / "donor"))
    f = donor / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    a, b = _first_two(header)
    begin, end = header[a]["data_offsets"]
    size = len(raw) - 8 - n
    _rewrite(f, change, extra)
    recipe = tmp_path / "recipe.yaml"
    models = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (donor, llama_ft1)]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    detail = problem.format(
        a=a, b=b, begin=begin, end=end, shape=header[a]["shape"], size=size, size8=size + 8
    )
    expected = (
        f"error: {recipe}:3: models[0].model: model '{donor}' ({f}): corrupt header: {detail}"
    )
    out = tmp_path / "out"
    for args in (["validate", str(recipe)], ["run", str(recipe), str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.strip() == expected
        assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    "key, value, detail",
    [
        ("num_hidden_layers", 3, "have 4 layers"),
        ("vocab_size", 50, "have {rows} rows in 'model.embed_tokens.weight'"),
    ],
)
def test_donor_config_disagreeing_with_its_tensors_is_a_plan_error(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, key: str, value: int, detail: str
) -> None:
    donor = Path(shutil.copytree(llama_base, tmp_path / "donor"))
    config = json.loads((donor / "config.json").read_text())
    said, config[key] = config[key], value
    (donor / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "recipe.yaml"
    models = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (donor, llama_ft1)]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    expected = (
        f"error: {recipe}: model '{donor}': config.json has {key}: {value} but its tensors "
        + detail.format(rows=said)
    )
    out = tmp_path / "out"
    for args in (["validate", str(recipe)], ["run", str(recipe), str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.strip() == expected
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
