"""Run a plan: read each job's inputs, apply the method in float32, cast once, write.

Vocabulary tensors (jobs with ``vocab``: embeddings and lm_head under a tokenizer setting)
get one extra step between reading and the method: every input and the base is moved into the
output vocabulary's rows (``merge.vocab.align``), so methods only ever see equal shapes.

Jobs merged with ``trim: global`` (TIES over the whole model) first go through two statistics
passes (``merge.globaltrim``) that find each model's exact magnitude threshold; each job's
parameters then carry the thresholds.

Jobs run one at a time in plan order (the order of the shards), so memory holds one job's
tensors: the bound ``Plan.peak_bytes`` reports. Each random job gets its own generator seeded
from (seed, output tensor name), so results do not depend on order or thread count.

MoE plans have two more kinds of job: expert copies with ``noise``/``scale`` (seeded by the
output tensor's name) and ``computed`` tensors (the router's gates), which ``execute`` takes
ready-made in ``computed`` (name -> float32 tensor) and only casts.

What it does not do yet: parallel jobs and GPU math (the performance issue adds them behind
this same function).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from merge.errors import CheckpointError
from merge.globaltrim import GlobalTrim, global_jobs
from merge.jobs import Plan, TensorJob, tensor_seed
from merge.vocab import align
from merge.writer import ShardWriter


def _read(plan: Plan, model: str, name: str) -> torch.Tensor:
    try:
        return plan.models[model].checkpoint.read(name)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt file that passed header checks
        raise CheckpointError(f"model '{model}': cannot read tensor '{name}': {e}") from None


# --- vocabulary alignment (embeddings, lm_head; see merge.vocab) ------------------------------


def _align_vocab(
    plan: Plan, job: TensorJob, tensors: list[torch.Tensor], base: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Move the inputs and the base into the output vocabulary's rows (reading the rows that
    overrides take from models outside the job), before the method sees them."""
    assert job.vocab is not None
    by_model = {i.model: t for i, t in zip(job.inputs, tensors, strict=True)}
    if job.base is not None and base is not None:
        by_model[job.base.model] = base
    for extra in job.vocab.extra:
        by_model[extra.model] = _read(plan, extra.model, extra.name).to(torch.float32)
    aligned = align(job.vocab.alignment, by_model)
    del by_model
    new_base = aligned[job.base.model] if job.base is not None else None
    return [aligned[i.model] for i in job.inputs], new_base


# --- jobs -------------------------------------------------------------------------------------


def read_inputs(plan: Plan, job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A job's inputs and base as float32, in the output vocabulary for vocabulary tensors."""
    tensors = [_read(plan, i.model, i.name).to(torch.float32) for i in job.inputs]
    base = _read(plan, job.base.model, job.base.name).to(torch.float32) if job.base else None
    if job.vocab is not None:
        tensors, base = _align_vocab(plan, job, tensors, base)
    return tensors, base


def _read_with_base(plan: Plan, job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor]:
    tensors, base = read_inputs(plan, job)
    if base is None:  # the planner gives every trim job a base
        raise RuntimeError(f"'{job.name}': global trim needs a base tensor")
    return tensors, base


def _copy(plan: Plan, job: TensorJob) -> torch.Tensor:
    """A copied tensor, with an MoE expert's noise and scale applied in float32."""
    tensor = _read(plan, job.inputs[0].model, job.inputs[0].name)
    if job.noise == 0.0 and job.scale == 1.0:
        return tensor.to(job.dtype)
    out = tensor.to(torch.float32)
    if job.noise:
        gen = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name))
        out = out + torch.randn(out.shape, generator=gen) * job.noise
    return (out * job.scale).to(job.dtype)


def run_job(
    plan: Plan,
    job: TensorJob,
    trim: GlobalTrim | None = None,
    computed: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The output tensor of one job, in its output dtype. Jobs with global trimming take
    their thresholds from ``trim`` and must come in plan order; ``computed`` jobs take their
    tensor from ``computed``."""
    if job.computed is not None:
        if computed is None or job.name not in computed:
            raise RuntimeError(f"'{job.name}': computed tensor was not provided")
        return computed[job.name].to(job.dtype)
    if job.copy:
        return _copy(plan, job)
    tensors, base = read_inputs(plan, job)
    params = job.params
    if trim is not None and base is not None and job.params.get("trim") == "global":
        params = trim.job_params(job, tensors, base)
    rng = None
    if plan.method.random:
        rng = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name))
    out = plan.method.fn(tensors, base, params, rng)
    if tuple(out.shape) != job.shape:  # a method bug, not a user error
        raise RuntimeError(
            f"{plan.method.name} returned shape {tuple(out.shape)} for "
            f"'{job.name}', expected {job.shape}"
        )
    return out.to(job.dtype)


def _trim_pass(plan: Plan, show: bool) -> GlobalTrim | None:
    jobs = global_jobs(plan.jobs)
    if not jobs:
        return None
    bars: list[tqdm] = []

    def step(desc: str) -> Callable[[TensorJob], None]:
        bar = tqdm(total=len(jobs), desc=desc, unit="tensor", disable=not show, file=sys.stderr)
        bars.append(bar)
        return lambda job: bar.update(1)

    try:
        return GlobalTrim.compute(jobs, lambda j: _read_with_base(plan, j), step)
    finally:
        for bar in bars:
            bar.close()


def execute(
    plan: Plan,
    directory: Path,
    *,
    progress: bool = True,
    computed: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write every output tensor of ``plan`` as safetensors shards into ``directory``
    (``computed``: the tensors of the plan's computed jobs, by name)."""
    metadata = {"format": "pt", "merged_with": "merge", "merge_method": plan.method.name}
    show = progress and sys.stderr.isatty()
    trim = _trim_pass(plan, show)
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
            writer.write(job.name, run_job(plan, job, trim, computed))
            bar.update(job.numel * job.dtype.itemsize)
