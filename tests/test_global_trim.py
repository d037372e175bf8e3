"""Global TIES trimming: the streamed radix select keeps exactly the whole-model top-k.

The reference concatenates every task vector of a model in plan order and keeps the ``k``
largest magnitudes with a stable order (earlier entries win exact ties), plainly, in the test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.testing import assert_close

from merge import api
from merge.globaltrim import GlobalTrim, global_jobs
from merge.jobs import Input, TensorJob
from merge.methods.sparsify import threshold_mask
from tiny import assert_loads_and_generates, load_state


def _jobs(shapes: list[tuple[int, ...]], densities: list[float]) -> list[TensorJob]:
    return [
        TensorJob(
            f"t{j}",
            shape,
            torch.float32,
            tuple(Input(f"m{i}", f"t{j}") for i in range(len(densities))),
            Input("base", f"t{j}"),
            {"density": densities, "trim": "global", "weight": [1.0] * len(densities)},
            None,
        )
        for j, shape in enumerate(shapes)
    ]


def _reference_masks(deltas: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top-k of the concatenation, stable: sort by (-|d|, position)."""
    flat = torch.cat([d.reshape(-1) for d in deltas]).abs()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = [], 0
    for d in deltas:
        out.append(keep[start : start + d.numel()].reshape(d.shape))
        start += d.numel()
    return out


