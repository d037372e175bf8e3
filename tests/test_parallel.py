"""Parallel jobs, the memory budget and ``--device``: same bytes whatever the resources.

The scheduler (``merge.pipeline.run_ordered``) is checked with instrumented jobs (order of
hand-over, bytes in flight, a job over the budget alone, errors); the schedule's worst case
(``merge.memory.scheduled_peak``) against a brute-force replay written here; and whole merges
for bit-identical shards across ``--threads``, ``--max-memory`` and the process's own torch
thread count, on tiny checkpoints and on wider ones where torch's float reductions do depend on
the number of intra-op threads.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge import api
from merge.cli import app
from merge.errors import CheckpointError, MergeError
from merge.jobs import Input, TensorJob
from merge.memory import job_order, job_peak_bytes, peak_memory, scheduled_peak, streamed
from merge.pipeline import run_jobs
from merge.report import human_bytes
from merge.resources import Resources
from support import run_recipe
from tiny import assert_loads_and_generates, load_state, make_tiny

# --- the scheduler ----------------------------------------------------------------------------


class Tracker:
    """Jobs that sleep a little and record what ran at the same time."""

    def __init__(self, peaks: list[int], delays: list[float]) -> None:
        self.peaks, self.delays = peaks, delays
        self.lock = threading.Lock()
        self.running: set[int] = set()
        self.max_bytes = 0
        self.overlaps: dict[int, set[int]] = {i: set() for i in range(len(peaks))}
        self.started: list[int] = []

    def work(self, i: int) -> None:
        with self.lock:
            self.started.append(i)
            for j in self.running:
                self.overlaps[i].add(j)
                self.overlaps[j].add(i)
            self.running.add(i)
            self.max_bytes = max(self.max_bytes, sum(self.peaks[j] for j in self.running))
        time.sleep(self.delays[i])
        with self.lock:
            self.running.discard(i)


def test_jobs_start_in_the_given_order_and_overlap() -> None:
    t = Tracker([1] * 8, [0.01] * 8)
    order = [7, 3, 0, 1, 2, 4, 5, 6]
    run_jobs(t.work, order, peaks=t.peaks, budget=100, threads=3)
    assert t.started[:3] == [7, 3, 0] and sorted(t.started) == list(range(8))
    assert any(t.overlaps.values())  # several jobs did run at once


def test_budget_bounds_the_bytes_running_and_a_huge_job_runs_alone() -> None:
    peaks = [3, 3, 3, 50, 3, 3, 4, 4]
    t = Tracker(peaks, [0.01] * len(peaks))
    run_jobs(t.work, range(8), peaks=peaks, budget=10, threads=4)
    assert sorted(t.started) == list(range(8))
    assert t.overlaps[3] == set()  # over the budget: alone, and no deadlock
    small = Tracker([3] * 8, [0.01] * 8)
    run_jobs(small.work, range(8), peaks=small.peaks, budget=10, threads=4)
    assert 3 < small.max_bytes <= 9  # three of 3 bytes fit in 10, four do not


def test_threads_one_runs_one_job_at_a_time() -> None:
    t = Tracker([1] * 5, [0.005] * 5)
    run_jobs(t.work, range(5), peaks=t.peaks, budget=100, threads=1)
    assert t.started == list(range(5))
    assert all(not o for o in t.overlaps.values())


def test_a_worker_error_propagates_and_stops_the_rest() -> None:
    started: list[int] = []

    def work(i: int) -> None:
        started.append(i)
        if i == 2:
            raise CheckpointError("model 'a': cannot read tensor 'x': boom")
        time.sleep(0.01)

    with pytest.raises(CheckpointError, match="cannot read tensor 'x'"):
        run_jobs(work, range(50), peaks=[1] * 50, budget=100, threads=2)
    assert max(started) < 10  # submission stops at the error; the rest never ran


def test_job_order_starts_the_most_work_first() -> None:
    def job(name: str, numel: int, inputs: int) -> TensorJob:
        ins = tuple(Input(f"m{k}", name) for k in range(inputs))
        return TensorJob(name, (numel,), torch.float32, ins, None, {}, None)

    jobs = [job("a", 10, 2), job("b", 40, 1), job("c", 5, 3), job("d", 10, 2)]
    assert job_order(jobs) == [1, 0, 3, 2]  # 40, 20, 20 (plan order), 15


# --- the schedule's worst case ----------------------------------------------------------------


def brute_peak(peaks: list[int], budget: int, threads: int) -> int:
    """The admission rule replayed plainly: indices running, oldest leaves first."""
    running: list[int] = []
    worst = 0
    for i, need in enumerate(peaks):
        while running:
            total = sum(peaks[j] for j in running)
            if len(running) < threads and total + need <= budget:
                break
            running.pop(0)
        running.append(i)
        worst = max(worst, sum(peaks[j] for j in running))
    return worst


@pytest.mark.parametrize("seed", range(20))
def test_scheduled_peak_matches_a_replay_and_is_bounded(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 30, (1,), generator=g))
    peaks = torch.randint(1, 100, (n,), generator=g).tolist()
    budget = int(torch.randint(1, 300, (1,), generator=g))
    threads = int(torch.randint(1, 5, (1,), generator=g))
    got = scheduled_peak(peaks, budget, threads)
    assert got == brute_peak(peaks, budget, threads)
    assert max(peaks) <= got <= max(budget, max(peaks))


def test_scheduled_peak_examples() -> None:
    assert scheduled_peak([5, 5, 5], budget=10, threads=4) == 10
    assert scheduled_peak([30, 5], budget=10, threads=4) == 30
    assert scheduled_peak([1, 1, 1, 1, 1], budget=100, threads=1) == 1  # one at a time


def test_job_peak_bytes_is_what_the_plan_reports(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(llama_base),
                "models": [{"model": str(llama_ft1), "parameters": {"weight": 1, "density": 0.5}}],
            }
        )
    )
    p = api.plan(recipe)
    per_job = [job_peak_bytes(j, p.models, p.method) for j in p.jobs]
    assert p.peak_bytes == max(per_job) == peak_memory(p.jobs, p.models, p.method)
    mlp = next(j for j in p.jobs if j.name.endswith("layers.0.mlp.up_proj.weight"))
    # streamed from the memory maps: one chunk (here the whole small tensor) of the two float32
    # inputs, the method's buffers and the float32 output chunk; nothing stored is held
    assert streamed(mlp, p.models, p.method)
    per_model, fixed = p.method.workspace
    want = 4 * mlp.numel * (2 + per_model + fixed + 1) + 4 * mlp.numel
    assert job_peak_bytes(mlp, p.models, p.method) == int(want)
    # the l1 rescale keeps one bit an entry of each model's keep mask until the merge pass
    for rescale, bits in ((True, 1), ("l1", 1), ("inverse_density", 0), (False, 0)):
        l1 = replace(mlp, params={**mlp.params, "rescale": rescale})
        kept = -(-mlp.numel * bits // 8)
        assert job_peak_bytes(l1, p.models, p.method) == int(want) + kept, rescale


# --- whole merges: the same bytes whatever the resources --------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A base and two fine-tunes with 256x512 MLP matrices: large enough that torch splits
    a float sum across intra-op threads (and so rounds differently for 1 and 4 threads)."""
    root = tmp_path_factory.mktemp("wide")
    base = make_tiny(root / "base", hidden=256, layers=1, seed=11)
    ft1 = make_tiny(root / "ft1", noise_from=base, seed=12)
    ft2 = make_tiny(root / "ft2", noise_from=base, seed=13)
    return base, ft1, ft2


