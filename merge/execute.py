"""Run a plan: read each job's inputs, apply the method in float32, cast once, write.

Jobs run one at a time in plan order (the order of the shards), so memory holds one job's
tensors: the bound ``Plan.peak_bytes`` reports. Each random job gets its own generator seeded
from (seed, output tensor name), so results do not depend on order or thread count.

What it does not do yet: parallel jobs and GPU math (the performance issue adds them behind
this same function).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from merge.errors import CheckpointError
from merge.jobs import Plan, TensorJob, tensor_seed
from merge.writer import ShardWriter


def _read(plan: Plan, model: str, name: str) -> torch.Tensor:
    try:
        return plan.models[model].checkpoint.read(name)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt file that passed header checks
        raise CheckpointError(f"model '{model}': cannot read tensor '{name}': {e}") from None


def run_job(plan: Plan, job: TensorJob) -> torch.Tensor:
    """The output tensor of one job, in its output dtype."""
    if job.copy:
        return _read(plan, job.inputs[0].model, job.inputs[0].name).to(job.dtype)
    tensors = [_read(plan, i.model, i.name).to(torch.float32) for i in job.inputs]
    base = _read(plan, job.base.model, job.base.name).to(torch.float32) if job.base else None
    rng = None
    if plan.method.random:
        rng = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name))
    out = plan.method.fn(tensors, base, job.params, rng)
    if tuple(out.shape) != job.shape:  # a method bug, not a user error
        raise RuntimeError(
            f"{plan.method.name} returned shape {tuple(out.shape)} for "
            f"'{job.name}', expected {job.shape}"
        )
    return out.to(job.dtype)


def execute(plan: Plan, directory: Path, *, progress: bool = True) -> None:
    """Write every output tensor of ``plan`` as safetensors shards into ``directory``."""
    metadata = {"format": "pt", "merged_with": "merge", "merge_method": plan.method.name}
    show = progress and sys.stderr.isatty()
    bar = tqdm(
        total=plan.shards.total_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=not show,
        file=sys.stderr,
    )
    with ShardWriter(directory, plan.shards, metadata) as writer, bar:
        for job in plan.jobs:
            writer.write(job.name, run_job(plan, job))
            bar.update(job.numel * job.dtype.itemsize)
