"""Helpers shared by the method and end-to-end tests: run a recipe dict, load states, fill a
method's parameters. No assertions about merge behaviour live here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from merge import api
from merge.methods import REQUIRED, get_method
from tiny import load_state


def run_recipe(tmp_path: Path, recipe: dict[str, Any], name: str = "out", **kwargs: Any) -> Path:
    """Write ``recipe`` to ``tmp_path/name.yaml`` and merge it into ``tmp_path/name``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return api.run(path, tmp_path / name, progress=False, **kwargs)


def states(*dirs: Path, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """Each checkpoint's tensors, converted to ``dtype``."""
    return [{k: v.to(dtype) for k, v in load_state(d).items()} for d in dirs]


def fill(name: str, n: int, **given: Any) -> dict[str, Any]:
    """Every declared param of method ``name``: defaults, then ``given``; per-model scalars are
    broadcast to ``n`` models."""
    params: dict[str, Any] = {}
    for p in get_method(name).params:
        value = given.get(p.name, p.default)
        assert value is not REQUIRED, f"test forgot {p.name}"
        if p.per_model and not isinstance(value, list):
            value = [value] * n
        params[p.name] = value
    return params


def cpu_and_device_bytes(path: Path, tmp_path: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The shard bytes of recipe ``path`` executed on the CPU (one thread) and through the
    device path on the simulated device of ``merge.device`` (three threads, 1 MB of VRAM)."""
    from test_parallel import shard_bytes

    from merge.execute import execute
    from merge.resources import Resources

    outs = []
    for dev, threads in ((None, 1), (torch.device("cpu"), 3)):
        out = tmp_path / f"out-{dev}"
        out.mkdir()
        with api.planned(path) as p:
            execute(p, out, progress=False, resources=Resources(threads, 10**9, dev, vram=10**6))
        outs.append(shard_bytes(out))
    return outs[0], outs[1]
