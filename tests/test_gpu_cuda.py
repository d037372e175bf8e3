"""The GPU path on a real CUDA device (marked ``gpu``: deselected by default, skipped without
CUDA). What merge.device promises: the streamed pipeline's output equals the CPU executor's
bit for bit for elementwise methods, is within float32 rounding (and keeps the same entries)
where device reductions sum in another order, is identical run to run, and keeps the device
memory peak near ``--max-vram``. ``GPU_REPORT`` (a path) records, per method, how many output
tensors matched the CPU bit for bit, so a GPU session can say which methods are exact."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_parallel import recipes, shard_bytes, wide  # noqa: F401 (a fixture)

import merge.methods.stream as stream
from support import run_recipe
from tiny import load_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

EXACT = ["linear"]  # float32 elementwise: IEEE operations in the same order
BOUNDED = ["ties", "dare_ties", "della", "breadcrumbs", "model_stock", "sce", "slerp"]
SPARSE = {"ties", "dare_ties", "della", "breadcrumbs", "sce"}


def _record(method: str, same: int, total: int) -> None:
    path = os.environ.get("GPU_REPORT")
    if not path:
        return
    report = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    report[method] = {"bit_identical_tensors": same, "tensors": total}
    Path(path).write_text(json.dumps(report, indent=2))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: Any) -> None:
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 4096)  # many chunks a tensor: overlap


@pytest.mark.parametrize("method", EXACT + BOUNDED)
def test_gpu_matches_cpu(tmp_path: Path, method: str, wide: Any) -> None:  # noqa: F811
    recipe = recipes(*wide)[method]
    cpu = load_state(run_recipe(tmp_path, recipe, "cpu", threads=2))
    gpu = load_state(run_recipe(tmp_path, recipe, "gpu", threads=2, device="cuda"))
    assert cpu.keys() == gpu.keys()
    same = sum(torch.equal(gpu[n], t) for n, t in cpu.items())
    _record(method, same, len(cpu))
    for name, t in cpu.items():
        if method in EXACT:
            assert torch.equal(gpu[name], t), name
        else:
            torch.testing.assert_close(gpu[name], t, rtol=1e-2, atol=1e-3, msg=name)  # bf16
        if method in SPARSE:  # CPU draws and exact integer cuts: the same kept entries
            assert (gpu[name] != t).float().mean() < 0.01, name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp", "model_stock"])
def test_gpu_runs_are_identical_run_to_run(tmp_path: Path, method: str, wide: Any) -> None:  # noqa: F811
    recipe = recipes(*wide)[method]
    a = run_recipe(tmp_path, recipe, "a", threads=3, device="cuda")
    b = run_recipe(tmp_path, recipe, "b", threads=1, device="cuda", max_vram="8MB")
    assert shard_bytes(a) == shard_bytes(b)


def test_device_memory_stays_near_the_budget(tmp_path: Path, wide: Any) -> None:  # noqa: F811
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    budget = 8 * 2**20
    run_recipe(tmp_path, recipes(*wide)["ties"], "t", threads=4, device="cuda", max_vram=budget)
    peak = torch.cuda.max_memory_allocated()
    assert 0 < peak <= 1.5 * budget, peak  # estimates, plus the allocator's rounding