def recipes(base: Path, ft1: Path, ft2: Path) -> dict[str, dict[str, Any]]:
    def fts(**params: Any) -> list[dict[str, Any]]:
        return [{"model": str(m), "parameters": dict(params)} for m in (ft1, ft2)]

    with_base = {"base_model": str(base)}
    return {
        "linear": {"merge_method": "linear", "models": fts(weight=0.5)},
        "ties": {"merge_method": "ties", **with_base, "models": fts(weight=0.6, density=0.4)},
        "dare_ties": {
            "merge_method": "dare_ties",
            **with_base,
            "models": fts(weight=0.6, density=0.5),
        },
        "della": {
            "merge_method": "della",
            **with_base,
            "models": fts(weight=0.5, density=0.5, epsilon=0.1),
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            **with_base,
            "models": fts(weight=0.5, density=0.8, gamma=0.05),
        },
        "model_stock": {"merge_method": "model_stock", **with_base, "models": fts()},
        "sce": {
            "merge_method": "sce",
            **with_base,
            "models": fts(),
            "parameters": {"select_topk": 0.5},
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            **with_base,
            "models": fts(),
            "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 1.0},
        },
        "slerp": {
            "merge_method": "slerp",
            **with_base,
            "models": [{"model": str(base)}, {"model": str(ft1)}],
            "parameters": {"t": 0.3},
        },
    }