def _backwards_on_threads(work: Callable[[int], None], todo: Sequence[TensorJob]) -> None:
    """Run the statistics work last job first, two at a time."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, reversed(range(len(todo)))))


def _run(
    jobs: list[TensorJob], data: dict[str, torch.Tensor], each: Any = None
) -> tuple[GlobalTrim, list[list[torch.Tensor]]]:
    def whole(job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor]:
        assert job.base is not None
        return [data[f"{i.model}.{i.name}"] for i in job.inputs], data[f"base.{job.name}"]

    def read_job(job: TensorJob) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        tensors, base = whole(job)  # in three uneven chunks, as the executor streams them
        cuts = [0, job.numel // 3, job.numel // 3 + 1, job.numel]
        for a, b in itertools.pairwise(cuts):
            yield [t.reshape(-1)[a:b] for t in tensors], base.reshape(-1)[a:b]

    trim = GlobalTrim.compute(jobs, read_job, each=each)
    counts = [trim.count_equal(job, read_job) for job in jobs]
    masks: list[list[torch.Tensor]] = []
    for job, params in zip(jobs, trim.allot(jobs, counts), strict=True):
        tensors, base = whole(job)
        masks.append(
            [
                threshold_mask(x - base, t, q)
                for x, t, q in zip(
                    tensors, params["trim_threshold"], params["trim_equal"], strict=True
                )
            ]
        )
    return trim, masks


@pytest.mark.parametrize("each", [None, _backwards_on_threads])
@pytest.mark.parametrize("quantized", [False, True])
def test_streamed_cut_equals_whole_model_topk(quantized: bool, each: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (4, 3, 2), (30,)]
    densities = [0.3, 0.55]
    data: dict[str, torch.Tensor] = {}
    for j, shape in enumerate(shapes):
        data[f"base.t{j}"] = torch.randn(shape, generator=gen)
        for i in range(2):
            delta = torch.randn(shape, generator=gen)
            if quantized:  # many exact ties in magnitude, across tensors and signs
                delta = torch.round(delta * 2) / 2
            data[f"m{i}.t{j}"] = data[f"base.t{j}"] + delta
    jobs = _jobs(shapes, densities)
    trim, masks = _run(jobs, data, each)
    for i, density in enumerate(densities):
        deltas = [data[f"m{i}.t{j}"] - data[f"base.t{j}"] for j in range(len(shapes))]
        k = sum(int(density * d.numel()) for d in deltas)
        want = _reference_masks(deltas, k)
        got = [m[i] for m in masks]
        assert sum(int(g.sum()) for g in got) == k
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
        cut = trim.cuts[f"m{i}"]
        assert 0 <= cut.equal_left <= cut.equal_total


def test_budget_edges_keep_nothing_or_everything() -> None:
    shapes = [(4, 4), (8,)]
    gen = torch.Generator().manual_seed(1)
    data = {
        f"{m}.t{j}": torch.randn(s, generator=gen)
        for m in ("base", "m0", "m1")
        for j, s in enumerate(shapes)
    }
    jobs = _jobs(shapes, [0.01, 1.0])  # int(0.01 * 16) + int(0.01 * 8) == 0
    _, masks = _run(jobs, data)
    assert all(not m[0].any() for m in masks)
    assert all(m[1].all() for m in masks)


def test_only_global_jobs_take_part() -> None:
    jobs = _jobs([(2,), (3,)], [0.5])
    jobs[1].params = {**jobs[1].params, "trim": "local"}
    jobs.append(TensorJob("int", (2,), torch.int64, (Input("m0", "int"),), None, {}, None, True))
    assert [j.name for j in global_jobs(jobs)] == ["t0"]


def _recipe(tmp_path: Path, base: Path, fts: list[Path], trim: str) -> Path:
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft), "parameters": {"weight": w, "density": d}}
            for ft, w, d in zip(fts, [0.6, 0.8], [0.3, 0.5], strict=True)
        ],
        "parameters": {"trim": trim},
    }
    path = tmp_path / f"{trim}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_global_ties_end_to_end_equals_whole_model_computation(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    out = api.run(
        _recipe(tmp_path, llama_base, [llama_ft1, llama_ft2], "global"),
        tmp_path / "out",
        progress=False,
    )
    p = api.plan(_recipe(tmp_path, llama_base, [llama_ft1, llama_ft2], "global"))
    names = [j.name for j in p.jobs if not j.copy]
    b = {k: v.float() for k, v in load_state(llama_base).items()}
    xs = [{k: v.float() for k, v in load_state(d).items()} for d in (llama_ft1, llama_ft2)]
    kept = []
    for x, density in zip(xs, [0.3, 0.5], strict=True):
        deltas = [x[n] - b[n] for n in names]
        k = sum(int(density * d.numel()) for d in deltas)
        flat = torch.cat([d.reshape(-1) for d in deltas]).abs()
        cut = torch.topk(flat, k).values.min()
        assert int((flat == cut).sum()) == 1  # no ties at the cut in float32 random models
        kept.append({n: (d.abs() >= cut) * d for n, d in zip(names, deltas, strict=True)})
    got = load_state(out)
    local = []
    for n in names:
        o = [0.6 * kept[0][n], 0.8 * kept[1][n]]
        positive = (o[0] + o[1]) >= 0
        agree = [torch.where(positive, t > 0, t < 0) for t in o]
        num = o[0] * agree[0] + o[1] * agree[1]
        den = 0.6 * agree[0].float() + 0.8 * agree[1].float()
        den[den == 0] = 1
        want = b[n] + num / den
        assert_close(got[n].float(), want.to(got[n].dtype).float(), msg=n)
        local.append(n)
    assert local
    assert_loads_and_generates(out)
    # per tensor the kept fractions differ from the density: that is what global trim means
    fractions = [float((kept[0][n] != 0).float().mean()) for n in names if kept[0][n].numel() > 64]
    assert max(fractions) - min(fractions) > 0.05


def test_plan_announces_the_statistics_passes(
    tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path
) -> None:
    from merge.report import summary

    trimmed = summary(api.plan(_recipe(tmp_path, llama_base, [llama_ft1, llama_ft2], "global")))
    local = summary(api.plan(_recipe(tmp_path, llama_base, [llama_ft1, llama_ft2], "local")))
    p = api.plan(_recipe(tmp_path, llama_base, [llama_ft1, llama_ft2], "global"))
    n = len([j for j in p.jobs if not j.copy])
    assert trimmed[-1] == (
        f"trim: global over {n} tensors (the whole-model top-k per model: two statistics "
        "passes over the inputs before the merge)"
    )
    assert not any(line.startswith("trim:") for line in local)


def test_ties_refuses_global_trim_without_thresholds() -> None:
    from merge.methods import get_method

    x, b = torch.ones(3), torch.zeros(3)
    params = {"weight": [1.0], "density": [0.5], "normalize": True, "lambda": 1.0}
    params |= {"rescale": False, "int8_mask": False, "trim": "global"}
    with pytest.raises(ValueError, match="needs the thresholds"):
        get_method("ties").fn([x], b, params, None)
