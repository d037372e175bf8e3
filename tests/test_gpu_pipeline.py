"""The GPU path's scheduling on CPU tensors (merge.device): the chunk pipeline on the
simulated backend, whose copies run late unless waited for, so a missing wait changes the
result; the order of its operations (overlap, buffer reuse); the --max-vram admission and
estimate; and the executor's device path writing the same bytes as the CPU executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_parallel import recipes, shard_bytes
from test_stream import CASES, full_params, tensors
from typer.testing import CliRunner

import merge.methods.stream as stream
from merge import api
from merge.cli import app
from merge.device.backend import SimBackend
from merge.device.chunks import device_merge_chunks
from merge.device.vram import placement, vram_plan
from merge.execute import execute
from merge.methods import get_method
from merge.pipeline import run_jobs
from merge.resources import Resources
from support import cpu_and_device_bytes


def streams(name: str, params: dict[str, Any]) -> tuple[Any, list[torch.Tensor], Any]:
    """A fresh ``Streamed`` of method ``name`` and its bf16 inputs (the base last)."""
    method = get_method(name)
    xs, base = tensors(3, 1 if name == "slerp" else 3)
    xs, base = [x.bfloat16() for x in xs], base.bfloat16()
    inputs = [base, *xs] if method.base == "input" else xs
    full = full_params(name, params, len(inputs))
    rng = torch.Generator().manual_seed(11) if method.random else None
    assert method.stream is not None
    state = method.stream(full, tuple(xs[0].shape), rng)
    has_base = method.base != "input"
    return (
        state,
        [t.reshape(-1) for t in inputs] + ([base.reshape(-1)] if has_base else []),
        has_base,
    )


def on_cpu(name: str, params: dict[str, Any]) -> torch.Tensor:
    state, flats, has_base = streams(name, params)
    n = len(flats) - has_base
    out = torch.empty(flats[0].numel(), dtype=torch.bfloat16)

    def read(a: int, b: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        xs = [f[a:b] if state.stored_inputs else f[a:b].float() for f in flats[:n]]
        return xs, flats[n][a:b].float() if has_base else None

    def emit(a: int, chunk: torch.Tensor) -> None:
        out[a : a + chunk.numel()] = chunk.to(torch.bfloat16)

    stream.merge_chunks(state, out.numel(), read, emit)
    return out


def on_device(name: str, params: dict[str, Any], backend: SimBackend) -> torch.Tensor:
    state, flats, has_base = streams(name, params)
    out = torch.full((flats[0].numel(),), float("nan"), dtype=torch.bfloat16)

    def emit(a: int, chunk: torch.Tensor) -> None:
        out[a : a + chunk.numel()] = chunk

    device_merge_chunks(
        state,
        out.numel(),
        lambda a, b: [f[a:b].clone() for f in flats],
        [f.dtype for f in flats],
        has_base,
        torch.bfloat16,
        lambda c: c.to(torch.bfloat16),
        emit,
        backend,
    )
    return out


@pytest.mark.parametrize(("name", "params", "exact"), CASES)
def test_the_pipeline_gives_the_cpu_bytes_for_every_streamed_method(
    name: str, params: dict[str, Any], exact: bool, monkeypatch: Any
) -> None:
    for size in (7, 64, 10_000):  # many chunks with passes, and one chunk
        monkeypatch.setattr(stream, "CHUNK_ELEMENTS", size)
        assert torch.equal(on_device(name, params, SimBackend()), on_cpu(name, params)), size


def log_of(name: str, params: dict[str, Any], monkeypatch: Any) -> list[str]:
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)  # 407 entries: 7 chunks a pass
    backend = SimBackend()
    on_device(name, params, backend)
    return backend.log


def test_the_next_chunk_is_copied_while_this_one_computes(monkeypatch: Any) -> None:
    log = log_of("ties", {"density": [0.3, 0.5, 0.71]}, monkeypatch)
    steps = sum(1 for e in log if e.startswith("compute "))
    assert steps == 3 * 7  # two statistics passes and the apply pass
    for i in range(steps - 1):
        issued = log.index(f"issue h2d {i + 1} slot {(i + 1) % 2} in 0")
        assert issued < log.index(f"compute {i}")  # issued before this compute starts
        assert log.index(f"run h2d {i + 1} slot {(i + 1) % 2} in 0") > log.index(f"compute {i}")


def test_no_buffer_is_overwritten_before_its_reader_is_done(monkeypatch: Any) -> None:
    log = log_of("dare_ties", {"density": [0.3, 0.5, 0.7]}, monkeypatch)
    steps = sum(1 for e in log if e.startswith("compute "))
    for i in range(2, steps):
        copy = log.index(f"issue h2d {i} slot {i % 2} in 0")
        assert log.index(f"host copied {i - 2}") < copy  # pinned staging slot free
        assert log.index(f"wait copy computed {i - 2}") < copy  # device slot free
        assert log.index(f"wait compute copied {i}") < log.index(f"compute {i}")
    applies = [i for i in range(steps) if f"d2h {i} slot {i % 2}" in " ".join(log)]
    for i in applies:
        assert log.index(f"wait copy computed {i}") < log.index(f"issue d2h {i} slot {i % 2}")
        assert log.index(f"host returned {i}") < log.index(f"emit {i}")
        if i + 2 in applies:  # an output slot is reused only after its chunk was emitted
            assert log.index(f"emit {i}") < log.index(f"issue d2h {i + 2} slot {i % 2}")


class NoComputeWait(SimBackend):
    def wait(self, stream: Any, event: Any) -> None:
        if stream is not self.compute:
            super().wait(stream, event)


class NoHostWait(SimBackend):
    def host_wait(self, event: Any) -> None:
        pass


@pytest.mark.parametrize("broken", [NoComputeWait, NoHostWait])
def test_the_simulated_device_catches_a_missing_wait(broken: type, monkeypatch: Any) -> None:
    """Without its waits the schedule reads chunks that have not arrived, or emits output
    that has not come back: the simulation runs copies late, so the bytes differ."""
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 64)
    params = {"weight": [0.7, -0.4, 1.1], "normalize": False, "lambda": 0.9}
    good = on_cpu("task_arithmetic", params)
    assert torch.equal(on_device("task_arithmetic", params, SimBackend()), good)
    got = on_device("task_arithmetic", params, broken())
    assert not torch.equal(got, good)


# --- VRAM admission and estimates ---------------------------------------------------------------


def test_device_budget_bounds_the_device_bytes_running() -> None:
    import threading
    import time

    lock, running, worst = threading.Lock(), {}, [0, 0]
    dev = [60, 0, 50, 50, 0, 30, 120]

    def work(i: int) -> None:
        with lock:
            running[i] = dev[i]
            worst[0] = max(worst[0], sum(running.values()))
            worst[1] = max(worst[1], len(running))
        time.sleep(0.02)
        with lock:
            running.pop(i)

    order = list(range(len(dev)))
    run_jobs(
        work, order, peaks=[1] * 7, budget=10**9, threads=4, device_peaks=dev, device_budget=100
    )
    assert worst[0] <= 120  # within 100, or the 120 job alone
    assert worst[1] >= 2  # host-only jobs are not held back by the device budget


@pytest.fixture
def planned(tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipes(llama_base, llama_ft1, llama_ft2)["ties"]))
    return path


def test_placement_and_the_vram_plan(planned: Path) -> None:
    with api.planned(planned) as p:
        where = [placement(j, p.models, p.method, 10**9) for j in p.jobs]
        assert set(where) <= {"stream", "cpu"} and "stream" in where
        assert all(w == "cpu" for j, w in zip(p.jobs, where, strict=True) if j.copy)
        one = vram_plan(p.jobs, p.models, p.method, "cuda", 10**9, 1)
        four = vram_plan(p.jobs, p.models, p.method, "cuda", 10**9, 4)
        assert 0 < one.peak < four.peak <= 10**9
        assert one.on_device == where.count("stream") and not one.warnings()
        tight = vram_plan(p.jobs, p.models, p.method, "cuda", 1, 4)
        assert tight.peak == one.peak  # streamed jobs run alone, never on the CPU


def test_plan_shows_the_vram_peak_without_a_gpu(planned: Path) -> None:
    got = CliRunner().invoke(app, ["plan", str(planned), "--device", "cuda", "--max-vram", "1GB"])
    assert got.exit_code == 0, got.output
    assert "VRAM budget: 1.00 GB on cuda: expected peak" in got.output.splitlines()[-1]
    js = CliRunner().invoke(
        app, ["plan", str(planned), "--device", "cuda", "--max-vram", "1GB", "--json"]
    )
    assert js.exit_code == 0 and '"vram"' in js.output


def test_plan_default_budget_is_a_fraction_of_free_device_memory(
    planned: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("merge.resources.free_vram", lambda dev: 10 * 10**9)
    got = CliRunner().invoke(app, ["plan", str(planned), "--device", "cuda"])
    assert got.exit_code == 0, got.output
    assert "VRAM budget: 8.00 GB on cuda" in got.output


def test_device_option_errors(planned: Path) -> None:
    runner = CliRunner()
    if not torch.cuda.is_available():
        got = runner.invoke(app, ["plan", str(planned), "--device", "cuda"])
        assert got.exit_code == 2
        assert "CUDA is not available here" in got.output
    got = runner.invoke(app, ["plan", str(planned), "--device", "cuda", "--max-vram", "lots"])
    assert got.exit_code == 2 and "--max-vram" in got.output
    got = runner.invoke(app, ["plan", str(planned), "--device", "tpu", "--max-vram", "1GB"])
    assert got.exit_code == 2 and "--device must be cpu or cuda" in got.output


# --- the executor's device path on the simulated device ---------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "della"])
def test_device_path_writes_the_cpu_bytes(
    tmp_path: Path,
    method: str,
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 96)  # several chunks per tensor
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipes(llama_base, llama_ft1, llama_ft2)[method]))
    cpu, device = cpu_and_device_bytes(path, tmp_path)
    assert cpu == device


def test_whole_jobs_run_on_the_device_when_they_fit_else_on_the_cpu(
    planned: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """Jobs that cannot stream (here: every job, as if none could) move whole to the device
    within --max-vram; the larger ones run on the CPU with a warning; the bytes are the CPU's."""
    import merge.device.vram as vram

    monkeypatch.setattr(vram, "streamed", lambda *a: False)
    with api.planned(planned) as p:
        sizes = sorted(vram.whole_vram_bytes(j, p.models, p.method) for j in p.jobs if not j.copy)
        budget = sizes[len(sizes) // 2]
        where = [placement(j, p.models, p.method, budget) for j in p.jobs]
        assert "whole" in where and where.count("cpu") > sum(j.copy for j in p.jobs)
        plan = vram_plan(p.jobs, p.models, p.method, "cuda", budget, 2)
        assert plan.peak <= budget and "it runs on the CPU (and" in plan.warnings()[0]
        outs = []
        for dev in (None, torch.device("cpu")):
            out = tmp_path / f"whole-{dev}"
            out.mkdir()
            execute(p, out, progress=False, resources=Resources(2, 10**9, dev, vram=budget))
            outs.append(shard_bytes(out))
    assert outs[0] == outs[1]


def test_run_option_errors(planned: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    got = runner.invoke(app, ["run", str(planned), str(tmp_path / "o"), "--max-vram", "lots"])
    assert got.exit_code == 2 and "--max-vram must be a size like 5GB" in got.output
    if not torch.cuda.is_available():
        got = runner.invoke(app, ["run", str(planned), str(tmp_path / "o"), "--device", "cuda"])
        assert got.exit_code == 2 and "CUDA is not available here" in got.output
    assert not (tmp_path / "o").exists()