def shard_bytes(out: Path) -> dict[str, str]:
    """Each shard's SHA-256: equal digests, equal bytes."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.safetensors")}


@pytest.fixture
def ambient_threads() -> Any:
    """Set torch's process-wide intra-op threads (as another machine or caller would)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", list(recipes(Path(), Path(), Path())))
def test_bit_identical_across_threads_and_budgets(
    tmp_path: Path,
    method: str,
    wide: tuple[Path, Path, Path],
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
    ambient_threads: Any,
) -> None:
    for name, models in (("wide", wide), ("tiny", (llama_base, llama_ft1, llama_ft2))):
        recipe = recipes(*models)[method]
        ambient_threads(1)
        first = run_recipe(tmp_path, recipe, f"{name}-t1", threads=1)
        ambient_threads(4)
        runs = [
            run_recipe(tmp_path, recipe, f"{name}-t4", threads=4),
            run_recipe(tmp_path, recipe, f"{name}-tiny-budget", threads=3, max_memory=1),
            run_recipe(tmp_path, recipe, f"{name}-t2-cpu-mover", threads=2, device="cpu"),
        ]
        want = shard_bytes(first)
        assert want
        for out in runs:
            assert shard_bytes(out) == want, f"{method} {out.name}"
    assert_loads_and_generates(first)


def test_global_trim_is_identical_in_parallel(
    tmp_path: Path, wide: tuple[Path, Path, Path]
) -> None:
    """trim: global takes its equal-to-threshold quota in plan order, whatever the threads."""
    base, ft1, ft2 = wide
    recipe = recipes(base, ft1, ft2)["ties"]
    recipe = {**recipe, "parameters": {"trim": "global"}}
    outs = [run_recipe(tmp_path, recipe, f"t{n}", threads=n) for n in (1, 4, 2)]
    assert shard_bytes(outs[0]) == shard_bytes(outs[1]) == shard_bytes(outs[2])


def test_device_transfer_path_runs_the_same_math(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    """The mover path (put as stored, convert on the device, back) on torch.device('cpu')."""
    from merge.execute import execute

    recipe = recipes(llama_base, llama_ft1, llama_ft2)["dare_ties"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outs = []
    for dev in (None, torch.device("cpu")):
        out = tmp_path / f"out-{dev}"
        out.mkdir()
        with api.planned(path) as p:
            execute(p, out, progress=False, resources=Resources(2, 10**9, dev))
        outs.append(shard_bytes(out))
    assert outs[0] == outs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "della", "slerp"])
def test_cuda_matches_cpu(tmp_path: Path, method: str, wide: tuple[Path, Path, Path]) -> None:
    recipe = recipes(*wide)[method]
    cpu = load_state(run_recipe(tmp_path, recipe, "cpu", threads=2))
    gpu = load_state(run_recipe(tmp_path, recipe, "gpu", threads=2, device="cuda"))
    assert cpu.keys() == gpu.keys()
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name], t, rtol=1e-5, atol=1e-6, msg=name)
        if method in ("dare_ties", "della"):  # the same CPU draws: the same kept entries
            assert torch.equal(gpu[name] == 0, t == 0), name


# --- errors and options -----------------------------------------------------------------------


def test_worker_error_leaves_nothing_behind(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path, monkeypatch: Any
) -> None:
    import merge.reads as rd

    real = rd.flat_views

    def failing(plan: Any, job: Any) -> Any:
        if job.name.endswith("layers.1.mlp.down_proj.weight"):
            raise CheckpointError(f"model 'm': cannot read tensor '{job.name}': bad bytes")
        return real(plan, job)

    monkeypatch.setattr(rd, "flat_views", failing)
    recipe = recipes(llama_base, llama_ft1, llama_ft2)["ties"]
    with pytest.raises(CheckpointError, match="cannot read tensor 'model.layers.1.mlp.down_proj"):
        run_recipe(tmp_path, recipe, "out", threads=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml"]


def test_interrupt_in_a_worker_keeps_finished_work_for_resume(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, monkeypatch: Any
) -> None:
    import merge.execute as ex

    real = ex._stream_job

    def interrupted(plan: Any, job: Any, *args: Any, **kwargs: Any) -> None:
        if job.name.endswith("layers.1.self_attn.q_proj.weight"):
            raise KeyboardInterrupt
        real(plan, job, *args, **kwargs)

    monkeypatch.setattr(ex, "_stream_job", interrupted)
    recipe = recipes(llama_base, llama_ft1, llama_ft1)["linear"]
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        run_recipe(tmp_path, recipe, "out", threads=2)
    # no output, only the partial one an interrupt keeps for --resume (merge.resume)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "out.yaml"]
    assert (tmp_path / ".out.partial" / "merge-journal.jsonl").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "error: --threads must be at least 1, got 0"),
        (["--max-memory", "lots"], "error: --max-memory must be a size like 5GB or 500MB"),
        (["--device", "tpu"], "error: --device must be cpu or cuda (or cuda:N), got 'tpu'"),
    ],
)
def test_bad_options(tmp_path: Path, llama_base: Path, args: list[str], message: str) -> None:
    recipe = tmp_path / "r.yaml"
    models = [{"model": str(llama_base), "parameters": {"weight": 1}}]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    result = CliRunner().invoke(app, ["run", str(recipe), str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith(message)
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(tmp_path: Path, llama_base: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "x"}]}))
    result = CliRunner().invoke(app, ["run", str(recipe), str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output == "error: --device cuda: CUDA is not available here; use --device cpu\n"
    with pytest.raises(MergeError):
        Resources.resolve(device="cuda")


def test_plan_shows_the_budget_and_warns_about_tensors_over_it(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipes(llama_base, llama_ft1, llama_ft1)["ties"]))
    with api.planned(recipe) as p:
        embed = next(j for j in p.jobs if j.name == "model.embed_tokens.weight")
        need = job_peak_bytes(embed, p.models, p.method)
        smaller = sum(job_peak_bytes(j, p.models, p.method) > need // 2 for j in p.jobs)
    budget = need // 2
    runner = CliRunner()
    result = runner.invoke(
        app, ["plan", str(recipe), "--max-memory", str(budget), "--threads", "2"]
    )
    assert result.exit_code == 0, result.output
    assert f"memory budget: {human_bytes(budget)} with 2 threads: expected peak" in result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert "tensor 'model.embed_tokens.weight' needs about" in warning
    assert "it runs alone" in warning
    assert (smaller > 1) == ("more tensor" in warning)
    as_json = runner.invoke(app, ["plan", str(recipe), "--max-memory", str(budget), "--json", "-q"])
    memory = json.loads(as_json.output)["memory"]
    assert memory["budget_bytes"] == budget
    assert {"tensor": "model.embed_tokens.weight", "bytes": need} in memory["over_budget"]
    assert memory["expected_peak_bytes"] >= need
